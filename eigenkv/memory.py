"""Honest KV-cache accounting: bytes of everything a cache stores, in one place.

A cache is described by a :class:`KVLayout`: for every layer, how many KV heads
it has and how one head's keys and values are stored per token (a *storage*).
``KVLayout.nbytes(seq_len, batch_size)`` sums every component a storage names,
so every reported size comes from one place, and tests compare it with the
bytes a real cache holds (:func:`cache_tensor_bytes`):

- dense caches (:class:`DenseStorage`): ``d_h`` (or a rank) elements per token;
- quantized caches (:class:`QuantizedStorage`), per KV head and sequence of
  ``n`` tokens with ``T_q = quantized_prefix(n)`` quantized tokens (``b`` bits,
  group ``G``, width ``D``, codes stored for ``D' = aligned_width(D)``
  features, ``D`` rounded up to a multiple of 8): codes ``T_q *
  packed_length(D', b)`` bytes; per token ``T_q * ceil(D / G)`` scales and
  zeros, per channel ``T_q / G * D'``; the window ``(n - T_q) * D`` values of the
  model's dtype; plus, when a stream has ``rotate``, one ``D x D`` float32
  Hadamard matrix (one per device, for a model whose rotating layers are
  spread over several devices). Each stream is counted with its own quantizer
  (``stream_config``: a ``LayerwiseKVQuantConfig`` sets one per layer and
  kind); an unquantized stream is ``D`` elements of the window's dtype per token
  (:class:`DenseStorage`). Two-precision streams (``MixedKVQuantConfig``) are
  the sum of their segments, each padded to its own aligned width.
- sliding-window layers (per layer, as transformers builds caches): a dense one
  keeps its last ``W - 1`` tokens (:class:`SlidingStorage`); a quantized one
  stops holding the whole quantized units of the streams of every sliding layer
  before the next query's window (``sliding_dropped``, :class:`LayerSlide`), counted by
  :class:`QuantizedStorage` (and :class:`SlidStorage` for an unquantized stream);
- compressed models (any module exposing ``key_rank``, ``value_rank``,
  ``kv_heads``, ``layer_idx`` and ``runtime_basis_elements()``, as
  ``eigenkv.compress`` attention does): ``r_k``/``r_v`` elements per KV head and
  token, plus the bases kept at run time as fixed bytes.

Sizes are reported in GB of 2^30 bytes, as the paper's Figure 3 does at batch
1 and n = 2048: an fp16 Llama-2-7B cache of 2048 tokens is exactly 1.00 GB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from eigenkv.devices import layer_devices
from eigenkv.quant.config import (
    AnyKVQuantConfig,
    KVQuantConfig,
    MixedKVQuantConfig,
    check_layers,
    layer_segments,
    layer_windows,
    quantized_prefix,
    sliding_dropped,
    sliding_streams,
    stream_config,
)
from eigenkv.quant.packing import aligned_width, packed_length
from eigenkv.quant.reference import num_groups

GB = 2**30


@dataclass(frozen=True)
class AttentionShape:
    """Attention sizes of a decoder: layers, query heads, KV heads, head size."""

    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...] = ()  # per layer: its sliding window (None: full attention); () all full

    @classmethod
    def from_config(cls, config) -> AttentionShape:
        """Read a transformers config (Llama/Mistral/Qwen2 with GQA, OPT, MPT, GPT-2 style names)."""
        config = getattr(config, "get_text_config", lambda: config)()
        layers = getattr(config, "num_hidden_layers", None)
        q_heads = getattr(config, "num_attention_heads", None)
        hidden = getattr(config, "hidden_size", None)
        if layers is None or q_heads is None:
            raise ValueError(
                f"unsupported model config {type(config).__name__}: it names no num_hidden_layers / "
                "num_attention_heads; build a KVLayout by hand for this architecture"
            )
        kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
        head_dim = getattr(config, "head_dim", None) or (hidden // q_heads if hidden else None)
        if head_dim is None:
            raise ValueError(f"{type(config).__name__} names neither head_dim nor hidden_size")
        if q_heads % kv_heads:
            raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
        windows = tuple(layer_windows(config))
        return cls(
            layers=int(layers),
            q_heads=int(q_heads),
            kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            windows=windows if any(windows) else (),
        )

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None


class Storage(Protocol):
    """How one KV head's keys (or values) of one layer are stored."""

    def nbytes(self, tokens: int) -> dict[str, int]:
        """Bytes per component (e.g. ``{"data": ...}``) for one sequence of ``tokens`` tokens."""
        ...


