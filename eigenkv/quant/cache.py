"""A quantized KV cache for Hugging Face models, and attention that reads it causally.

``QuantizedKVCache`` is a transformers ``Cache``: each layer keeps its keys and
values in a :class:`~eigenkv.quant.store.QuantizedStream` (packed codes, scales,
zero points and a full-precision window) and hands attention what it holds,
dequantized. It works with ``model.generate`` and, one fresh cache per window,
with :func:`eigenkv.eval.perplexity`.

Causal reads in a multi-token forward. When one forward appends many tokens
(a prompt, or a perplexity window), the token at position ``p`` must see the
past as the cache would hold it after ``p + 1`` tokens: key ``j`` quantized if
``j < T_q(p + 1)``, in full precision otherwise. (Attending to the unquantized
states, as transformers' own QuantizedCache does in prefill, measures nothing.)
The cache tags the tensors it returns with their unquantized twins and the
per-query boundaries ``T_q(p + 1)``; the attention function registered as
``"eigenkv_quant"`` builds the scores from both. Inside ``QuantizedKV(model,
config)`` the model uses that attention function; a token-by-token decode
through the same cache gives the same logits (a test).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicLayer

from eigenkv.quant.config import (
    AnyKVQuantConfig,
    KVQuantConfig,
    LayerwiseKVQuantConfig,
    MixedKVQuantConfig,
    check_layers,
    layer_config,
    layer_segments,
    quantized_prefix,
)
from eigenkv.quant.reference import hadamard
from eigenkv.quant.routing import kernel_attention, kernels_apply, resolve, stream_handle, tag_twin, twin_of
from eigenkv.quant.store import QuantizedStream, SegmentedStream

ATTN_NAME = "eigenkv_quant"
QUERY_BLOCK = 64  # queries per SDPA call of banded_attention (a multiple of the usual group size)


class QuantizedKVLayer(DynamicLayer):
    """One layer of a :class:`QuantizedKVCache`."""

    def __init__(
        self,
        config: AnyKVQuantConfig,
        rotation_source: QuantizedKVCache,
        index: int,
        read_packed: bool = False,
    ):
        super().__init__()
        self.read_packed = read_packed
        self.quant = config
        self.config = layer_config(config, index)  # grouping, group size and window shared by every segment
        self.index = index
        self._cache = rotation_source
        self.key_stream: QuantizedStream | SegmentedStream | None = None
        self.value_stream: QuantizedStream | SegmentedStream | None = None

    def _stream(self, kind: str, width: int, device) -> QuantizedStream | SegmentedStream:
        axis = self.config.axis_k if kind == "key" else self.config.axis_v
        if isinstance(self.quant, MixedKVQuantConfig):
            return SegmentedStream(layer_segments(self.quant, self.index, kind, width), axis)
        rotation = self._cache.rotation(width, device) if self.config.rotate else None
        return QuantizedStream(self.config, axis, rotation)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_stream = self._stream("key", key_states.shape[-1], key_states.device)
        self.value_stream = self._stream("value", value_states.shape[-1], value_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``(B, H_kv, s, D)`` keys and values; return all held keys and values ``(B, H_kv, m, D)``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.read_packed and key_states.shape[-2] == 1 and self._kernels_read(key_states):
            self.key_stream.push(key_states)
            self.value_stream.push(value_states)
            return stream_handle(self.key_stream, key_states), stream_handle(self.value_stream, value_states)
        start = self.key_stream.tokens
        keys, keys_fp = self.key_stream.append(key_states)
        values, values_fp = self.value_stream.append(value_states)
        new = key_states.shape[-2]
        if new > 1:
            cfg = self.config
            positions = torch.arange(start + 1, start + new + 1)
            for held, twin, axis in ((keys, keys_fp, cfg.axis_k), (values, values_fp, cfg.axis_v)):
                # quantized_prefix(m) for every m in positions, at once
                old = (positions - cfg.residual).clamp(min=0)
                bounds = old if axis == "token" else old // cfg.group_size * cfg.group_size
                flushed_from = quantized_prefix(start, axis, cfg.group_size, cfg.residual)
                # Query p (holding m = p + 1 tokens) reads the twin of token j in [bound, m) that this
                # call quantized (j < bounds[-1]); tag only when that happens for some query.
                if bool((bounds.clamp(min=flushed_from) < positions.clamp(max=int(bounds[-1]))).any()):
                    tag_twin(held, twin, bounds.to(held.device))
        return keys, values

    def _kernels_read(self, key_states: torch.Tensor) -> bool:
        """Whether the decode kernel reads this layer's store for states like ``key_states``."""
        from eigenkv.kernels.backend import use_triton
        from eigenkv.kernels.lowrank_decode import GROUP_SIZES, KERNEL_DTYPES

        cfg = self.config
        return (
            use_triton(key_states)
            and key_states.dtype in KERNEL_DTYPES
            and cfg.group_size in GROUP_SIZES
            and cfg.scale_dtype == "float16"
            and not cfg.rotate
        )

    def get_seq_length(self) -> int:
        return 0 if self.key_stream is None else self.key_stream.tokens

    def reset(self) -> None:
        self.key_stream = self.value_stream = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot drop tokens (its groups span several tokens)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported by QuantizedKVCache; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("QuantizedKVCache does not support batch expansion (num_return_sequences > 1)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("QuantizedKVCache does not support batch selection")

    def streams(self) -> tuple[QuantizedStream | SegmentedStream, ...]:
        return () if self.key_stream is None else (self.key_stream, self.value_stream)


class QuantizedKVCache(Cache):
    """transformers ``Cache`` holding packed quantized keys and values (see the module doc).

    Args:
        config: the quantization settings (one precision, or two per layer).
        model_config: the model's config (number of layers).
        read_packed: decode steps (one new token) on the kernel path (``eigenkv.quant.routing``)
            return empty handles to the packed store instead of its dequantized contents, for the
            attention kernels to read; only eigenkv's attention (``QuantizedKV``, compressed models)
            understands them. ``QuantizedKV.new_cache`` sets it.
    """

    def __init__(self, config: AnyKVQuantConfig, model_config, read_packed: bool = False):
        text_config = getattr(model_config, "get_text_config", lambda **_: model_config)(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"QuantizedKVCache supports full-attention layers only; this model has {set(layer_types)}")
        layers = text_config.num_hidden_layers
        check_layers(config, layers)
        self.config = config
        self._rotation: torch.Tensor | None = None
        super().__init__(layers=[QuantizedKVLayer(config, self, i, read_packed) for i in range(layers)])

    def rotation(self, head_dim: int, device) -> torch.Tensor | None:
        """The Hadamard matrix shared by the layers that ``rotate`` (created on first use)."""
        if self._rotation is None:
            self._rotation = hadamard(head_dim, torch.float32, device)
        return self._rotation

    def nbytes(self) -> dict[str, int]:
        """Bytes held right now, by component: codes, scales, zeros, window (and the rotation matrix)."""
        total = {"codes": 0, "scales": 0, "zeros": 0, "window": 0}
        for layer in self.layers:
            for stream in layer.streams():
                for name, n in stream.nbytes().items():
                    total[name] += n
        if self._rotation is not None:
            total["rotation"] = self._rotation.numel() * self._rotation.element_size()
        return total


def quantized_cache_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over a :class:`QuantizedKVCache` with causal quantization (see the module doc).

    Args follow transformers' attention interface: ``query`` (B, H, T, D),
    ``key``/``value`` (B, H_kv, S, D), ``attention_mask`` additive (B, 1, T, S) or None.
    Returns ``(output (B, T, H, D), None)``.

    Query ``p`` reads each key ``j`` in one of up to four versions (key quantized
    or not, value quantized or not): :func:`banded_attention` computes it block by
    block of queries, reading the versions other than the held one only near the
    diagonal; :func:`versions_attention` (its reference) with all versions of all keys.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from eigenkv.kernels.scoring import Scoring

    if kernels_apply(query, module.training and dropout > 0, **kwargs):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = kernel_attention(query, key, value, attention_mask, Scoring(scale))
        if out is not None:
            return out, None
    key, value = resolve(key), resolve(value)
    key_twin, value_twin = twin_of(key), twin_of(value)
    if key_twin is None and value_twin is None:  # decode step, or no query sees a full-precision twin
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask is None or attention_mask.dim() != 4:
        return versions_attention(query, key, value, attention_mask, scaling), None
    return banded_attention(query, key, value, attention_mask, scaling), None


def versions_attention(query, key, value, attention_mask, scaling=None) -> torch.Tensor:
    """The causal mixed attention as one SDPA over every version of every key -> ``(B, T, H, D_v)``.

    Each key position ``j`` appears in up to four versions (key quantized or
    not, value quantized or not); the keys and values are concatenated over the
    versions present and a boolean mask lets query ``p`` see exactly one version
    of each ``j``. The reference of :func:`banded_attention`, and the path for a
    mask that is not 4-D (or none: no query is masked).
    """
    key_twin, value_twin = twin_of(key), twin_of(value)
    seq = key.shape[-2]
    positions = torch.arange(seq, device=query.device)

    def versions(held, twin):  # [(tensor, (T, S) bool: query p reads this version of key j)]
        if twin is None:
            return [(held, torch.ones(1, seq, dtype=torch.bool, device=query.device))]
        twin_tensor, bounds = twin
        quantized = positions[None, :] < bounds[:, None]
        return [(held, quantized), (twin_tensor, ~quantized)]

    keys, values, masks = [], [], []
    for k, k_mask in versions(key, key_twin):
        for v, v_mask in versions(value, value_twin):
            keys.append(k)
            values.append(v)
            masks.append(k_mask & v_mask)
    allowed = torch.cat(masks, dim=-1)  # (T, n * S)
    if attention_mask is not None:
        visible = attention_mask[..., :seq] > torch.finfo(attention_mask.dtype).min / 2  # (B, 1, T, S)
        allowed = allowed & visible.repeat(1, 1, 1, len(masks))
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        torch.cat(keys, dim=-2).repeat_interleave(groups, dim=1),
        torch.cat(values, dim=-2).repeat_interleave(groups, dim=1),
        attn_mask=allowed,
        scale=scaling,
    )
    return out.transpose(1, 2).contiguous()


