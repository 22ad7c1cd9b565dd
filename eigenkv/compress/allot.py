"""How many components each layer keeps.

Ranks are uniform within a layer (one ``r_k`` and one ``r_v`` for all its KV
heads), so the cache of a layer is one ``(B, H_kv, S, r)`` tensor per kind and
a kernel tile reads one rank per layer; what varies is keys versus values and
layer versus layer. Three ways to choose them:

- **error budget** (the paper): in every layer, lower ``eps`` from 1 in steps
  of ``eps_step`` while the relative error of the layer's attention output,
  ``||Y - Y^||_F / ||Y||_F`` on kept calibration windows, stays within the
  budget; ``eps`` gives both ranks by the paper's rule
  (:func:`~eigenkv.compress.basis.rank_for_eps`).
- **target ratio, "budget" allotment**: the single error budget whose ranks
  meet the ratio, found by bisection. Every layer then pays the same measured
  output error, so components go to the layers where removing them costs
  most, and keys versus values follow the spectra (a flat value spectrum
  needs more components for the same ``eps``).
- **target ratio, "uniform"**: the same rank for keys and values everywhere
  (the paper's headline setting, e.g. 38 of 64 for 0.6x).

A ratio is then met within ``RATIO_TOLERANCE`` (and as closely as single steps
allow from below) by adding or removing single components (``rank_multiple``
at a time) where the next or last kept component carries the most or least
normalised energy: a small correction after the uniform or measured allotment
has done the real work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from eigenkv.compress.basis import LayerBases, rank_for_eps
from eigenkv.compress.config import EigenConfig

RATIO_TOLERANCE = 0.005


@dataclass(frozen=True)
class LayerSize:
    kv_heads: int
    head_dim: int


def kv_ratio(ranks: list[tuple[int, int]], sizes: list[LayerSize]) -> float:
    """Per-token cache elements kept: ``sum H_kv (r_k + r_v) / sum H_kv 2 d``."""
    kept = sum(s.kv_heads * (rk + rv) for (rk, rv), s in zip(ranks, sizes, strict=True))
    return kept / sum(s.kv_heads * 2 * s.head_dim for s in sizes)


class Allotter:
    """Chooses ranks for every layer from its bases and a measured error function.

    Args:
        bases: per layer.
        sizes: per layer KV heads and head size.
        config: the compression settings.
        error: ``error(layer, r_k, r_v)`` -> relative attention-output error (memoised here).
    """

    def __init__(
        self,
        bases: list[LayerBases],
        sizes: list[LayerSize],
        config: EigenConfig,
        error: Callable[[int, int, int], float],
    ):
        self.bases, self.sizes, self.config = bases, sizes, config
        self._error = error
        self._errors: dict[tuple[int, int, int], float] = {}
        self.budget = config.error_budget  # the budget used (found by bisection for "budget" allotment)
        steps = int(round(1 / config.eps_step))
        self.eps_grid = [1 - i * config.eps_step for i in range(steps) if 1 - i * config.eps_step > 1e-9]

    def error(self, layer: int, r_k: int, r_v: int) -> float:
        key = (layer, r_k, r_v)
        if key not in self._errors:
            self._errors[key] = float(self._error(layer, r_k, r_v))
        return self._errors[key]

    @property
    def evaluations(self) -> int:
        return len(self._errors)

    def _round(self, rank: int, d: int) -> int:
        m = self.config.rank_multiple
        return max(self.config.min_rank, min(d, m * math.ceil(rank / m)))

    def ranks_at_eps(self, layer: int, eps: float) -> tuple[int, int]:
        b, d = self.bases[layer], self.sizes[layer].head_dim
        return self._round(rank_for_eps(b.key_eigenvalues, eps), d), self._round(
            rank_for_eps(b.value_eigenvalues, eps), d
        )

    def for_budget(self, layer: int, budget: float) -> tuple[int, int]:
        """The paper's per-layer search: the lowest ``eps`` on the grid whose error stays within ``budget``."""
        chosen = self.ranks_at_eps(layer, self.eps_grid[0])
        for eps in self.eps_grid[1:]:
            ranks = self.ranks_at_eps(layer, eps)
            if ranks == chosen:
                continue
            if self.error(layer, *ranks) > budget:
                break
            chosen = ranks
        return chosen

    def error_budget(self, budget: float) -> list[tuple[int, int]]:
        return [self.for_budget(layer, budget) for layer in range(len(self.bases))]

    def target(self, ratio: float) -> list[tuple[int, int]]:
        """Ranks meeting ``ratio`` within ``RATIO_TOLERANCE`` (or as close as rank steps allow)."""
        if self.config.allot == "uniform":
            ranks = [(self._round(round(ratio * s.head_dim), s.head_dim),) * 2 for s in self.sizes]
        else:
            ranks = self._budget_for_ratio(ratio)
        return self._adjust(ranks, ratio)

    def _budget_for_ratio(self, ratio: float) -> list[tuple[int, int]]:
        # ratio(budget) falls as the budget grows; grow geometrically past the target, then bisect.
        # Growing from small budgets keeps every layer's walk (and its error measurements) short.
        low, high = 0.0, 1e-3
        ranks_high = self.error_budget(high)
        while kv_ratio(ranks_high, self.sizes) > ratio and high < 4.0:
            low, high = high, high * 1.5
            ranks_high = self.error_budget(high)
        ranks_low = self.error_budget(low)
        for _ in range(25):
            if kv_ratio(ranks_low, self.sizes) - kv_ratio(ranks_high, self.sizes) <= RATIO_TOLERANCE:
                break
            middle = (low + high) / 2
            ranks_middle = self.error_budget(middle)
            if kv_ratio(ranks_middle, self.sizes) > ratio:
                low, ranks_low = middle, ranks_middle
            else:
                high, ranks_high = middle, ranks_middle
        self.budget = high
        return min((ranks_low, ranks_high), key=lambda r: abs(kv_ratio(r, self.sizes) - ratio))

    def _energy(self, layer: int, kind: int, index: int) -> float:
        """Normalised singular value of component ``index`` (0-based) of keys (0) or values (1), max over heads."""
        b = self.bases[layer]
        eig = (b.key_eigenvalues, b.value_eigenvalues)[kind]
        s = eig.clamp_min(0).sqrt()
        return float((s[..., index] / s.sum(-1).clamp_min(1e-300)).max())

    def _adjust(self, ranks: list[tuple[int, int]], ratio: float) -> list[tuple[int, int]]:
        ranks = [list(r) for r in ranks]
        step = self.config.rank_multiple

        def current():
            return kv_ratio([tuple(r) for r in ranks], self.sizes)

        while current() > ratio + RATIO_TOLERANCE:
            units = [
                (self._energy(layer, kind, ranks[layer][kind] - 1), layer, kind)
                for layer in range(len(ranks))
                for kind in (0, 1)
                if ranks[layer][kind] - step >= self.config.min_rank
            ]
            if not units:
                raise ValueError(
                    f"target_ratio {ratio} is below what this model can keep with min_rank={self.config.min_rank} "
                    f"and rank_multiple={step} (at least {current():.4f}); ask for a larger ratio"
                )
            _, layer, kind = min(units)
            ranks[layer][kind] -= step
        while current() < ratio:  # then as close to the target as single steps get
            units = [
                (self._energy(layer, kind, ranks[layer][kind]), layer, kind)
                for layer in range(len(ranks))
                for kind in (0, 1)
                if ranks[layer][kind] + step <= self.sizes[layer].head_dim
            ]
            if not units:
                break
            _, layer, kind = max(units)
            before = current()
            ranks[layer][kind] += step
            if abs(current() - ratio) >= abs(before - ratio):
                ranks[layer][kind] -= step
                break
        return [tuple(r) for r in ranks]


def truncate(bases: LayerBases, r_k: int, r_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept columns: ``(1 or H_kv, d, r_k)`` and ``(H_kv, d, r_v)``."""
    return bases.keys[..., :r_k], bases.values[..., :r_v]
