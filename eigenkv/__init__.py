"""eigenkv: KV-cache compression for Hugging Face LLMs.

Eigen Attention (attention in a low-rank space found on calibration data)
composed with group-wise integer quantization of the cache, with Triton
kernels that attend directly on the packed cache.

    compressed = eigenkv.apply_recipe(model, eigenkv.Recipe(lowrank=..., kv=...), calibration)

Layers, bottom up: ``eigenkv.kernels`` and the numerics of ``eigenkv.quant``;
``eigenkv.data``, ``eigenkv.models``, ``eigenkv.memory`` (text, models, byte
accounting); the quantized cache and attention routing (``eigenkv.quant``);
the low-rank method (``eigenkv.compress``); the recipe and its pipeline
(``eigenkv.recipe``, ``eigenkv.pipeline``); evaluation (``eigenkv.eval``) and
the CLI on top.
"""

from eigenkv.compress import ComponentQuantConfig, EigenConfig, EigenPlan, compress_model
from eigenkv.data import TokenWindows, load_text, load_windows
from eigenkv.eval import PerplexityResult, perplexity
from eigenkv.memory import KVLayout, kv_cache_bytes
from eigenkv.models import load_model
from eigenkv.pipeline import CompressedModel, apply_recipe, from_pretrained, load_compressed
from eigenkv.quant import KVQuantConfig, LayerwiseKVQuantConfig
from eigenkv.recipe import Recipe

__version__ = "0.2.0"

__all__ = [
    "ComponentQuantConfig",
    "CompressedModel",
    "EigenConfig",
    "EigenPlan",
    "KVLayout",
    "KVQuantConfig",
    "LayerwiseKVQuantConfig",
    "PerplexityResult",
    "Recipe",
    "TokenWindows",
    "apply_recipe",
    "compress_model",
    "from_pretrained",
    "kv_cache_bytes",
    "load_compressed",
    "load_model",
    "load_text",
    "load_windows",
    "perplexity",
]
