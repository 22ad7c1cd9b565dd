"""When the attention modules run the decode kernel, and what they hand it.

The switch is :func:`eigenkv.kernels._launch.backend` (``EIGENKV_BACKEND``):
with ``auto`` a decode step (one new token) of an fp16/bf16 model on CUDA runs
:func:`~eigenkv.kernels.lowrank_decode.lowrank_decode`; CPU tensors, float32
models, prompts, masks that are not one contiguous range of keys per
sequence, and returned attention weights take the PyTorch path.
"""

from __future__ import annotations

import torch

from eigenkv.kernels._launch import use_triton
from eigenkv.quant.store import PackedStream

# Set on the (B, H_kv, 0, D) tensors a QuantizedKVCache returns instead of its dequantized contents.
STREAM_ATTR = "_eigenkv_stream"
_BOUNDS_ATTR = "_eigenkv_key_bounds"


def decode_kernel_applies(query: torch.Tensor, tokens: int, training: bool = False, **kwargs) -> bool:
    """Whether a forward with ``query`` ``(B, H, tokens, e)`` should use the decode kernel."""
    from eigenkv.kernels.lowrank_decode import KERNEL_DTYPES

    return (
        tokens == 1
        and not training
        and not kwargs.get("output_attentions", False)
        and query.dtype in KERNEL_DTYPES
        and use_triton(query)
    )


def stream_handle(stream, like: torch.Tensor) -> torch.Tensor:
    """An empty ``(B, H_kv, 0, D)`` tensor standing for ``stream`` (a consumer that ignores the tag fails loudly)."""
    handle = like.new_empty((*like.shape[:2], 0, like.shape[-1]))
    setattr(handle, STREAM_ATTR, stream)
    return handle


def is_handle(x: torch.Tensor) -> bool:
    return getattr(x, STREAM_ATTR, None) is not None


def packed(x: torch.Tensor) -> PackedStream:
    """The packed stream behind a handle, or a full-precision ``(B, H_kv, S, r)`` tensor as an all-window stream."""
    stream = getattr(x, STREAM_ATTR, None)
    return PackedStream.full_precision(x) if stream is None else stream.packed()


def resolve(x: torch.Tensor) -> torch.Tensor:
    """A handle's contents, dequantized in its dtype (the PyTorch path); any other tensor unchanged."""
    stream = getattr(x, STREAM_ATTR, None)
    return x if stream is None else stream.packed().dequantize(x.dtype)


def key_bounds(visible: torch.Tensor | None, batch: int, tokens: int, device) -> tuple | None:
    """Valid keys per sequence as int32 ``(starts, ends)`` from a ``(B, S)`` bool mask (True = attend);
    None when some row is not one contiguous range (then the PyTorch path handles it).

    The check costs one device sync; the result is kept on the mask, which every layer of a step shares.
    """
    if visible is None:
        return (
            torch.zeros(batch, dtype=torch.int32, device=device),
            torch.full((batch,), tokens, dtype=torch.int32, device=device),
        )
    cached = getattr(visible, _BOUNDS_ATTR, None)
    if cached is not None:
        return cached if cached != () else None
    rows = visible[:, :tokens].to(torch.int32)
    starts = rows.argmax(-1).to(torch.int32)
    any_visible = rows.any(-1)
    ends = torch.where(any_visible, tokens - rows.flip(-1).argmax(-1), starts).to(torch.int32)  # none: empty range
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
