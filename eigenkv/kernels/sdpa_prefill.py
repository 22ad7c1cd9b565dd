"""Causal prefill attention in rank space through torch's fused ``scaled_dot_product_attention``.

:func:`sdpa_prefill` has the contract of :func:`eigenkv.kernels.lowrank_prefill.lowrank_prefill`
without the causal quantized view: ``query`` (B, H, T, e), ``keys`` (B, H_kv, S, r_k), ``values``
(B, H_kv, S, r_v), query ``i`` at position ``S - T + i``, valid keys from ``starts[b]``; output
(B, T, H, r_v) in the query's dtype. It is the prompt path of a compressed model whenever every
query reads the same keys and values (``eigenkv.quant.routing``): FlashAttention, the
memory-efficient kernel or cuDNN do the work, the custom kernel is kept for what they cannot
express (the quantized view, ALiBi, capped logits).

- Rank space without a kernel of our own: features are zero-padded to a multiple of 8 (what the
  fused backends need). Exact: a zero feature adds nothing to a score, and zero value features
  give output columns that are sliced off. The scale is ``scoring.scaling``, never the padded
  width's default.
- ``"pre"`` mode: keys rebuilt from their pre-RoPE coefficients and rotated at their positions by
  ``scoring.keys`` (as the reference and the PyTorch path do), then scored by the rotated full
  queries.
- Masks only where needed: ``T == S`` without ``starts`` runs ``is_causal=True`` (no mask: the
  flash backend can run, with queries, keys and values padded to one common width, which it
  needs); ``T < S`` (a cache prefix) without ``starts`` runs torch's bottom-right causal bias
  (still flash). Left padding (``starts``) needs an additive ``(B, 1, T, S)`` mask in the query's
  dtype: built once and kept on the ``starts`` tensor, which every layer of a forward shares (the
  routing caches it on the model's mask), so treat ``starts`` as read-only. Queries without a
  valid key get zeros, as in the kernel and the reference.
- GQA: ``enable_gqa=True`` (torch >= 2.5) when a fused backend takes it for these tensors
  (asked of torch, no device sync); otherwise keys and values repeated per query head, so a
  memory-efficient kernel without GQA support still runs instead of the math fallback.
- Capped logits (``Scoring.softcap``, Gemma-2) are refused: SDPA has no cap; the routing sends
  them to the kernel.
- ALiBi (supported for completeness; the routing sends ALiBi to the kernel): an additive
  ``(B, H, T, S)`` bias built per call, which rules flash out and costs ``H T S`` elements of
  memory: the kernel adds ``slope * j`` in registers instead.

Imports no Triton, nothing from ``eigenkv.quant``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention

from eigenkv.kernels.scoring import Scoring

ALIGN = 8  # feature padding: the fused backends' requirement
MASK_ALIGN = 16  # key axis of a kept mask buffer: the memory-efficient backend copies less aligned masks
HAS_ENABLE_GQA = torch.__version__ >= (2, 5)  # enable_gqa, and SDPAParams taking it
_MASKS_ATTR = "_eigenkv_sdpa_masks"


def _round_up(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` with its features zero-padded to ``width`` (itself when already that wide)."""
    extra = width - x.shape[-1]
    return x if extra == 0 else F.pad(x, (0, extra))


