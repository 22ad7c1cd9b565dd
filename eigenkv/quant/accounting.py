"""Bytes of a quantized KV cache, computed from its configuration (no cache needed).

Mirrors exactly what :class:`~eigenkv.quant.cache.QuantizedKVCache` holds (a
test compares the two): per KV head and sequence of ``n`` tokens, with
``T_q = quantized_prefix(n)`` quantized tokens (``b`` bits, group ``G``, head size ``D``):

- per token:   codes ``T_q * packed_length(D, b)`` bytes, scales and zeros
  ``T_q * ceil(D / G)`` values each;
- per channel: codes ``T_q / G * packed_length(G, b) * D`` bytes, scales and zeros
  ``T_q / G * D`` values each;
- window:      ``(n - T_q) * D`` values of the model's dtype;

plus, with ``rotate``, one ``D x D`` float32 Hadamard matrix for the whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eigenkv.eval.kv_memory import AttentionShape, KVLayout, LayerKV
from eigenkv.quant.config import KVQuantConfig
from eigenkv.quant.packing import packed_length
from eigenkv.quant.reference import num_groups
from eigenkv.quant.store import quantized_prefix


@dataclass(frozen=True)
class QuantizedStorage:
    """Storage of one KV head's keys or values in a quantized cache (a ``Storage`` for ``KVLayout``)."""

    width: int
    config: KVQuantConfig
    axis: str
    window_dtype: torch.dtype = torch.float16

    def nbytes(self, tokens: int) -> dict[str, int]:
        cfg = self.config
        quantized = quantized_prefix(tokens, self.axis, cfg.group_size, cfg.residual)
        scale_size = cfg.torch_scale_dtype.itemsize
        if self.axis == "token":
            codes = quantized * packed_length(self.width, cfg.bits)
            params = quantized * num_groups(self.width, cfg.group_size)
        else:
            blocks = quantized // cfg.group_size
            codes = blocks * packed_length(cfg.group_size, cfg.bits) * self.width
            params = blocks * self.width
        return {
            "codes": codes,
            "scales": params * scale_size,
            "zeros": 0 if cfg.symmetric else params * scale_size,
            "window": (tokens - quantized) * self.width * self.window_dtype.itemsize,
        }


def quantized_layout(
    shape: AttentionShape, config: KVQuantConfig, window_dtype: torch.dtype = torch.float16
) -> KVLayout:
    """The ``KVLayout`` of a :class:`QuantizedKVCache` on a model of this shape."""
    keys = QuantizedStorage(shape.head_dim, config, config.axis_k, window_dtype)
    values = QuantizedStorage(shape.head_dim, config, config.axis_v, window_dtype)
    fixed = {"rotation": shape.head_dim**2 * 4} if config.rotate else {}
    return KVLayout(layers=tuple(LayerKV(shape.kv_heads, keys, values) for _ in range(shape.layers)), fixed=fixed)
