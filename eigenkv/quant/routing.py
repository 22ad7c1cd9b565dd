"""Routing attention into Hugging Face models: when the kernels run, and what a cache hands attention.

A quantized cache returns either plain tensors, *handles* (empty tensors tagged
with the packed store, for the decode kernel) or held tensors tagged with
their unquantized *twins* (a multi-token forward, see ``eigenkv.quant.cache``).
This module owns those tags; the attention functions (``eigenkv.quant.cache``,
``eigenkv.compress.attention``) read them through the functions below.

The kernel switch is :func:`eigenkv.kernels.backend.backend` (``EIGENKV_BACKEND``):
with ``auto`` an fp16/bf16 forward on CUDA runs
:func:`~eigenkv.kernels.lowrank_decode.lowrank_decode` for one new token; for
several (a prompt) it runs :func:`~eigenkv.kernels.sdpa_prefill.sdpa_prefill`
(torch's fused SDPA on zero-padded rank-space tensors) when every query reads the
same keys and values, and :func:`~eigenkv.kernels.lowrank_prefill.lowrank_prefill`
only where that is not so or SDPA has no cheap form of it: the causal quantized view
of a ``QuantizedKVCache`` (held keys or values tagged with twins), ALiBi, and
Gemma-2's capped logits, which SDPA has no form of (:func:`prefill_through_sdpa`).
``triton`` runs the Triton kernels for every prompt (tests under the interpreter,
kernel benchmarks). CPU tensors, float32 models, masks other than causal attention
to one range of keys per sequence, dropout and returned attention weights take the
PyTorch path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from eigenkv.kernels.backend import backend, use_triton
from eigenkv.quant.packing import PackedStream

# Set on the (B, H_kv, 0, D) tensors a QuantizedKVCache returns instead of its dequantized contents.
STREAM_ATTR = "_eigenkv_stream"
# Set on them too when the stream changes before attention reads it (a sliding layer drops its oldest tokens).
PACKED_ATTR = "_eigenkv_packed"
# Set on the key/value tensors a multi-token update returns: (unquantized twin, per-query boundaries).
TWIN_ATTR = "_eigenkv_unquantized"
_BOUNDS_ATTR = "_eigenkv_key_bounds"


def tag_twin(held: torch.Tensor, twin: torch.Tensor, bounds: torch.Tensor) -> None:
    """Mark ``held`` (what the cache holds) with its unquantized ``twin``: query ``p`` reads key ``j``
    quantized when ``j < bounds[p]`` and the twin otherwise."""
    setattr(held, TWIN_ATTR, (twin, bounds))


def twin_of(held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(twin, bounds)`` tagged on ``held`` by :func:`tag_twin`, or None."""
    return getattr(held, TWIN_ATTR, None)


def map_twin(held: torch.Tensor, out: torch.Tensor, fn) -> torch.Tensor:
    """Carry ``held``'s twin through ``fn`` onto ``out = fn(held)`` (padding, key rebuilds); returns ``out``."""
    twin = twin_of(held)
    if twin is not None:
        tag_twin(out, fn(twin[0]), twin[1])
    return out


def kernels_apply(query: torch.Tensor, training: bool = False, **kwargs) -> bool:
    """Whether a forward with ``query`` ``(B, H, T, e)`` should use the attention kernels: not while autograd
    records through the query (the kernels have no backward; training, LoRA recovery), nor with dropout or
    attention weights asked for. Capped logits (Gemma-2's ``softcap``) run in the kernels: the caller puts
    ``softcap`` in the :class:`~eigenkv.kernels.scoring.Scoring` it hands :func:`kernel_attention`."""
    from eigenkv.kernels.utils import KERNEL_DTYPES

    return (
        not training
        and not (torch.is_grad_enabled() and query.requires_grad)
        and not kwargs.get("output_attentions", False)
        and query.dtype in KERNEL_DTYPES
        and use_triton(query)
    )