@dataclass(frozen=True)
class DenseStorage:
    """Every token stored as ``width`` elements of ``dtype`` (``width`` = head size, or a rank)."""

    width: int
    dtype: torch.dtype = torch.float16

    def __post_init__(self):
        if self.width < 1:
            raise ValueError(f"width must be >= 1; got {self.width}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"dense caches hold floating-point values; got {self.dtype}")

    def nbytes(self, tokens: int) -> dict[str, int]:
        return {"data": tokens * self.width * self.dtype.itemsize}


@dataclass(frozen=True)
class SlidingStorage:
    """A dense sliding-window layer's storage: after a forward it keeps the last ``window - 1`` tokens
    (transformers' ``DynamicSlidingWindowLayer``)."""

    inner: Storage
    window: int

    def nbytes(self, tokens: int) -> dict[str, int]:
        return self.inner.nbytes(min(tokens, self.window - 1))


def slide(storage: Storage, window: int | None) -> Storage:
    """``storage`` as a layer of this sliding ``window`` keeps it (unchanged for full attention)."""
    return storage if window is None else SlidingStorage(storage, window)


@dataclass(frozen=True)
class LayerKV:
    """One layer's cache: ``kv_heads`` heads, each with its key and value storage."""

    kv_heads: int
    keys: Storage
    values: Storage


@dataclass(frozen=True)
class KVBytes:
    """Bytes a cache holds, by component (``"keys.data"``, ``"values.data"``, ...)."""

    components: dict[str, int]
    seq_len: int
    batch_size: int

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def gb(self) -> float:
        """Total in GB of 2^30 bytes."""
        return self.total / GB

    def fraction_of(self, other: KVBytes) -> float:
        """This size over ``other`` (e.g. over the fp16 cache of the same model)."""
        return self.total / other.total

    def to_dict(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "bytes": self.total,
            "gb": self.gb,
            "components": dict(self.components),
        }


@dataclass(frozen=True)
class KVLayout:
    """Per-layer storage of a KV cache, plus fixed bytes that do not grow with tokens."""

    layers: tuple[LayerKV, ...]
    fixed: dict[str, int] = field(default_factory=dict)

    @classmethod
    def dense(cls, shape: AttentionShape, dtype: torch.dtype = torch.float16) -> KVLayout:
        """The uncompressed cache of transformers' DynamicCache: ``d_h`` elements per head and token."""
        storage = DenseStorage(shape.head_dim, dtype)
        layers = (slide(storage, shape.window(i)) for i in range(shape.layers))
        return cls(layers=tuple(LayerKV(shape.kv_heads, s, s) for s in layers))

    def nbytes(self, seq_len: int = 2048, batch_size: int = 1) -> KVBytes:
        """Bytes held for ``batch_size`` sequences of ``seq_len`` tokens each."""
        if seq_len < 0 or batch_size < 1:
            raise ValueError(f"need seq_len >= 0 and batch_size >= 1; got {seq_len}, {batch_size}")
        components: dict[str, int] = {}
        for layer in self.layers:
            for kind, storage in (("keys", layer.keys), ("values", layer.values)):
                for name, nbytes in storage.nbytes(seq_len).items():
                    key = f"{kind}.{name}"
                    components[key] = components.get(key, 0) + nbytes * layer.kv_heads * batch_size
        components.update(self.fixed)
        return KVBytes(components=components, seq_len=seq_len, batch_size=batch_size)


def kv_cache_bytes(
    model_or_config,
    seq_len: int = 2048,
    batch_size: int = 1,
    dtype: torch.dtype | None = None,
    quant=None,
) -> KVBytes:
    """Bytes of the KV cache for ``batch_size`` sequences of ``seq_len`` tokens.

    Args:
        model_or_config: a ``KVLayout``, or a model / transformers config; a
            model compressed by ``eigenkv.compress`` is counted at its ranks
            (plus the bases it keeps at run time).
        seq_len: tokens per sequence (the paper reports n = 2048).
        batch_size: sequences (the paper reports batch 1).
        dtype: element type of the cache, or of a quantized cache's
            full-precision window (default float16, as the paper counts); not
            allowed with a ``KVLayout``, which carries its own.
        quant: a ``KVQuantConfig`` (or ``MixedKVQuantConfig``, ``LayerwiseKVQuantConfig``) for a quantized
            cache (codes, scales, zero points, window; unquantized streams as ``data``); None for an
            uncompressed one.

    Returns:
        ``KVBytes``; ``.total`` in bytes, ``.gb`` in units of 2^30 bytes.
    """
    if isinstance(model_or_config, KVLayout):
        if dtype is not None or quant is not None:
            raise ValueError("a KVLayout carries its own storage; do not pass dtype or quant with it")
        return model_or_config.nbytes(seq_len, batch_size)
    if isinstance(model_or_config, torch.nn.Module) and rank_space_modules(model_or_config):
        return compressed_layout(model_or_config, dtype or torch.float16, quant).nbytes(seq_len, batch_size)
    config = getattr(model_or_config, "config", model_or_config)
    shape = AttentionShape.from_config(config)
    if quant is None:
        layout = KVLayout.dense(shape, dtype or torch.float16)
    else:
        devices = layer_devices(model_or_config) if isinstance(model_or_config, torch.nn.Module) else None
        layout = quantized_layout(shape, quant, dtype or torch.float16, devices)
    return layout.nbytes(seq_len, batch_size)


@dataclass(frozen=True)
class LayerSlide:
    """A sliding-window layer of a quantized cache: its ``window``, and the ``(quantizer, kind)`` of the streams
    of every sliding layer (``sliding_streams``; None: unquantized), which together say how many first tokens
    every stream of those layers no longer holds."""

    window: int
    streams: tuple[tuple[KVQuantConfig | None, str], ...]

    def dropped(self, tokens: int) -> int:
        """First tokens no longer held once ``tokens`` were appended (:func:`sliding_dropped`)."""
        return sliding_dropped(tokens, self.window, self.streams)


@dataclass(frozen=True)
class QuantizedStorage:
    """Storage of one KV head's keys or values in a quantized cache (a ``Storage`` for ``KVLayout``)."""

    width: int
    config: KVQuantConfig
    axis: str
    window_dtype: torch.dtype = torch.float16
    # a sliding-window layer: its first tokens are dropped; a window alone (int): a layer whose keys and values
    # both follow ``config``
    sliding: LayerSlide | int | None = None

    def __post_init__(self):
        if isinstance(self.sliding, int):
            streams = ((self.config, "key"), (self.config, "value"))
            object.__setattr__(self, "sliding", LayerSlide(self.sliding, streams))

    def nbytes(self, tokens: int) -> dict[str, int]:
        cfg = self.config
        total = quantized_prefix(tokens, self.axis, cfg.group_size, cfg.residual)
        quantized = total - (0 if self.sliding is None else self.sliding.dropped(tokens))
        scale_size = cfg.torch_scale_dtype.itemsize
        codes = quantized * packed_length(aligned_width(self.width), cfg.bits)  # the padding codes count
        if self.axis == "token":
            params = quantized * num_groups(self.width, cfg.group_size)
        else:  # scales and zeros of the padding features too
            params = quantized // cfg.group_size * aligned_width(self.width)
        return {
            "codes": codes,
            "scales": params * scale_size,
            "zeros": 0 if cfg.symmetric else params * scale_size,
            "window": (tokens - total) * self.width * self.window_dtype.itemsize,
        }


@dataclass(frozen=True)
class SlidStorage:
    """An unquantized stream of a quantized cache's sliding-window layer: ``inner`` for the tokens after the
    first ``sliding.dropped(tokens)`` (which its quantized partner decides; a ``Storage``)."""

    inner: DenseStorage
    sliding: LayerSlide

    def nbytes(self, tokens: int) -> dict[str, int]:
        return self.inner.nbytes(tokens - self.sliding.dropped(tokens))


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
    config: AnyKVQuantConfig,
    kind: str,
    layer: int,
    window_dtype: torch.dtype = torch.float16,
    slid: LayerSlide | None = None,
) -> Storage:
    """Storage of layer ``layer``'s ``kind`` (``"key"``/``"value"``) stream of ``width`` features (``slid``: what
    the layer drops when it slides, :func:`sliding_layer`): quantized by its own quantizer (``stream_config``),
    or, when it has none, ``width`` elements of ``window_dtype`` per token."""
    quantizer = stream_config(config, layer, kind)
    if quantizer is None:
        dense = DenseStorage(width, window_dtype)
        return dense if slid is None else SlidStorage(dense, slid)
    axis = quantizer.axis(kind)
    if isinstance(config, MixedKVQuantConfig):
        segments = layer_segments(config, layer, kind, width)
        return SegmentedStorage(tuple(QuantizedStorage(n, c, axis, window_dtype, slid) for n, c in segments))
    return QuantizedStorage(width, quantizer, axis, window_dtype, slid)


