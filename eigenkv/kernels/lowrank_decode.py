"""Flash-decoding attention on the packed low-rank quantized cache: one new query token per sequence.

Shapes (``B`` batch, ``H`` query heads, ``H_kv`` KV heads, ``g = H / H_kv``,
``S`` cached tokens, ``r_k`` / ``r_v`` key / value ranks, ``d`` head size):

- ``query`` (B, H, e): rank-space queries (``e = r_k``) in ``"rank"`` mode
  (post-RoPE and no-RoPE models), or rotated full queries (``e = d``) in
  ``"pre"`` mode;
- ``keys`` / ``values``: :class:`~eigenkv.quant.store.PackedStream` of
  ``(B, H_kv, S, r_k)`` / ``(B, H_kv, S, r_v)``: packed codes, scales and zeros
  of the first ``T_q`` tokens (one or two precision segments), a full-precision
  window for the rest;
- output (B, H, r_v) in the query's dtype: attention in value rank space (the
  folded output projection finishes the job).

Grid ``(B * H_kv, splits)``: a program reads one contiguous range of tokens for
all ``g`` query heads of its KV head (each cached byte is read once per step),
keeps an online softmax in base 2 and writes its partial output, running max
and sum; ``_merge_kernel`` combines the splits. Valid keys of sequence ``b`` are
``[starts[b], ends[b])`` (left padding, unequal lengths). ALiBi adds
``slope_h * t`` (softmax is invariant to the per-query shift
``- slope_h * (S - 1)`` MPT also adds). With ``scoring.softcap`` (Gemma-2) the
scaled scores are capped, ``c tanh(s / c)``, before the bias and the mask
(:func:`~eigenkv.kernels.utils.soft_cap`; a compile-time value, so a launch
without it runs the same code as before).

Inside a program (what it issues per stored byte is read from the compiled
code by ``python -m eigenkv.kernels.roofline``):

- tiles are token-major: scores ``(BLOCK_N tokens, query heads)``, so the
  tokens are the MMA's M dimension (each warp its 16 rows) and the query heads,
  padded to a power of two of at least 8 (:func:`query_heads_pad`), its N;
- a stream's features are read as at most two power-of-two chunks
  (:func:`feature_chunks`), their packed rows as aligned vectors copied
  asynchronously (rows cover ``aligned_width`` features, see
  :mod:`eigenkv.quant.packing`; each (batch, head) slice addressed with 32-bit
  offsets), converted without an integer-to-float conversion (the code OR-ed
  into the mantissa of 1024.0: 2, 3 and 4 bits by :func:`unpack_ptx` and
  :func:`unpack_ptx3`, 8 bits by :func:`_halves`) into 16-bit MMA operands
  (:func:`_mma_operand`), and dequantized in the model dtype with one fused
  multiply-add per two elements, the scales of a block of per-channel codes
  loaded once per tile (a tile of 64 tokens holds one block, part of one, or
  several whole ones), or folded out of the elements. Codes are a row per
  token whichever the grouping, so a register of two converted codes holds
  two adjacent features of a token, as the MMA operand does;
- the softmax's row sums are kept per tile element and summed once after the
  main loop (only the running maximum is reduced every tile);
- a main loop reads the whole tiles where every key and value is quantized and
  valid, with no mask on a load or a score; a tail loop reads the rest element
  by element (a left-padded sequence's partial first tile, partly quantized or
  partly valid tiles, the full-precision window);
- pre mode (pre-RoPE caches) rebuilds key ``t`` as ``rope(c_t D^T, t)``: with
  ``D = [D_1 D_2]`` split at ``d / 2``, ``a_i = c_t D_i^T`` on tensor cores,
  rotated as Hugging Face's ``rotate_half`` does. In the main loop the tile's
  base angle turns the query once per tile (advanced by angle addition) and
  each key turns by its offset in the tile, from a table computed once per
  program: no sin/cos per element.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from eigenkv.kernels.backend import check_kernel_device, interpreting
from eigenkv.kernels.scoring import Scoring
from eigenkv.kernels.utils import (
    KERNEL_DTYPES,
    KernelConfig,
    KernelSpec,
    RooflineCase,
    cdiv,
    dot,
    next_power_of_2,
    on_input_device,
    pad_width,
    rotate_keys,
    soft_cap,
)
from eigenkv.quant.packing import PackedStream, aligned_width, packed_length

SCALE_DTYPE = torch.float16
GROUP_SIZES = (16, 32, 64, 128)
MAX_SPLITS = 128


def unpack_ptx(bits: int, magic: int) -> str:
    """PTX that unpacks four bytes of 2- or 4-bit codes (``$N``, N = 2 * 8 // bits: byte i of the register is
    element i, as Triton packs them) into ``8 // bits`` outputs of two registers each: output k holds code k
    of each byte (codes from the lowest bits), element i in half i % 2 of register i // 2, each as the 16-bit
    float ``magic + code`` (0x6400, 1024.0 in fp16; 0x4300, 128.0 in bf16, exact for codes below 128).

    One byte permutation spreads two bytes to bits 0 and 16, then per code a shift (but the first) and one
    ``lop3`` (mask, then OR the magic): 1-1.25 instructions a code, where converting byte by byte costs 2."""
    if bits not in (2, 4):
        raise ValueError(f"unpack_ptx converts 2- or 4-bit codes, not {bits}-bit")
    codes = 8 // bits
    mask = ((1 << bits) - 1) * 0x00010001
    lines = [f"prmt.b32 lo, ${2 * codes}, 0, 0x7170;", f"prmt.b32 hi, ${2 * codes}, 0, 0x7372;"]  # bytes 0,1 / 2,3
    for k in range(codes):
        if k:
            lines += [f"shr.b32 lo, lo, {bits};", f"shr.b32 hi, hi, {bits};"]
        for j, reg in enumerate(("lo", "hi")):  # 0xea: (a & b) | c
            lines.append(f"lop3.b32 ${2 * k + j}, {reg}, {mask:#010x}, {magic * 0x00010001:#010x}, 0xea;")
    return "{ .reg .b32 lo, hi; " + " ".join(lines) + " }"


def unpack_ptx3(magic: int) -> str:
    """PTX that unpacks 3-bit codes from four bytes of their 2-bit plane (``$8``: byte i is element i, four codes
    from the lowest bits) and the matching high bits (``$9``: byte i holds the third bit of element i's four
    codes in bits 0-3) into four outputs of two registers each, laid out as :func:`unpack_ptx`'s: output k
    holds ``magic + code k`` of each element.

    ``prmt`` spreads two bytes of each input to bits 0 and 16; per code, the low bits are shifted down (but the
    first) and masked with the magic by one ``lop3``, the high bit shifted to bit 2 (but the third) and OR-ed
    in by a second: about 2 instructions a code, where shifts, masks and a conversion per code cost 5-6."""
    lines = ["prmt.b32 lo, $8, 0, 0x7170;", "prmt.b32 hi, $8, 0, 0x7372;"]
    lines += ["prmt.b32 hl, $9, 0, 0x7170;", "prmt.b32 hh, $9, 0, 0x7372;"]
    for k in range(4):
        if k:
            lines += ["shr.b32 lo, lo, 2;", "shr.b32 hi, hi, 2;"]
        for j, (reg, high) in enumerate((("lo", "hl"), ("hi", "hh"))):
            lines.append(f"lop3.b32 t, {reg}, 0x00030003, {magic * 0x00010001:#010x}, 0xea;")  # (a & b) | c
            if k == 2:
                bit = high
            else:
                lines.append(f"{'shl' if k < 2 else 'shr'}.b32 u, {high}, {abs(2 - k)};")  # bit k to bit 2
                bit = "u"
            lines.append(f"lop3.b32 ${2 * k + j}, {bit}, 0x00040004, t, 0xea;")
    return "{ .reg .b32 lo, hi, hl, hh, t, u; " + " ".join(lines) + " }"


_PTX_4_F16 = tl.constexpr(unpack_ptx(4, 0x6400))
_PTX_4_BF16 = tl.constexpr(unpack_ptx(4, 0x4300))
_PTX_2_F16 = tl.constexpr(unpack_ptx(2, 0x6400))
_PTX_2_BF16 = tl.constexpr(unpack_ptx(2, 0x4300))
_PTX_3_F16 = tl.constexpr(unpack_ptx3(0x6400))
_PTX_3_BF16 = tl.constexpr(unpack_ptx3(0x4300))


# --- reference -------------------------------------------------------------------------------


def lowrank_decode_reference(
    query: torch.Tensor,
    keys: PackedStream,
    values: PackedStream,
    scoring: Scoring,
    *,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`lowrank_decode` (same arguments, ``splits`` unused).

    Dequantizes the whole cache in the query's dtype: the CPU path, and the test
    oracle (with a float64 query and ``scoring.exact()``, the exact one)."""
    dtype = query.dtype
    k = scoring.keys(keys.dequantize(dtype))
    v = values.dequantize(dtype)
    groups = query.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    positions = torch.arange(k.shape[-2], device=query.device)
    scores = scoring.cap(torch.einsum("bhe,bhse->bhs", query, k).float() * scoring.scaling) + scoring.bias(positions)
    batch = query.shape[0]
    lo = torch.zeros(batch, dtype=torch.long, device=query.device) if starts is None else starts.long()
    hi = torch.full_like(lo, k.shape[-2]) if ends is None else ends.long()
    valid = (positions[None, :] >= lo[:, None]) & (positions[None, :] < hi[:, None])
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(dtype)
    return torch.einsum("bhs,bhsr->bhr", weights, v)


# --- kernel ----------------------------------------------------------------------------------

# The tail loop (window, partly quantized tiles) reads codes one element at a time (_codes, _segment); the
# main loop reads whole aligned runs of packed codes (_token_codes, _token_words).