def kernel_attention(query, key, value, attention_mask, scoring, masked_is_true: bool = False, window=None):
    """Attention through the kernels -> ``(B, T, H, r_v)``, or None when the mask is not one they handle.

    Args:
        query: ``(B, H, T, e)``; key, value: what the cache returned (tensors, handles to a packed store,
            or held tensors tagged with their unquantized twins, see ``eigenkv.quant.cache``).
        attention_mask: 4-D mask of the model (or None: causal); ``masked_is_true`` for MPT's convention.
        scoring: a :class:`~eigenkv.kernels.scoring.Scoring` (with the model's ``softcap``, if any).
        window: the layer's sliding window (None: full attention). A decode step reads the range of keys the
            mask gives; a prompt whose mask slides goes through the prefill kernel with the window (SDPA has
            none: such a prompt that would take SDPA returns None, and the caller's SDPA applies the mask).
    """
    if attention_mask is not None and attention_mask.dim() != 4:
        return None
    batch, _, length, _ = query.shape
    if length == 1:
        from eigenkv.kernels.lowrank_decode import lowrank_decode

        keys, values = packed(key), packed(value)
        owner = getattr(key, STREAM_ATTR, None)  # a cache's stream: it holds the flag of later masks
        trusted = getattr(owner, "mask_ok", None)
        bounds = key_bounds(visible_keys(attention_mask, masked_is_true), batch, keys.tokens, query.device, trusted)
        if bounds is None:
            return None
        if owner is not None and trusted is None:  # checked once (one sync); later steps flag on the device
            owner.mask_ok = torch.ones((), dtype=torch.bool, device=query.device)
        out = lowrank_decode(query[:, :, 0], keys, values, scoring, starts=bounds[0], ends=bounds[1])
        return out.unsqueeze(1)
    rows = causal_starts(attention_mask, batch, length, key.shape[-2], masked_is_true, query.device, window)
    if rows is None:
        return None
    if prefill_through_sdpa(key, value, scoring):
        if rows.window is not None:
            return None
        from eigenkv.kernels.sdpa_prefill import sdpa_prefill

        return sdpa_prefill(query, key, value, scoring, starts=rows.starts if rows.padded else None)
    from eigenkv.kernels.lowrank_prefill import lowrank_prefill

    views = []
    for held in (key, value):
        twin = twin_of(held)
        views.append((held, None) if twin is None else (twin[0], (held, twin[1].to(torch.int32))))
    (keys, quantized_keys), (values, quantized_values) = views
    quantized = {"quantized_keys": quantized_keys, "quantized_values": quantized_values}
    return lowrank_prefill(query, keys, values, scoring, starts=rows.starts, window=rows.window, **quantized)


def prefill_through_sdpa(key: torch.Tensor, value: torch.Tensor, scoring) -> bool:
    """Whether a prompt takes :func:`~eigenkv.kernels.sdpa_prefill.sdpa_prefill` rather than the prefill kernel.

    SDPA when every query reads the same keys and values (neither ``key`` nor ``value`` is tagged with
    a twin: a ``DynamicCache``, no cache, or a quantized cache where no query reads a twin), there
    is no ALiBi (SDPA would need an ``(H, T, S)`` bias in memory and lose flash; the kernel adds it in
    registers) and no logit cap (SDPA has none; the kernel caps in registers). ``EIGENKV_BACKEND=triton``
    keeps every prompt on the kernel.
    """
    return (
        backend() != "triton"
        and twin_of(key) is None
        and twin_of(value) is None
        and scoring.alibi_slopes is None
        and scoring.softcap is None
    )


class CausalRows(NamedTuple):
    """A causal mask of one key range per sequence: its first valid keys, whether any is past 0, and the
    sliding window that hides keys (None: none does)."""

    starts: torch.Tensor  # (B,) int32
    padded: bool  # some sequence is left-padded (known from the check's one sync: no layer syncs again)
    window: int | None = None


def causal_starts(attention_mask, batch: int, length: int, seq: int, masked_is_true: bool, device, window=None):
    """:class:`CausalRows` when the mask of ``length`` queries over ``seq`` keys is causal attention to
    ``[start, ...)`` per sequence (with a sliding ``window``: to the keys less than ``window`` positions back
    too, as transformers' sliding masks), else None. Rows of padding queries (no valid key) are not compared.

    The check costs one device sync, which also tells whether any sequence is padded; the result is
    kept on the mask, which every layer of its kind shares. No mask: causal from 0, no sync.
    """
    if attention_mask is None:
        return CausalRows(torch.zeros(batch, dtype=torch.int32, device=device), False)
    window = window if window is not None and seq > window else None  # a window that hides no key is none
    kept = _BOUNDS_ATTR if window is None else f"{_BOUNDS_ATTR}_{window}"
    cached = getattr(attention_mask, kept, None)
    if cached is not None:
        return cached or None
    rows = attention_mask[:, 0, -length:, :seq]
    if rows.dtype == torch.bool:
        visible = ~rows if masked_is_true else rows
    else:
        visible = rows > torch.finfo(rows.dtype).min / 2
    if visible.shape != (batch, length, seq):
        setattr(attention_mask, kept, ())
        return None
    positions = torch.arange(seq, device=device)
    query_positions = seq - length + torch.arange(length, device=device)
    causal = positions[None, :] <= query_positions[:, None]  # (T, S)
    if window is None:  # the last query sees every valid key
        starts = visible[:, -1].to(torch.int32).argmax(-1).to(torch.int32)
    else:  # the first query's window may begin after a sequence's first valid key: the first key any query
        # sees (then `padded` also says a start is past 0 without padding; only SDPA reads it, never with a window)
        causal &= positions[None, :] > query_positions[:, None] - window
        starts = visible.any(1).to(torch.int32).argmax(-1).to(torch.int32)
    expected = causal[None] & (positions[None, None, :] >= starts[:, None, None])
    compared = (query_positions[None, :] >= starts[:, None])[..., None]  # (B, T, 1): queries with a valid key
    same = ((visible & compared) == (expected & compared)).all()
    ok, padded = torch.stack([same, (starts > 0).any()]).tolist()  # the one sync
    result = CausalRows(starts, bool(padded), window) if ok else ()
    setattr(attention_mask, kept, result)
    return result or None


