"""Fused group-wise quantize + pack, and unpack + dequantize, along the last axis.

Both operate on a 2-D view ``x`` of shape ``(R, C)``: groups of ``G`` consecutive
elements of a row share a scale (and zero point), and codes are packed along
the row in the layout of :mod:`eigenkv.quant.packing` (4 and 2 bits: several
codes per byte, first code in the low bits; 3 bits: a 2-bit plane of the whole
row followed by a 1-bit plane). The math is that of
:func:`eigenkv.quant.reference.quantize` (round half to even, codes computed
from the stored, rounded scale and zero); the references are
``pack(quantize(x, bits, G).codes)`` and ``dequantize(unpack(...))``.

Per-channel grouping (G tokens of one feature) is the same operation on the
transposed block; the cache transposes before calling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eigenkv.kernels.backend import check_kernel_device
from eigenkv.kernels.utils import KernelConfig, KernelSpec, cdiv
from eigenkv.quant.packing import aligned_width, pack_aligned, packed_length, unpack_aligned
from eigenkv.quant.reference import NON_FINITE_MESSAGE, QuantizedGroups, check_quant_args, dequantize, quantize

KERNEL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# The kernels cover the common settings; anything else (other group sizes, remainder
# groups, bf16/fp32 scales) goes through the reference functions, which handle it all.
GROUP_SIZES = (16, 32, 64, 128)
SCALE_DTYPE = torch.float16
_TILE_ELEMENTS = 2048


def quantize_pack_reference(x, bits, group_size, *, symmetric=False, scale_dtype=torch.float16):
    """Reference of :func:`quantize_pack` (any group size, remainder groups included)."""
    q = quantize(x, bits, group_size, -1, symmetric=symmetric, scale_dtype=scale_dtype)
    return pack_aligned(q.codes, bits, dim=-1), q.scale, q.zero


def unpack_dequantize_reference(packed, scale, zero, bits, group_size, n, dtype=torch.float16):
    """Reference of :func:`unpack_dequantize`."""
    codes = unpack_aligned(packed, bits, n, dim=-1)
    q = QuantizedGroups(codes, scale, zero, bits, group_size, codes.dim() - 1, zero is None)
    return dequantize(q, dtype)


@triton.jit
def _round_half_even(y):
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _pack_store(codes, P, rows, row_ok, col0, limit, stride_p, BLOCK_R: tl.constexpr, WIDTH: tl.constexpr,
                BITS: tl.constexpr):  # fmt: skip
    # codes: (BLOCK_R, WIDTH) int32 < 2^BITS -> bytes at columns col0 .. col0 + WIDTH * BITS / 8 of P, those
    # below `limit` (a remainder group's bytes past the aligned row are not stored)
    PER: tl.constexpr = 8 // BITS
    grouped = tl.reshape(codes, (BLOCK_R, WIDTH // PER, PER))
    shifts = tl.arange(0, PER) * BITS
    packed = tl.sum(grouped << shifts[None, None, :], axis=2)
    cols = col0 + tl.arange(0, WIDTH // PER)
    ok = row_ok[:, None] & (cols < limit)[None, :]
    tl.store(P + rows[:, None].to(tl.int64) * stride_p + cols[None, :], packed.to(tl.uint8), mask=ok)


@triton.jit
def _quantize_pack_kernel(
    X,  # (R, C), unit column stride
    P,  # (R, packed bytes per row) uint8
    S,  # (R, C / G)
    Z,  # (R, C / G); unused when SYMMETRIC
    NON_FINITE,  # (1,) int32, set to 1 when x holds NaN or Inf
    n_rows,
    n_cols,
    aligned,  # features a packed row covers: n_cols rounded up to a multiple of 8
    stride_x,
    stride_p,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    n_groups = (n_cols + GROUP - 1) // GROUP  # the last group may be a remainder
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    cols = g * GROUP + tl.arange(0, GROUP)
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=ok, other=0.0)
    x = x.to(tl.float32)
    # Flag NaN/Inf here instead of a separate torch.isfinite pass, which costs the launcher 5x in bandwidth.
    non_finite = tl.max(tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1), axis=0)
    tl.atomic_max(NON_FINITE, non_finite, mask=non_finite > 0)
    out = rows.to(tl.int64) * n_groups + g
    if SYMMETRIC:
        QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
        scale = (tl.max(tl.abs(x), axis=1) / QMAX).to(S.dtype.element_ty)
        s = scale.to(tl.float32)
        safe = tl.where(s == 0.0, 1.0, s)
        c = _round_half_even(x / safe[:, None])
        c = tl.minimum(tl.maximum(c, -QMAX), QMAX) + (1 << (BITS - 1))
    else:
        LEVELS: tl.constexpr = (1 << BITS) - 1
        lo = tl.min(tl.where(col_ok[None, :], x, float("inf")), axis=1)  # over the group's real features
        hi = tl.max(tl.where(col_ok[None, :], x, float("-inf")), axis=1)
        scale = ((hi - lo) / LEVELS).to(S.dtype.element_ty)
        zero = lo.to(Z.dtype.element_ty)
        s = scale.to(tl.float32)
        safe = tl.where(s == 0.0, 1.0, s)
        c = _round_half_even((x - zero.to(tl.float32)[:, None]) / safe[:, None])
        c = tl.minimum(tl.maximum(c, 0.0), LEVELS)
        tl.store(Z + out, zero, mask=row_ok)
    tl.store(S + out, scale, mask=row_ok)
    codes = tl.where(col_ok[None, :], c.to(tl.int32), 0)  # the padding features' codes are zero
    if BITS == 3:
        # low 2-bit plane of the aligned row first, then the high-bit plane
        _pack_store(codes & 3, P, rows, row_ok, g * (GROUP // 4), aligned // 4, stride_p, BLOCK_R, GROUP, 2)
        _pack_store(codes >> 2, P, rows, row_ok, aligned // 4 + g * (GROUP // 8), aligned // 4 + aligned // 8,
                    stride_p, BLOCK_R, GROUP, 1)  # fmt: skip
    else:
        limit = aligned * BITS // 8
        _pack_store(codes, P, rows, row_ok, g * (GROUP * BITS // 8), limit, stride_p, BLOCK_R, GROUP, BITS)


@triton.jit
def _unpack_load(P, rows, row_ok, col0, limit, stride_p, BLOCK_R: tl.constexpr, WIDTH: tl.constexpr,
                 BITS: tl.constexpr):  # fmt: skip
    # inverse of _pack_store: (BLOCK_R, WIDTH) int32 codes (bytes from `limit` on read as zero)
    PER: tl.constexpr = 8 // BITS
    cols = col0 + tl.arange(0, WIDTH // PER)
    ok = row_ok[:, None] & (cols < limit)[None, :]
    packed = tl.load(P + rows[:, None].to(tl.int64) * stride_p + cols[None, :], mask=ok, other=0)
    shifts = tl.arange(0, PER) * BITS
    codes = (packed.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (BLOCK_R, WIDTH))


@triton.jit
def _unpack_dequantize_kernel(
    P,  # (R, packed bytes per row) uint8
    S,  # (R, C / G)
    Z,  # (R, C / G); unused when SYMMETRIC
    OUT,  # (R, C)
    n_rows,
    n_cols,
    aligned,  # features a packed row covers: n_cols rounded up to a multiple of 8
    stride_p,
    stride_out,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    n_groups = (n_cols + GROUP - 1) // GROUP  # the last group may be a remainder
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    if BITS == 3:
        low = _unpack_load(P, rows, row_ok, g * (GROUP // 4), aligned // 4, stride_p, BLOCK_R, GROUP, 2)
        high = _unpack_load(P, rows, row_ok, aligned // 4 + g * (GROUP // 8), aligned // 4 + aligned // 8, stride_p,
                            BLOCK_R, GROUP, 1)  # fmt: skip
        codes = low | (high << 2)
    else:
        limit = aligned * BITS // 8
        codes = _unpack_load(P, rows, row_ok, g * (GROUP * BITS // 8), limit, stride_p, BLOCK_R, GROUP, BITS)
    params = rows.to(tl.int64) * n_groups + g
    s = tl.load(S + params, mask=row_ok, other=0.0).to(tl.float32)
    if SYMMETRIC:
        x = s[:, None] * (codes.to(tl.float32) - (1 << (BITS - 1)))
    else:
        z = tl.load(Z + params, mask=row_ok, other=0.0).to(tl.float32)
        x = s[:, None] * codes.to(tl.float32) + z[:, None]
    cols = g * GROUP + tl.arange(0, GROUP)
    ok = row_ok[:, None] & (cols < n_cols)[None, :]
    tl.store(OUT + rows[:, None].to(tl.int64) * stride_out + cols[None, :], x.to(OUT.dtype.element_ty), mask=ok)


def launch_config(group_size: int) -> KernelConfig:
    """Rows per program for a group size (the compile test checks every one)."""
    return KernelConfig(constexprs={"BLOCK_R": max(1, _TILE_ELEMENTS // group_size)}, num_warps=4)


def _launch(kernel, args: tuple, n_rows: int, n_cols: int, bits: int, group_size: int, symmetric: bool) -> None:
    """Launch a row kernel: one program per (BLOCK_R rows, group of the row)."""
    cfg = launch_config(group_size)
    grid = (cdiv(n_rows, cfg.constexprs["BLOCK_R"]), cdiv(n_cols, group_size))
    kernel[grid](*args, BITS=bits, GROUP=group_size, SYMMETRIC=symmetric, num_warps=cfg.num_warps, **cfg.constexprs)


def kernel_supports(n_cols: int, group_size: int, scale_dtype: torch.dtype) -> bool:
    """Whether the kernels handle rows of ``n_cols`` (else use the references, which handle any case)."""
    return group_size in GROUP_SIZES and scale_dtype == SCALE_DTYPE


def _check_kernel_group(group_size: int, scale_dtype: torch.dtype) -> None:
    if scale_dtype != SCALE_DTYPE:
        raise ValueError(f"the kernels store float16 scales; got {scale_dtype} (use the *_reference functions)")
    if group_size not in GROUP_SIZES:
        raise ValueError(
            f"the kernels need a power-of-two group size in {GROUP_SIZES}; got {group_size} "
            "(use the *_reference functions for other sizes)"
        )


def quantize_pack(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    check_finite: bool = True,
):
    """Triton: ``x`` (R, C) fp16/bf16/fp32 -> ``(packed, scale, zero)``.

    ``packed`` is uint8 (R, packed_length(aligned_width(C), bits)): the row's codes followed by zero codes up to
    a multiple of 8 features (the stored layout, ``eigenkv.quant.packing.pack_aligned``; the dense packing when
    8 divides C). ``scale`` and ``zero`` are float16 (R, ceil(C / G)) (a remainder group has its own), ``zero``
    None when symmetric. NaN/Inf raise (one 4-byte device-to-host read) unless ``check_finite=False``
    (callers that flag them on the device).

    ``x`` needs a unit stride along its last axis; CUDA, or CPU under ``TRITON_INTERPRET=1``.
    """
    check_quant_args(x, bits, group_size, scale_dtype, check_finite=False)  # the kernel flags NaN/Inf
    check_kernel_device(x, "quantize_pack", "quantize_pack_reference")
    if x.dtype not in KERNEL_DTYPES or x.dim() != 2:
        raise ValueError(f"quantize_pack takes a 2-D fp16/bf16/fp32 tensor; got {x.dim()}-D {x.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_rows, n_cols = x.shape
    _check_kernel_group(group_size, scale_dtype)
    aligned = aligned_width(n_cols)
    packed = torch.empty((n_rows, packed_length(aligned, bits)), dtype=torch.uint8, device=x.device)
    scale = torch.empty((n_rows, cdiv(n_cols, group_size)), dtype=scale_dtype, device=x.device)
    zero = None if symmetric else torch.empty_like(scale)
    non_finite = torch.zeros(1, dtype=torch.int32, device=x.device)
    if n_rows:
        args = (
            x,
            packed,
            scale,
            scale if zero is None else zero,
            non_finite,
            n_rows,
            n_cols,
            aligned,
            x.stride(0),
            packed.stride(0),
        )
        _launch(_quantize_pack_kernel, args, n_rows, n_cols, bits, group_size, symmetric)
        if check_finite and non_finite.item():  # one 4-byte read
            raise ValueError(NON_FINITE_MESSAGE)
    return packed, scale, zero


def unpack_dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    n: int,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Triton: inverse of :func:`quantize_pack` -> ``(R, n)`` in ``dtype``."""
    check_kernel_device(packed, "unpack_dequantize", "unpack_dequantize_reference")
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"output dtype must be fp16, bf16 or fp32; got {dtype}")
    _check_kernel_group(group_size, scale.dtype)
    aligned = aligned_width(n)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_length(aligned, bits):
        raise ValueError(
            f"packed must be uint8 (R, {packed_length(aligned, bits)}) for {n} codes of {bits} bits "
            f"(padded to {aligned}); got {packed.dtype} {tuple(packed.shape)}"
        )
    n_rows = packed.shape[0]
    expected = (n_rows, cdiv(n, group_size))
    if tuple(scale.shape) != expected or (zero is not None and tuple(zero.shape) != expected):
        raise ValueError(f"scale and zero must have shape {expected}")
    packed, scale = packed.contiguous(), scale.contiguous()
    zero = None if zero is None else zero.contiguous()
    out = torch.empty((n_rows, n), dtype=dtype, device=packed.device)
    if n_rows:
        args = (
            packed,
            scale,
            scale if zero is None else zero,
            out,
            n_rows,
            n,
            aligned,
            packed.stride(0),
            out.stride(0),
        )
        _launch(_unpack_dequantize_kernel, args, n_rows, n, bits, group_size, zero is None)
    return out


