"""Eigen Attention: low-rank bases from calibration data, folded into attention weights.

- ``config``: :class:`EigenConfig` (target ratio, error budget or ranks, basis, allotment, RoPE mode;
  ``EigenConfig.method("paper")`` for the paper's method).
- ``families``: which attention modules a model has and how to replace them.
- ``calibrate``: streamed float64 Gram matrices of queries, keys and values (and loss gradients).
- ``basis``: PCA and output-aware bases, and the paper's rank rule.
- ``sensitivity``: the output error and predicted loss of truncated bases.
- ``allot``: ranks per layer (error budget, or a target ratio met within 0.005: uniform,
  the paper's budget rule, or a measured Fisher sensitivity).
- ``attention``: rank-space attention modules for the Llama family, OPT and MPT.
- ``plan``: :class:`EigenPlan` (saved as safetensors + sealed JSON).
- ``signature``: which model a plan belongs to (exact weight digests, any dtype).
- ``build``: :func:`compress_model` and :func:`apply_plan`.
- ``components``: :func:`prepare_components` (scale, rotate or split the cached components
  before quantizing them; folded into the plan).
- ``budget``: the byte allotment: ranks and bits chosen together per layer and kind for a KV
  budget in bytes, from measured sensitivities (``BudgetConfig``, ``measure_sensitivity``,
  ``allot_bytes``; ``eigenkv.pipeline.recipes_for_budget`` turns its choice into recipes).
"""

from eigenkv.compress.build import apply_plan, compress_model, is_compressed
from eigenkv.compress.components import ComponentQuantConfig, prepare_components
from eigenkv.compress.config import EigenConfig
from eigenkv.compress.plan import EigenPlan

__all__ = [
    "ComponentQuantConfig",
    "EigenConfig",
    "EigenPlan",
    "apply_plan",
    "compress_model",
    "is_compressed",
    "prepare_components",
]