@triton.jit
def _codes(C, base, stride_row, tok, feat, ok, aligned, BITS: tl.constexpr):
    # int32 codes (BLOCK_N, F) of tokens `tok` and segment-local features `feat`, one element at a time: a token's
    # codes packed along features in a paired row, whichever the grouping (layouts: eigenkv.quant.packing;
    # `aligned`: features a code row covers)
    row = base + tok[:, None].to(tl.int64) * stride_row
    along = feat[None, :]
    if BITS < 8:  # feature 2 s + i of a run of RUN is stored at position i * RUN / 2 + s of the run
        RUN: tl.constexpr = 8 if BITS == 3 else 16 // BITS
        along = along // RUN * RUN + (along % 2) * (RUN // 2) + (along % RUN) // 2
    if BITS == 3:
        low = tl.load(C + row + along // 4, mask=ok, other=0).to(tl.int32)
        high = tl.load(C + row + aligned // 4 + along // 8, mask=ok, other=0).to(tl.int32)
        return ((low >> ((along % 4) * 2)) & 3) | (((high >> (along % 8)) & 1) << 2)
    else:
        byte = tl.load(C + row + along // (8 // BITS), mask=ok, other=0).to(tl.int32)
        return (byte >> ((along % (8 // BITS)) * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _segment(
    C, S, Z, c_base, s_base, stride_cr, stride_sr, tok, tok_ok, feat, first, width, aligned,
    AXIS_TOKEN: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
):  # fmt: skip
    # fp32 (BLOCK_N, F): features [first, first + width) of the tile dequantized, zero elsewhere
    local = feat - first
    feat_ok = (local >= 0) & (local < width)
    local = tl.where(feat_ok, local, 0)
    ok = tok_ok[:, None] & feat_ok[None, :]
    codes = _codes(C, c_base, stride_cr, tok, local, ok, aligned, BITS).to(tl.float32)
    if AXIS_TOKEN:
        params = s_base + tok[:, None].to(tl.int64) * stride_sr + (local // GROUP)[None, :]
    else:
        params = s_base + (tok // GROUP)[:, None].to(tl.int64) * stride_sr + local[None, :]
    scale = tl.load(S + params, mask=ok, other=0.0).to(tl.float32)
    if SYMMETRIC:
        return scale * (codes - (1 << (BITS - 1)))
    else:
        return scale * codes + tl.load(Z + params, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _halves(x, HALF: tl.constexpr, FP32: tl.constexpr):
    # uint32 words with a code in the low bits of each 16-bit half -> (..., 2) [low half, high half]: each code
    # plus _code_bias, exact in HALF (fp16 or bf16; fp32 when FP32), without an integer-to-float conversion. A
    # code OR-ed into the low mantissa bits of 1024.0 (fp16 0x6400; bf16 128.0 = 0x4300, whose 7 bits hold codes
    # below 128) is the float 1024 + code, two per instruction. The bias stays: a fold carries it in fp32
    # (_code_bias), a dequantization subtracts it exactly first (_dequantize), never inside a rounded product.
    x = x | (0x43004300 if tl.bfloat16 == HALF else 0x64006400)
    pair = tl.join(x.to(tl.uint16).to(HALF, bitcast=True), (x >> 16).to(tl.uint16).to(HALF, bitcast=True))
    if FP32:  # the interpreter's bf16 arithmetic is wrong
        return pair.to(tl.float32)
    else:
        return pair


@triton.jit
def _code_bias(BITS: tl.constexpr, PAIRS: tl.constexpr, DTYPE: tl.constexpr):
    # what the main loop's codes of a segment carry above the code: 1024 (fp16) or 128 (bf16) when converted
    # two an instruction (_halves), except 8-bit codes in bf16 (they outgrow its mantissa: unbiased in fp16,
    # _word_codes); none for codes unpacked one by one
    if PAIRS and not (BITS == 8 and tl.bfloat16 == DTYPE):
        if tl.bfloat16 == DTYPE:
            return 128.0
        else:
            return 1024.0
    else:
        return 0.0


@triton.jit
def _code_planes(x, BITS: tl.constexpr, DTYPE: tl.constexpr, FP32: tl.constexpr):
    # (F, R) uint8 bytes of 2- or 4-bit codes -> code k of each byte (F, R), k < 8 // BITS (four tensors: the
    # last two repeat the first two at 4 bits), plus _code_bias, in DTYPE. On the GPU by the PTX of unpack_ptx,
    # four bytes an instance: it maps each byte to its own codes, so it is right whichever bytes Triton packs
    # together. The interpreter runs no PTX: there each code is shifted out and converted in fp32 (exact).
    if FP32:
        b = x.to(tl.int32)
        bias = _code_bias(BITS, True, DTYPE)
        mask: tl.constexpr = (1 << BITS) - 1
        c0 = (b & mask).to(tl.float32) + bias
        c1 = ((b >> BITS) & mask).to(tl.float32) + bias
        if BITS == 4:
            return c0, c1, c0, c1
        else:
            return c0, c1, ((b >> 4) & mask).to(tl.float32) + bias, (b >> 6).to(tl.float32) + bias
    elif BITS == 4:
        if tl.bfloat16 == DTYPE:
            c0, c1 = tl.inline_asm_elementwise(_PTX_4_BF16, "=r,=r,=r,=r,r", [x], dtype=(tl.bfloat16, tl.bfloat16),
                                               is_pure=True, pack=4)  # fmt: skip
        else:
            c0, c1 = tl.inline_asm_elementwise(_PTX_4_F16, "=r,=r,=r,=r,r", [x], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)  # fmt: skip
        return c0, c1, c0, c1
    else:
        if tl.bfloat16 == DTYPE:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(_PTX_2_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
                                                       dtype=(tl.bfloat16,) * 4, is_pure=True, pack=4)  # fmt: skip
        else:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(_PTX_2_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
                                                       dtype=(tl.float16,) * 4, is_pure=True, pack=4)  # fmt: skip
        return c0, c1, c2, c3


@triton.jit
def _code_planes3(low, high, DTYPE: tl.constexpr, FP32: tl.constexpr):
    # 3-bit codes: (F, R) bytes of the 2-bit plane and (F, R // 2) of the 1-bit plane (a byte of it holds the
    # third bits of two 2-bit bytes' codes, four each) -> code k of each 2-bit byte (F, R), k < 4, plus
    # _code_bias, in DTYPE: the high bits are first spread to a byte per 2-bit byte (a join), then the GPU merges
    # the planes with the PTX of unpack_ptx3; the interpreter shifts each code out in fp32
    h = tl.join(high & 15, high >> 4).reshape(low.shape[0], low.shape[1])
    if FP32:
        b = low.to(tl.int32)
        t = h.to(tl.int32)
        bias = _code_bias(3, True, DTYPE)
        c0 = ((b & 3) | ((t & 1) << 2)).to(tl.float32) + bias
        c1 = (((b >> 2) & 3) | (((t >> 1) & 1) << 2)).to(tl.float32) + bias
        c2 = (((b >> 4) & 3) | (((t >> 2) & 1) << 2)).to(tl.float32) + bias
        c3 = ((b >> 6) | (((t >> 3) & 1) << 2)).to(tl.float32) + bias
        return c0, c1, c2, c3
    elif tl.bfloat16 == DTYPE:
        return tl.inline_asm_elementwise(_PTX_3_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [low, h],
                                         dtype=(tl.bfloat16,) * 4, is_pure=True, pack=4)  # fmt: skip
    else:
        return tl.inline_asm_elementwise(_PTX_3_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [low, h],
                                         dtype=(tl.float16,) * 4, is_pure=True, pack=4)  # fmt: skip


@triton.jit
def _paired_order(c0, c1, c2, c3, BITS: tl.constexpr):
    # the code planes of _code_planes (F, R) of paired bytes (eigenkv.quant.packing: code k of bytes 2a and
    # 2a + 1 is element 2 k + 0 / 1 of their run) -> (F, R * 8 // BITS) in order. Each code plane splits into
    # its even and odd bytes; the last join pairs them, so that the fastest axis in registers is the byte of
    # the pair, as the PTX's output registers hold it: two adjacent elements a register, stored to shared
    # memory as they are (plain bytes would need a byte permutation per register to regroup the pairs)
    F: tl.constexpr = c0.shape[0]
    R: tl.constexpr = c0.shape[1]
    e0, o0 = tl.split(c0.reshape(F, R // 2, 2))
    e1, o1 = tl.split(c1.reshape(F, R // 2, 2))
    if BITS == 4:  # [a, k, byte]: element 4 a + 2 k + byte
        return tl.join(tl.join(e0, e1), tl.join(o0, o1)).reshape(F, R * 2)
    else:  # [a, i, j, byte] (k = 2 i + j: the 2-bit codes join as (c0, c2), (c1, c3)): element 8 a + 2 k + byte
        e2, o2 = tl.split(c2.reshape(F, R // 2, 2))
        e3, o3 = tl.split(c3.reshape(F, R // 2, 2))
        even = tl.join(tl.join(e0, e2), tl.join(e1, e3))
        odd = tl.join(tl.join(o0, o2), tl.join(o1, o3))
        return tl.join(even, odd).reshape(F, R * 4)


@triton.jit
def _byte_codes(x, BITS: tl.constexpr, PAIRS: tl.constexpr, DTYPE: tl.constexpr, FP32: tl.constexpr):
    # (F, R) uint8 of paired rows, each byte holding 8 // BITS codes along the last axis (first code in the lowest
    # bits) -> (F, R * 8 // BITS) codes in order: two per instruction in DTYPE plus _code_bias when PAIRS (2 and
    # 4 bits always, unpacks_pairs), else 8-bit codes as they are
    if PAIRS:
        c0, c1, c2, c3 = _code_planes(x, BITS, DTYPE, FP32)
        return _paired_order(c0, c1, c2, c3, BITS)
    else:
        tl.static_assert(BITS == 8, "2- and 4-bit codes are always converted in pairs")
        return x


@triton.jit
def _three_bit_codes(low, high, DTYPE: tl.constexpr, FP32: tl.constexpr):
    # (F, R) bytes of a 2-bit plane and (F, R // 2) of the matching 1-bit plane, of paired rows -> (F, 4 R)
    # 3-bit codes in order, in DTYPE plus _code_bias
    c0, c1, c2, c3 = _code_planes3(low, high, DTYPE, FP32)
    return _paired_order(c0, c1, c2, c3, 2)


@triton.jit
def _word_codes(w, DTYPE: tl.constexpr, FP32: tl.constexpr):
    # uint32 words of 8-bit codes -> (..., 2h, 2a): byte 2h + a of the word (little-endian) plus _code_bias,
    # exact in DTYPE (through fp16: 8-bit codes outgrow bf16's 7 mantissa bits, so in bf16 the bias is
    # subtracted in fp16 first; exact in bf16 after)
    low = _halves(w & 0x00FF00FF, tl.float16, FP32)
    high = _halves((w >> 8) & 0x00FF00FF, tl.float16, FP32)
    x = tl.join(low, high)
    if tl.bfloat16 == DTYPE:
        x = x - 1024.0
    return x.to(DTYPE)


@triton.jit
def _token_words(C, rows, offset, aligned, W: tl.constexpr, MASK: tl.constexpr, DTYPE: tl.constexpr,
                 FP32: tl.constexpr):  # fmt: skip
    # (N, W) 8-bit codes in DTYPE of features [offset, offset + W) of tokens whose rows start at uint32 word
    # `rows` (N, 1), a word holding 4 features
    j = tl.arange(0, W // 4)
    ptrs = C.to(tl.pointer_type(tl.uint32)) + rows + offset // 4 + j[None, :]
    w = tl.load(ptrs, mask=(offset + 4 * j < aligned)[None, :], other=0) if MASK else tl.load(ptrs)
    return _word_codes(w, DTYPE, FP32).reshape(rows.shape[0], W)  # (N, W / 4, 2h, 2a): feature 4q + 2h + a


@triton.jit
def _token_codes(C, rows, offset, aligned, BITS: tl.constexpr, W: tl.constexpr, MASK: tl.constexpr,
                 PAIRS: tl.constexpr, ALIGN: tl.constexpr, DTYPE: tl.constexpr, FP32: tl.constexpr):  # fmt: skip
    # (N, W) codes of features [offset, offset + W) of tokens whose packed rows start at `rows` (N, 1):
    # each row packs `aligned` features along features (3 bits: a 2-bit plane, then a 1-bit plane). A row and
    # the chunk start on a multiple of ALIGN bytes (codes_alignment: what the row's bytes and a chunk offset of a
    # multiple of 16 features bear, checked by the launcher; a false claim faults on the GPU with a misaligned
    # address); at 3 bits the 1-bit plane starts `aligned / 4` bytes in, and its chunk `offset / 8` (even)
    if BITS == 3:
        j4 = tl.arange(0, W // 4)
        j8 = tl.arange(0, W // 8)
        low = tl.multiple_of(rows + offset // 4 + j4[None, :], [1, ALIGN])
        high = tl.multiple_of(rows + aligned // 4 + offset // 8 + j8[None, :], [1, min(ALIGN, 2)])
        if MASK:
            low = tl.load(C + low, mask=(offset + 4 * j4 < aligned)[None, :], other=0)
            high = tl.load(C + high, mask=(offset + 8 * j8 < aligned)[None, :], other=0)
        else:
            low = tl.load(C + low)
            high = tl.load(C + high)
        return _three_bit_codes(low, high, DTYPE, FP32)
    else:
        j = tl.arange(0, W * BITS // 8)
        idx = tl.multiple_of(rows + offset * BITS // 8 + j[None, :], [1, ALIGN])
        x = tl.load(C + idx, mask=(offset + j * (8 // BITS) < aligned)[None, :], other=0) if MASK else tl.load(C + idx)
        return _byte_codes(x, BITS, PAIRS, DTYPE, FP32)


@triton.jit
def _offset(S, Z, ptrs, ok, scale, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    # dequantized = scale * code + offset: the zero point, or -scale * 2^(BITS-1) when symmetric
    if SYMMETRIC:
        return -scale * (1 << (BITS - 1))
    else:
        return tl.load(Z + ptrs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _channel_params(S, Z, stride_r, n, col, aligned, BITS: tl.constexpr, GROUP: tl.constexpr,
                    SYMMETRIC: tl.constexpr, MASK: tl.constexpr, NG: tl.constexpr):  # fmt: skip
    # scale and offset of columns `col` for the NG blocks of GROUP tokens from token n: (W,) when NG == 1 (one
    # row of parameters), else (NG, W); rows are stored for the aligned features (16-byte vector loads; the
    # padding features' are zero)
    if NG == 1:
        ptrs = tl.multiple_of((n // GROUP) * stride_r + col, 8)
        ok = col < aligned
    else:
        block = n // GROUP + tl.arange(0, NG)
        ptrs = tl.multiple_of(block[:, None] * stride_r + col[None, :], [1, 8])
        ok = (col < aligned)[None, :]
    if MASK:
        scale = tl.load(S + ptrs, mask=ok, other=0.0)
        if SYMMETRIC:
            return scale, -scale * (1 << (BITS - 1))
        else:
            return scale, tl.load(Z + ptrs, mask=ok, other=0.0)
    else:
        scale = tl.load(S + ptrs)
        if SYMMETRIC:
            return scale, -scale * (1 << (BITS - 1))
        else:
            return scale, tl.load(Z + ptrs)


@triton.jit
def _token_params(S, Z, rows, first, groups, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, NG: tl.constexpr):
    # (N, NG) fp32 scales and offsets of groups [first, first + NG) of tokens whose parameter rows start at `rows`.
    # One group is always stored (a chunk starts inside its segment): its loads need no mask (nor predication)
    g = first + tl.arange(0, NG)
    ptrs = rows + g[None, :]
    if NG == 1:
        scale = tl.load(S + ptrs).to(tl.float32)
        if SYMMETRIC:
            return scale, -scale * (1 << (BITS - 1))
        else:
            return scale, tl.load(Z + ptrs).to(tl.float32)
    else:
        ok = (g < groups)[None, :]
        scale = tl.load(S + ptrs, mask=ok, other=0.0).to(tl.float32)
        return scale, _offset(S, Z, ptrs, ok, scale, BITS, SYMMETRIC)


@triton.jit
def _chunk_codes(C, c_r, tok, offset, aligned, DTYPE: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr,
                 MASK: tl.constexpr, PAIRS: tl.constexpr, ALIGN: tl.constexpr, FP32: tl.constexpr):  # fmt: skip
    # (N, W) codes of features [offset, offset + W) of a segment for the tokens `tok` (N,) of a full tile, a row
    # per token whichever the grouping; in DTYPE plus _code_bias when PAIRS, else integers
    if PAIRS and BITS == 8:
        return _token_words(C, tok[:, None] * (c_r // 4), offset, aligned, W, MASK, DTYPE, FP32)
    else:
        return _token_codes(C, tok[:, None] * c_r, offset, aligned, BITS, W, MASK, PAIRS, ALIGN, DTYPE, FP32)


@triton.jit
def _chunk_states(C, S, Z, c_r, s_r, n, tok, offset, aligned, groups,
                  DTYPE: tl.constexpr, BITS: tl.constexpr, AXIS_TOKEN: tl.constexpr, GROUP: tl.constexpr,
                  SYMMETRIC: tl.constexpr, W: tl.constexpr, N: tl.constexpr, MASK: tl.constexpr,
                  PAIRS: tl.constexpr, ALIGN: tl.constexpr, FP32: tl.constexpr):  # fmt: skip
    # the chunk of _chunk_codes dequantized in the model dtype (one fused multiply-add per element, two elements
    # per instruction; fp32 under the interpreter, whose bf16 arithmetic is wrong), in the same layout (a
    # per-channel tile holds one block of GROUP tokens, part of one, or several)
    codes = _chunk_codes(C, c_r, tok, offset, aligned, DTYPE, BITS, W, MASK, PAIRS, ALIGN, FP32)
    bias = _code_bias(BITS, PAIRS, DTYPE)
    if AXIS_TOKEN:
        rows = tok[:, None] * s_r
        if W > GROUP:  # several groups in the chunk: each group's parameters broadcast over its features
            scale, shift = _token_params(S, Z, rows, offset // GROUP, groups, BITS, SYMMETRIC, W // GROUP)
            x = _dequantize(codes.reshape(N, W // GROUP, GROUP), bias, scale[:, :, None], shift[:, :, None], DTYPE,
                            FP32)  # fmt: skip
            return x.reshape(N, W)
        else:
            scale, shift = _token_params(S, Z, rows, offset // GROUP, groups, BITS, SYMMETRIC, 1)
            return _dequantize(codes, bias, scale, shift, DTYPE, FP32)
    else:
        col = offset + tl.arange(0, W)
        if N > GROUP:  # several blocks in the tile: each block's parameters broadcast over its tokens
            scale, shift = _channel_params(S, Z, s_r, n, col, aligned, BITS, GROUP, SYMMETRIC, MASK,
                                           N // GROUP)  # fmt: skip
            x = _dequantize(codes.reshape(N // GROUP, GROUP, W), bias, scale[:, None, :], shift[:, None, :], DTYPE,
                            FP32)  # fmt: skip
            return x.reshape(N, W)
        else:
            scale, shift = _channel_params(S, Z, s_r, n, col, aligned, BITS, GROUP, SYMMETRIC, MASK, 1)
            return _dequantize(codes, bias, scale[None, :], shift[None, :], DTYPE, FP32)


@triton.jit
def _dequantize(codes, bias, scale, shift, DTYPE: tl.constexpr, FP32: tl.constexpr):
    # scale * (codes - bias) + shift in DTYPE: the bias (_code_bias) comes off exactly first (small integer codes
    # are exact in fp16 and bf16), then one fused multiply-add
    if FP32:
        return ((codes.to(tl.float32) - bias) * scale.to(tl.float32) + shift.to(tl.float32)).to(DTYPE)
    else:
        return (codes.to(DTYPE) - bias.to(DTYPE)) * scale.to(DTYPE) + shift.to(DTYPE)


@triton.jit
def _tile_rows(C, S, Z, c_r, s_r, n, tok, offset, aligned, groups,
               DTYPE: tl.constexpr, BITS: tl.constexpr, AXIS_TOKEN: tl.constexpr, GROUP: tl.constexpr,
               SYMMETRIC: tl.constexpr, W: tl.constexpr, N: tl.constexpr, MASK: tl.constexpr,
               PAIRS: tl.constexpr, ALIGN: tl.constexpr, FP32: tl.constexpr):  # fmt: skip
    # (N, W) token-major chunk of a full tile in the model dtype: keys score as dot(rows, q), values weigh as
    # dot(rows^T, p), pre mode rebuilds keys from them
    x = _chunk_states(C, S, Z, c_r, s_r, n, tok, offset, aligned, groups, DTYPE, BITS,
                      AXIS_TOKEN, GROUP, SYMMETRIC, W, N, MASK, PAIRS, ALIGN, FP32)  # fmt: skip
    return _mma_operand(x, FP32)


@triton.jit
def _mma_operand(x, FP32: tl.constexpr):
    # x (16-bit floats) unchanged, through a PTX move that Triton must keep (not pure): an MMA operand computed
    # from bytes is otherwise laid out for 8-bit elements (8 fp16 a thread along K, where ldmatrix gives 2 a
    # register: a move per register regroups them, ~70 a tile at Llama-3-8B 4 bits); past the move Triton sees
    # a 16-bit operand and loads it straight into the MMA's registers (ptxas drops the move). Interpreter: x.
    if FP32:
        return x
    else:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=2)


@triton.jit
def _operand(codes, DTYPE: tl.constexpr, FP32: tl.constexpr):
    # codes as an MMA operand: in DTYPE (integer codes converted), or fp32 under the interpreter (whose
    # integer-to-bf16 conversion is wrong; exact in fp32)
    if FP32:
        return codes.to(tl.float32)
    else:
        return codes.to(DTYPE)


@triton.jit
def _folded_chunk(C, S, Z, c_r, s_r, n, tok, offset, aligned, groups,
                  DTYPE: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
                  W: tl.constexpr, N: tl.constexpr, MASK: tl.constexpr, PAIRS: tl.constexpr,
                  ALIGN: tl.constexpr, FP32: tl.constexpr):  # fmt: skip
    # a chunk of per-token codes of a full tile as an MMA operand (N, W) (_operand: plus _code_bias), with each
    # token's scale and offset (N, 1) fp32, the chunk in one group of each token
    codes = _chunk_codes(C, c_r, tok, offset, aligned, DTYPE, BITS, W, MASK, PAIRS, ALIGN, FP32)
    rows = tok[:, None] * s_r
    scale, offset_t = _token_params(S, Z, rows, offset // GROUP, groups, BITS, SYMMETRIC, 1)
    return _mma_operand(_operand(codes, DTYPE, FP32), FP32), scale, offset_t


@triton.jit
def _score_folded(C, S, Z, c_r, s_r, n, tok, offset, aligned, groups, q, q_sum,
                  DTYPE: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
                  W: tl.constexpr, N: tl.constexpr, MASK: tl.constexpr, PAIRS: tl.constexpr,
                  ALIGN: tl.constexpr, FP32: tl.constexpr):  # fmt: skip
    # (N, M) fp32 scores of the key chunk of a full tile of per-token codes against its query features q (W, M)
    # (rank mode), the chunk in one group of each token: sum_f q_f (s_t c_f + o_t) = s_t (sum_f q_f c_f) +
    # o_t q_sum, with q_sum (M,) = sum_f q_f. The MMA takes the codes as converted (plus _code_bias, b, taken
    # off as b q_sum in fp32); the scale and offset cost a multiply-add per score, none per element.
    # (Per-channel keys keep their dequantization: their fold would need a per-head bias from every block's
    # offsets, a reduction across the warps each tile that costs more than the elementwise work it saves.)
    codes, scale, offset_t = _folded_chunk(C, S, Z, c_r, s_r, n, tok, offset, aligned, groups, DTYPE,
                                           BITS, GROUP, SYMMETRIC, W, N, MASK, PAIRS, ALIGN, FP32)  # fmt: skip
    raw = dot(codes, q, FP32) - _code_bias(BITS, PAIRS, DTYPE) * q_sum[None, :]
    return scale * raw + offset_t * q_sum[None, :]


@triton.jit
def _weigh_folded(C, S, Z, c_r, s_r, n, tok, offset, aligned, groups, p, alpha, acc, shift_sum,
                  DTYPE: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
                  W: tl.constexpr, N: tl.constexpr, MASK: tl.constexpr, PAIRS: tl.constexpr,
                  ALIGN: tl.constexpr, FP32: tl.constexpr):  # fmt: skip
    # acc (W, M) rescaled by alpha (M,) plus the value chunk of a full tile of per-token codes weighed by the
    # probabilities p (N, M) fp32, the chunk in one group of each token: sum_t p_t (s_t c_t + o_t) =
    # sum_t (p_t s_t) c_t + sum_t p_t o_t. The MMA weighs the codes as converted (plus _code_bias, b) by
    # p_t s_t rounded to DTYPE; shift_sum (N, M) fp32 keeps p_t o_t - b (p_t s_t) per token, with the very
    # rounded weights, so that the bias cancels in fp32 (summed over tokens after the loop, as the row sums)
    codes, scale, offset_t = _folded_chunk(C, S, Z, c_r, s_r, n, tok, offset, aligned, groups, DTYPE,
                                           BITS, GROUP, SYMMETRIC, W, N, MASK, PAIRS, ALIGN, FP32)  # fmt: skip
    weights = (p * scale).to(DTYPE)
    acc = acc * alpha[None, :] + dot(tl.trans(codes), weights, FP32)
    bias = _code_bias(BITS, PAIRS, DTYPE)
    shift_sum = shift_sum * alpha[None, :] + (p * offset_t - bias * weights.to(tl.float32))
    return acc, shift_sum


@triton.jit
def _chunk_tail(C, S, Z, c_base, s_base, c_r, s_r, X, x_base, x_r, quantized, ring, n, tok, tok_ok, offset, feat0,
                width, aligned, BITS: tl.constexpr, AXIS_TOKEN: tl.constexpr, GROUP: tl.constexpr,
                SYMMETRIC: tl.constexpr, W: tl.constexpr, RING: tl.constexpr):  # fmt: skip
    # (N, W) fp32 of features [offset, offset + W) of a segment (stream features feat0 + j) for tokens `tok`
    # (from n): dequantized codes for tok < quantized, the full-precision window after (per element: the few last
    # tiles); the window is a ring of `ring` slots (token j in slot j % ring) when RING, else starts at token
    # `quantized`. A tile wholly in the window (most tail tiles of a decode step) skips the codes' gathers.
    j = tl.arange(0, W)
    f_ok = offset + j < width
    in_window = tok_ok & (tok >= quantized)
    row = tl.where(in_window, tok % ring if RING else tok - quantized, 0)
    x = tl.load(
        X + x_base + row[:, None].to(tl.int64) * x_r + (feat0 + j)[None, :],
        mask=in_window[:, None] & f_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    if BITS > 0:  # noqa: SIM102 (compiled away when BITS is 0; the test below is a runtime branch)
        if n < quantized:
            x += _segment(C, S, Z, c_base, s_base, c_r, s_r, tok, tok_ok & (tok < quantized), offset + j, 0, width,
                          aligned, AXIS_TOKEN, BITS, GROUP, SYMMETRIC)  # fmt: skip
    return x


# Integers that change from one decode step to the next are not specialized (no recompiles as a cache grows,
# one compile for a captured CUDA graph): token counts, and the split count (which follows the length early on).
@triton.jit(do_not_specialize=["tokens_per_split", "n_splits", "main_tokens", "k_quantized", "v_quantized"])
def _decode_kernel(
    Q, q_b, q_h,
    ACC, STATS,  # (B * H, SPLITS, RV_PAD), (B * H, SPLITS, 2) fp32 partials
    STARTS, ENDS,  # (B,) int32: valid keys [start, end)
    DEC, dec_h, INV_FREQ, rope_scale,  # pre mode: decoders (1 or H_kv, d, r_k), (d / 2,) fp32
    SLOPES,  # (H,) fp32 ALiBi slopes
    # two feature chunks per stream (see feature_chunks): packed codes, scales, zeros, their (batch, head, row)
    # strides, offset in their segment (in units of 16 features, so that the compiler knows the alignment of the
    # loads), first stream feature, the segment's width, aligned width and groups per token
    KAC, KAS, KAZ, kac_b, kac_h, kac_r, kas_b, kas_h, kas_r, ka_off16, ka_feat, ka_width, ka_aligned, ka_groups,
    KBC, KBS, KBZ, kbc_b, kbc_h, kbc_r, kbs_b, kbs_h, kbs_r, kb_off16, kb_feat, kb_width, kb_aligned, kb_groups,
    KW, kw_b, kw_h, kw_r, k_quantized, kw_ring,
    VAC, VAS, VAZ, vac_b, vac_h, vac_r, vas_b, vas_h, vas_r, va_off16, va_feat, va_width, va_aligned, va_groups,
    VBC, VBS, VBZ, vbc_b, vbc_h, vbc_r, vbs_b, vbs_h, vbs_r, vb_off16, vb_feat, vb_width, vb_aligned, vb_groups,
    VW, vw_b, vw_h, vw_r, v_quantized, vw_ring,
    KCNT, VCNT,  # device form (COUNTS): int32 (2,) [quantized tokens, tokens held] of the keys / values
    kv_heads, groups, key_rank, half, qk_scale, tokens_per_split, n_splits, main_tokens,
    PRE: tl.constexpr, ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr,  # Gemma-2's logit cap (a float; 0.0: none, and no code for it)
    # each stream's grouping (axis, group size, symmetry) is its own: keys and values may be stored with different
    # KVQuantConfigs (e.g. keys per channel in blocks of 128 tokens, values per token in groups of 32 features)
    K_TOKEN: tl.constexpr, K_GROUP: tl.constexpr, K_SYMMETRIC: tl.constexpr,
    KA_BITS: tl.constexpr, KA_W: tl.constexpr, KA_MASK: tl.constexpr, KA_PAIRS: tl.constexpr, KA_ALIGN: tl.constexpr,
    KB: tl.constexpr, KB_BITS: tl.constexpr, KB_W: tl.constexpr, KB_MASK: tl.constexpr, KB_PAIRS: tl.constexpr,
    KB_ALIGN: tl.constexpr,
    V_TOKEN: tl.constexpr, V_GROUP: tl.constexpr, V_SYMMETRIC: tl.constexpr,
    VA_BITS: tl.constexpr, VA_W: tl.constexpr, VA_MASK: tl.constexpr, VA_PAIRS: tl.constexpr, VA_ALIGN: tl.constexpr,
    VB: tl.constexpr, VB_BITS: tl.constexpr, VB_W: tl.constexpr, VB_MASK: tl.constexpr, VB_PAIRS: tl.constexpr,
    VB_ALIGN: tl.constexpr,
    G_PAD: tl.constexpr, RV_PAD: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, COUNTS: tl.constexpr,
):  # fmt: skip
    tokens_per_split = tl.multiple_of(tokens_per_split, BLOCK_N)  # whole tiles, by construction
    if COUNTS:  # a capturable cache: what is held is read on the device (one launch serves every step)
        k_quantized = tl.load(KCNT)
        v_quantized = tl.load(VCNT)
        held = tl.load(KCNT + 1)
        both = KA_BITS > 0 and VA_BITS > 0  # else the main loop is not compiled
        main_tokens = tl.minimum(k_quantized, v_quantized) // BLOCK_N * BLOCK_N if both else 0
    main_tokens = tl.multiple_of(main_tokens, BLOCK_N)
    ka_off = ka_off16 * 16
    kb_off = kb_off16 * 16
    va_off = va_off16 * 16
    vb_off = vb_off16 * 16
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // kv_heads).to(tl.int64)
    h = (pid % kv_heads).to(tl.int64)
    start = tl.load(STARTS + b)
    end = tl.load(ENDS + b)
    if COUNTS:
        end = tl.minimum(end, held)
    lo = tl.maximum(split * tokens_per_split, (start // BLOCK_N) * BLOCK_N)
    hi = tl.minimum((split + 1) * tokens_per_split, end)
    dtype = Q.dtype.element_ty

    rows = tl.arange(0, G_PAD)
    row_ok = rows < groups
    heads = h * groups + rows  # query heads of this KV head
    q_cols = Q + b * q_b + heads[None, :] * q_h  # the queries as columns: every tile is token-major (N, M)
    ja = tl.arange(0, KA_W)
    jb = tl.arange(0, KB_W)
    if PRE:  # query halves (HALF_PAD, M), and each key chunk's decoder rows transposed: (W, HALF_PAD) = D[j, r]
        j = tl.arange(0, HALF_PAD)
        j_ok = j < half
        q1 = tl.load(q_cols + j[:, None], mask=j_ok[:, None] & row_ok[None, :], other=0.0)
        q2 = tl.load(q_cols + half + j[:, None], mask=j_ok[:, None] & row_ok[None, :], other=0.0)
        inv_freq = tl.load(INV_FREQ + j, mask=j_ok, other=0.0)
        dec = DEC + h * dec_h + j[None, :] * key_rank
        da_ok = (ka_off + ja < ka_width)[:, None] & j_ok[None, :]
        d1a = tl.load(dec + (ka_feat + ja)[:, None], mask=da_ok, other=0.0).to(dtype)
        d2a = tl.load(dec + half * key_rank + (ka_feat + ja)[:, None], mask=da_ok, other=0.0).to(dtype)
        if KB:
            db_ok = (kb_off + jb < kb_width)[:, None] & j_ok[None, :]
            d1b = tl.load(dec + (kb_feat + jb)[:, None], mask=db_ok, other=0.0).to(dtype)
            d2b = tl.load(dec + half * key_rank + (kb_feat + jb)[:, None], mask=db_ok, other=0.0).to(dtype)
    else:  # the query's features of each key chunk, (W, M)
        qa_ok = (ka_off + ja < ka_width)[:, None] & row_ok[None, :]
        qa = tl.load(q_cols + (ka_feat + ja)[:, None], mask=qa_ok, other=0.0)
        if KB:
            qb_ok = (kb_off + jb < kb_width)[:, None] & row_ok[None, :]
            qb = tl.load(q_cols + (kb_feat + jb)[:, None], mask=qb_ok, other=0.0)
    if ALIBI:
        slopes = tl.load(SLOPES + heads, mask=row_ok, other=0.0) * 1.4426950408889634

    ka_c = b * kac_b + h * kac_h
    ka_s = b * kas_b + h * kas_h
    kb_c = b * kbc_b + h * kbc_h
    kb_s = b * kbs_b + h * kbs_h
    va_c = b * vac_b + h * vac_h
    va_s = b * vas_b + h * vas_h
    vb_c = b * vbc_b + h * vbc_h
    vb_s = b * vbs_b + h * vbs_h
    # the main loop addresses each (batch, head) slice from its first byte with 32-bit offsets (the launcher checks
    # that they fit): fewer instructions a tile than 64-bit ones (505 against 542 at Llama-3-8B 4 bits). The
    # slices start on a multiple of *_ALIGN bytes (checked by the launcher: the vector loads rely on it).
    ka_cp = tl.multiple_of(KAC + ka_c, KA_ALIGN)
    kb_cp = tl.multiple_of(KBC + kb_c, KB_ALIGN)
    va_cp = tl.multiple_of(VAC + va_c, VA_ALIGN)
    vb_cp = tl.multiple_of(VBC + vb_c, VB_ALIGN)
    ka_sp = KAS + ka_s
    ka_zp = KAZ + ka_s
    kb_sp = KBS + kb_s
    kb_zp = KBZ + kb_s
    va_sp = VAS + va_s
    va_zp = VAZ + va_s
    vb_sp = VBS + vb_s
    vb_zp = VBZ + vb_s
    m_i = tl.full([G_PAD], -1.0e30, tl.float32)  # finite: exp2(m_i - m_new) stays 1 (not NaN) while all masked
    # the main loop's softmax sums per tile element, summed over tokens after it: no reduction across the warps
    # per tile (the running maximum has one)
    l_tile = tl.zeros([BLOCK_N, G_PAD], tl.float32)
    acc_a = tl.zeros([VA_W, G_PAD], tl.float32)
    acc_b = tl.zeros([VB_W, G_PAD], tl.float32)
    # Per-token streams fold their scales and offsets out of the elements where a chunk lies in one group of each
    # token: rank-mode keys into the scores (_score_folded), values into the probabilities and a per-head sum
    # kept per tile element like the row sums (_weigh_folded); the MMAs take the codes as converted (2, 4 and
    # 8 bits). A fold trades work per element (W a token) for work per score (G_PAD a token): it pays where
    # W >= 8 G_PAD (at 4 bits, GQA 4-8: a 64-feature chunk 770 -> 702 loop instructions, 128 features
    # 1057 -> 842; a 16-feature chunk, or GQA 16 at 64 features, lose 20-50).
    KA_FOLD: tl.constexpr = not PRE and K_TOKEN and KA_PAIRS and KA_W <= K_GROUP and KA_W >= 8 * G_PAD
    KB_FOLD: tl.constexpr = not PRE and K_TOKEN and KB_PAIRS and KB_W <= K_GROUP and KB_W >= 8 * G_PAD
    qa_sum = tl.sum(qa.to(tl.float32), axis=0) if KA_FOLD else tl.zeros([G_PAD], tl.float32)
    qb_sum = tl.sum(qb.to(tl.float32), axis=0) if KB_FOLD and KB else tl.zeros([G_PAD], tl.float32)
    VA_FOLD: tl.constexpr = V_TOKEN and VA_PAIRS and VA_W <= V_GROUP and VA_W >= 8 * G_PAD
    VB_FOLD: tl.constexpr = V_TOKEN and VB_PAIRS and VB_W <= V_GROUP and VB_W >= 8 * G_PAD
    va_shift = tl.zeros([BLOCK_N, G_PAD], tl.float32)
    vb_shift = tl.zeros([BLOCK_N, G_PAD], tl.float32)

    # main loop: whole tiles where every key and value is quantized and valid (from the first tile at or after
    # `start` to the last that ends by `hi`; partial tiles go to the tail loop): no load and no score masked
    main_lo = tl.maximum(lo, (start + BLOCK_N - 1) // BLOCK_N * BLOCK_N)
    main_hi = tl.maximum(tl.minimum(hi, main_tokens) // BLOCK_N * BLOCK_N, main_lo)
    if KA_BITS > 0 and VA_BITS > 0:
        if PRE:  # turns of the first tile (fp32 angles, as the model's), of one tile, and of each offset in a tile
            q1f = q1.to(tl.float32) * rope_scale
            q2f = q2.to(tl.float32) * rope_scale
            cos_n = tl.cos(main_lo.to(tl.float32) * inv_freq)[:, None]
            sin_n = tl.sin(main_lo.to(tl.float32) * inv_freq)[:, None]
            cos_step = tl.cos(BLOCK_N * inv_freq)[:, None]
            sin_step = tl.sin(BLOCK_N * inv_freq)[:, None]
            offset_angle = tl.arange(0, BLOCK_N).to(tl.float32)[:, None] * inv_freq[None, :]
            cos_i = tl.cos(offset_angle).to(dtype)
            sin_i = tl.sin(offset_angle).to(dtype)
        for n in range(main_lo, main_hi, BLOCK_N):
            n = tl.multiple_of(n, BLOCK_N)
            nu = n.to(tl.uint32)  # the tile's first token, unsigned: its blocks and rows are shifts, not divisions
            tok = n + tl.arange(0, BLOCK_N)
            if KA_FOLD:
                scores = _score_folded(ka_cp, ka_sp, ka_zp, kac_r, kas_r, nu, tok, ka_off, ka_aligned, ka_groups,
                                       qa, qa_sum, dtype, KA_BITS, K_GROUP, K_SYMMETRIC, KA_W, BLOCK_N, KA_MASK,
                                       KA_PAIRS, KA_ALIGN, DOT_FP32)  # fmt: skip
            else:
                ka = _tile_rows(ka_cp, ka_sp, ka_zp, kac_r, kas_r, nu, tok, ka_off, ka_aligned, ka_groups, dtype,
                                KA_BITS, K_TOKEN, K_GROUP, K_SYMMETRIC, KA_W, BLOCK_N, KA_MASK, KA_PAIRS, KA_ALIGN,
                                DOT_FP32)  # fmt: skip
            if KB and KB_FOLD:
                scores_b = _score_folded(kb_cp, kb_sp, kb_zp, kbc_r, kbs_r, nu, tok, kb_off, kb_aligned, kb_groups,
                                         qb, qb_sum, dtype, KB_BITS, K_GROUP, K_SYMMETRIC, KB_W, BLOCK_N, KB_MASK,
                                         KB_PAIRS, KB_ALIGN, DOT_FP32)  # fmt: skip
            elif KB:
                kb = _tile_rows(kb_cp, kb_sp, kb_zp, kbc_r, kbs_r, nu, tok, kb_off, kb_aligned, kb_groups,
                                dtype, KB_BITS, K_TOKEN, K_GROUP, K_SYMMETRIC, KB_W, BLOCK_N, KB_MASK, KB_PAIRS,
                                KB_ALIGN, DOT_FP32)  # fmt: skip
            if PRE:
                a1 = dot(ka, d1a, DOT_FP32)
                a2 = dot(ka, d2a, DOT_FP32)
                if KB:
                    a1 += dot(kb, d1b, DOT_FP32)
                    a2 += dot(kb, d2b, DOT_FP32)
                # key t = n + i turns by (n + i) * inv_freq: the tile's base turn moves to the query (once per
                # tile), each key's offset turn comes from a table (once per program): no sin/cos in the loop
                if DOT_FP32:  # the interpreter's bf16 arithmetic is wrong: round, then compute in fp32
                    a1 = a1.to(dtype).to(tl.float32)
                    a2 = a2.to(dtype).to(tl.float32)
                    k1 = (a1 * cos_i.to(tl.float32) - a2 * sin_i.to(tl.float32)).to(dtype)
                    k2 = (a2 * cos_i.to(tl.float32) + a1 * sin_i.to(tl.float32)).to(dtype)
                else:  # in the model dtype, as the model rotates them (two elements per instruction)
                    a1 = a1.to(dtype)
                    a2 = a2.to(dtype)
                    k1 = a1 * cos_i - a2 * sin_i
                    k2 = a2 * cos_i + a1 * sin_i
                qr1 = (q1f * cos_n + q2f * sin_n).to(dtype)
                qr2 = (q2f * cos_n - q1f * sin_n).to(dtype)
                scores = dot(k1, qr1, DOT_FP32) + dot(k2, qr2, DOT_FP32)
                cos_n, sin_n = cos_n * cos_step - sin_n * sin_step, sin_n * cos_step + cos_n * sin_step
            else:
                if not KA_FOLD:
                    scores = dot(ka, qa, DOT_FP32)
                if KB:
                    scores += scores_b if KB_FOLD else dot(kb, qb, DOT_FP32)
            scores = scores * qk_scale
            if SOFTCAP > 0:  # Gemma-2: capped after the scale, before the bias and the mask
                scores = soft_cap(scores, SOFTCAP)
            if ALIBI:
                scores += tok.to(tl.float32)[:, None] * slopes[None, :]
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[None, :])
            l_tile = l_tile * alpha[None, :] + p
            if VA_FOLD:
                acc_a, va_shift = _weigh_folded(va_cp, va_sp, va_zp, vac_r, vas_r, nu, tok, va_off, va_aligned,
                                                va_groups, p, alpha, acc_a, va_shift, dtype, VA_BITS, V_GROUP,
                                                V_SYMMETRIC, VA_W, BLOCK_N, VA_MASK, VA_PAIRS, VA_ALIGN,
                                                DOT_FP32)  # fmt: skip
            else:
                v = _tile_rows(va_cp, va_sp, va_zp, vac_r, vas_r, nu, tok, va_off, va_aligned, va_groups, dtype,
                               VA_BITS, V_TOKEN, V_GROUP, V_SYMMETRIC, VA_W, BLOCK_N, VA_MASK, VA_PAIRS, VA_ALIGN,
                               DOT_FP32)  # fmt: skip
                acc_a = acc_a * alpha[None, :] + dot(tl.trans(v), p.to(dtype), DOT_FP32)
            if VB:
                if VB_FOLD:
                    acc_b, vb_shift = _weigh_folded(vb_cp, vb_sp, vb_zp, vbc_r, vbs_r, nu, tok, vb_off,
                                                    vb_aligned, vb_groups, p, alpha, acc_b, vb_shift, dtype, VB_BITS,
                                                    V_GROUP, V_SYMMETRIC, VB_W, BLOCK_N, VB_MASK, VB_PAIRS, VB_ALIGN,
                                                    DOT_FP32)  # fmt: skip
                else:
                    v = _tile_rows(vb_cp, vb_sp, vb_zp, vbc_r, vbs_r, nu, tok, vb_off, vb_aligned, vb_groups,
                                   dtype, VB_BITS, V_TOKEN, V_GROUP, V_SYMMETRIC, VB_W, BLOCK_N, VB_MASK, VB_PAIRS,
                                   VB_ALIGN, DOT_FP32)  # fmt: skip
                    acc_b = acc_b * alpha[None, :] + dot(tl.trans(v), p.to(dtype), DOT_FP32)
            m_i = m_new

    l_i = tl.sum(l_tile, axis=0)
    if VA_FOLD:
        acc_a += tl.sum(va_shift, axis=0)[None, :]
    if VB_FOLD:
        acc_b += tl.sum(vb_shift, axis=0)[None, :]
    # tail, element by element, in tiles of TAIL_N tokens: the lead (a sequence's partial first tile before
    # main_lo, when it has one) and the tokens from main_hi on (the full-precision window and partly quantized
    # tiles). The tiles are the MMAs' smallest M: the per-element gathers hold a pointer and a value per element,
    # and 64-token tail tiles made the whole kernel spill (Llama-3-8B 4 bits at 128 registers: an 856-byte stack
    # and 16 local loads and stores in the main loop; at 16 tokens, with tiles in the window skipping the codes'
    # gathers, 56 bytes and none in the main loop).
    TAIL_N: tl.constexpr = 16
    kw = b * kw_b + h * kw_h
    vw = b * vw_b + h * vw_h
    lead_lo = tl.maximum(lo, start // TAIL_N * TAIL_N)
    lead_hi = tl.where(lo < main_lo, tl.minimum(main_lo, hi), lead_lo)
    n_lead = tl.maximum(lead_hi - lead_lo + TAIL_N - 1, 0) // TAIL_N
    n_tail = tl.maximum(hi - main_hi + TAIL_N - 1, 0) // TAIL_N
    for i in range(0, n_lead + n_tail):
        n = tl.where(i < n_lead, lead_lo + i * TAIL_N, main_hi + (i - n_lead) * TAIL_N)
        tok = n + tl.arange(0, TAIL_N)
        tok_ok = (tok >= start) & (tok < hi)
        k = _chunk_tail(
            KAC,
            KAS,
            KAZ,
            ka_c,
            ka_s,
            kac_r,
            kas_r,
            KW,
            kw,
            kw_r,
            k_quantized,
            kw_ring,
            n,
            tok,
            tok_ok,
            ka_off,
            ka_feat,
            ka_width,
            ka_aligned,
            KA_BITS,
            K_TOKEN,
            K_GROUP,
            K_SYMMETRIC,
            KA_W,
            COUNTS,
        ).to(dtype)
        if KB:
            kb = _chunk_tail(KBC, KBS, KBZ, kb_c, kb_s, kbc_r, kbs_r, KW, kw, kw_r, k_quantized, kw_ring, n, tok,
                             tok_ok, kb_off, kb_feat, kb_width, kb_aligned, KB_BITS, K_TOKEN, K_GROUP, K_SYMMETRIC,
                             KB_W, COUNTS)  # fmt: skip
            kb = kb.to(dtype)
        if PRE:
            a1 = dot(k, d1a, DOT_FP32)
            a2 = dot(k, d2a, DOT_FP32)
            if KB:
                a1 += dot(kb, d1b, DOT_FP32)
                a2 += dot(kb, d2b, DOT_FP32)
            k1, k2 = rotate_keys(a1, a2, tok, inv_freq, rope_scale, dtype)
            scores = dot(k1, q1, DOT_FP32) + dot(k2, q2, DOT_FP32)
        else:
            scores = dot(k, qa, DOT_FP32)
            if KB:
                scores += dot(kb, qb, DOT_FP32)
        scores = scores * qk_scale
        if SOFTCAP > 0:
            scores = soft_cap(scores, SOFTCAP)
        if ALIBI:
            scores += tok.to(tl.float32)[:, None] * slopes[None, :]
        scores = tl.where(tok_ok[:, None], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = _chunk_tail(
            VAC,
            VAS,
            VAZ,
            va_c,
            va_s,
            vac_r,
            vas_r,
            VW,
            vw,
            vw_r,
            v_quantized,
            vw_ring,
            n,
            tok,
            tok_ok,
            va_off,
            va_feat,
            va_width,
            va_aligned,
            VA_BITS,
            V_TOKEN,
            V_GROUP,
            V_SYMMETRIC,
            VA_W,
            COUNTS,
        )
        acc_a = acc_a * alpha[None, :] + dot(tl.trans(v.to(dtype)), p.to(dtype), DOT_FP32)
        if VB:
            v = _chunk_tail(
                VBC,
                VBS,
                VBZ,
                vb_c,
                vb_s,
                vbc_r,
                vbs_r,
                VW,
                vw,
                vw_r,
                v_quantized,
                vw_ring,
                n,
                tok,
                tok_ok,
                vb_off,
                vb_feat,
                vb_width,
                vb_aligned,
                VB_BITS,
                V_TOKEN,
                V_GROUP,
                V_SYMMETRIC,
                VB_W,
                COUNTS,
            )
            acc_b = acc_b * alpha[None, :] + dot(tl.trans(v.to(dtype)), p.to(dtype), DOT_FP32)
        m_i = m_new

    out = (b * kv_heads * groups + heads) * n_splits + split  # row of (B * H, SPLITS)
    jv = tl.arange(0, VA_W)
    dst = ACC + out[None, :] * RV_PAD
    tl.store(dst + (va_feat + jv)[:, None], acc_a, mask=(va_off + jv < va_width)[:, None] & row_ok[None, :])
    if VB:
        jv = tl.arange(0, VB_W)
        tl.store(dst + (vb_feat + jv)[:, None], acc_b, mask=(vb_off + jv < vb_width)[:, None] & row_ok[None, :])
    tl.store(STATS + out * 2, m_i, mask=row_ok)
    tl.store(STATS + out * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_kernel(ACC, STATS, OUT, n_splits, value_rank, SPLITS_PAD: tl.constexpr, RV_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * H + query head
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < n_splits
    m = tl.load(STATS + (row * n_splits + s) * 2, mask=s_ok, other=-1.0e30)
    l_s = tl.load(STATS + (row * n_splits + s) * 2 + 1, mask=s_ok, other=0.0)
    weight = tl.where(s_ok, tl.exp2(m - tl.max(m, axis=0)), 0.0)
    rv = tl.arange(0, RV_PAD)
    acc = tl.load(ACC + (row * n_splits + s)[:, None] * RV_PAD + rv[None, :], mask=s_ok[:, None], other=0.0)
    total = tl.maximum(tl.sum(l_s * weight, axis=0), 1.0e-30)  # a sequence with no valid key gives zeros
    out = tl.sum(acc * weight[:, None], axis=0) / total
    tl.store(OUT + row * value_rank + rv, out.to(OUT.dtype.element_ty), mask=rv < value_rank)


# --- launcher --------------------------------------------------------------------------------


def launch_config(mode: str, group: int) -> KernelConfig:
    """Tokens per tile, warps, pipeline stages and register cap (``group``: see :func:`tile_group`; it does not
    change them).

    Tiles of 64 tokens: the MMAs' M, 16 rows for each of the four warps (smaller tiles leave the tensor
    cores' rows idle, and 64-token tiles are what the GPU correctness check runs); four warps and three
    stages keep two tiles of loads in flight while one is used. The loop is latency-bound: uncapped, the
    compiler takes 240-255 registers a thread and an SM holds two programs. Rank mode caps registers at 128:
    four programs per SM (measured on an H200 at Llama-3-8B B=8 x 32k, 4 bits: 0.31 -> 0.25 ms, when the
    capped compile spilled 16 local loads and stores a tile; now none in the main loop). ``max_registers`` of
    :func:`lowrank_decode` takes other caps. Pre mode keeps the compiler's choice (capped, its rotation ran
    twice as slow). ``python -m eigenkv.kernels.roofline`` reports both compiles.
    """
    if mode == "rank":
        return KernelConfig(constexprs={"BLOCK_N": 64}, num_warps=4, num_stages=3, maxnreg=128)
    return KernelConfig(constexprs={"BLOCK_N": 64}, num_warps=4, num_stages=3)


def tile_group(streams: list[tuple[int, str]]) -> int:
    """The group :func:`launch_config` is given for streams of ``(group size, axis)`` (the quantized ones, keys
    first; keys and values may be grouped differently): the smallest per-channel group, else the smallest group.

    The launch config sets the tile's tokens, and only per-channel groups run along tokens (blocks of ``G``
    tokens: a tile holds one block, part of one, or several whole ones); per-token groups run along features,
    which every tile reads whole, so they do not bear on it. Of two per-channel groups the smaller: groups are
    powers of two, so a tile that never straddles the smaller block never straddles the larger either (the rule
    tiles followed when they held ``min(group, 64)`` tokens). Today every group gets 64-token tiles, so the
    choice changes nothing yet; it keeps the launcher and the compile specs on one rule. Nothing quantized: 64
    (no group is read)."""
    channel = [group for group, axis in streams if axis == "channel"]
    return min(channel or [group for group, _ in streams] or [64])


def programs_per_sm(cfg: KernelConfig) -> int:
    """Programs one SM holds at once by the register file (65536 per SM; the compiler takes 255 a thread when
    uncapped, as these kernels do): what the split count fills. The roofline test checks it on the compile."""
    registers = cfg.maxnreg or 255
    return max(1, 65536 // (-(-registers // 8) * 8 * 32 * cfg.num_warps))


@dataclass(frozen=True)
class Chunk:
    """A power-of-two run of features that the kernel reads as one tile (two per stream at most).

    Attributes:
        segment: index of the precision segment it reads (0 for an unquantized stream).
        offset: its first feature in that segment; feature: its first feature in the stream.
        width: tile width (a power of two, at least 16).
        masked: the tile reaches past the features the segment stores (its loads need a mask).
    """

    segment: int
    offset: int
    feature: int
    width: int
    masked: bool


@functools.lru_cache(maxsize=256)  # a pure function of the widths, called for every stream of every launch
def _chunks(widths: tuple[int, ...]) -> tuple[Chunk, ...]:
    return tuple(feature_chunks(list(widths)))


def feature_chunks(widths: list[int]) -> list[Chunk]:
    """The tiles covering a stream of segments of ``widths`` features (stored ``aligned_width`` each).

    One segment: the largest power of two within its aligned width (at least 16), then the rest rounded up
    to a power of two (77 features: 64 + 16, stored 80; 38: 32 + 16, stored 40, the second tile masked past
    feature 40); two segments: one tile each."""
    if len(widths) == 1:
        stored = aligned_width(widths[0])
        first = max(16, 1 << (stored.bit_length() - 1))  # tiles of at least 16 features (tensor-core K)
        chunks = [Chunk(0, 0, 0, first, first > stored)]
        if stored > first:
            rest = pad_width(stored - first)
            chunks.append(Chunk(0, first, first, rest, rest > stored - first))
        return chunks
    if len(widths) != 2:
        raise ValueError(f"the kernel reads at most two precision segments; got {len(widths)}")
    w1, w2 = (pad_width(aligned_width(w)) for w in widths)
    return [
        Chunk(0, 0, 0, w1, w1 > aligned_width(widths[0])),
        Chunk(1, 0, widths[0], w2, w2 > aligned_width(widths[1])),
    ]


def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (1 elsewhere: the interpreter runs programs one after another, and the tests pass
    ``splits`` explicitly where splitting is what they test)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def num_splits(tokens: int, programs: int, block_n: int, slots: int) -> int:
    """Splits of each sequence so that ``programs * splits`` fills the ``slots`` (SMs x programs per SM) once.

    Rounded down, not up: a launch of one wave and a bit takes two waves (on an H200, 320 programs for 264
    slots ran 1.6x slower than 256); a program then reads a long range, which the kernel does at full speed."""
    tiles = max(1, cdiv(tokens, block_n))
    return int(min(tiles, MAX_SPLITS, max(1, slots // programs)))


def _check_stream(name: str, stream: PackedStream, batch: int, kv_heads: int, query: torch.Tensor) -> None:
    if not isinstance(stream, PackedStream):
        raise TypeError(f"{name} must be a PackedStream (QuantizedStream.packed()); got {type(stream).__name__}")
    w = stream.window
    if w.dim() != 4 or w.shape[0] != batch or w.shape[1] != kv_heads:
        raise ValueError(f"{name} window must be (B={batch}, H_kv={kv_heads}, W, r); got {tuple(w.shape)}")
    if stream.counts is not None:
        c = stream.counts
        if c.dtype != torch.int32 or tuple(c.shape) != (2,) or c.device != query.device or not c.is_contiguous():
            raise ValueError(f"{name} counts must be int32 (2,) on {query.device}; got {c.dtype} {tuple(c.shape)}")
        if not stream.segments or stream.ring < 1 or w.shape[2] != stream.ring:
            raise ValueError(
                f"{name}: a device-form stream has quantized segments and a ring window of `ring` slots; "
                f"got {len(stream.segments)} segments, ring {stream.ring}, window {tuple(w.shape)}"
            )
    if w.dtype != query.dtype or w.device != query.device or (w.numel() and w.shape[-1] > 1 and w.stride(-1) != 1):
        raise ValueError(
            f"{name} window must be {query.dtype} on {query.device} with unit feature stride; "
            f"got {w.dtype} on {w.device}, strides {w.stride()}"
        )
    if len(stream.segments) > 2:
        raise ValueError(f"{name}: the kernel reads at most two precision segments; got {len(stream.segments)}")
    if stream.segments and sum(s.width for s in stream.segments) != stream.width:
        raise ValueError(f"{name}: segment widths {[s.width for s in stream.segments]} do not add up to {stream.width}")
    if stream.segments and stream.group_size not in GROUP_SIZES:
        raise ValueError(f"{name}: the kernel reads groups of {GROUP_SIZES}; got {stream.group_size}")
    # the rows the segments hold: the quantized tokens, or a device-form stream's whole capacity
    tq, g = (stream.capacity if stream.counts is not None else stream.quantized_tokens), stream.group_size
    if stream.axis == "channel" and tq % g:
        raise ValueError(f"{name}: per-channel groups hold whole blocks of {g} tokens; got {tq} quantized tokens")
    for segment in stream.segments:
        stored = aligned_width(segment.width)
        cols = packed_length(stored, segment.bits)
        params = (tq, -(-segment.width // g)) if stream.axis == "token" else (tq // g, stored)
        if segment.codes.dtype != torch.uint8 or tuple(segment.codes.shape) != (batch, kv_heads, tq, cols):
            raise ValueError(
                f"{name} codes must be uint8 {(batch, kv_heads, tq, cols)} for {tq} tokens of "
                f"{segment.width} features (stored {stored}) at {segment.bits} bits; "
                f"got {segment.codes.dtype} {tuple(segment.codes.shape)}"
            )
        for label, t in (("scale", segment.scale), ("zero", segment.zero)):
            if t is None:
                if label == "zero" and not stream.symmetric:
                    raise ValueError(f"{name}: an asymmetric stream needs zero points")
                continue
            if t.dtype != SCALE_DTYPE or tuple(t.shape) != (batch, kv_heads, *params):
                raise ValueError(
                    f"{name} {label} must be float16 {(batch, kv_heads, *params)}; got {t.dtype} {tuple(t.shape)}"
                )
        check_slice_extent(f"{name} codes", segment.codes)
        check_slice_extent(f"{name} scale", segment.scale)
        if segment.zero is not None and segment.zero.stride() != segment.scale.stride():
            raise ValueError(f"{name}: scale and zero must share strides")
        for t in (segment.codes, segment.scale):
            if t.device != query.device or (t.shape[-1] > 1 and t.stride(-1) != 1):
                raise ValueError(f"{name}: packed tensors must be on {query.device} with a unit last stride")


def check_slice_extent(name: str, t: torch.Tensor) -> None:
    """Refuse a packed tensor (B, H, rows, columns) whose (batch, head) slice spans more elements than the main loop's
    32-bit offsets reach (2**31 - 1; a slice of 4-bit codes of 80 features holds some 50 million tokens)."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape[2:], t.stride()[2:], strict=True))
    if extent > 2**31 - 1:
        raise ValueError(
            f"{name}: one (batch, head) slice spans {extent} elements, past the 2**31 - 1 that the kernel addresses "
            "with 32-bit offsets; hold fewer tokens per sequence"
        )


def query_heads_pad(groups: int) -> int:
    """Query heads of a KV head as the kernel's tiles hold them (the MMA's N): a power of two, at least 8."""
    return max(8, next_power_of_2(groups))


def unpacks_pairs(bits: int, codes: torch.Tensor | None = None) -> bool:
    """Whether the main loop converts a segment's codes to 16-bit floats without an integer-to-float conversion
    (``1024 + code``, two an instruction): 2, 3 and 4 bits by PTX (:func:`unpack_ptx`, :func:`unpack_ptx3`), 8
    bits read as pairs of uint32 words, so their ``codes`` (when given) must start and stride on multiples of 8
    bytes (the store's always do: rows of a multiple of 8 features; a view off that is read byte by byte, its
    codes shifted out and converted one by one)."""
    if bits not in (2, 3, 4, 8):
        return False
    return bits < 8 or codes is None or (codes.data_ptr() % 8 == 0 and all(st % 8 == 0 for st in codes.stride()[:3]))


def codes_alignment(bits: int, pairs: bool, width: int) -> int:
    """Bytes a (batch, head) slice of a segment of ``width`` features, and each of its rows, start on a multiple
    of, as the main loop's vector loads take them (rows of :mod:`eigenkv.quant.packing`, one per token, whichever
    the grouping): 8-bit rows read as words (``pairs``), 8; 2-, 3- and 4-bit rows, the largest power of two that
    divides their bytes, at most ``2 * bits`` (the second chunk of a row starts at a multiple of 16 features),
    e.g. 8 for 4-bit rows of a multiple of 16 features (two 8-byte copies a 64-feature row, where 4-byte claims
    take four); 3-bit rows (``3 * aligned / 8`` bytes) the same, at most 4 (their 2-bit plane's chunks start at
    multiples of 4 bytes; the 1-bit plane's are read at most 2 bytes wide); 8-bit rows read byte by byte claim
    nothing (1)."""
    if bits == 8:
        return 8 if pairs else 1
    row = packed_length(aligned_width(width), bits)
    return min(row & -row, 4 if bits == 3 else 2 * bits)


def slice_alignment(claim: int, codes: torch.Tensor) -> int:
    """The largest power of two up to ``claim`` that every row of ``codes`` (B, H, rows, bytes) starts on a
    multiple of (its address and its batch, head and row strides, in bytes): what the main loop may tell the
    compiler about the alignment of its vector loads (a false claim faults)."""
    while claim > 1 and (codes.data_ptr() % claim or any(stride % claim for stride in codes.stride()[:3])):
        claim //= 2
    return claim


def _stream_args(stream: PackedStream, prefix: str) -> tuple[tuple, dict]:
    """Kernel arguments of a stream's two chunks and window, and their constexprs (``prefix`` K or V)."""
    segments = list(stream.segments)
    widths = [seg.width for seg in segments] or [stream.width]
    chunks = list(_chunks(tuple(widths)))
    args, constexprs = [], {f"{prefix}_TOKEN": stream.axis == "token", f"{prefix}B": len(chunks) > 1}
    constexprs |= {f"{prefix}_GROUP": stream.group_size, f"{prefix}_SYMMETRIC": stream.symmetric}
    # a stream of one chunk repeats it as chunk B (never read)
    for name, chunk in zip("AB", chunks + chunks[:1] * (2 - len(chunks)), strict=True):
        width = widths[chunk.segment]
        if segments:
            seg = segments[chunk.segment]
            zero = seg.scale if seg.zero is None else seg.zero
            args += [seg.codes, seg.scale, zero, *seg.codes.stride()[:3], *seg.scale.stride()[:3]]
            bits = seg.bits
            pairs = unpacks_pairs(bits, seg.codes)
            align = slice_alignment(codes_alignment(bits, pairs, seg.width), seg.codes)
        else:  # nothing quantized: point at the window, never read
            args += [stream.window] * 3 + [0] * 6
            bits, pairs, align = 0, False, 1
        args += [chunk.offset // 16, chunk.feature, width, aligned_width(width), -(-width // stream.group_size)]
        constexprs |= {f"{prefix}{name}_BITS": bits, f"{prefix}{name}_W": chunk.width}
        constexprs |= {f"{prefix}{name}_MASK": chunk.masked, f"{prefix}{name}_PAIRS": pairs}
        constexprs |= {f"{prefix}{name}_ALIGN": align}
    w = stream.window
    args += [w, *w.stride()[:3], stream.quantized_tokens, stream.ring]
    return tuple(args), constexprs


@on_input_device
def lowrank_decode(
    query: torch.Tensor,
    keys: PackedStream,
    values: PackedStream,
    scoring: Scoring,
    *,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
    splits: int | None = None,
    max_registers: int | None = None,
) -> torch.Tensor:
    """Triton flash-decoding over a packed low-rank cache (module doc) -> ``(B, H, r_v)`` in ``query.dtype``.

    Args:
        query: ``(B, H, e)`` fp16/bf16, unit last stride: ``e = r_k`` (rank mode) or ``d`` (pre mode, rotated).
        keys, values: the layer's streams, ``r_k`` and ``r_v`` features over ``H_kv`` heads (``H_kv`` divides ``H``).
        scoring: how queries score keys (:class:`~eigenkv.kernels.scoring.Scoring`).
        starts, ends: ``(B,)`` int32, valid keys ``[starts[b], ends[b])``; default all ``S``.
        splits: programs per sequence (default from the length and the GPU's SM count).
        max_registers: register cap per thread, 64-255 (default :func:`launch_config`'s: 128 in rank mode, none
            in pre mode), for benchmarks that weigh programs per SM against spills.

    Streams in device form (``PackedStream.counts``, a capturable cache): the launch depends on the
    capacity, not on what is held (read from ``counts`` on the device), so one CUDA graph serves every
    step; keys past what is held are never read, whatever ``ends`` says.
    """
    check_kernel_device(query, "lowrank_decode", "lowrank_decode_reference")
    if not isinstance(scoring, Scoring):
        raise TypeError(f"scoring must be a Scoring; got {type(scoring).__name__}")
    if query.dim() != 3 or query.dtype not in KERNEL_DTYPES or (query.shape[-1] > 1 and query.stride(-1) != 1):
        raise ValueError(
            f"query must be (B, H, e) fp16/bf16 with unit last stride; got {query.dim()}-D {query.dtype} "
            f"(float32 models use lowrank_decode_reference)"
        )
    batch, q_heads, width = query.shape
    kv_heads = keys.window.shape[1] if keys.window.dim() == 4 else -1
    if kv_heads <= 0 or q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of the cache's KV heads ({kv_heads})")
    _check_stream("keys", keys, batch, kv_heads, query)
    _check_stream("values", values, batch, kv_heads, query)
    device_counts = keys.counts is not None
    if device_counts != (values.counts is not None):
        raise ValueError("keys and values must both be in device form (counts) or neither")
    if keys.tokens != values.tokens:
        raise ValueError(f"keys hold {keys.tokens} tokens but values {values.tokens}")
    key_rank, value_rank = keys.width, values.width
    scoring.check_kernel(query, kv_heads, key_rank)
    mode = scoring.mode
    half = width // 2 if mode == "pre" else 0
    decoder, decoder_stride, inv_freq, slopes = scoring.kernel_tensors(query)
    tokens = keys.tokens
    bounds = []
    for label, t, default in (("starts", starts, 0), ("ends", ends, tokens)):
        if t is None:
            t = torch.full((batch,), default, dtype=torch.int32, device=query.device)
        if t.shape != (batch,) or t.dtype != torch.int32 or t.device != query.device:
            raise ValueError(f"{label} must be int32 ({batch},) on {query.device}; got {t.dtype} {tuple(t.shape)}")
        bounds.append(t.contiguous())
    if tokens >= 2**31:
        raise ValueError(f"{tokens} tokens: positions are int32 in the kernel")

    groups = q_heads // kv_heads
    cfg = launch_config(mode, tile_group([(s.group_size, s.axis) for s in (keys, values) if s.segments]))
    if max_registers is not None:
        if not 64 <= max_registers <= 255:
            raise ValueError(f"max_registers must be in [64, 255] (registers per thread); got {max_registers}")
        cfg = replace(cfg, maxnreg=max_registers)
    block_n = cfg.constexprs["BLOCK_N"]
    slots = multiprocessors(query.device) * programs_per_sm(cfg)
    n_splits = splits or num_splits(tokens, batch * kv_heads, block_n, slots)
    if not 1 <= n_splits <= MAX_SPLITS:
        raise ValueError(f"splits must be in [1, {MAX_SPLITS}]; got {n_splits}")
    tokens_per_split = block_n * cdiv(cdiv(max(tokens, 1), block_n), n_splits)
    # tokens read by the main loop: whole tiles where keys and values are both quantized
    main_tokens = min(keys.quantized_tokens, values.quantized_tokens) // block_n * block_n
    if not (keys.segments and values.segments) or device_counts:  # device form: the kernel reads the counts
        main_tokens = 0

    rv_pad = pad_width(value_rank)
    out = torch.empty((batch, q_heads, value_rank), dtype=query.dtype, device=query.device)
    if batch == 0:
        return out
    acc = torch.empty((batch * q_heads, n_splits, rv_pad), dtype=torch.float32, device=query.device)
    stats = torch.empty((batch * q_heads, n_splits, 2), dtype=torch.float32, device=query.device)
    key_args, key_constexprs = _stream_args(keys, "K")
    value_args, value_constexprs = _stream_args(values, "V")
    dummy = bounds[0]
    grid = (batch * kv_heads, n_splits)
    _decode_kernel[grid](
        query, query.stride(0), query.stride(1),
        acc, stats, *bounds,
        dummy if decoder is None else decoder, decoder_stride,
        dummy if inv_freq is None else inv_freq, float(scoring.rope_scale),
        dummy if slopes is None else slopes,
        *key_args, *value_args,
        keys.counts if device_counts else dummy, values.counts if device_counts else dummy,
        kv_heads, groups, key_rank, half, float(scoring.scaling) * math.log2(math.e),
        tokens_per_split, n_splits, main_tokens,
        PRE=mode == "pre", ALIBI=slopes is not None, SOFTCAP=scoring.softcap or 0.0,
        **key_constexprs, **value_constexprs,
        G_PAD=query_heads_pad(groups), RV_PAD=rv_pad, HALF_PAD=pad_width(half) if mode == "pre" else 16,
        DOT_FP32=interpreting(), COUNTS=device_counts,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, **cfg.constexprs,
    )  # fmt: skip
    _merge_kernel[(batch * q_heads,)](
        acc, stats, out, n_splits, value_rank, SPLITS_PAD=next_power_of_2(n_splits), RV_PAD=rv_pad
    )
    return out


# --- compile specs -----------------------------------------------------------------------------


def _decode_signature(dtype: str) -> dict:
    """Argument types of ``_decode_kernel`` (fp16 scales, uint8 codes, int32 sizes and strides)."""
    sig = {"Q": f"*{dtype}", "q_b": "i32", "q_h": "i32", "ACC": "*fp32", "STATS": "*fp32"}
    sig |= {"STARTS": "*i32", "ENDS": "*i32", "DEC": f"*{dtype}", "dec_h": "i32", "INV_FREQ": "*fp32"}
    sig |= {"rope_scale": "fp32", "SLOPES": "*fp32"}
    for s in ("K", "V"):
        low = s.lower()
        for c in ("A", "B"):
            x, y = s + c, (s + c).lower()
            sig |= {f"{x}C": "*u8", f"{x}S": "*fp16", f"{x}Z": "*fp16"}
            sig |= {f"{y}{p}_{a}": "i32" for p in ("c", "s") for a in ("b", "h", "r")}
            sig |= {f"{y}_{n}": "i32" for n in ("off16", "feat", "width", "aligned", "groups")}
        sig |= {f"{s}W": f"*{dtype}", f"{low}w_b": "i32", f"{low}w_h": "i32", f"{low}w_r": "i32"}
        sig |= {f"{low}_quantized": "i32", f"{low}w_ring": "i32"}
    sig |= {"KCNT": "*i32", "VCNT": "*i32"}
    sig |= {name: "i32" for name in ("kv_heads", "groups", "key_rank", "half")}
    return sig | {"qk_scale": "fp32", "tokens_per_split": "i32", "n_splits": "i32", "main_tokens": "i32"}


def decode_spec(
    name: str, dtype: str, mode: str, heads: int, kv_heads: int, head_dim: int, key_rank: int, value_rank: int,
    bits: tuple[int, int], group: int | tuple[int, int], key_axis: str = "channel", value_axis: str = "token",
    alibi: bool = False, counts: bool = False, symmetric: bool | tuple[bool, bool] = False,
    softcap: float | None = None,
) -> KernelSpec:  # fmt: skip
    """The compile a launch makes for uniform streams (``bits``: keys, values; 0 = unquantized) of these ranks
    (``counts``: streams in device form, a capturable cache; ``softcap``: Gemma-2's logit cap). ``group`` and
    ``symmetric``: both streams', or (keys, values) when each is stored with its own config.

    Arguments the launcher always passes as multiples of 16 (pointers, the strides of rows of a multiple of 16)
    are declared so, as Triton specializes them at a real launch (token counts are never specialized)."""
    groups = group if isinstance(group, tuple) else (group, group)
    symmetries = symmetric if isinstance(symmetric, tuple) else (symmetric, symmetric)
    axes = (key_axis, value_axis)
    cfg = launch_config(mode, tile_group([(g, a) for g, a, b in zip(groups, axes, bits, strict=True) if b]))
    constexprs = {"PRE": mode == "pre", "ALIBI": alibi, "SOFTCAP": float(softcap or 0.0), "COUNTS": counts}
    aligned = []  # the token counts are not specialized (the kernel states their alignment itself)
    streams = zip("KV", (key_rank, value_rank), bits, axes, groups, symmetries, strict=True)
    for prefix, width, b, axis, g, sym in streams:
        chunks = feature_chunks([width])
        constexprs |= {f"{prefix}_TOKEN": axis == "token", f"{prefix}B": len(chunks) > 1}
        constexprs |= {f"{prefix}_GROUP": g, f"{prefix}_SYMMETRIC": sym}
        for c, chunk in zip("AB", chunks + chunks[:1] * (2 - len(chunks)), strict=True):
            constexprs |= {f"{prefix}{c}_BITS": b, f"{prefix}{c}_W": chunk.width, f"{prefix}{c}_MASK": chunk.masked}
            constexprs |= {f"{prefix}{c}_PAIRS": unpacks_pairs(b)}
            constexprs |= {f"{prefix}{c}_ALIGN": codes_alignment(b, unpacks_pairs(b), width) if b else 1}
            # a launch specializes the strides of rows of a multiple of 16 bytes (codes) or elements (per-channel
            # parameters of a multiple of 16 features)
            strides = ("c",) if b and packed_length(aligned_width(width), b) % 16 == 0 else ()
            strides += ("s",) if b and axis == "channel" and aligned_width(width) % 16 == 0 else ()
            aligned += [f"{(prefix + c).lower()}{t}_{a}" for t in strides for a in ("b", "h", "r")]
    constexprs |= {"G_PAD": query_heads_pad(heads // kv_heads), "RV_PAD": pad_width(value_rank)}
    constexprs |= {"HALF_PAD": pad_width(head_dim // 2) if mode == "pre" else 16, "DOT_FP32": False}
    signature = _decode_signature(dtype)
    aligned += [arg for arg, kind in signature.items() if kind.startswith("*")]
    return KernelSpec(
        name=name,
        fn=_decode_kernel,
        signature=signature,
        constexprs=constexprs | cfg.constexprs,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        maxnreg=cfg.maxnreg,
        aligned=tuple(aligned),
    )


# (mode, head size, key rank, value rank): the shapes users run (head sizes 64/128, ranks of one chunk, of two,
# of a masked second chunk)
_SPEC_SHAPES = [("rank", 64, 38, 38), ("rank", 128, 77, 77), ("rank", 128, 128, 100), ("pre", 64, 38, 38),
                ("pre", 128, 77, 77)]  # fmt: skip


# Gemma-2's capped logits (softcap 50): rank 77 in both modes (the same compiles without the cap are above), and
# rank mode at Gemma-2's head sizes (its attention compresses post-RoPE only): 128 (27B), 256 (2B, 9B), whole (a
# quantized cache alone) and at 0.6x
_SOFTCAP_SHAPES = [("rank", 128, 77, 77), ("pre", 128, 77, 77), ("rank", 128, 128, 128), ("rank", 256, 256, 256),
                   ("rank", 256, 154, 154)]  # fmt: skip


def compile_specs():
    """The configurations the launcher uses, for the sm_80/sm_90 compile test: every shape at 4 bits (keys per
    channel, values per token, group 64) in fp16 (ALiBi at one of them), rank 77 in bf16 (both modes: bf16
    arithmetic differs), and at rank 77 each
    other bit width, the groupings swapped, groups of 16 (per token, and per channel: tiles of several
    blocks) and 128, an unquantized cache, and keys and values stored with their own configs (keys 4 bits per
    channel in blocks of 128 tokens, values 2 bits per token in symmetric groups of 32 features); capped logits
    (Gemma-2, ``_SOFTCAP_SHAPES``) at rank 77 in fp16, at every Gemma-2 shape in bf16. Each compile
    takes seconds: these are the variants that change the code, not every product; the 4-bit fp16 ones are
    the static roofline's cases (tests/kernels/test_roofline.py finds them compiled)."""
    for dtype in ("fp16", "bf16"):
        for mode, head_dim, key_rank, value_rank in _SPEC_SHAPES:
            if dtype == "bf16" and key_rank != 77:
                continue
            variants = [((4, 4), 64, "channel", "token", False)]
            if dtype == "fp16" and key_rank == 77 and mode == "rank":
                variants += [((b, b), 64, "channel", "token", False) for b in (2, 3, 8)]
                variants += [((3, 3), 16, "token", "token", False), ((2, 2), 128, "channel", "channel", False)]
                variants += [((3, 3), 16, "channel", "channel", False)]  # 64-token tiles of four blocks
                variants += [((0, 0), 64, "channel", "token", False)]
            if key_rank == 77:  # a capturable cache's streams (device counts, ring window)
                variants += [((4, 4), 64, "channel", "token", True)]
            if dtype == "fp16" and key_rank == 77 and mode == "pre":
                variants += [((3, 3), 64, "token", "channel", False)]
            for bits, group, key_axis, value_axis, counts in variants:
                name = (
                    f"lowrank_decode[{dtype},{mode},d{head_dim},r{key_rank}x{value_rank},b{bits[0]},g{group}"
                    f",k{key_axis[0]},v{value_axis[0]}{',counts' if counts else ''}]"
                )
                yield decode_spec(
                    name, dtype, mode, 32, 8, head_dim, key_rank, value_rank, bits, group, key_axis, value_axis,
                    alibi=key_rank == 128, counts=counts,
                )  # fmt: skip
            if dtype == "fp16" and key_rank == 77 and mode == "rank":  # keys and values with their own configs
                yield decode_spec(
                    f"lowrank_decode[{dtype},{mode},d{head_dim},r{key_rank}x{value_rank},b4x2,g128x32,kc,vt,vsym]",
                    dtype, mode, 32, 8, head_dim, key_rank, value_rank, (4, 2), (128, 32), "channel", "token",
                    symmetric=(False, True),
                )  # fmt: skip
        for mode, head_dim, key_rank, value_rank in _SOFTCAP_SHAPES:
            if dtype == "fp16" and key_rank != 77:
                continue
            yield decode_spec(
                f"lowrank_decode[{dtype},{mode},d{head_dim},r{key_rank}x{value_rank},b4,g64,kc,vt,softcap]",
                dtype, mode, 32, 8, head_dim, key_rank, value_rank, (4, 4), 64, softcap=50.0,
            )  # fmt: skip
        for rv_pad in (16, 32, 64, 128):
            for splits_pad in (1, 8, MAX_SPLITS):
                yield KernelSpec(
                    name=f"lowrank_decode_merge[{dtype},rv{rv_pad},s{splits_pad}]",
                    fn=_merge_kernel,
                    signature={"ACC": "*fp32", "STATS": "*fp32", "OUT": f"*{dtype}"}
                    | {"n_splits": "i32", "value_rank": "i32"},
                    constexprs={"SPLITS_PAD": splits_pad, "RV_PAD": rv_pad},
                )


# --- static roofline cases ---------------------------------------------------------------------

# (name, query heads, KV heads, head size, key rank, value rank): the benchmark shapes (0.6x ranks)
ROOFLINE_SHAPES = [("llama3-8b", 32, 8, 128, 77, 77), ("smollm2-135m", 9, 3, 64, 38, 38)]
H100_SMS = 132  # H100 SXM and H200: splits of the roofline workloads
ROOFLINE_WORKLOAD = {"batch": 8, "context": 32768, "group": 64}


def stream_bytes_per_token(width: int, bits: int, group: int, axis: str, symmetric: bool = False) -> float:
    """Bytes one KV head stores per token for a stream of ``width`` features (codes with their padding to
    ``aligned_width``, fp16 scales and zeros)."""
    params = 1 if symmetric else 2
    stored = aligned_width(width)
    groups = -(-width // group) if axis == "token" else stored / group
    return packed_length(stored, bits) + params * 2 * groups


def roofline_cases():
    """Decode at the benchmark shapes: Llama-3-8B and SmolLM2 at 0.6x, rank and pre modes, 2/3/4/8 bits,
    keys per channel and values per token, group 64, batch 8 at 32k tokens."""
    batch, context, group = ROOFLINE_WORKLOAD["batch"], ROOFLINE_WORKLOAD["context"], ROOFLINE_WORKLOAD["group"]
    for shape, heads, kv_heads, head_dim, key_rank, value_rank in ROOFLINE_SHAPES:
        for mode in ("rank", "pre"):
            for bits in (2, 3, 4, 8):
                name = f"lowrank_decode[{shape},{mode},{bits}bit,g{group}]"
                spec = decode_spec(name, "fp16", mode, heads, kv_heads, head_dim, key_rank, value_rank, (bits, bits),
                                   group)  # fmt: skip
                block_n = spec.constexprs["BLOCK_N"]
                per_token = stream_bytes_per_token(key_rank, bits, group, "channel") + stream_bytes_per_token(
                    value_rank, bits, group, "token"
                )
                slots = H100_SMS * programs_per_sm(launch_config(mode, group))
                programs = batch * kv_heads * num_splits(context, batch * kv_heads, block_n, slots)
                decoders = kv_heads * head_dim * key_rank * 2 if mode == "pre" else 0
                c = spec.constexprs  # MMA widths per token: keys (rebuilt in pre mode), then values
                key_w = c["KA_W"] + c["KB_W"] * c["KB"]
                per_token_flops = 2 * c["G_PAD"] * (
                    (2 * c["HALF_PAD"] if mode == "pre" else key_w) + c["VA_W"] + c["VB_W"] * c["VB"]
                ) + (2 * key_w * 2 * c["HALF_PAD"] if mode == "pre" else 0)
                yield RooflineCase(
                    name=name,
                    spec=spec,
                    tokens_per_iteration=block_n,
                    bytes_per_token=per_token,
                    total_bytes=batch * kv_heads * context * per_token + decoders,
                    sdpa_bytes=batch * kv_heads * context * 2 * head_dim * 2,
                    programs=programs,
                    flops=batch * kv_heads * context * per_token_flops,
                    sdpa_flops=batch * heads * context * 2 * 2 * head_dim,
                    loop=0,  # the main loop comes first; the tail loop after it runs a few times per program
                    workload={
                        "shape": shape, "mode": mode, "batch": batch, "context": context, "heads": heads,
                        "kv_heads": kv_heads, "head_dim": head_dim, "key_rank": key_rank, "value_rank": value_rank,
                        "bits": bits, "group": group, "keys": "channel", "values": "token",
                    },
                )  # fmt: skip
