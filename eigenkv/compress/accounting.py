"""KV layout of a compressed model: ``r_k`` and ``r_v`` elements per KV head and token, plus kept bases.

Per layer the cache holds ``(B, H_kv, S, r_k)`` keys and ``(B, H_kv, S, r_v)``
values (dense, or quantized with a ``KVQuantConfig``). Bases folded into the
weights cost nothing extra; those used at run time are counted as fixed bytes:
the pre-RoPE rebuild decoders (``(d, r_k)`` per layer for PCA, per KV head for
output-aware bases) and the post-RoPE key encoders and query decoders
``(H_kv, d, r_k)`` per layer (one set when they are equal, as for PCA).
"""

from __future__ import annotations

import torch
from torch import nn

from eigenkv.compress.attention import EigenAttention
from eigenkv.eval.kv_memory import DenseStorage, KVLayout, LayerKV


def compressed_layout(model: nn.Module, dtype: torch.dtype = torch.float16, quant=None) -> KVLayout:
    """The ``KVLayout`` of a compressed model's cache.

    Args:
        model: compressed in place by ``compress_model`` or ``load_compressed``.
        dtype: element type of a dense cache, of a quantized cache's window, and of the kept bases.
        quant: a ``KVQuantConfig`` (or ``MixedKVQuantConfig``) when the cache is quantized.
    """
    modules = [m for m in model.modules() if isinstance(m, EigenAttention)]
    if not modules:
        raise ValueError("this model is not compressed; use kv_cache_bytes(model) for its dense cache")
    if quant is not None:
        from eigenkv.quant.accounting import stream_storage
        from eigenkv.quant.config import base_config

        if base_config(quant).rotate:
            raise ValueError("rotate=True rotates the head dimension; a compressed cache holds ranks, not heads")
    layers, basis_elements = [], 0
    for module in modules:
        if quant is None:
            keys, values = DenseStorage(module.key_rank, dtype), DenseStorage(module.value_rank, dtype)
        else:
            keys = stream_storage(module.key_rank, quant, "key", module.layer_idx, dtype)
            values = stream_storage(module.value_rank, quant, "value", module.layer_idx, dtype)
        layers.append(LayerKV(module.kv_heads, keys, values))
        for name in ("key_basis", "query_basis"):
            basis = getattr(module, name, None)
            basis_elements += 0 if basis is None else basis.numel()
    fixed = {"bases": basis_elements * dtype.itemsize} if basis_elements else {}
    return KVLayout(layers=tuple(layers), fixed=fixed)
