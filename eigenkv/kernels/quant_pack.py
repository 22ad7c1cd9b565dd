"""Fused group-wise quantize + pack, and unpack + dequantize, along the last axis.

Both operate on a 2-D view ``x`` of shape ``(R, C)``: groups of ``G`` consecutive
elements of a row share a scale (and zero point), and codes are packed along
the row in the layout of :mod:`eigenkv.quant.packing` (4 and 2 bits: several
codes per byte, first code in the low bits; 3 bits: a 2-bit plane of the whole
row followed by a 1-bit plane; ``paired`` rows store each run of two bytes' codes even
features first, see ``paired_run``). The math is that of
:func:`eigenkv.quant.reference.quantize` (round half to even, codes computed
from the stored, rounded scale and zero); the references are
``pack(quantize(x, bits, G).codes)`` and ``dequantize(unpack(...))``.

Per-channel grouping (``axis="channel"``: groups of G consecutive rows, the
tokens, of each column, the features) quantizes along the rows and packs along
the columns, as per-token grouping does: a cache stores both in the same rows
of codes, one per token, and only the scales and zeros differ, ``(R / G, C')``
(``C'`` the aligned width, the padding columns' zero).

:func:`ring_append` is the one-token append of a capturable cache in one launch:
the new states into their ring slot, and the newest quantization unit quantized
and packed straight into the cache's buffers at positions read on the device
(reference: :func:`ring_append_reference`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from eigenkv.kernels.backend import check_kernel_device
from eigenkv.kernels.utils import KernelConfig, KernelSpec, cdiv, on_input_device
from eigenkv.quant.config import KVQuantConfig
from eigenkv.quant.packing import aligned_width, pack_aligned, packed_length, paired_run, unpack_aligned
from eigenkv.quant.reference import NON_FINITE_MESSAGE, QuantizedGroups, check_quant_args, dequantize, quantize

KERNEL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# The kernels cover the common settings; anything else (other group sizes, remainder
# groups, bf16/fp32 scales) goes through the reference functions, which handle it all.
GROUP_SIZES = (16, 32, 64, 128)
SCALE_DTYPE = torch.float16
_TILE_ELEMENTS = 2048


def quantize_pack_reference(
    x, bits, group_size, *, symmetric=False, scale_dtype=torch.float16, paired=False, axis="token"
):
    """Reference of :func:`quantize_pack` (any group size, remainder groups included per token)."""
    token = _check_axis(axis, x.shape[-2], group_size)
    q = quantize(x, bits, group_size, -1 if token else -2, symmetric=symmetric, scale_dtype=scale_dtype)
    packed = pack_aligned(q.codes, bits, dim=-1, paired=paired)
    if token:
        return packed, q.scale, q.zero
    pad = (0, aligned_width(x.shape[-1]) - x.shape[-1])  # the padding columns' parameters are zero
    zero = None if q.zero is None else torch.nn.functional.pad(q.zero, pad)
    return packed, torch.nn.functional.pad(q.scale, pad), zero


def unpack_dequantize_reference(
    packed, scale, zero, bits, group_size, n, dtype=torch.float16, *, paired=False, axis="token"
):
    """Reference of :func:`unpack_dequantize`."""
    token = _check_axis(axis, packed.shape[-2], group_size)
    codes = unpack_aligned(packed, bits, n, dim=-1, paired=paired)
    if not token:  # parameters of the aligned columns
        scale = scale[..., :n]
        zero = None if zero is None else zero[..., :n]
    q = QuantizedGroups(codes, scale, zero, bits, group_size, codes.dim() - (1 if token else 2), zero is None)
    return dequantize(q, dtype)


def _check_axis(axis: str, rows: int, group_size: int) -> bool:
    """Whether ``axis`` is per token (else per channel, whose ``rows`` must be whole groups)."""
    if axis not in ("token", "channel"):
        raise ValueError(f'axis must be "token" or "channel"; got {axis!r}')
    if axis == "channel" and rows % group_size:
        raise ValueError(f"per-channel groups take {group_size} consecutive rows; got {rows} rows (pass whole groups)")
    return axis == "token"


@triton.jit
def _round_half_even(y):
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _quantize_tile(x, valid, S, Z, AXIS: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    # fp32 x (2-D), groups reduced along AXIS over the `valid` elements -> int32 codes (0 where not valid), and
    # the groups' scales and zero points in the dtypes of S and Z (the codes are computed from them, rounded)
    if SYMMETRIC:
        QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
        scale = (tl.max(tl.where(valid, tl.abs(x), 0.0), axis=AXIS) / QMAX).to(S.dtype.element_ty)
        s = scale.to(tl.float32)
        safe = tl.expand_dims(tl.where(s == 0.0, 1.0, s), AXIS)
        c = _round_half_even(x / safe)
        c = tl.minimum(tl.maximum(c, -QMAX), QMAX) + (1 << (BITS - 1))
        zero = scale  # not stored
    else:
        LEVELS: tl.constexpr = (1 << BITS) - 1
        lo = tl.min(tl.where(valid, x, float("inf")), axis=AXIS)
        hi = tl.max(tl.where(valid, x, float("-inf")), axis=AXIS)
        scale = ((hi - lo) / LEVELS).to(S.dtype.element_ty)
        zero = lo.to(Z.dtype.element_ty)
        s = scale.to(tl.float32)
        safe = tl.expand_dims(tl.where(s == 0.0, 1.0, s), AXIS)
        c = _round_half_even((x - tl.expand_dims(zero.to(tl.float32), AXIS)) / safe)
        c = tl.minimum(tl.maximum(c, 0.0), LEVELS)
    return tl.where(valid, c, 0.0).to(tl.int32), scale, zero  # (groups of padding only: NaN codes, not kept)


@triton.jit
def _paired(codes, BITS: tl.constexpr, INVERSE: tl.constexpr):
    # (R, W) codes in feature order -> the paired order of eigenkv.quant.packing (each run of RUN features: the
    # even ones, then the odd ones), or back when INVERSE; W a multiple of RUN (groups of at least 16)
    if BITS == 8:
        return codes
    RUN: tl.constexpr = 8 if BITS == 3 else 16 // BITS
    R: tl.constexpr = codes.shape[0]
    W: tl.constexpr = codes.shape[1]
    shape: tl.constexpr = (R, W // RUN, 2, RUN // 2) if INVERSE else (R, W // RUN, RUN // 2, 2)
    return tl.reshape(tl.permute(tl.reshape(codes, shape), (0, 1, 3, 2)), (R, W))


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
def _pack_rows(codes, P, rows, row_ok, first, aligned, stride_p, BITS: tl.constexpr, PAIRED: tl.constexpr):
    # codes (BLOCK_R, W) int32 of columns [first, first + W) (first and W multiples of 8) of rows `rows` -> their
    # bytes in the packed rows of P (row r at P + r * stride_p, paired when PAIRED; 3 bits: the 2-bit plane of
    # the aligned row, then the 1-bit plane); bytes past the aligned row are not stored
    R: tl.constexpr = codes.shape[0]
    W: tl.constexpr = codes.shape[1]
    if PAIRED:
        codes = _paired(codes, BITS, False)
    if BITS == 3:
        _pack_store(codes & 3, P, rows, row_ok, first // 4, aligned // 4, stride_p, R, W, 2)
        _pack_store(codes >> 2, P, rows, row_ok, aligned // 4 + first // 8, aligned // 4 + aligned // 8, stride_p,
                    R, W, 1)  # fmt: skip
    else:
        _pack_store(codes, P, rows, row_ok, first * BITS // 8, aligned * BITS // 8, stride_p, R, W, BITS)


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
    PAIRED: tl.constexpr,
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
    # over the group's real features (a remainder group's padding codes are zero)
    codes, scale, zero = _quantize_tile(x, row_ok[:, None] & col_ok[None, :], S, Z, 1, BITS, SYMMETRIC)
    if not SYMMETRIC:
        tl.store(Z + out, zero, mask=row_ok)
    tl.store(S + out, scale, mask=row_ok)
    _pack_rows(codes, P, rows, row_ok, g * GROUP, aligned, stride_p, BITS, PAIRED)  # runs lie inside a group


@triton.jit
def _block_tile(GROUP: tl.constexpr, BLOCK_F: tl.constexpr):
    # a per-channel program's tile, program (block of GROUP rows, tile of BLOCK_F columns): (block int64, first
    # column, its columns (BLOCK_F,), its rows (GROUP,) int64)
    block = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * BLOCK_F
    return block, first, first + tl.arange(0, BLOCK_F), block * GROUP + tl.arange(0, GROUP)


@triton.jit
def _dequantize_codes(codes, S, Z, params, ok, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    # fp32 values of int32 codes from the scales (and zero points) at offsets `params`, shaped to broadcast over
    # the codes ((R, 1) per token, (1, W) per channel); `ok` masks the parameter loads
    s = tl.load(S + params, mask=ok, other=0.0).to(tl.float32)
    if SYMMETRIC:
        return s * (codes.to(tl.float32) - (1 << (BITS - 1)))
    else:
        return s * codes.to(tl.float32) + tl.load(Z + params, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _quantize_pack_blocks_kernel(
    X,  # (R, C), unit column stride; R a multiple of GROUP
    P,  # (R, packed bytes per row) uint8
    S,  # (R / GROUP, aligned)
    Z,  # (R / GROUP, aligned); unused when SYMMETRIC
    NON_FINITE,  # (1,) int32, set to 1 when x holds NaN or Inf
    n_cols,
    aligned,  # columns a packed row covers: n_cols rounded up to a multiple of 8
    stride_x,
    stride_p,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    PAIRED: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    # per channel (_block_tile): each column's GROUP codes one group
    block, first, cols, rows = _block_tile(GROUP, BLOCK_F)
    col_ok = cols < n_cols
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=col_ok[None, :], other=0.0).to(tl.float32)
    non_finite = tl.max(tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1), axis=0)
    tl.atomic_max(NON_FINITE, non_finite, mask=non_finite > 0)
    rows_ok = rows >= 0  # every row of a block is stored
    codes, scale, zero = _quantize_tile(x, col_ok[None, :] & rows_ok[:, None], S, Z, 0, BITS, SYMMETRIC)
    params = block * aligned + cols
    tl.store(S + params, tl.where(col_ok, scale, 0.0), mask=cols < aligned)  # padding columns: zero
    if not SYMMETRIC:
        tl.store(Z + params, tl.where(col_ok, zero, 0.0), mask=cols < aligned)
    _pack_rows(codes, P, rows, rows_ok, first, aligned, stride_p, BITS, PAIRED)


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
def _unpack_rows(P, rows, row_ok, first, aligned, stride_p, BLOCK_R: tl.constexpr, W: tl.constexpr,
                 BITS: tl.constexpr, PAIRED: tl.constexpr):  # fmt: skip
    # inverse of _pack_rows: (BLOCK_R, W) int32 codes of columns [first, first + W)
    if BITS == 3:
        low = _unpack_load(P, rows, row_ok, first // 4, aligned // 4, stride_p, BLOCK_R, W, 2)
        high = _unpack_load(P, rows, row_ok, aligned // 4 + first // 8, aligned // 4 + aligned // 8, stride_p,
                            BLOCK_R, W, 1)  # fmt: skip
        codes = low | (high << 2)
    else:
        codes = _unpack_load(P, rows, row_ok, first * BITS // 8, aligned * BITS // 8, stride_p, BLOCK_R, W, BITS)
    if PAIRED:
        codes = _paired(codes, BITS, True)
    return codes


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
    PAIRED: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    n_groups = (n_cols + GROUP - 1) // GROUP  # the last group may be a remainder
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    codes = _unpack_rows(P, rows, row_ok, g * GROUP, aligned, stride_p, BLOCK_R, GROUP, BITS, PAIRED)
    params = rows.to(tl.int64) * n_groups + g
    x = _dequantize_codes(codes, S, Z, params[:, None], row_ok[:, None], BITS, SYMMETRIC)
    cols = g * GROUP + tl.arange(0, GROUP)
    ok = row_ok[:, None] & (cols < n_cols)[None, :]
    tl.store(OUT + rows[:, None].to(tl.int64) * stride_out + cols[None, :], x.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _unpack_dequantize_blocks_kernel(
    P,  # (R, packed bytes per row) uint8; R a multiple of GROUP
    S,  # (R / GROUP, aligned)
    Z,  # (R / GROUP, aligned); unused when SYMMETRIC
    OUT,  # (R, C)
    n_cols,
    aligned,  # columns a packed row covers: n_cols rounded up to a multiple of 8
    stride_p,
    stride_out,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    PAIRED: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    # inverse of _quantize_pack_blocks_kernel (_block_tile)
    block, first, cols, rows = _block_tile(GROUP, BLOCK_F)
    codes = _unpack_rows(P, rows, rows >= 0, first, aligned, stride_p, GROUP, BLOCK_F, BITS, PAIRED)
    col_ok = cols < n_cols
    x = _dequantize_codes(codes, S, Z, (block * aligned + cols)[None, :], col_ok[None, :], BITS, SYMMETRIC)
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], x.to(OUT.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def _ring_append_kernel(
    X, x_b, x_h,  # (B, H, 1, D): the new token's states
    RING, r_b, r_h, r_r,  # (B, H, slots, D): token j in slot j % slots
    C, c_b, c_h, c_r,  # codes (B, H, rows, packed row) uint8
    S, Z, s_b, s_h, s_r,  # scales, zero points (B, H, rows, groups or features)
    COUNTS, NEXT,  # (2,) int32: [quantized tokens, tokens held] before / after this token
    NON_FINITE,  # () bool, set when the new states hold NaN or Inf
    heads, width, aligned, slots, residual,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, AXIS_TOKEN: tl.constexpr,
    BLOCK_F: tl.constexpr,
):  # fmt: skip
    # program (b * H + h, j): features group j (per token) or tile j of BLOCK_F features (per channel)
    pid = tl.program_id(0)
    j = tl.program_id(1)
    b = (pid // heads).to(tl.int64)
    h = (pid % heads).to(tl.int64)
    held = tl.load(COUNTS + 1)
    after = held + 1
    feats = j * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = feats < width
    x = tl.load(X + b * x_b + h * x_h + feats, mask=f_ok, other=0.0)
    ring = RING + b * r_b + h * r_h
    tl.store(ring + (held % slots).to(tl.int64) * r_r + feats, x, mask=f_ok)
    xf = x.to(tl.float32)
    bad = tl.max(((xf != xf) | (tl.abs(xf) == float("inf"))).to(tl.int32), axis=0)
    tl.store(NON_FINITE, bad > 0, mask=bad > 0)
    old = tl.maximum(after - residual, 0)
    # a unit completes at this step (a predicate on the device: the launch is the same at every step)
    if AXIS_TOKEN:  # the token this step quantizes, when there is one
        write = held >= residual
        first = tl.maximum(held - residual, 0)
        # the unit is read from the ring, or from x when it is this token (its ring write may not be visible)
        src = tl.load(ring + (first % slots).to(tl.int64) * r_r + feats, mask=f_ok & (first != held), other=0.0)
        unit = tl.where(first == held, x, src).to(tl.float32)[None, :]  # (1, GROUP)
        codes, scale, zero = _quantize_tile(unit, f_ok[None, :], S, Z, 1, BITS, SYMMETRIC)
        params = b * s_b + h * s_h + first.to(tl.int64) * s_r + j
        tl.store(S + params + tl.arange(0, 1), scale, mask=write)
        if not SYMMETRIC:
            tl.store(Z + params + tl.arange(0, 1), zero, mask=write)
        first_row = first + tl.zeros([1], tl.int32)
        _pack_rows(
            codes, C + b * c_b + h * c_h, first_row, write & (first_row >= 0), j * GROUP, aligned, c_r, BITS, True
        )  # fmt: skip  (a cache's rows are paired)
        quantized = old
    else:  # the block of GROUP tokens that this step completes, when it completes one
        write = (old > 0) & (old % GROUP == 0)
        block = tl.maximum(old // GROUP - 1, 0)
        toks = block * GROUP + tl.arange(0, GROUP)
        is_new = (toks == held)[:, None]
        tile = tl.load(ring + (toks % slots).to(tl.int64)[:, None] * r_r + feats[None, :],
                       mask=f_ok[None, :] & ~is_new, other=0.0)  # fmt: skip
        tile = tl.where(is_new, x[None, :], tile).to(tl.float32)  # (GROUP, BLOCK_F)
        codes, scale, zero = _quantize_tile(tile, f_ok[None, :] & (toks >= 0)[:, None], S, Z, 0, BITS, SYMMETRIC)
        # padding features (width <= f < aligned): zero codes, scales and zero points, as the cache stores them
        params = b * s_b + h * s_h + block.to(tl.int64) * s_r + feats
        tl.store(S + params, tl.where(f_ok, scale, 0.0), mask=(feats < aligned) & write)
        if not SYMMETRIC:
            tl.store(Z + params, tl.where(f_ok, zero, 0.0), mask=(feats < aligned) & write)
        _pack_rows(codes, C + b * c_b + h * c_h, toks, write & (toks >= 0), j * BLOCK_F, aligned, c_r, BITS, True)
        quantized = old // GROUP * GROUP
    if (pid == 0) & (j == 0):
        tl.store(NEXT, quantized)
        tl.store(NEXT + 1, after)


def launch_config(group_size: int, axis: str = "token") -> KernelConfig:
    """Tile of a program for a group size (the compile test checks every one): BLOCK_R rows of one group per
    token, BLOCK_F columns of a block of GROUP rows per channel."""
    if axis == "token":
        return KernelConfig(constexprs={"BLOCK_R": max(1, _TILE_ELEMENTS // group_size)}, num_warps=4)
    return KernelConfig(constexprs={"BLOCK_F": max(16, _TILE_ELEMENTS // group_size)}, num_warps=4)


def _launch(
    kernels: tuple, args: tuple, n_rows: int, n_cols: int, bits: int, group_size: int, symmetric: bool,
    paired: bool, axis: str,
) -> None:  # fmt: skip
    """Launch kernels[0] per token: one program per (BLOCK_R rows, group of the row); kernels[1] per channel: one
    per (block of GROUP rows, BLOCK_F columns of the aligned row). 8-bit rows are paired as they are."""
    cfg = launch_config(group_size, axis)
    if axis == "token":
        kernel, grid = kernels[0], (cdiv(n_rows, cfg.constexprs["BLOCK_R"]), cdiv(n_cols, group_size))
    else:
        kernel, grid = kernels[1], (n_rows // group_size, cdiv(aligned_width(n_cols), cfg.constexprs["BLOCK_F"]))
    kernel[grid](*args, BITS=bits, GROUP=group_size, SYMMETRIC=symmetric, PAIRED=paired and paired_run(bits) > 1,
                 num_warps=cfg.num_warps, **cfg.constexprs)  # fmt: skip


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


@on_input_device
def quantize_pack(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    check_finite: bool = True,
    paired: bool = False,
    axis: str = "token",
):
    """Triton: ``x`` (R, C) fp16/bf16/fp32 -> ``(packed, scale, zero)``.

    ``packed`` is uint8 (R, packed_length(aligned_width(C), bits)): the row's codes followed by zero codes up to
    a multiple of 8 features (the stored layout, ``eigenkv.quant.packing.pack_aligned``; the dense packing when
    8 divides C), in the paired order when ``paired`` (a cache's rows). Per token (``axis="token"``), groups of
    G columns: ``scale`` and ``zero`` are float16 (R, ceil(C / G)) (a remainder group has its own). Per channel
    (``"channel"``), groups of G consecutive rows of each column (R a multiple of G): float16
    (R / G, aligned_width(C)), the padding columns' zero. ``zero`` is None when symmetric. NaN/Inf raise (one
    4-byte device-to-host read) unless ``check_finite=False`` (callers that flag them on the device).

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
    token = _check_axis(axis, n_rows, group_size)
    aligned = aligned_width(n_cols)
    packed = torch.empty((n_rows, packed_length(aligned, bits)), dtype=torch.uint8, device=x.device)
    params = (n_rows, cdiv(n_cols, group_size)) if token else (n_rows // group_size, aligned)
    scale = torch.empty(params, dtype=scale_dtype, device=x.device)
    zero = None if symmetric else torch.empty_like(scale)
    non_finite = torch.zeros(1, dtype=torch.int32, device=x.device)
    if n_rows:
        rows = (n_rows,) if token else ()  # a block kernel's rows are whole blocks: its grid bounds them
        args = (x, packed, scale, scale if zero is None else zero, non_finite, *rows, n_cols, aligned, x.stride(0),
                packed.stride(0))  # fmt: skip
        kernels = (_quantize_pack_kernel, _quantize_pack_blocks_kernel)
        _launch(kernels, args, n_rows, n_cols, bits, group_size, symmetric, paired, axis)
        if check_finite and non_finite.item():  # one 4-byte read
            raise ValueError(NON_FINITE_MESSAGE)
    return packed, scale, zero


@on_input_device
def unpack_dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    n: int,
    dtype: torch.dtype = torch.float16,
    *,
    paired: bool = False,
    axis: str = "token",
) -> torch.Tensor:
    """Triton: inverse of :func:`quantize_pack` -> ``(R, n)`` in ``dtype`` (``paired``: rows in the paired order;
    ``axis``: the grouping, and the parameters' shape, of :func:`quantize_pack`)."""
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
    token = _check_axis(axis, n_rows, group_size)
    expected = (n_rows, cdiv(n, group_size)) if token else (n_rows // group_size, aligned)
    if tuple(scale.shape) != expected or (zero is not None and tuple(zero.shape) != expected):
        raise ValueError(f"scale and zero must have shape {expected} (per {axis})")
    packed, scale = packed.contiguous(), scale.contiguous()
    zero = None if zero is None else zero.contiguous()
    out = torch.empty((n_rows, n), dtype=dtype, device=packed.device)
    if n_rows:
        rows = (n_rows,) if token else ()
        args = (packed, scale, scale if zero is None else zero, out, *rows, n, aligned, packed.stride(0),
                out.stride(0))  # fmt: skip
        kernels = (_unpack_dequantize_kernel, _unpack_dequantize_blocks_kernel)
        _launch(kernels, args, n_rows, n, bits, group_size, zero is None, paired, axis)
    return out


class RingBuffers(NamedTuple):
    """What a one-token append writes (one capturable cache stream, in the layouts of ``eigenkv.quant.store``).

    Attributes:
        ring: ``(B, H, slots, D)`` full-precision tokens, token ``j`` in slot ``j % slots``.
        codes: uint8 packed codes ``(B, H, T, bytes)``, a paired row per token (either grouping).
        scale, zero: per token ``(B, H, T, groups)``, per channel ``(B, H, T / G, D')``; ``zero`` None when
            symmetric.
        counts: int32 ``(2,)``: ``[T_q, S]``, read and advanced on the device.
        non_finite: () bool, set when appended states hold NaN or Inf.
        next_counts: int32 ``(2,)`` scratch for the kernel (the reference does not need it).
    """

    ring: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    counts: torch.Tensor
    non_finite: torch.Tensor
    next_counts: torch.Tensor | None = None


def ring_append_reference(x: torch.Tensor, buffers: RingBuffers, config: KVQuantConfig, axis: str) -> None:
    """Reference of :func:`ring_append` (any dtype, group size and scale dtype): the same writes with torch ops,
    every position read from ``counts`` on the device (nothing read back: a CUDA graph can capture it; a step
    that completes no unit writes its rows back unchanged)."""
    ring, codes, scale, zero, counts, non_finite, _ = buffers
    bits, group_size, residual, symmetric = config.bits, config.group_size, config.residual, config.symmetric
    b, h, _, d = x.shape
    slots = ring.shape[2]
    held = counts[1:].long()  # (1,)
    non_finite |= ~torch.isfinite(x).all()
    ring.index_copy_(2, held % slots, x.to(ring.dtype))
    old = (held + 1 - residual).clamp(min=0)

    def write(buffer, index, rows):  # rows at `index` along axis 2 where a unit completes, else unchanged
        if buffer is not None:
            buffer.index_copy_(2, index, torch.where(completes, rows, buffer.index_select(2, index)))

    if axis == "token":  # the token this step quantizes, when there is one
        completes = held >= residual
        first = (held - residual).clamp(min=0)
        unit = ring.index_select(2, first % slots).to(x.dtype)  # (B, H, 1, D)
        q = quantize(unit, bits, group_size, -1, symmetric=symmetric, scale_dtype=scale.dtype, check_finite=False)
        write(codes, first, pack_aligned(q.codes, bits, dim=-1, check=False, paired=True))
        write(scale, first, q.scale)
        write(zero, first, q.zero)
        quantized = old
    else:  # the block of G tokens this step completes, when it completes one
        completes = (old > 0) & (old % group_size == 0)
        block = (old // group_size - 1).clamp(min=0)
        tokens = block * group_size + torch.arange(group_size, device=x.device)
        unit = ring.index_select(2, tokens % slots).to(x.dtype)  # (B, H, G, D)
        q = quantize(unit, bits, group_size, -2, symmetric=symmetric, scale_dtype=scale.dtype, check_finite=False)
        pad = (0, aligned_width(d) - d)  # padding features: zero codes, scales and zero points
        write(codes, tokens, pack_aligned(q.codes, bits, dim=-1, check=False, paired=True))
        write(scale, block, torch.nn.functional.pad(q.scale, pad))
        write(zero, block, None if q.zero is None else torch.nn.functional.pad(q.zero, pad))
        quantized = old // group_size * group_size
    counts.copy_(torch.cat([quantized, held + 1]).to(torch.int32))


@on_input_device
def ring_append(x: torch.Tensor, buffers: RingBuffers, config: KVQuantConfig, axis: str) -> None:
    """Triton: append one token to a capturable cache stream in one launch (and a 8-byte copy of the counts).

    Writes ``x`` (B, H, 1, D) fp16/bf16 into ``buffers.ring`` at slot ``S % slots``, then quantizes the unit
    this token completes, if any (``axis="token"``: token ``S - residual``; ``"channel"``: the block of ``G``
    tokens that ends at ``S + 1 - residual``; bits, group, residual and symmetry from ``config``), from the
    ring (``x`` for the new token itself), and writes its packed codes, scales and zero points in place;
    whether a unit completes is a predicate on the device, so the launch is the same at every step.
    ``counts`` is read on the device and advanced (through ``next_counts``, as other programs still read it).
    NaN/Inf in ``x`` set ``non_finite``. Nothing is read back on the host.
    """
    check_kernel_device(x, "ring_append", "ring_append_reference")
    ring, codes, scale, zero, counts, non_finite, next_counts = buffers
    bits, group_size, residual, symmetric = config.bits, config.group_size, config.residual, config.symmetric
    b, h, one, d = x.shape
    if one != 1 or x.dtype not in (torch.float16, torch.bfloat16) or x.stride(-1) != 1 or ring.dtype != x.dtype:
        raise ValueError(
            f"ring_append appends one fp16/bf16 token (B, H, 1, D) with unit last stride to a ring of its dtype; "
            f"got {x.dtype} {tuple(x.shape)}, ring {ring.dtype}"
        )
    _check_kernel_group(group_size, scale.dtype)
    if next_counts is None or next_counts.shape != counts.shape or next_counts.dtype != torch.int32:
        raise ValueError("ring_append needs next_counts: a scratch int32 (2,) tensor like counts")
    if axis == "token":
        block_f, tiles = group_size, cdiv(d, group_size)
    else:
        block_f = max(16, _TILE_ELEMENTS // group_size)
        tiles = cdiv(aligned_width(d), block_f)
    _ring_append_kernel[(b * h, tiles)](
        x, x.stride(0), x.stride(1), ring, *ring.stride()[:3], codes, *codes.stride()[:3],
        scale, scale if zero is None else zero, *scale.stride()[:3], counts, next_counts, non_finite,
        h, d, aligned_width(d), ring.shape[2], residual,
        BITS=bits, GROUP=group_size, SYMMETRIC=symmetric, AXIS_TOKEN=axis == "token", BLOCK_F=block_f, num_warps=4,
    )  # fmt: skip
    counts.copy_(next_counts)


def _signatures(dtype: str, axis: str = "token") -> dict:
    """Argument types of each kernel for activations of ``dtype`` (fp16 scales, as the launchers require), per
    token (the row kernels) or per channel (the block kernels)."""
    ints = (
        {"n_rows": "i32", "n_cols": "i32", "aligned": "i32"} if axis == "token" else {"n_cols": "i32", "aligned": "i32"}
    )
    kernels = (
        (_quantize_pack_kernel, _unpack_dequantize_kernel)
        if axis == "token"
        else (_quantize_pack_blocks_kernel, _unpack_dequantize_blocks_kernel)
    )
    return {
        "quantize_pack": (
            kernels[0],
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
        ),  # fmt: skip
        "unpack_dequantize": (
            kernels[1],
            {
                "P": "*u8",
                "S": "*fp16",
                "Z": "*fp16",
                "OUT": f"*{dtype}",
                **ints,
                "stride_p": "i32",
                "stride_out": "i32",
            },
        ),  # fmt: skip
    }


def _ring_append_signature(dtype: str) -> dict:
    strides = {name: "i32" for name in ("x_b", "x_h", "r_b", "r_h", "r_r", "c_b", "c_h", "c_r", "s_b", "s_h", "s_r")}
    pointers = {"X": f"*{dtype}", "RING": f"*{dtype}", "C": "*u8", "S": "*fp16", "Z": "*fp16", "COUNTS": "*i32"}
    ints = {name: "i32" for name in ("heads", "width", "aligned", "slots", "residual")}
    return pointers | {"NEXT": "*i32", "NON_FINITE": "*i1"} | strides | ints


def ring_append_specs():
    """The ring append at what changes its code: both groupings, every bit width (group 64, fp16 and bf16),
    groups of 16 and 128, symmetric codes."""
    variants = [(dtype, bits, 64, False) for dtype in ("fp16", "bf16") for bits in (2, 3, 4, 8)]
    variants += [("fp16", 4, 16, False), ("fp16", 4, 128, False), ("fp16", 4, 64, True)]
    for dtype, bits, group, symmetric in variants:
        for axis in ("token", "channel"):
            block_f = group if axis == "token" else max(16, _TILE_ELEMENTS // group)
            yield KernelSpec(
                name=f"ring_append[{dtype},{axis},b={bits},G={group},sym={int(symmetric)}]",
                fn=_ring_append_kernel,
                signature=_ring_append_signature(dtype),
                constexprs={
                    "BITS": bits,
                    "GROUP": group,
                    "SYMMETRIC": symmetric,
                    "AXIS_TOKEN": axis == "token",
                    "BLOCK_F": block_f,
                },  # fmt: skip
                num_warps=4,
            )


def compile_specs():
    """Every configuration the launchers can use, for the sm_80/sm_90 compile test. Per token: plain rows at
    every width, group, symmetry and dtype; paired rows (a cache's) at 2, 3 and 4 bits (8-bit rows are the same
    either way), every group, asymmetric, in fp16 and bf16 (the pairing is code of its own, independent of the
    symmetry and the dtype). Per channel (a cache's paired rows): every width at group 64 in fp16 and bf16, every
    group, symmetric codes and plain rows at 4 bits (a block's tile is GROUP x 2048 / GROUP whatever the group)."""
    yield from ring_append_specs()
    variants = [(dtype, bits, group, symmetric, False, "token") for dtype in ("fp16", "bf16", "fp32")
                for bits in (2, 3, 4, 8) for group in GROUP_SIZES for symmetric in (False, True)]  # fmt: skip
    variants += [(dtype, bits, group, False, True, "token") for dtype in ("fp16", "bf16") for bits in (2, 3, 4)
                 for group in GROUP_SIZES]  # fmt: skip
    variants += [(dtype, bits, 64, False, True, "channel") for dtype in ("fp16", "bf16") for bits in (2, 3, 4, 8)]
    variants += [("fp16", 4, group, False, True, "channel") for group in GROUP_SIZES if group != 64]
    variants += [("fp16", 4, 64, True, True, "channel"), ("fp16", 4, 64, False, False, "channel")]
    for dtype, bits, group, symmetric, paired, axis in variants:
        for name, (kernel, signature) in _signatures(dtype, axis).items():
            cfg = launch_config(group, axis)
            yield KernelSpec(
                name=f"{name}[{dtype},{axis},b={bits},G={group},sym={int(symmetric)}{',paired' if paired else ''}]",
                fn=kernel,
                signature=signature,
                constexprs={"BITS": bits, "GROUP": group, "SYMMETRIC": symmetric, "PAIRED": paired, **cfg.constexprs},
                num_warps=cfg.num_warps,
            )
