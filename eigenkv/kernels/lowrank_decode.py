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

Pre mode (pre-RoPE caches) rebuilds key ``t`` inside the kernel as
``rope(c_t D^T, t)``: with ``D = [D_1 D_2]`` split at ``d / 2``, ``a_i = c_t D_i^T``
on tensor cores, and the rotated halves are ``a_1 cos - a_2 sin`` and
``a_2 cos + a_1 sin`` (Hugging Face's ``rotate_half`` convention), with
``cos``/``sin`` of ``t * inv_freq`` computed in registers: no table is read.

Grid ``(B * H_kv, splits)``: a program reads one contiguous range of tokens for
all ``g`` query heads of its KV head (each cached byte is read once per step),
unpacks and dequantizes codes in registers, keeps an online softmax in base 2,
and writes its partial output, running max and sum; ``_merge_kernel`` combines
the splits. Valid keys of sequence ``b`` are ``[starts[b], ends[b])`` (left
padding, unequal lengths). ALiBi adds ``slope_h * t`` (softmax is invariant to
the per-query shift ``- slope_h * (S - 1)`` MPT also adds).
"""

from __future__ import annotations

import math

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
    dot,
    pad_width,
    qk_scores,
    query_operands,
)
from eigenkv.quant.packing import PackedStream, packed_length

SCALE_DTYPE = torch.float16
GROUP_SIZES = (16, 32, 64, 128)
MAX_SPLITS = 128


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
    scores = torch.einsum("bhe,bhse->bhs", query, k).float() * scoring.scaling + scoring.bias(positions)
    batch = query.shape[0]
    lo = torch.zeros(batch, dtype=torch.long, device=query.device) if starts is None else starts.long()
    hi = torch.full_like(lo, k.shape[-2]) if ends is None else ends.long()
    valid = (positions[None, :] >= lo[:, None]) & (positions[None, :] < hi[:, None])
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(dtype)
    return torch.einsum("bhs,bhsr->bhr", weights, v)


# --- kernel ----------------------------------------------------------------------------------


@triton.jit
def _codes(
    C, base, stride_row, tok, feat, ok, width, AXIS_TOKEN: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr
):
    # int32 codes (BLOCK_N, F) of tokens `tok` and segment-local features `feat` (layouts: eigenkv.quant.store)
    if AXIS_TOKEN:  # a token's codes packed along features
        row = base + tok[:, None].to(tl.int64) * stride_row
        along = feat[None, :]
        if BITS == 3:
            low = tl.load(C + row + along // 4, mask=ok, other=0).to(tl.int32)
            high = tl.load(C + row + (width + 3) // 4 + along // 8, mask=ok, other=0).to(tl.int32)
            return ((low >> ((along % 4) * 2)) & 3) | (((high >> (along % 8)) & 1) << 2)
        else:
            byte = tl.load(C + row + along // (8 // BITS), mask=ok, other=0).to(tl.int32)
            return (byte >> ((along % (8 // BITS)) * BITS)) & ((1 << BITS) - 1)
    else:  # blocks of GROUP tokens, each feature's codes packed along tokens
        along = (tok % GROUP)[:, None]
        col = base + feat[None, :]
        if BITS == 3:
            block = (tok // GROUP)[:, None].to(tl.int64) * (GROUP // 4 + GROUP // 8)
            low = tl.load(C + col + (block + along // 4) * stride_row, mask=ok, other=0).to(tl.int32)
            high = tl.load(C + col + (block + GROUP // 4 + along // 8) * stride_row, mask=ok, other=0).to(tl.int32)
            return ((low >> ((along % 4) * 2)) & 3) | (((high >> (along % 8)) & 1) << 2)
        else:
            block = (tok // GROUP)[:, None].to(tl.int64) * (GROUP * BITS // 8)
            byte = tl.load(C + col + (block + along // (8 // BITS)) * stride_row, mask=ok, other=0).to(tl.int32)
            return (byte >> ((along % (8 // BITS)) * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _segment(
    C, S, Z, c_base, s_base, stride_cr, stride_sr, tok, tok_ok, feat, first, width,
    AXIS_TOKEN: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
):  # fmt: skip
    # fp32 (BLOCK_N, F): features [first, first + width) of the tile dequantized, zero elsewhere
    local = feat - first
    feat_ok = (local >= 0) & (local < width)
    local = tl.where(feat_ok, local, 0)
    ok = tok_ok[:, None] & feat_ok[None, :]
    codes = _codes(C, c_base, stride_cr, tok, local, ok, width, AXIS_TOKEN, BITS, GROUP).to(tl.float32)
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
def _stream_tile(
    C1, S1, Z1, c1_b, c1_h, c1_r, s1_b, s1_h, s1_r,
    C2, S2, Z2, c2_b, c2_h, c2_r, s2_b, s2_h, s2_r,
    W, w_b, w_h, w_r, quantized, width1, width,
    b, h, tok, tok_ok, feat,
    BITS1: tl.constexpr, BITS2: tl.constexpr, AXIS_TOKEN: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
):  # fmt: skip
    # fp32 (BLOCK_N, F) of one stream: dequantized codes for tokens < quantized, the window after
    in_window = tok_ok & (tok >= quantized)
    row = tl.where(in_window, tok - quantized, 0)
    x = tl.load(
        W + b * w_b + h * w_h + row[:, None].to(tl.int64) * w_r + feat[None, :],
        mask=in_window[:, None] & (feat < width)[None, :],
        other=0.0,
    ).to(tl.float32)
    in_codes = tok_ok & (tok < quantized)
    if BITS1 > 0:
        x += _segment(
            C1, S1, Z1, b * c1_b + h * c1_h, b * s1_b + h * s1_h, c1_r, s1_r, tok, in_codes, feat, 0, width1,
            AXIS_TOKEN, BITS1, GROUP, SYMMETRIC,
        )  # fmt: skip
    if BITS2 > 0:
        x += _segment(
            C2, S2, Z2, b * c2_b + h * c2_h, b * s2_b + h * s2_h, c2_r, s2_r, tok, in_codes, feat, width1,
            width - width1, AXIS_TOKEN, BITS2, GROUP, SYMMETRIC,
        )  # fmt: skip
    return x


@triton.jit
def _decode_kernel(
    Q, q_b, q_h,
    ACC, STATS,  # (B * H, SPLITS, RV_PAD), (B * H, SPLITS, 2) fp32 partials
    STARTS, ENDS,  # (B,) int32: valid keys [start, end)
    DEC, dec_h, INV_FREQ, rope_scale,  # pre mode: decoders (1 or H_kv, d, r_k), (d / 2,) fp32
    SLOPES,  # (H,) fp32 ALiBi slopes
    KC1, KS1, KZ1, kc1_b, kc1_h, kc1_r, ks1_b, ks1_h, ks1_r,
    KC2, KS2, KZ2, kc2_b, kc2_h, kc2_r, ks2_b, ks2_h, ks2_r,
    KW, kw_b, kw_h, kw_r, k_quantized, k_width1,
    VC1, VS1, VZ1, vc1_b, vc1_h, vc1_r, vs1_b, vs1_h, vs1_r,
    VC2, VS2, VZ2, vc2_b, vc2_h, vc2_r, vs2_b, vs2_h, vs2_r,
    VW, vw_b, vw_h, vw_r, v_quantized, v_width1,
    kv_heads, groups, key_rank, value_rank, half, qk_scale, tokens_per_split, n_splits,
    PRE: tl.constexpr, ALIBI: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
    K_BITS1: tl.constexpr, K_BITS2: tl.constexpr, K_TOKEN: tl.constexpr,
    V_BITS1: tl.constexpr, V_BITS2: tl.constexpr, V_TOKEN: tl.constexpr,
    G_PAD: tl.constexpr, RK_PAD: tl.constexpr, RV_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // kv_heads).to(tl.int64)
    h = (pid % kv_heads).to(tl.int64)
    start = tl.load(STARTS + b)
    end = tl.load(ENDS + b)
    lo = tl.maximum(split * tokens_per_split, (start // BLOCK_N) * BLOCK_N)
    hi = tl.minimum((split + 1) * tokens_per_split, end)
    dtype = Q.dtype.element_ty

    rows = tl.arange(0, G_PAD)
    row_ok = rows < groups
    heads = h * groups + rows  # query heads of this KV head
    q_rows = Q + b * q_b + heads[:, None] * q_h
    rk = tl.arange(0, RK_PAD)
    rv = tl.arange(0, RV_PAD)
    q, q1, q2, d1, d2, inv_freq = query_operands(
        q_rows, row_ok, DEC, h * dec_h, INV_FREQ, key_rank, half, rk, PRE, HALF_PAD
    )
    if ALIBI:
        slopes = tl.load(SLOPES + heads, mask=row_ok, other=0.0) * 1.4426950408889634

    m_i = tl.full([G_PAD], -1.0e30, tl.float32)  # finite: exp2(m_i - m_new) stays 1 (not NaN) while all masked
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, RV_PAD], tl.float32)
    for n in range(lo, hi, BLOCK_N):
        tok = n + tl.arange(0, BLOCK_N)
        tok_ok = (tok >= start) & (tok < hi)
        k = _stream_tile(
            KC1, KS1, KZ1, kc1_b, kc1_h, kc1_r, ks1_b, ks1_h, ks1_r,
            KC2, KS2, KZ2, kc2_b, kc2_h, kc2_r, ks2_b, ks2_h, ks2_r,
            KW, kw_b, kw_h, kw_r, k_quantized, k_width1, key_rank,
            b, h, tok, tok_ok, rk, K_BITS1, K_BITS2, K_TOKEN, GROUP, SYMMETRIC,
        ).to(dtype)  # fmt: skip
        scores = qk_scores(q, q1, q2, k, d1, d2, tok, inv_freq, rope_scale, PRE, DOT_FP32)
        scores = scores * qk_scale
        if ALIBI:
            scores += slopes[:, None] * tok.to(tl.float32)[None, :]
        scores = tl.where(tok_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _stream_tile(
            VC1, VS1, VZ1, vc1_b, vc1_h, vc1_r, vs1_b, vs1_h, vs1_r,
            VC2, VS2, VZ2, vc2_b, vc2_h, vc2_r, vs2_b, vs2_h, vs2_r,
            VW, vw_b, vw_h, vw_r, v_quantized, v_width1, value_rank,
            b, h, tok, tok_ok, rv, V_BITS1, V_BITS2, V_TOKEN, GROUP, SYMMETRIC,
        ).to(dtype)  # fmt: skip
        acc = acc * alpha[:, None] + dot(p.to(dtype), v, DOT_FP32)
        m_i = m_new

    out = (b * kv_heads * groups + heads) * n_splits + split  # row of (B * H, SPLITS)
    tl.store(ACC + out[:, None] * RV_PAD + rv[None, :], acc, mask=row_ok[:, None])
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


def launch_config(mode: str, width: int, rank_pad: int, value_pad: int) -> KernelConfig:
    """Tokens per tile and warps for a mode and tile widths (``width``: HALF_PAD in pre mode, else RK_PAD).

    Chosen from the sm_90 compile (no GPU to time on yet): the widest tiles that
    stay free of spills, with registers well under the 255 cap where possible,
    since a memory-bound kernel wants many warps in flight. Pre mode holds the
    two rebuilt key halves and their cos/sin, so its token tile shrinks with the
    head size.
    """
    widest = max(width, rank_pad, value_pad)
    if mode == "pre":
        block_n = 32 if max(width, rank_pad) >= 64 else 64
        return KernelConfig(constexprs={"BLOCK_N": block_n}, num_warps=4 if widest <= 64 else 8, num_stages=2)
    return KernelConfig(constexprs={"BLOCK_N": 64 if widest <= 32 else 32}, num_warps=8, num_stages=2)


def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (4 elsewhere: the interpreter, where splits only need testing)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def num_splits(tokens: int, programs: int, block_n: int, units: int) -> int:
    """Splits of the sequence so that ``programs * splits`` fills ``units`` SMs about twice over."""
    tiles = max(1, triton.cdiv(tokens, block_n))
    return int(min(tiles, MAX_SPLITS, max(1, triton.cdiv(2 * units, programs))))


def _check_stream(name: str, stream: PackedStream, batch: int, kv_heads: int, query: torch.Tensor) -> None:
    if not isinstance(stream, PackedStream):
        raise TypeError(f"{name} must be a PackedStream (QuantizedStream.packed()); got {type(stream).__name__}")
    w = stream.window
    if w.dim() != 4 or w.shape[0] != batch or w.shape[1] != kv_heads:
        raise ValueError(f"{name} window must be (B={batch}, H_kv={kv_heads}, W, r); got {tuple(w.shape)}")
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
    tq, g = stream.quantized_tokens, stream.group_size
    if stream.axis == "channel" and tq % g:
        raise ValueError(f"{name}: per-channel groups hold whole blocks of {g} tokens; got {tq} quantized tokens")
    for segment in stream.segments:
        rows = tq if stream.axis == "token" else tq // g * packed_length(g, segment.bits)
        cols = packed_length(segment.width, segment.bits) if stream.axis == "token" else segment.width
        params = (tq, -(-segment.width // g)) if stream.axis == "token" else (tq // g, segment.width)
        if segment.codes.dtype != torch.uint8 or tuple(segment.codes.shape) != (batch, kv_heads, rows, cols):
            raise ValueError(
                f"{name} codes must be uint8 {(batch, kv_heads, rows, cols)} for {tq} tokens of "
                f"{segment.width} features at {segment.bits} bits; "
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
        if segment.zero is not None and segment.zero.stride() != segment.scale.stride():
            raise ValueError(f"{name}: scale and zero must share strides")
        for t in (segment.codes, segment.scale):
            if t.device != query.device or (t.shape[-1] > 1 and t.stride(-1) != 1):
                raise ValueError(f"{name}: packed tensors must be on {query.device} with a unit last stride")


def _stream_args(stream: PackedStream) -> tuple[tuple, tuple[int, int]]:
    """Kernel arguments of a stream and its (BITS1, BITS2) constexprs (0: absent)."""
    segments = list(stream.segments)
    bits = tuple(segments[i].bits if i < len(segments) else 0 for i in range(2))
    args = []
    for i in range(2):
        s = segments[min(i, len(segments) - 1)] if segments else None
        if s is None:  # nothing quantized: point at the window, never read
            w = stream.window
            args += [w, w, w, 0, 0, 0, 0, 0, 0]
            continue
        zero = s.scale if s.zero is None else s.zero
        args += [s.codes, s.scale, zero, *s.codes.stride()[:3], *s.scale.stride()[:3]]
    w = stream.window
    width1 = segments[0].width if segments else stream.width
    args += [w, *w.stride()[:3], stream.quantized_tokens, width1]
    return tuple(args), bits


def lowrank_decode(
    query: torch.Tensor,
    keys: PackedStream,
    values: PackedStream,
    scoring: Scoring,
    *,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Triton flash-decoding over a packed low-rank cache (module doc) -> ``(B, H, r_v)`` in ``query.dtype``.

    Args:
        query: ``(B, H, e)`` fp16/bf16, unit last stride: ``e = r_k`` (rank mode) or ``d`` (pre mode, rotated).
        keys, values: the layer's streams, ``r_k`` and ``r_v`` features over ``H_kv`` heads (``H_kv`` divides ``H``).
        scoring: how queries score keys (:class:`~eigenkv.kernels.scoring.Scoring`).
        starts, ends: ``(B,)`` int32, valid keys ``[starts[b], ends[b])``; default all ``S``.
        splits: programs per sequence (default from the length and the GPU's SM count).
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
    if keys.tokens != values.tokens:
        raise ValueError(f"keys hold {keys.tokens} tokens but values {values.tokens}")
    if keys.segments and values.segments and (keys.group_size, keys.symmetric) != (values.group_size, values.symmetric):
        raise ValueError("keys and values must share group size and symmetry (one KVQuantConfig)")
    key_rank, value_rank = keys.width, values.width
    scoring.check(query, kv_heads, key_rank)
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
    g_pad, rk_pad, rv_pad = pad_width(groups), pad_width(key_rank), pad_width(value_rank)
    half_pad = pad_width(half) if mode == "pre" else 16
    cfg = launch_config(mode, half_pad if mode == "pre" else rk_pad, rk_pad, rv_pad)
    block_n = cfg.constexprs["BLOCK_N"]
    n_splits = splits or num_splits(tokens, batch * kv_heads, block_n, multiprocessors(query.device))
    if not 1 <= n_splits <= MAX_SPLITS:
        raise ValueError(f"splits must be in [1, {MAX_SPLITS}]; got {n_splits}")
    tokens_per_split = block_n * triton.cdiv(triton.cdiv(max(tokens, 1), block_n), n_splits)

    out = torch.empty((batch, q_heads, value_rank), dtype=query.dtype, device=query.device)
    if batch == 0:
        return out
    acc = torch.empty((batch * q_heads, n_splits, rv_pad), dtype=torch.float32, device=query.device)
    stats = torch.empty((batch * q_heads, n_splits, 2), dtype=torch.float32, device=query.device)
    key_args, key_bits = _stream_args(keys)
    value_args, value_bits = _stream_args(values)
    dummy = bounds[0]
    grid = (batch * kv_heads, n_splits)
    _decode_kernel[grid](
        query, query.stride(0), query.stride(1),
        acc, stats, *bounds,
        dummy if decoder is None else decoder, decoder_stride,
        dummy if inv_freq is None else inv_freq, float(scoring.rope_scale),
        dummy if slopes is None else slopes,
        *key_args, *value_args,
        kv_heads, groups, key_rank, value_rank, half, float(scoring.scaling) * math.log2(math.e),
        tokens_per_split, n_splits,
        PRE=mode == "pre", ALIBI=slopes is not None,
        GROUP=(keys if keys.segments else values).group_size,
        SYMMETRIC=(keys if keys.segments else values).symmetric,
        K_BITS1=key_bits[0], K_BITS2=key_bits[1], K_TOKEN=keys.axis == "token",
        V_BITS1=value_bits[0], V_BITS2=value_bits[1], V_TOKEN=values.axis == "token",
        G_PAD=g_pad, RK_PAD=rk_pad, RV_PAD=rv_pad, HALF_PAD=half_pad,
        DOT_FP32=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )  # fmt: skip
    _merge_kernel[(batch * q_heads,)](
        acc, stats, out, n_splits, value_rank, SPLITS_PAD=triton.next_power_of_2(n_splits), RV_PAD=rv_pad
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
        for i in (1, 2):
            sig |= {f"{s}C{i}": "*u8", f"{s}S{i}": "*fp16", f"{s}Z{i}": "*fp16"}
            sig |= {f"{low}{p}{i}_{a}": "i32" for p in ("c", "s") for a in ("b", "h", "r")}
        sig |= {f"{s}W": f"*{dtype}", f"{low}w_b": "i32", f"{low}w_h": "i32", f"{low}w_r": "i32"}
        sig |= {f"{low}_quantized": "i32", f"{low}_width1": "i32"}
    sig |= {name: "i32" for name in ("kv_heads", "groups", "key_rank", "value_rank", "half")}
    return sig | {"qk_scale": "fp32", "tokens_per_split": "i32", "n_splits": "i32"}


# (mode, HALF_PAD, RK_PAD, RV_PAD): the tile widths of the shapes users run (head sizes 64/128, ranks to 128)
_SPEC_TILES = [
    ("rank", 16, 32, 32),
    ("rank", 16, 64, 64),
    ("rank", 16, 128, 128),
    ("rank", 16, 64, 128),
    ("pre", 32, 32, 32),
    ("pre", 32, 64, 64),
    ("pre", 64, 64, 64),
    ("pre", 64, 128, 128),
]
# (K_BITS1, K_BITS2, K_TOKEN, V_BITS1, V_BITS2, V_TOKEN): default grouping at every width, token keys,
# channel values, mixed precision, and an unquantized cache
_SPEC_STORES = [(b, 0, False, b, 0, True) for b in (2, 3, 4, 8)] + [
    (4, 0, True, 4, 0, False),
    (8, 4, False, 8, 4, True),
    (0, 0, False, 0, 0, True),
]


def compile_specs():
    """The configurations the launcher uses, for the sm_80/sm_90 compile test: every tile size with 4-bit
    codes, and every store layout at the largest tiles of each mode."""
    for dtype in ("fp16", "bf16"):
        for mode, half_pad, rk_pad, rv_pad in _SPEC_TILES:
            cfg = launch_config(mode, half_pad if mode == "pre" else rk_pad, rk_pad, rv_pad)
            widest = (rk_pad, rv_pad) == (128, 128)
            for kb1, kb2, kt, vb1, vb2, vt in _SPEC_STORES if widest else _SPEC_STORES[2:3]:
                constexprs = {
                    "PRE": mode == "pre", "ALIBI": mode == "rank", "GROUP": 64, "SYMMETRIC": False,
                    "K_BITS1": kb1, "K_BITS2": kb2, "K_TOKEN": kt, "V_BITS1": vb1, "V_BITS2": vb2, "V_TOKEN": vt,
                    "G_PAD": 16, "RK_PAD": rk_pad, "RV_PAD": rv_pad, "HALF_PAD": half_pad, "DOT_FP32": False,
                    **cfg.constexprs,
                }  # fmt: skip
                yield KernelSpec(
                    name=f"lowrank_decode[{dtype},{mode},h{half_pad},rk{rk_pad},rv{rv_pad},k{kb1}{kb2},v{vb1}{vb2}"
                    f",kt{int(kt)},vt{int(vt)}]",
                    fn=_decode_kernel,
                    signature=_decode_signature(dtype),
                    constexprs=constexprs,
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                )
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
    """Bytes one KV head stores per token for a stream of ``width`` features (codes, scales, zeros)."""
    params = 1 if symmetric else 2
    if axis == "token":
        return packed_length(width, bits) + params * 2 * -(-width // group)
    return packed_length(group, bits) * width / group + params * 2 * width / group


def roofline_cases():
    """Decode at the benchmark shapes: Llama-3-8B and SmolLM2 at 0.6x, rank and pre modes, 2/3/4/8 bits,
    keys per channel and values per token, group 64, batch 8 at 32k tokens."""
    batch, context, group = ROOFLINE_WORKLOAD["batch"], ROOFLINE_WORKLOAD["context"], ROOFLINE_WORKLOAD["group"]
    for shape, heads, kv_heads, head_dim, key_rank, value_rank in ROOFLINE_SHAPES:
        for mode in ("rank", "pre"):
            for bits in (2, 3, 4, 8):
                rk_pad, rv_pad = pad_width(key_rank), pad_width(value_rank)
                half_pad = pad_width(head_dim // 2) if mode == "pre" else 16
                cfg = launch_config(mode, half_pad if mode == "pre" else rk_pad, rk_pad, rv_pad)
                constexprs = {
                    "PRE": mode == "pre", "ALIBI": False, "GROUP": group, "SYMMETRIC": False,
                    "K_BITS1": bits, "K_BITS2": 0, "K_TOKEN": False, "V_BITS1": bits, "V_BITS2": 0, "V_TOKEN": True,
                    "G_PAD": pad_width(heads // kv_heads), "RK_PAD": rk_pad, "RV_PAD": rv_pad, "HALF_PAD": half_pad,
                    "DOT_FP32": False, **cfg.constexprs,
                }  # fmt: skip
                name = f"lowrank_decode[{shape},{mode},{bits}bit,g{group}]"
                spec = KernelSpec(name, _decode_kernel, _decode_signature("fp16"), constexprs, cfg.num_warps,
                                  cfg.num_stages)  # fmt: skip
                per_token = stream_bytes_per_token(key_rank, bits, group, "channel") + stream_bytes_per_token(
                    value_rank, bits, group, "token"
                )
                programs = batch * kv_heads * num_splits(context, batch * kv_heads, cfg.constexprs["BLOCK_N"], H100_SMS)
                decoders = kv_heads * head_dim * key_rank * 2 if mode == "pre" else 0
                yield RooflineCase(
                    name=name,
                    spec=spec,
                    tokens_per_iteration=cfg.constexprs["BLOCK_N"],
                    bytes_per_token=per_token,
                    total_bytes=batch * kv_heads * context * per_token + decoders,
                    sdpa_bytes=batch * kv_heads * context * 2 * head_dim * 2,
                    programs=programs,
                    workload={
                        "shape": shape, "mode": mode, "batch": batch, "context": context, "heads": heads,
                        "kv_heads": kv_heads, "head_dim": head_dim, "key_rank": key_rank, "value_rank": value_rank,
                        "bits": bits, "group": group, "keys": "channel", "values": "token",
                    },
                )  # fmt: skip