def banded_attention(query, key, value, attention_mask, scaling=None, block: int = QUERY_BLOCK) -> torch.Tensor:
    """:func:`versions_attention` over the keys each block of ``block`` queries needs -> ``(B, T, H, D_v)``.

    Args follow :func:`quantized_cache_attention`; ``attention_mask`` is 4-D, additive
    or bool (True = attend).

    Query ``p`` reads key ``j`` as the cache holds it (the held key and value) when
    ``j < lo[p]``, the smaller of its key and value boundaries, and only the band
    ``[lo[p], p]`` in other versions (at most ``G + R`` tokens with per-channel groups,
    ``R`` per token). For queries ``[a, e)``, whose visible keys end at ``hi`` and whose
    boundaries start at ``lo[a]`` (they grow with ``p``), one SDPA reads the held keys
    ``[0, hi)`` and, after them, each other version of the band ``[lo[a], hi)``, with a
    mask choosing one version of each key per query: the scores of
    :func:`versions_attention` without its masked ones (causal, or versions not read).
    Blocks and masks are computed once per forward and kept on ``attention_mask``,
    which every layer shares.

    The keys of every block live in one buffer holding the held keys plus room for the
    band: a block writes its band versions right after its ``hi`` held keys; blocks
    run from the last one, so each overwrites only held keys that no block after it reads.
    GQA without repeating keys (``enable_gqa``).
    """
    key_twin, value_twin = twin_of(key), twin_of(value)
    seq = key.shape[-2]
    plan = _banded_plan(attention_mask, seq, key_twin, value_twin, block, query.dtype)
    buffers = []
    for held in (key, value):
        buffer = held.new_empty((*held.shape[:-2], seq + plan.room, held.shape[-1]))
        buffer[..., :seq, :] = held
        buffers.append(buffer)
    keys, values = buffers
    outs = []
    for (a, e, hi, low), mask in zip(reversed(plan.blocks), reversed(plan.masks), strict=True):
        end = hi
        for reads_key_twin, reads_value_twin in plan.extra if hi > low else ():
            keys[..., end : end + hi - low, :] = (key_twin[0] if reads_key_twin else key)[..., low:hi, :]
            values[..., end : end + hi - low, :] = (value_twin[0] if reads_value_twin else value)[..., low:hi, :]
            end += hi - low
        out = torch.nn.functional.scaled_dot_product_attention(
            query[..., a:e, :], keys[..., :end, :], values[..., :end, :], attn_mask=mask, scale=scaling, enable_gqa=True
        )
        outs.append(out.transpose(1, 2))  # (B, queries, H, D_v)
    return torch.cat(outs[::-1], dim=1)