def sliding_layer(config: AnyKVQuantConfig, windows, layer: int) -> LayerSlide | None:
    """What layer ``layer`` of a quantized cache drops (None: it attends in full), from the model's ``windows``
    (``layer_windows``)."""
    return None if windows[layer] is None else LayerSlide(windows[layer], sliding_streams(config, windows))


def _rotates(config: AnyKVQuantConfig, layers) -> bool:
    """Whether a stream of one of ``layers`` is Hadamard-rotated."""
    streams = (stream_config(config, i, kind) for i in layers for kind in ("key", "value"))
    return any(c is not None and c.rotate for c in streams)


def quantized_layout(
    shape: AttentionShape,
    config: AnyKVQuantConfig,
    window_dtype: torch.dtype = torch.float16,
    devices: dict[int, torch.device] | None = None,
) -> KVLayout:
    """The ``KVLayout`` of a :class:`QuantizedKVCache` on a model of this shape; ``devices``: each layer's device
    (``eigenkv.devices.layer_devices``), for a model spread over devices, whose cache keeps the Hadamard matrix
    of rotated streams once per device (None: one device)."""
    check_layers(config, shape.layers)
    windows = [shape.window(i) for i in range(shape.layers)]
    layers = tuple(
        LayerKV(
            shape.kv_heads,
            stream_storage(shape.head_dim, config, "key", i, window_dtype, sliding_layer(config, windows, i)),
            stream_storage(shape.head_dim, config, "value", i, window_dtype, sliding_layer(config, windows, i)),
        )
        for i in range(shape.layers)
    )
    # one Hadamard matrix shared by the rotating layers of each device
    rotating = [i for i in range(shape.layers) if _rotates(config, (i,))]
    copies = max(1, len({devices[i] for i in rotating if i in (devices or {})}))
    fixed = {"rotation": copies * shape.head_dim**2 * 4} if rotating else {}
    return KVLayout(layers=layers, fixed=fixed)


