"""Eigen Attention: low-rank bases from calibration data, folded into attention weights.

- ``config``: :class:`EigenConfig` (target ratio or error budget, basis, allotment, RoPE mode;
  ``EigenConfig.method("paper")`` for the paper's method).
- ``calibrate``: streamed float64 Gram matrices of queries, keys and values (and loss gradients).
- ``basis``: PCA and output-aware bases, and the paper's rank rule.
- ``allot``: ranks per layer (error budget, or a target ratio met within 0.005: uniform,
  the paper's budget rule, or a measured Fisher sensitivity).
- ``attention``: rank-space attention modules for the Llama family, OPT and MPT.
- ``plan``: :func:`compress_model`, :class:`EigenPlan` (saved as safetensors + JSON),
  :func:`load_compressed`.
- ``accounting``: the KV layout of a compressed model, for honest sizes.
- ``components``: :func:`prepare_components` (scale, rotate or split the cached components
  before quantizing them; folded into the plan).
"""

from eigenkv.compress.components import ComponentQuantConfig, prepare_components
from eigenkv.compress.config import EigenConfig
from eigenkv.compress.plan import EigenPlan, apply_plan, compress_model, is_compressed, load_compressed

__all__ = [
    "ComponentQuantConfig",
    "EigenConfig",
    "EigenPlan",
    "apply_plan",
    "compress_model",
    "is_compressed",
    "load_compressed",
    "prepare_components",
]