class _BandedPlan(NamedTuple):
    """What :func:`banded_attention` reads per block of queries, the same in every layer of a forward."""

    key_bounds: torch.Tensor | None
    value_bounds: torch.Tensor | None
    block: int
    dtype: torch.dtype
    blocks: list[tuple[int, int, int, int]]  # (first query, end query, visible keys hi, band start)
    extra: list[tuple[bool, bool]]  # versions after the held one: (reads the key twin, reads the value twin)
    room: int  # keys past the held ones that the band versions of a block take at most
    masks: list[torch.Tensor]  # per block, additive (B, 1 or H, queries, keys read)


def _banded_plan(attention_mask, seq: int, key_twin, value_twin, block: int, dtype) -> _BandedPlan:
    """The plan of :func:`banded_attention`, kept on ``attention_mask`` (every layer shares it)."""
    key_bounds = None if key_twin is None else key_twin[1]
    value_bounds = None if value_twin is None else value_twin[1]
    plans = attention_mask.__dict__.setdefault("_eigenkv_banded_plans", {}).setdefault((seq, block, dtype), [])
    for plan in plans:  # one per distinct quantizer geometry among the layers (usually one)
        if all(
            (a is None) == (b is None) and (a is None or torch.equal(a, b))
            for a, b in ((plan.key_bounds, key_bounds), (plan.value_bounds, value_bounds))
        ):
            return plan
    rows = attention_mask[..., :seq]
    visible = rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2  # (B, 1|H, T, seq)
    seen = visible.flatten(0, -3).any(0)  # (T, seq): some batch row reads this key
    ends = torch.where(seen.any(-1), seq - seen.flip(-1).to(torch.uint8).argmax(-1), 0).tolist()
    bounds = [b for b in (key_bounds, value_bounds) if b is not None]
    lo = bounds[0] if len(bounds) == 1 else torch.minimum(*bounds)  # (T,): first key not read held
    starts = lo.tolist()
    options = [(False, True) if b is not None else (False,) for b in (key_bounds, value_bounds)]
    extra = [(k, v) for k in options[0] for v in options[1]][1:]
    columns = torch.arange(seq, device=attention_mask.device)
    blocks, masks = [], []
    for a in range(0, len(starts), block):
        e = min(a + block, len(starts))
        hi = max(1, *ends[a:e])  # at least one key: fully masked rows give what SDPA gives them
        low = min(hi, *starts[a:e])
        seen_rows = visible[..., a:e, :hi]
        allowed = [seen_rows & (columns[:hi] < lo[a:e, None])]
        band = columns[low:hi]
        for reads_key_twin, reads_value_twin in extra if hi > low else ():
            read = seen_rows[..., low:hi]
            for b, reads in ((key_bounds, reads_key_twin), (value_bounds, reads_value_twin)):
                if b is not None:
                    read = read & (band >= b[a:e, None] if reads else band < b[a:e, None])
            allowed.append(read)
        allowed = torch.cat(allowed, dim=-1)
        blocks.append((a, e, hi, low))
        masks.append(torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, -torch.inf))
    room = len(extra) * max(hi - low for _, _, hi, low in blocks)
    plan = _BandedPlan(key_bounds, value_bounds, block, dtype, blocks, extra, room, masks)
    plans.append(plan)
    return plan


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_NAME, quantized_cache_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)  # an explicit additive mask, always materialised