def rank_space_modules(model: torch.nn.Module) -> list:
    """Attention modules of ``model`` that cache rank-space keys and values (``eigenkv.compress``), in layer order."""
    return [m for m in model.modules() if callable(getattr(m, "runtime_basis_elements", None))]


def compressed_layout(model: torch.nn.Module, dtype: torch.dtype = torch.float16, quant=None) -> KVLayout:
    """The ``KVLayout`` of a compressed model's cache.

    Args:
        model: compressed in place by ``eigenkv.compress`` (its attention modules cache rank-space states).
        dtype: element type of a dense cache, of a quantized cache's window, and of the kept bases.
        quant: a ``KVQuantConfig`` (or ``MixedKVQuantConfig``, ``LayerwiseKVQuantConfig``) when the cache is quantized.
    """
    modules = rank_space_modules(model)
    if not modules:
        raise ValueError("this model is not compressed; use kv_cache_bytes(model) for its dense cache")
    if quant is not None:
        check_layers(quant, len(modules))
        if _rotates(quant, (m.layer_idx for m in modules)):
            raise ValueError("rotate=True rotates the head dimension; a compressed cache holds ranks, not heads")
    windows = layer_windows(model.config)
    layers, basis_elements = [], 0
    for module in modules:
        window = windows[module.layer_idx]
        if quant is None:
            keys = slide(DenseStorage(module.key_rank, dtype), window)
            values = slide(DenseStorage(module.value_rank, dtype), window)
        else:
            slid = sliding_layer(quant, windows, module.layer_idx)
            keys = stream_storage(module.key_rank, quant, "key", module.layer_idx, dtype, slid)
            values = stream_storage(module.value_rank, quant, "value", module.layer_idx, dtype, slid)
        layers.append(LayerKV(module.kv_heads, keys, values))
        basis_elements += module.runtime_basis_elements()
    fixed = {"bases": basis_elements * dtype.itemsize} if basis_elements else {}
    return KVLayout(layers=tuple(layers), fixed=fixed)


def cache_held_bytes(cache) -> int:
    """Bytes a cache holds: every tensor reachable from it (:func:`cache_tensor_bytes`) less the room it says
    it reserved (``cache.reserved_bytes()``, for caches that grow in place; 0 for others)."""
    reserved = getattr(cache, "reserved_bytes", None)
    return cache_tensor_bytes(cache) - (reserved() if callable(reserved) else 0)


def cache_tensor_bytes(cache) -> int:
    """Bytes of every distinct tensor reachable from a transformers ``Cache`` (or a tuple cache).

    Walks the object's attributes, lists and dicts, so whatever a cache class
    stores (keys, values, codes, scales, windows) is counted once.
    """
    seen: set[int] = set()
    total = 0
    stack = [cache]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
                # a wrapper subclass (a quantized or packed tensor): counted by the tensors it stores
                stack.extend(getattr(obj, name) for name in obj.__tensor_flatten__()[0])
            else:
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
            stack.extend(vars(obj).values())
    return total
