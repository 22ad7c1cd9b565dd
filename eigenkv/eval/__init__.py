"""Evaluation: offline models and text, perplexity, and KV-cache accounting."""

from eigenkv.eval.data import TokenWindows, load_text, load_windows, tokenize_windows
from eigenkv.eval.kv_memory import (
    AttentionShape,
    DenseStorage,
    KVBytes,
    KVLayout,
    LayerKV,
    cache_tensor_bytes,
    kv_cache_bytes,
)
from eigenkv.eval.models import DEFAULT_MODEL, load_model
from eigenkv.eval.perplexity import PerplexityResult, perplexity

__all__ = [
    "DEFAULT_MODEL",
    "AttentionShape",
    "DenseStorage",
    "KVBytes",
    "KVLayout",
    "LayerKV",
    "PerplexityResult",
    "TokenWindows",
    "cache_tensor_bytes",
    "kv_cache_bytes",
    "load_model",
    "load_text",
    "load_windows",
    "perplexity",
    "tokenize_windows",
]