class QuantizedKV:
    """Reversible switch of a model to quantized-KV attention, and a factory of caches.

    Example::

        with QuantizedKV(model, KVQuantConfig(bits=4, group_size=64)) as kv:
            ppl = perplexity(model, windows, make_cache=kv.new_cache)
            out = model.generate(ids, past_key_values=kv.new_cache(), max_new_tokens=20)
    """

    def __init__(self, model, config: AnyKVQuantConfig):
        if not isinstance(config, (KVQuantConfig, MixedKVQuantConfig, LayerwiseKVQuantConfig)):
            raise TypeError(
                "config must be a KVQuantConfig, MixedKVQuantConfig or LayerwiseKVQuantConfig; "
                f"got {type(config).__name__}"
            )
        self.model = model
        self.config = config
        self._previous: str | None = None

    def new_cache(self) -> QuantizedKVCache:
        """A cache for this model; decode steps read it with the attention kernels when they apply."""
        return QuantizedKVCache(self.config, self.model.config, read_packed=True)

    def __enter__(self) -> QuantizedKV:
        if not getattr(self.model, "_supports_attention_backend", False):
            raise ValueError(
                f"{type(self.model).__name__} computes attention itself instead of through transformers' "
                "AttentionInterface, so a multi-token forward cannot read the quantized cache causally; "
                "QuantizedKVCache still works there for token-by-token decoding (model.generate)"
            )
        _register()
        self._previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTN_NAME)
        return self

    def __exit__(self, *exc) -> None:
        self.model.set_attn_implementation(self._previous)