def _visible(starts: torch.Tensor | None, length: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(visible (B or 1, T, S) bool, empty rows (B, T) bool or None)``: query ``i`` reads keys
    ``starts[b] <= j <= S - T + i``; a query without such a key reads every key (no NaN in any backend)
    and is listed in ``empty``, to be zeroed."""
    positions = torch.arange(seq, device=device)
    query_positions = seq - length + torch.arange(length, device=device)
    visible = (positions[None, :] <= query_positions[:, None])[None]
    if starts is None:
        return visible, None
    lo = starts.long()
    empty = query_positions[None, :] < lo[:, None]
    return (visible & (positions[None, None, :] >= lo[:, None, None])) | empty[..., None], empty


def padding_mask(starts: torch.Tensor, length: int, seq: int, dtype: torch.dtype) -> tuple:
    """``(additive (B, 1, T, S) mask in dtype, empty rows (B, T) bool)`` of causal attention from
    ``starts`` (:func:`_visible`); kept on ``starts`` per ``(T, S, dtype)``."""
    kept = starts.__dict__.setdefault(_MASKS_ATTR, {})
    key = (length, seq, dtype)
    if key not in kept:
        visible, empty = _visible(starts, length, seq, starts.device)
        buffer = torch.zeros(
            (starts.shape[0], 1, length, _round_up(seq, MASK_ALIGN)), dtype=dtype, device=starts.device
        )
        mask = buffer[..., :seq]
        mask.masked_fill_(~visible[:, None], float("-inf"))
        kept[key] = (mask, empty)
    return kept[key]


def alibi_mask(slopes, starts, length: int, seq: int, dtype) -> tuple:
    """``(additive (B or 1, H, T, S) bias and mask in dtype, empty rows or None)``: ``slope_h (j - p)``
    (computed in float32, relative to the query position so that the rounded values stay small
    near the diagonal) where query ``p`` reads key ``j``, ``-inf`` elsewhere."""
    device = slopes.device
    visible, empty = _visible(starts, length, seq, device)
    positions = torch.arange(seq, device=device, dtype=torch.float32)
    query_positions = seq - length + torch.arange(length, device=device, dtype=torch.float32)
    bias = slopes.float()[:, None, None] * (positions[None, None, :] - query_positions[None, :, None])  # (H, T, S)
    return bias[None].masked_fill(~visible[:, None], float("-inf")).to(dtype), empty


def _fused_gqa(query, keys, values, mask, causal: bool) -> bool:
    """Whether SDPA runs these grouped tensors as they are (``enable_gqa``) in a fused backend, or on CPU."""
    if not HAS_ENABLE_GQA:
        return False
    if not query.is_cuda:
        return True  # CPU backends take enable_gqa (what runs there is for correctness, not speed)
    cuda = torch.backends.cuda
    params = cuda.SDPAParams(query, keys, values, mask, 0.0, causal, True)
    checks = [cuda.can_use_flash_attention, cuda.can_use_efficient_attention]
    checks += [cuda.can_use_cudnn_attention] if hasattr(cuda, "can_use_cudnn_attention") else []  # torch >= 2.5
    return any(check(params) for check in checks)


def _check(query, keys, values, scoring, starts) -> None:
    if not isinstance(scoring, Scoring):
        raise TypeError(f"scoring must be a Scoring; got {type(scoring).__name__}")
    if query.dim() != 4 or not query.is_floating_point():
        raise ValueError(f"query must be a floating (B, H, T, e) tensor; got {query.dim()}-D {query.dtype}")
    batch, q_heads, length, _ = query.shape
    if keys.dim() != 4 or keys.shape[1] == 0 or q_heads % keys.shape[1]:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of the KV heads of keys {tuple(keys.shape)}")
    kv_heads, seq = keys.shape[1:3]
    if seq < length:
        raise ValueError(f"{length} queries need at least as many keys; got {seq}")
    for name, x in (("keys", keys), ("values", values)):
        if x.dim() != 4 or tuple(x.shape[:3]) != (batch, kv_heads, seq):
            raise ValueError(f"{name} must be (B={batch}, H_kv={kv_heads}, S={seq}, r); got {tuple(x.shape)}")
        if x.dtype != query.dtype or x.device != query.device:
            raise ValueError(f"{name} must be {query.dtype} on {query.device}; got {x.dtype} on {x.device}")
    if starts is not None and (
        starts.shape != (batch,) or starts.dtype != torch.int32 or starts.device != query.device
    ):
        raise ValueError(f"starts must be int32 ({batch},) on {query.device}; got {starts.dtype} {tuple(starts.shape)}")
    scoring.check(query, kv_heads, keys.shape[-1])
    if scoring.softcap is not None:
        raise ValueError("SDPA cannot cap logits (Scoring.softcap): use lowrank_prefill or lowrank_prefill_reference")


def sdpa_prefill(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scoring: Scoring,
    *,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of ``T`` new queries over ``S`` rank-space states by SDPA -> ``(B, T, H, r_v)``.

    Args:
        query: ``(B, H, T, e)``, any floating dtype (the fused backends want fp16/bf16 on CUDA).
        keys, values: ``(B, H_kv, S, r_k)``, ``(B, H_kv, S, r_v)`` in the query's dtype; ``S >= T``.
        scoring: how queries score keys (:class:`~eigenkv.kernels.scoring.Scoring`).
        starts: ``(B,)`` int32, first valid key per sequence (left padding), or None: every row starts
            at 0, which lets the unmasked (flash) path run. Pass None rather than zeros when known.
    """
    _check(query, keys, values, scoring, starts)
    batch, q_heads, length, _ = query.shape
    value_rank = values.shape[-1]
    groups = q_heads // keys.shape[1]
    if batch * length * q_heads * value_rank == 0:
        return query.new_empty((batch, length, q_heads, value_rank))
    keys = scoring.keys(keys)  # pre mode: rotated full keys (B, H_kv, S, d)
    seq = keys.shape[-2]
    empty = None
    if scoring.alibi_slopes is not None:
        mask, empty = alibi_mask(scoring.alibi_slopes.to(query.device), starts, length, seq, query.dtype)
    elif starts is not None:
        mask, empty = padding_mask(starts, length, seq, query.dtype)
    elif length < seq:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(length, seq)
    else:
        mask = None
    dense = isinstance(mask, torch.Tensor)
    if dense:  # no flash anyway: each width only as padded as it must be
        width, value_width = _round_up(query.shape[-1]), _round_up(value_rank)
    else:  # flash needs one head size for queries, keys and values
        width = value_width = _round_up(max(query.shape[-1], value_rank))
    q, k, v = _pad(query, width), _pad(keys, width), _pad(values, value_width)
    kwargs = {}
    if groups > 1:
        if _fused_gqa(q, k, v, mask if dense else None, mask is None):
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=float(scoring.scaling), **kwargs
    )
    out = out[..., :value_rank].transpose(1, 2).contiguous()  # (B, T, H, r_v)
    if empty is not None:
        out.masked_fill_(empty[:, :, None, None], 0.0)
    return out