def fit_mask(attention_mask: torch.Tensor | None, keys: int) -> torch.Tensor | None:
    """A 4-D mask cut to the ``keys`` keys attention reads: a capturable cache's masks span its capacity
    (``eigenkv.graphs``), while the PyTorch paths read the keys held."""
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-1] <= keys:
        return attention_mask
    return attention_mask[..., :keys]


def new_positions(key: torch.Tensor, past: int, length: int) -> torch.Tensor:
    """``(1, length)`` int64 cache positions of the ``length`` tokens an update just appended: ``past + i``,
    read on the device when ``key`` is a handle to a capturable stream (its counts: no host integer that
    changes per step)."""
    counts = getattr(getattr(key, STREAM_ATTR, None), "counts", None)
    if counts is None:
        return torch.arange(past, past + length, device=key.device)[None]
    return (counts[1:].long() - length + torch.arange(length, device=key.device))[None]


def stream_handle(stream, like: torch.Tensor, snapshot: PackedStream | None = None) -> torch.Tensor:
    """An empty ``(B, H_kv, 0, D)`` tensor standing for ``stream`` (a consumer that ignores the tag fails loudly);
    ``snapshot``: what attention must read when the stream changes before it does (views, not copies)."""
    handle = like.new_empty((*like.shape[:2], 0, like.shape[-1]))
    setattr(handle, STREAM_ATTR, stream)
    if snapshot is not None:
        setattr(handle, PACKED_ATTR, snapshot)
    return handle


def packed(x: torch.Tensor) -> PackedStream:
    """The packed stream behind a handle, or a full-precision ``(B, H_kv, S, r)`` tensor as an all-window stream."""
    stream = getattr(x, STREAM_ATTR, None)
    if stream is None:
        return PackedStream.full_precision(x)
    snapshot = getattr(x, PACKED_ATTR, None)
    return stream.packed() if snapshot is None else snapshot


def resolve(x: torch.Tensor) -> torch.Tensor:
    """A handle's contents, dequantized in its dtype (the PyTorch path); any other tensor unchanged."""
    return x if getattr(x, STREAM_ATTR, None) is None else packed(x).dequantize(x.dtype)


def key_bounds(
    visible: torch.Tensor | None, batch: int, tokens: int, device, trusted: torch.Tensor | None = None
) -> tuple | None:
    """Valid keys per sequence as int32 ``(starts, ends)`` from a ``(B, S)`` bool mask (True = attend);
    None when some row is not one contiguous range (then the PyTorch path handles it).

    The check costs one device sync; the result is kept on the mask, which every layer of a step shares.
    With ``trusted`` (a () bool on the device, kept by a cache whose first decode step passed the check),
    nothing is read back: whether the rows are one range is ANDed into it, for the cache to read with its
    NaN/Inf flags (``QuantizedKVCache.check``): a generation's masks only grow by visible keys.
    """
    if visible is None:
        return (
            torch.zeros(batch, dtype=torch.int32, device=device),
            torch.full((batch,), tokens, dtype=torch.int32, device=device),
        )
    cached = getattr(visible, _BOUNDS_ATTR, None)
    if cached is not None:
        return cached if cached != () else None
    rows = visible[:, :tokens].to(torch.int32)  # a capturable cache: its capacity (the mask may be shorter)
    starts = rows.argmax(-1).to(torch.int32)
    any_visible = rows.any(-1)
    ends = torch.where(any_visible, rows.shape[-1] - rows.flip(-1).argmax(-1), starts).to(torch.int32)  # none: empty
    if trusted is not None:
        trusted &= (rows.sum(-1).to(torch.int32) == ends - starts).all()
        setattr(visible, _BOUNDS_ATTR, (starts, ends))
        return starts, ends
    contiguous = bool(torch.equal(rows.sum(-1).to(torch.int32), ends - starts))
    bounds = (starts, ends) if contiguous else ()
    setattr(visible, _BOUNDS_ATTR, bounds)
    return bounds or None


def visible_keys(attention_mask: torch.Tensor | None, masked_is_true: bool = False) -> torch.Tensor | None:
    """``(B, S)`` bool of the keys the (single) query may attend, from a 4-D mask of any convention.

    Args:
        attention_mask: ``(B, 1, 1, S)`` bool (True = attend) or additive float, or None.
        masked_is_true: bool masks where True means masked (MPT's convention).
    """
    if attention_mask is None:
        return None
    cached = getattr(attention_mask, "_eigenkv_visible", None)
    if cached is not None:
        return cached
    rows = attention_mask[:, 0, -1, :]
    if rows.dtype == torch.bool:
        visible = ~rows if masked_is_true else rows
    else:
        visible = rows > torch.finfo(rows.dtype).min / 2
    attention_mask._eigenkv_visible = visible
    return visible
