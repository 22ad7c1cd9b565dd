"""How many components each layer keeps.

Ranks are uniform within a layer (one ``r_k`` and one ``r_v`` for all its KV
heads), so the cache of a layer is one ``(B, H_kv, S, r)`` tensor per kind and
a kernel tile reads one rank per layer; what varies is keys versus values and
layer versus layer. Four ways to choose them:

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
- **target ratio, "fisher"** (the library's default): a predicted loss
  increase per layer and kind, ``F_l^K(r_k)`` with values at full rank and
  ``F_l^V(r_v)`` with keys at full rank, each measured on a grid of ranks
  (:data:`GRID_POINTS` per kind and layer, linearly interpolated between, made
  non-increasing in the rank) as the empirical-Fisher estimate
  ``1/2 sum_t (g_t . (y^_t - y_t))^2 / tokens``: ``y`` the layer's attention
  output on a kept calibration window, ``y^`` the same with the reduced basis,
  ``g`` the gradient of the window's loss with respect to ``y``. Unlike the
  relative output error, this knows what a layer's error costs the next-token
  loss downstream. Ranks minimise ``sum_l F_l^K + F_l^V`` under the ratio:
  for a multiplier ``lam`` every (layer, kind) independently picks the rank
  minimising ``F(r) + lam * H_kv * r``; ``lam`` is bisected to the ratio.
  (Keys and values are treated as independent and layers as additive: the
  docs/results.md, "Eigen Attention alone", checks the predicted against the measured perplexity.)

A ratio is then met within ``RATIO_TOLERANCE`` (and as closely as single steps
allow from below) by adding or removing single components (``rank_multiple``
at a time) where the next or last kept component is worth most or least:
by its predicted loss for ``"fisher"``, else by its normalised singular value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from tqdm.auto import tqdm

from eigenkv.compress.attention import KeptBases
from eigenkv.compress.basis import LayerBases, rank_for_eps
from eigenkv.compress.config import EigenConfig

RATIO_TOLERANCE = 0.005
GRID_POINTS = 16  # sensitivity measurements per (layer, kind); ranks between are interpolated


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
        sensitivity: ``sensitivity(layer, r_k, r_v)`` -> predicted loss increase
            per token (the ``"fisher"`` allotment; memoised here).
    """

    def __init__(
        self,
        bases: list[LayerBases],
        sizes: list[LayerSize],
        config: EigenConfig,
        error: Callable[[int, int, int], float],
        sensitivity: Callable[[int, int, int], float] | None = None,
        progress: bool = False,
    ):
        self.bases, self.sizes, self.config, self.progress = bases, sizes, config, progress
        self._error = error
        self._errors: dict[tuple[int, int, int], float] = {}
        self._sensitivity = sensitivity
        self._curves: list[tuple[list[float], list[float]]] | None = None
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
        return len(self._errors) + (0 if self._curves is None else self.sensitivity_evaluations)

    def curves(self) -> list[tuple[list[float], list[float]]]:
        """Per layer ``(F^K, F^V)``: predicted loss increase at every rank ``0..d`` (index = rank)."""
        if self._curves is None:
            if self._sensitivity is None:
                raise ValueError("the 'fisher' allotment needs a sensitivity function (calibration with gradients)")
            self._curves, self.sensitivity_evaluations = [], 0
            layers = tqdm(self.sizes, desc="sensitivity", unit="layer", disable=not self.progress)
            for layer, size in enumerate(layers):
                d = size.head_dim
                step = max(1, math.ceil(d / GRID_POINTS))
                grid = sorted({self.config.min_rank, *range(step, d, step)})
                pair = []
                for kind in (0, 1):
                    measured = {d: 0.0}
                    for r in grid:
                        measured[r] = float(
                            self._sensitivity(layer, r, d) if kind == 0 else self._sensitivity(layer, d, r)
                        )
                    self.sensitivity_evaluations += len(grid)
                    pair.append(interpolate(measured, d))
                self._curves.append(tuple(pair))
        return self._curves

    def use_curves(self, curves: list[tuple[list[float], list[float]]], evaluations: int) -> None:
        """Reuse curves measured earlier on the same calibration and bases."""
        self._curves, self.sensitivity_evaluations = curves, evaluations

    def predicted(self, ranks: list[tuple[int, int]]) -> float:
        """Predicted increase of the mean next-token loss for ``ranks`` (sum over layers and kinds)."""
        curves = self.curves()
        return sum(curves[layer][0][rk] + curves[layer][1][rv] for layer, (rk, rv) in enumerate(ranks))

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
        if ratio >= 1:
            return [(s.head_dim, s.head_dim) for s in self.sizes]
        if self.config.allot == "uniform":
            ranks = [(self._round(round(ratio * s.head_dim), s.head_dim),) * 2 for s in self.sizes]
        elif self.config.allot == "fisher":
            ranks = self._fisher_for_ratio(ratio)
        else:
            ranks = self._budget_for_ratio(ratio)
        return self._adjust(ranks, ratio)

    def _allowed(self, d: int) -> list[int]:
        return sorted({self._round(r, d) for r in range(1, d + 1)})

    def _fisher_at(self, lam: float) -> list[tuple[int, int]]:
        ranks = []
        for (keys, values), size in zip(self.curves(), self.sizes, strict=True):
            allowed = self._allowed(size.head_dim)
            pick = [min(allowed, key=lambda r, f=f: (f[r] + lam * size.kv_heads * r, -r)) for f in (keys, values)]
            ranks.append(tuple(pick))
        return ranks

    def _fisher_for_ratio(self, ratio: float) -> list[tuple[int, int]]:
        # The kept fraction falls as the price lam of a component grows; bisect lam on a log scale.
        top = max(max(k + v) for k, v in self.curves())
        low, high = 1e-12 * max(top, 1e-30), 2.0 * max(top, 1e-30)
        for _ in range(80):
            middle = math.sqrt(low * high)
            if kv_ratio(self._fisher_at(middle), self.sizes) > ratio:
                low = middle
            else:
                high = middle
        return self._fisher_at(high)

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

    def _worth(self, layer: int, kind: int, low: int, high: int) -> float:
        """What keeping components ``low..high-1`` of keys (0) or values (1) is worth, per cached element.

        ``"fisher"``: the predicted loss they save; otherwise their normalised
        singular values (max over heads).
        """
        if self.config.allot == "fisher":
            curve = self.curves()[layer][kind]
            return (curve[low] - curve[high]) / self.sizes[layer].kv_heads
        b = self.bases[layer]
        eig = (b.key_eigenvalues, b.value_eigenvalues)[kind]
        s = eig.clamp_min(0).sqrt()
        return float((s[..., low:high].sum(-1) / s.sum(-1).clamp_min(1e-300)).max())

    def _adjust(self, ranks: list[tuple[int, int]], ratio: float) -> list[tuple[int, int]]:
        ranks = [list(r) for r in ranks]
        step = self.config.rank_multiple

        def current():
            return kv_ratio([tuple(r) for r in ranks], self.sizes)

        while current() > ratio + RATIO_TOLERANCE:
            units = [
                (self._worth(layer, kind, ranks[layer][kind] - step, ranks[layer][kind]), layer, kind)
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
                (self._worth(layer, kind, ranks[layer][kind], ranks[layer][kind] + step), layer, kind)
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


def interpolate(measured: dict[int, float], d: int, non_increasing: bool = True) -> list[float]:
    """Values at every rank ``0..d`` from measurements at some ranks: linear between them,
    constant below the first, then (``non_increasing``) made non-increasing (a larger rank never
    predicts more loss)."""
    points = sorted(measured)
    curve = []
    for r in range(d + 1):
        if r <= points[0]:
            curve.append(measured[points[0]])
            continue
        hi = next(p for p in points if p >= r)
        lo = max(p for p in points if p <= r)
        t = 0.0 if hi == lo else (r - lo) / (hi - lo)
        curve.append((1 - t) * measured[lo] + t * measured[hi])
    for r in range(d - 1, -1, -1) if non_increasing else ():
        curve[r] = max(curve[r], curve[r + 1])
    return curve


def truncate(bases: LayerBases, r_k: int, r_v: int) -> KeptBases:
    """The kept columns: keys ``(1 or H_kv, d, r_k)``, values ``(H_kv, d, r_v)`` (duals only when they differ)."""
    distinct = bases.key_duals is not bases.keys
    return KeptBases(
        key=bases.keys[..., :r_k],
        value=bases.values[..., :r_v],
        key_dual=bases.key_duals[..., :r_k] if distinct else None,
        value_dual=bases.value_duals[..., :r_v] if bases.value_duals is not bases.values else None,
    )
