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
With a ``MixedKVQuantConfig`` each stream is the sum of its segments, each
counted as above at its own width and bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eigenkv.eval.kv_memory import AttentionShape, KVLayout, LayerKV
from eigenkv.quant.config import KVQuantConfig, MixedKVQuantConfig, base_config
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


@dataclass(frozen=True)
class SegmentedStorage:
    """Storage of a stream split into feature segments of different precision (a ``Storage``)."""

    parts: tuple[QuantizedStorage, ...]

    def nbytes(self, tokens: int) -> dict[str, int]:
        total: dict[str, int] = {}
        for part in self.parts:
            for name, n in part.nbytes(tokens).items():
                total[name] = total.get(name, 0) + n
        return total


def stream_storage(
    width: int,
    config: KVQuantConfig | MixedKVQuantConfig,
    kind: str,
    layer: int,
    window_dtype: torch.dtype = torch.float16,
) -> QuantizedStorage | SegmentedStorage:
    """Storage of layer ``layer``'s ``kind`` (``"key"``/``"value"``) stream of ``width`` features."""
    base = base_config(config)
    axis = base.axis_k if kind == "key" else base.axis_v
    if isinstance(config, MixedKVQuantConfig):
        segments = config.segments(layer, kind, width)
        return SegmentedStorage(tuple(QuantizedStorage(n, c, axis, window_dtype) for n, c in segments))
    return QuantizedStorage(width, config, axis, window_dtype)


def quantized_layout(
    shape: AttentionShape, config: KVQuantConfig | MixedKVQuantConfig, window_dtype: torch.dtype = torch.float16
) -> KVLayout:
    """The ``KVLayout`` of a :class:`QuantizedKVCache` on a model of this shape."""
    if isinstance(config, MixedKVQuantConfig) and config.layers != shape.layers:
        raise ValueError(f"the MixedKVQuantConfig describes {config.layers} layers; this model has {shape.layers}")
    layers = tuple(
        LayerKV(
            shape.kv_heads,
            stream_storage(shape.head_dim, config, "key", i, window_dtype),
            stream_storage(shape.head_dim, config, "value", i, window_dtype),
        )
        for i in range(shape.layers)
    )
    fixed = {"rotation": shape.head_dim**2 * 4} if base_config(config).rotate else {}
    return KVLayout(layers=layers, fixed=fixed)
