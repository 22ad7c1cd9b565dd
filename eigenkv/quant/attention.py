"""Attention that reads a quantized KV cache causally in one multi-token forward.

The cache (``eigenkv.quant.cache``) returns what it holds, tagged with the
unquantized twins and the per-query boundaries (``eigenkv.quant.routing``):
query ``p`` reads key ``j`` quantized when ``j < bounds[p]``, else in full
precision. :func:`banded_attention` computes that with one SDPA per block of
queries over the held keys plus only the narrow band where a twin is read;
:func:`versions_attention` (every version of every key, one masked SDPA) is
its reference. Registered with transformers as ``"eigenkv_quant"``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from eigenkv.kernels.scoring import Scoring
from eigenkv.quant.routing import fit_mask, kernel_attention, kernels_apply, resolve, twin_of

ATTN_NAME = "eigenkv_quant"
QUERY_BLOCK = 64  # queries per SDPA call of banded_attention (a multiple of the usual group size)


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

    if kernels_apply(query, module.training and dropout > 0, **kwargs):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        scoring = Scoring(scale, softcap=kwargs.get("softcap"))
        out = kernel_attention(query, key, value, attention_mask, scoring, window=kwargs.get("sliding_window"))
        if out is not None:
            return out, None
    key, value = resolve(key), resolve(value)
    attention_mask = fit_mask(attention_mask, key.shape[-2])
    key_twin, value_twin = twin_of(key), twin_of(value)
    softcap = kwargs.get("softcap")  # Gemma-2's capped logits: computed explicitly (SDPA has no cap)
    if key_twin is None and value_twin is None:  # decode step, or no query sees a full-precision twin
        if softcap is not None:
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling
            return masked_attention(query, key, value, attention_mask, scale, softcap).transpose(1, 2), None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask is None or attention_mask.dim() != 4:
        return versions_attention(query, key, value, attention_mask, scaling, softcap), None
    return banded_attention(query, key, value, attention_mask, scaling, softcap=softcap), None


def masked_attention(query, key, value, mask, scale, softcap=None) -> torch.Tensor:
    """``scaled_dot_product_attention`` with GQA -> ``(B, H, T, D_v)``; with ``softcap`` the scores are capped
    as Gemma-2 does (``softcap * tanh(s / softcap)``) before the mask, computed explicitly (SDPA cannot).

    Args: ``query`` (B, H, T, D), ``key`` / ``value`` (B, H_kv, S, D), ``mask`` bool (True = attend) or additive,
    broadcastable to (B, H, T, S), or None."""
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale, enable_gqa=True
        )
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # as the model's eager attention: its dtype
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return torch.matmul(weights.to(value.dtype), value)


def versions_attention(query, key, value, attention_mask, scaling=None, softcap=None) -> torch.Tensor:
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
        rows = attention_mask[..., :seq]
        visible = rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2  # (B, 1, T, S)
        allowed = allowed & visible.repeat(1, 1, 1, len(masks))
    out = masked_attention(query, torch.cat(keys, dim=-2), torch.cat(values, dim=-2), allowed, scaling, softcap)
    return out.transpose(1, 2).contiguous()


def banded_attention(
    query, key, value, attention_mask, scaling=None, block: int = QUERY_BLOCK, softcap=None
) -> torch.Tensor:
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
        out = masked_attention(query[..., a:e, :], keys[..., :end, :], values[..., :end, :], mask, scaling, softcap)
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


def register() -> None:
    """Register the attention function and its mask with transformers under ``ATTN_NAME``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_NAME, quantized_cache_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)  # an explicit additive mask, always materialised