def _signatures(dtype: str) -> dict:
    """Argument types of each kernel for activations of ``dtype`` (fp16 scales, as the launchers require)."""
    ints = {"n_rows": "i32", "n_cols": "i32", "aligned": "i32"}
    return {
        "quantize_pack": (
            _quantize_pack_kernel,
            {
                "X": f"*{dtype}",
                "P": "*u8",
                "S": "*fp16",
                "Z": "*fp16",
                "NON_FINITE": "*i32",
                **ints,
                "stride_x": "i32",
                "stride_p": "i32",
            },
        ),
        "unpack_dequantize": (
            _unpack_dequantize_kernel,
            {
                "P": "*u8",
                "S": "*fp16",
                "Z": "*fp16",
                "OUT": f"*{dtype}",
                **ints,
                "stride_p": "i32",
                "stride_out": "i32",
            },
        ),
    }


def compile_specs():
    """Every configuration the launchers can use, for the sm_80/sm_90 compile test."""
    for dtype in ("fp16", "bf16", "fp32"):
        for name, (kernel, signature) in _signatures(dtype).items():
            for bits in (2, 3, 4, 8):
                for group in GROUP_SIZES:
                    for symmetric in (False, True):
                        cfg = launch_config(group)
                        yield KernelSpec(
                            name=f"{name}[{dtype},b={bits},G={group},sym={int(symmetric)}]",
                            fn=kernel,
                            signature=signature,
                            constexprs={"BITS": bits, "GROUP": group, "SYMMETRIC": symmetric, **cfg.constexprs},
                            num_warps=cfg.num_warps,
                        )
