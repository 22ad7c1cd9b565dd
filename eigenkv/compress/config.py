"""Settings of an Eigen Attention compression, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

ROPE_MODES = ("pre", "post")
ALLOTMENTS = ("uniform", "budget")


@dataclass(frozen=True)
class EigenConfig:
    """How to choose bases and ranks.

    Exactly one of ``target_ratio`` and ``error_budget`` is set.

    Attributes:
        target_ratio: fraction of the KV cache's per-token elements to keep
            (``sum r_k + r_v`` over layers and KV heads over ``2 d_h`` for each),
            met within 0.01 (e.g. 0.6 keeps 0.59-0.61).
        error_budget: the paper's rule instead of a ratio: in every layer,
            lower ``eps`` in steps of ``eps_step`` while the relative error of
            the layer's attention output on calibration windows stays at most
            this (e.g. 0.05).
        allot: how a ``target_ratio`` is spread over layers and keys/values:
            ``"uniform"`` (default) gives every layer and both keys and values
            the same rank; ``"budget"`` finds the single error budget of the
            paper's rule that meets the ratio (every layer then pays the same
            relative output error). On SmolLM2-135M uniform measured better
            (README, Results): a layer's relative output error does not
            predict what its components are worth to perplexity.
        rope_mode: for RoPE models: ``"pre"`` (the paper: a basis of pre-RoPE
            keys folded into ``k_proj``; cached keys are rebuilt and rotated at
            their own positions; queries stay full rank) or ``"post"`` (a joint
            basis of rotated keys and queries per KV head; scores computed in
            rank space). Models without RoPE (OPT, MPT) always fold a joint
            key/query basis per head.
        eps_step: step of the paper's threshold search.
        error_windows: calibration windows whose attention inputs are kept to
            measure each layer's output error (budget allotment and rule).
        rank_multiple: every rank is a multiple of this (1: no rounding; 8 keeps
            fp16 cache rows 16-byte aligned for vector loads).
        min_rank: smallest rank any basis keeps.
    """

    target_ratio: float | None = 0.6
    error_budget: float | None = None
    allot: str = "uniform"
    rope_mode: str = "pre"
    eps_step: float = 0.02
    error_windows: int = 1
    rank_multiple: int = 1
    min_rank: int = 1

    def __post_init__(self):
        if (self.target_ratio is None) == (self.error_budget is None):
            raise ValueError(
                "set exactly one of target_ratio (a KV fraction such as 0.6) and error_budget "
                f"(the paper's per-layer output error, such as 0.05); got {self.target_ratio}, {self.error_budget}"
            )
        if self.target_ratio is not None and not 0 < self.target_ratio <= 1:
            raise ValueError(
                f"target_ratio must be in (0, 1]: the fraction of the KV cache kept; got {self.target_ratio}"
            )
        if self.error_budget is not None and not 0 < self.error_budget < 10:
            raise ValueError(f"error_budget must be a relative error in (0, 10); got {self.error_budget}")
        if self.allot not in ALLOTMENTS:
            raise ValueError(f"allot must be one of {ALLOTMENTS}; got {self.allot!r}")
        if self.rope_mode not in ROPE_MODES:
            raise ValueError(f"rope_mode must be one of {ROPE_MODES}; got {self.rope_mode!r}")
        if not 0 < self.eps_step <= 0.5:
            raise ValueError(f"eps_step must be in (0, 0.5]; got {self.eps_step}")
        for name in ("error_windows", "rank_multiple", "min_rank"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EigenConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown EigenConfig fields {sorted(unknown)}: the plan was written by another version")
        return cls(**data)

    def label(self) -> str:
        """Short name for tables, e.g. ``eigen0.6-pre-budget``."""
        size = f"{self.target_ratio:g}" if self.target_ratio is not None else f"err{self.error_budget:g}"
        allot = self.allot if self.target_ratio is not None else "rule"
        return f"eigen{size}-{self.rope_mode}-{allot}"
