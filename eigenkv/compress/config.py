"""Settings of an Eigen Attention compression, validated on construction."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace

from eigenkv.checks import require_fields, require_int, require_number

ROPE_MODES = ("pre", "post")
ALLOTMENTS = ("uniform", "budget", "fisher")
BASES = ("pca", "output", "output-rope")
# Named presets: the paper's method (Figure 3 reproduction) and the library's best measured one.
METHODS = {"paper": {"basis": "pca", "allot": "uniform"}, "eigenkv": {"basis": "output", "allot": "fisher"}}


@dataclass(frozen=True)
class EigenConfig:
    """How to choose bases and ranks.

    Exactly one of ``target_ratio``, ``error_budget`` and ``ranks`` is set. The
    defaults are the library's method (``EigenConfig.method("paper")`` gives the paper's).

    Attributes:
        target_ratio: fraction of the KV cache's per-token elements to keep
            (``sum r_k + r_v`` over layers and KV heads over ``2 d_h`` for each),
            met within 0.005 (e.g. 0.6 keeps 0.595-0.605).
        error_budget: the paper's rule instead of a ratio: in every layer,
            lower ``eps`` in steps of ``eps_step`` while the relative error of
            the layer's attention output on calibration windows stays at most
            this (e.g. 0.05).
        ranks: the ranks themselves, per layer ``(r_k, r_v)`` (e.g. chosen with the bit widths for a byte
            budget by ``eigenkv.compress.budget``); no rank allotment runs.
        basis: ``"output"`` (default): errors weighted by what reads them (the
            output projection for values, the queries for keys), an oblique
            projection folded into the weights; ``"pca"``: the paper's
            orthogonal PCA bases; ``"output-rope"``: as ``"output"`` with the
            pre-RoPE query weight averaged over the rotations between queries
            and keys (pre-RoPE mode only). See ``basis.py``.
        allot: how a ``target_ratio`` is spread over layers and keys/values:
            ``"fisher"`` (default) minimises the predicted loss increase
            ``sum_l F_l(r_k) + F_l(r_v)``, each ``F`` measured on calibration
            windows as ``1/2 sum_t (g_t . dy_t)^2 / tokens`` with ``dy`` the
            change of the layer's attention output and ``g`` the gradient of
            the loss with respect to it; ``"uniform"`` gives every layer and
            both keys and values the same rank (the paper's headline
            setting); ``"budget"`` finds the single error budget of the
            paper's rule that meets the ratio.
        rope_mode: for RoPE models: ``"pre"`` (the paper: keys stored before
            RoPE, rebuilt and rotated at their own positions; queries stay
            full rank) or ``"post"`` (keys and queries rotated, then projected
            per KV head; scores in rank space). Models without RoPE (OPT, MPT)
            project after the weights (``"none"``).
        eps_step: step of the paper's threshold search.
        error_windows: calibration windows whose attention inputs (and, for
            ``"fisher"``, loss gradients) are kept to measure each layer's
            output error.
        rank_multiple: every rank is a multiple of this (1: no rounding; 8 keeps
            fp16 cache rows 16-byte aligned for vector loads).
        min_rank: smallest rank any basis keeps.
    """

    target_ratio: float | None = 0.6
    error_budget: float | None = None
    basis: str = "output"
    allot: str = "fisher"
    rope_mode: str = "pre"
    eps_step: float = 0.02
    error_windows: int = 1
    rank_multiple: int = 1
    min_rank: int = 1
    ranks: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        if self.target_ratio is not None:
            require_number("target_ratio", self.target_ratio, 0, 1, low_open=True)
        if self.error_budget is not None:
            require_number("error_budget", self.error_budget, 0, 10, low_open=True, high_open=True)
        require_number("eps_step", self.eps_step, 0, 0.5, low_open=True)
        if self.ranks is not None:
            try:
                ranks = tuple((int_rank(k), int_rank(v)) for k, v in self.ranks)
            except (TypeError, ValueError):
                raise ValueError(
                    f"ranks must list one (key rank, value rank) pair of positive ints per layer; got {self.ranks!r}"
                ) from None
            if not ranks:
                raise ValueError("ranks is empty: give one (key rank, value rank) pair per layer")
            object.__setattr__(self, "ranks", ranks)
        chosen = [self.target_ratio is not None, self.error_budget is not None, self.ranks is not None]
        if sum(chosen) != 1:
            raise ValueError(
                "set exactly one of target_ratio (a KV fraction such as 0.6), error_budget "
                "(the paper's per-layer output error, such as 0.05) and ranks (per layer (r_k, r_v)); got "
                f"{self.target_ratio}, {self.error_budget}, {self.ranks}"
            )
        if self.target_ratio is not None and not 0 < self.target_ratio <= 1:
            raise ValueError(
                f"target_ratio must be in (0, 1]: the fraction of the KV cache kept; got {self.target_ratio}"
            )
        if self.error_budget is not None and not 0 < self.error_budget < 10:
            raise ValueError(f"error_budget must be a relative error in (0, 10); got {self.error_budget}")
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}; got {self.basis!r}")
        if self.allot not in ALLOTMENTS:
            raise ValueError(f"allot must be one of {ALLOTMENTS}; got {self.allot!r}")
        if self.rope_mode not in ROPE_MODES:
            raise ValueError(f"rope_mode must be one of {ROPE_MODES}; got {self.rope_mode!r}")
        if self.basis == "output-rope" and self.rope_mode != "pre":
            raise ValueError("basis 'output-rope' weights pre-RoPE keys; with rope_mode='post' use basis='output'")
        if not 0 < self.eps_step <= 0.5:
            raise ValueError(f"eps_step must be in (0, 0.5]; got {self.eps_step}")
        for name in ("error_windows", "rank_multiple", "min_rank"):
            require_int(name, getattr(self, name), minimum=1)

    @classmethod
    def method(cls, name: str, **overrides) -> EigenConfig:
        """A named preset: ``"paper"`` (PCA bases, uniform ranks) or ``"eigenkv"`` (the defaults)."""
        if name not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}; got {name!r}")
        return cls(**{**METHODS[name], **overrides})

    @property
    def method_name(self) -> str:
        """``"paper"`` for PCA bases (with any allotment of the paper's), else ``"eigenkv"``."""
        return "paper" if self.basis == "pca" and self.allot != "fisher" else "eigenkv"

    def with_ratio(self, ratio: float) -> EigenConfig:
        return replace(self, target_ratio=ratio, error_budget=None, ranks=None)

    def with_ranks(self, ranks) -> EigenConfig:
        """The same bases with these ranks, per layer ``(r_k, r_v)``."""
        return replace(self, target_ratio=None, error_budget=None, ranks=tuple(map(tuple, ranks)))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ranks"] = None if self.ranks is None else [list(r) for r in self.ranks]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> EigenConfig:
        # ``ranks`` came later: configs saved before it read as ratio or error-budget configs
        return cls(**{"ranks": None, **require_fields("EigenConfig", data, cls.__dataclass_fields__)})

    def label(self) -> str:
        """Short name for tables, e.g. ``eigen0.6-pre-uniform`` (PCA), ``eigen0.6-pre-output-fisher``, or
        ``eigen3120r1a2b3c-pre-output-ranks`` for given ranks (their sum and a digest)."""
        if self.ranks is not None:  # the ranks kept in all, and a digest of the ranks themselves (plan folders)
            digest = hashlib.sha256(repr(self.ranks).encode()).hexdigest()[:6]
            size, allot = f"{sum(k + v for k, v in self.ranks)}r{digest}", "ranks"
        else:
            size = f"{self.target_ratio:g}" if self.target_ratio is not None else f"err{self.error_budget:g}"
            allot = self.allot if self.target_ratio is not None else "rule"
        basis = "" if self.basis == "pca" else f"-{self.basis}"
        return f"eigen{size}-{self.rope_mode}{basis}-{allot}"


def int_rank(value) -> int:
    """A rank from a config or JSON (an int >= 1, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"a rank is an int >= 1; got {value!r}")
    return value
