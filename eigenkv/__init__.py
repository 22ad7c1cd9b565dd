"""eigenkv: KV-cache compression for Hugging Face LLMs.

Eigen Attention (attention in a low-rank space found on calibration data)
composed with group-wise integer quantization of the cache, with Triton
kernels that attend directly on the packed cache.

Subpackages: ``eigenkv.eval`` (models, text, perplexity, KV accounting),
``eigenkv.quant``, ``eigenkv.compress``, ``eigenkv.kernels``.
"""

from eigenkv.compress import EigenConfig, EigenPlan, compress_model
from eigenkv.data import TokenWindows, load_text, load_windows
from eigenkv.memory import KVLayout, kv_cache_bytes
from eigenkv.models import load_model
from eigenkv.eval import PerplexityResult, perplexity

__version__ = "0.1.0"

__all__ = [
    "EigenConfig",
    "EigenPlan",
    "compress_model",
    "KVLayout",
    "PerplexityResult",
    "TokenWindows",
    "kv_cache_bytes",
    "load_model",
    "load_text",
    "load_windows",
    "perplexity",
]
