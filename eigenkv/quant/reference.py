"""Group-wise integer quantization: pure PyTorch reference functions.

A tensor is split along one axis ``dim`` into groups of ``G`` consecutive
elements; each group gets its own scale ``s`` (and, when asymmetric, zero point
``z``), stored in ``scale_dtype``. With ``b`` bits:

Asymmetric (default), ``L = 2^b - 1``::

    z = min(x),  s = (max(x) - min(x)) / L          (both rounded to scale_dtype)
    c = clamp(round((x - z) / s), 0, L)             (uint8 codes)
    x^ = s * c + z

Symmetric, ``Q = 2^(b-1) - 1`` (2 bits: levels -1, 0, 1)::

    s = max(|x|) / Q
    c = clamp(round(x / s), -Q, Q) + 2^(b-1)        (stored unsigned, in [1, 2^b - 1])
    x^ = s * (c - 2^(b-1))

Rounding is to nearest (ties to even, ``torch.round``); a constant group gets
``s = 0`` and reconstructs exactly. Arithmetic runs in float32 (float64 for
float64 inputs); the codes are computed from the *stored* (rounded) scale and zero,
so dequantization reproduces exactly what quantization assumed.

Remainder policy: when ``G`` does not divide the axis length ``n``, the last
group holds the ``n mod G`` remaining elements and has its own scale (so a
group larger than the axis is one group of the whole axis). The number of
groups is ``ceil(n / G)``, and the KV accounting counts exactly that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eigenkv.quant.config import SCALE_DTYPES, SUPPORTED_BITS

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class QuantizedGroups:
    """Codes and per-group parameters of one quantized tensor.

    Attributes:
        codes: uint8, same shape as the input, values in ``[0, 2^bits)`` (unpacked).
        scale: ``scale_dtype``, the input's shape with ``dim`` replaced by ``ceil(n / G)``.
        zero: like ``scale``, or None when symmetric.
        bits, group_size, dim, symmetric: how it was quantized (``dim`` non-negative).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    dim: int
    symmetric: bool


def num_groups(length: int, group_size: int) -> int:
    """Groups along an axis of ``length`` elements (the last one may be shorter)."""
    return -(-length // group_size)


NON_FINITE_MESSAGE = "the tensor to quantize contains NaN or Inf; quantization would spread it over its group"


def check_quant_args(
    x: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype, *, check_finite: bool = True
) -> None:
    """Raise a clear error for unsupported inputs (dtype, bits, group size, and NaN/Inf unless ``check_finite=False``,
    for callers that detect them more cheaply themselves)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"cannot quantize dtype {x.dtype}; use float16, bfloat16, float32 or float64")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int; got {group_size!r}")
    if scale_dtype not in SCALE_DTYPES.values():
        raise TypeError(f"scale_dtype {scale_dtype} is not one of {sorted(SCALE_DTYPES)}")
    if check_finite and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(NON_FINITE_MESSAGE)


def _grouped(x: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """Split the last axis into full groups ``(..., k, G)`` and, if any, the remainder ``(..., 1, n mod G)``."""
    n = x.shape[-1]
    full = n // group_size
    parts = []
    if full:
        parts.append(x[..., : full * group_size].unflatten(-1, (full, group_size)))
    if n % group_size:
        parts.append(x[..., full * group_size :].unsqueeze(-2))
    return parts


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    dim: int = -1,
    *,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    check_finite: bool = True,
) -> QuantizedGroups:
    """Quantize ``x`` (any shape, floating) in groups of ``group_size`` along ``dim`` (formulas in the module doc).

    Returns ``QuantizedGroups`` (codes uint8 of ``x``'s shape; scale and zero with ``dim`` of size ``ceil(n / G)``).
    ``check_finite=False`` skips the NaN/Inf check (a device-to-host read) for callers that flag them themselves.
    """
    check_quant_args(x, bits, group_size, scale_dtype, check_finite=check_finite)
    dim = dim % x.dim()
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xt = x.movedim(dim, -1).to(compute)
    codes, scales, zeros = [], [], []
    for g in _grouped(xt, group_size):  # g: (..., k, size)
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = (g.abs().amax(-1, keepdim=True) / qmax).to(scale_dtype)
            s = scale.to(compute)
            c = torch.round(g / torch.where(s == 0, 1.0, s)).clamp(-qmax, qmax) + 2 ** (bits - 1)
        else:
            levels = 2**bits - 1
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = ((hi - lo) / levels).to(scale_dtype)
            zero = lo.to(scale_dtype)
            s = scale.to(compute)
            c = torch.round((g - zero.to(compute)) / torch.where(s == 0, 1.0, s)).clamp(0, levels)
            zeros.append(zero.squeeze(-1))
        scales.append(scale.squeeze(-1))
        codes.append(c.to(torch.uint8).flatten(-2))
    if not codes:  # empty axis
        empty = xt.new_zeros((*xt.shape[:-1], 0))
        codes, scales = [empty.to(torch.uint8)], [empty.to(scale_dtype)]
        zeros = [] if symmetric else [empty.to(scale_dtype)]
    return QuantizedGroups(
        codes=torch.cat(codes, -1).movedim(-1, dim).contiguous(),
        scale=torch.cat(scales, -1).movedim(-1, dim).contiguous(),
        zero=None if symmetric else torch.cat(zeros, -1).movedim(-1, dim).contiguous(),
        bits=bits,
        group_size=group_size,
        dim=dim,
        symmetric=symmetric,
    )


def dequantize(q: QuantizedGroups, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct ``x^`` (shape of ``q.codes``) in ``dtype`` from codes and group parameters."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    codes = q.codes.movedim(q.dim, -1).to(compute)
    n = codes.shape[-1]
    scale = q.scale.movedim(q.dim, -1).to(compute).repeat_interleave(q.group_size, dim=-1)[..., :n]
    if q.symmetric:
        out = scale * (codes - 2 ** (q.bits - 1))
    else:
        zero = q.zero.movedim(q.dim, -1).to(compute).repeat_interleave(q.group_size, dim=-1)[..., :n]
        out = scale * codes + zero
    return out.to(dtype).movedim(-1, q.dim)


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    dim: int = -1,
    *,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in the dtype of ``x``: what a quantized store gives back."""
    q = quantize(x, bits, group_size, dim, symmetric=symmetric, scale_dtype=scale_dtype)
    return dequantize(q, x.dtype)


def hadamard(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix ``(n, n)``: orthonormal and symmetric, ``H @ H = I``.

    ``n`` must be a power of two (head sizes 64, 128, 256 are).
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two size; got {n} (turn rotate off for this model)")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)
