"""Causal flash-attention forward in rank space, for prompts (many new query tokens).

Shapes (``B`` batch, ``H`` query heads, ``H_kv`` KV heads, ``T`` new tokens,
``S`` cached tokens including them, ``r_k`` / ``r_v`` ranks, ``d`` head size):

- ``query`` (B, H, T, e): the last ``T`` positions (query ``i`` sits at position
  ``S - T + i``); ``e = r_k`` in ``"rank"`` mode, rotated full queries (``e = d``)
  in ``"pre"`` mode (see :mod:`eigenkv.kernels.scoring`);
- ``keys`` (B, H_kv, S, r_k), ``values`` (B, H_kv, S, r_v): rank-space states in
  the query's dtype (pre mode: key coefficients, which the launcher rebuilds and
  rotates once, ``Scoring.keys``, as ``sdpa_prefill`` does: every block of
  queries reads the same keys, so rebuilding them per block in the kernel cost
  a decoder product and a rotation per tile and per block);
- output (B, T, H, r_v) in the query's dtype (the layout the folded output
  projection reads after a reshape).

Causal reads of a quantized cache: when the prompt goes through a
``QuantizedKVCache``, query ``i`` must see key ``j`` as the cache holds it after
``S - T + i + 1`` tokens: quantized (dequantized) for ``j < bounds[i]``, in full
precision otherwise (``eigenkv.quant.cache``). ``quantized_keys`` /
``quantized_values`` = ``(held (B, H_kv, S, r), bounds (T,) int32)`` give that
second version; the kernel scores (or weighs) both and keeps the right one per
(query, key) pair, so the prompt sees exactly what the reference path sees.

Grid ``(cdiv(T, BLOCK_M), B * H)``: one program per block of queries of one
head, online softmax in base 2 over key tiles up to the block's last position,
starting at ``starts[b]`` (left padding). Scores are capped as Gemma-2 caps them
with ``scoring.softcap`` (after the scale, before the bias and the mask). A
sliding-window layer's ``window``: query ``i`` sees only the keys less than
``window`` positions back (``j > S - T + i - window``, transformers' sliding
mask), and its program starts at the first key its block can see.
"""

from __future__ import annotations

import itertools
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
    cdiv,
    dot,
    on_input_device,
    pad_width,
    soft_cap,
)

# --- reference -------------------------------------------------------------------------------


def lowrank_prefill_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scoring: Scoring,
    *,
    starts: torch.Tensor | None = None,
    quantized_keys: tuple | None = None,
    quantized_values: tuple | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`lowrank_prefill` (same arguments): matmuls in the query's dtype,
    softmax in float32 (the CPU path, and with float64 inputs the exact oracle)."""
    dtype = query.dtype
    batch, q_heads, length = query.shape[:3]
    seq = keys.shape[-2]
    groups = q_heads // keys.shape[1]
    positions = torch.arange(seq, device=query.device)
    query_positions = seq - length + torch.arange(length, device=query.device)

    def expand(x):
        return x.to(dtype).repeat_interleave(groups, dim=1)

    def scores_of(k):
        return torch.matmul(query, expand(scoring.keys(k.to(dtype))).transpose(-1, -2)).float()

    scores = scores_of(keys)
    if quantized_keys is not None:
        held, bounds = quantized_keys
        use_held = positions[None, :] < bounds.long()[:, None]  # (T, S)
        scores = torch.where(use_held, scores_of(held), scores)
    scores = scoring.cap(scores * scoring.scaling)
    if scoring.alibi_slopes is not None:
        scores = scores + scoring.bias(positions)[None, :, None, :]
    lo = torch.zeros(batch, dtype=torch.long, device=query.device) if starts is None else starts.long()
    causal = positions[None, :] <= query_positions[:, None]
    if window is not None:
        causal &= positions[None, :] > query_positions[:, None] - window
    visible = causal[None] & (positions[None, None, :] >= lo[:, None, None])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without a visible key give zeros
    if quantized_values is None:
        out = torch.matmul(weights.to(dtype), expand(values))
    else:
        held, bounds = quantized_values
        use_held = positions[None, :] < bounds.long()[:, None]
        out = torch.matmul(torch.where(use_held, 0.0, weights).to(dtype), expand(values))
        out = out + torch.matmul(torch.where(use_held, weights, 0.0).to(dtype), expand(held))
    return out.transpose(1, 2).contiguous()


# --- kernel ----------------------------------------------------------------------------------


@triton.jit
def _tile(X, x_b, x_h, x_r, b, h, tok, tok_ok, feat):
    # (BLOCK_N, F) of a contiguous (B, H_kv, S, x_r) tensor, zero outside. Its rows hold a multiple of 8 features
    # (the launcher pads them with zeros, _padded_rows), so the compiler may read them as 16-byte vectors (and
    # copy them asynchronously) where rows of an odd rank take a 2-byte load per element
    x_r = x_r // 8 * 8  # a multiple of 8 (_padded_rows), in terms the compiler's alignment analysis follows
    base = b * (x_b // 8 * 8) + h * (x_h // 8 * 8)
    mask = tok_ok[:, None] & (feat < x_r)[None, :]
    return tl.load(X + base + tok[:, None].to(tl.int64) * x_r + feat[None, :], mask=mask, other=0.0)


@triton.jit
def _prefill_kernel(
    Q, q_b, q_h, q_t,
    K, KH, V, VH, kv_b, kv_h, k_r, v_b, v_h, v_r,  # full and held (quantized) versions share strides
    KB, VB,  # (T,) int32 bounds: query i reads the held version of keys/values j < bound
    OUT,  # (B, T, H, r_v) contiguous
    STARTS, SLOPES,
    q_heads, groups, length, seq, key_width, value_rank, qk_scale, window,
    ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, K_HELD: tl.constexpr, V_HELD: tl.constexpr, SLIDING: tl.constexpr,
    RK_PAD: tl.constexpr, RV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // q_heads).to(tl.int64)
    hq = (pid_bh % q_heads).to(tl.int64)
    h = hq // groups
    dtype = Q.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    positions = seq - length + rows
    start = tl.load(STARTS + b)
    q_rows = Q + b * q_b + hq * q_h + rows[:, None].to(tl.int64) * q_t
    rk = tl.arange(0, RK_PAD)
    rv = tl.arange(0, RV_PAD)
    q = tl.load(q_rows + rk[None, :], mask=row_ok[:, None] & (rk < key_width)[None, :], other=0.0)
    if ALIBI:
        slope = tl.load(SLOPES + hq) * 1.4426950408889634
    if K_HELD:
        k_bound = tl.load(KB + rows, mask=row_ok, other=0)
    if V_HELD:
        v_bound = tl.load(VB + rows, mask=row_ok, other=0)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, RV_PAD], tl.float32)
    first = start
    if SLIDING:  # the block's first query sees nothing before its window
        first = tl.maximum(start, seq - length + pid_m * BLOCK_M - window + 1)
    lo = (first // BLOCK_N) * BLOCK_N
    hi = tl.minimum(seq, seq - length + (pid_m + 1) * BLOCK_M)
    for n in range(lo, hi, BLOCK_N):
        tok = n + tl.arange(0, BLOCK_N)
        tok_ok = (tok >= start) & (tok < seq)
        k = _tile(K, kv_b, kv_h, k_r, b, h, tok, tok_ok, rk).to(dtype)
        scores = dot(q, tl.trans(k), DOT_FP32)
        if K_HELD:
            k = _tile(KH, kv_b, kv_h, k_r, b, h, tok, tok_ok, rk).to(dtype)
            held = dot(q, tl.trans(k), DOT_FP32)
            scores = tl.where(tok[None, :] < k_bound[:, None], held, scores)
        scores = scores * qk_scale
        if SOFTCAP > 0:  # Gemma-2's capped logits (0.0: none, no code): after the scale, before bias and mask
            scores = soft_cap(scores, SOFTCAP)
        if ALIBI:
            scores += slope * tok.to(tl.float32)[None, :]
        visible = tok_ok[None, :] & (tok[None, :] <= positions[:, None])
        if SLIDING:
            visible &= tok[None, :] > positions[:, None] - window
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        v = _tile(V, v_b, v_h, v_r, b, h, tok, tok_ok, rv).to(dtype)
        if V_HELD:
            from_held = tok[None, :] < v_bound[:, None]
            acc += dot(tl.where(from_held, 0.0, p).to(dtype), v, DOT_FP32)
            v = _tile(VH, v_b, v_h, v_r, b, h, tok, tok_ok, rv).to(dtype)
            acc += dot(tl.where(from_held, p, 0.0).to(dtype), v, DOT_FP32)
        else:
            acc += dot(p.to(dtype), v, DOT_FP32)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1.0e-30)[:, None]  # a query without a visible key gives zeros
    dst = OUT + ((b * length + rows.to(tl.int64)) * q_heads + hq)[:, None] * value_rank + rv[None, :]
    tl.store(dst, out.to(dtype), mask=row_ok[:, None] & (rv < value_rank)[None, :])


# --- launcher --------------------------------------------------------------------------------


def launch_config(key_pad: int, value_pad: int, held: bool) -> KernelConfig:
    """Query and key tile sizes and warps for key and value tiles ``key_pad`` and ``value_pad`` wide.

    Chosen from the sm_80/sm_90 compiles: at head size 128, with the second (quantized) versions of keys
    and values live, at most a 32-byte spill a thread.
    """
    widest = max(key_pad, value_pad)
    block_n = 32 if (held or widest > 64) else 64
    warps = 4 if widest <= 32 else 8
    return KernelConfig(constexprs={"BLOCK_M": 64, "BLOCK_N": block_n}, num_warps=warps, num_stages=2)


def _check_states(name: str, x: torch.Tensor, batch: int, kv_heads: int, seq: int, width: int, query) -> None:
    if x.dim() != 4 or tuple(x.shape) != (batch, kv_heads, seq, width):
        raise ValueError(f"{name} must be (B={batch}, H_kv={kv_heads}, S={seq}, {width}); got {tuple(x.shape)}")
    if x.dtype != query.dtype or x.device != query.device:
        raise ValueError(f"{name} must be {query.dtype} on {query.device}; got {x.dtype} on {x.device}")


def _padded_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H_kv, S, r) -> (B, H_kv, S, r') with r' = r rounded up to a multiple of 8, the added features zero,
    in the canonical contiguous strides (every row and slice starts on a multiple of 8 elements): rows the
    kernel reads as 16-byte vectors. ``x`` itself when it already is so, else a copy."""
    pad = -x.shape[-1] % 8
    if pad:
        return torch.nn.functional.pad(x, (0, pad))
    canonical = torch.empty(x.shape, device="meta").stride()  # a contiguous view may stride a size-1 axis oddly
    return x if x.stride() == canonical else torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)


def _held(name: str, view, full: torch.Tensor, length: int):
    """Validated ``(held, bounds)`` of a quantized view, or (None, None)."""
    if view is None:
        return None, None
    held, bounds = view
    if tuple(held.shape) != tuple(full.shape) or held.dtype != full.dtype or held.device != full.device:
        raise ValueError(f"{name}: the quantized version must match the states: {tuple(full.shape)} {full.dtype}")
    if bounds.dtype != torch.int32 or tuple(bounds.shape) != (length,) or bounds.device != full.device:
        raise ValueError(
            f"{name}: bounds must be int32 ({length},) on {full.device}; got {bounds.dtype} {tuple(bounds.shape)}"
        )
    return held, bounds.contiguous()


@on_input_device
def lowrank_prefill(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scoring: Scoring,
    *,
    starts: torch.Tensor | None = None,
    quantized_keys: tuple | None = None,
    quantized_values: tuple | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Triton causal attention of ``T`` new queries over ``S`` rank-space states -> ``(B, T, H, r_v)``.

    Args:
        query: ``(B, H, T, e)`` fp16/bf16 with unit last stride (module doc).
        keys, values: ``(B, H_kv, S, r_k)``, ``(B, H_kv, S, r_v)`` in the query's dtype; ``S >= T``.
        scoring: how queries score keys (:class:`~eigenkv.kernels.scoring.Scoring`).
        starts: ``(B,)`` int32, first valid key per sequence (left padding); default 0.
        quantized_keys, quantized_values: ``(held, bounds)``: query ``i`` reads ``held[..., j, :]`` for
            ``j < bounds[i]`` (module doc); ``bounds`` int32 ``(T,)``.
        window: a sliding-window layer's window (module doc); None: every earlier key.
    """
    check_kernel_device(query, "lowrank_prefill", "lowrank_prefill_reference")
    if not isinstance(scoring, Scoring):
        raise TypeError(f"scoring must be a Scoring; got {type(scoring).__name__}")
    if query.dim() != 4 or query.dtype not in KERNEL_DTYPES or (query.shape[-1] > 1 and query.stride(-1) != 1):
        raise ValueError(
            f"query must be (B, H, T, e) fp16/bf16 with unit last stride; got {query.dim()}-D {query.dtype} "
            "(float32 models use lowrank_prefill_reference)"
        )
    batch, q_heads, length, _ = query.shape
    if keys.dim() != 4 or keys.shape[1] == 0 or q_heads % keys.shape[1]:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of the KV heads of keys {tuple(keys.shape)}")
    kv_heads, seq, key_rank = keys.shape[1:]
    value_rank = values.shape[-1]
    if seq < length:
        raise ValueError(f"{length} queries need at least as many keys; got {seq}")
    _check_states("keys", keys, batch, kv_heads, seq, key_rank, query)
    _check_states("values", values, batch, kv_heads, seq, value_rank, query)
    scoring.check_kernel(query, kv_heads, key_rank)
    key_held, key_bounds = _held("quantized_keys", quantized_keys, keys, length)
    value_held, value_bounds = _held("quantized_values", quantized_values, values, length)
    if scoring.mode == "pre":  # the keys queries score, rebuilt and rotated once (module doc)
        keys = scoring.keys(keys)
        key_held = None if key_held is None else scoring.keys(key_held)
    key_width = keys.shape[-1]
    keys, values = _padded_rows(keys), _padded_rows(values)
    key_held, value_held = (None if x is None else _padded_rows(x) for x in (key_held, value_held))
    if starts is None:
        starts = torch.zeros(batch, dtype=torch.int32, device=query.device)
    if starts.shape != (batch,) or starts.dtype != torch.int32 or starts.device != query.device:
        raise ValueError(f"starts must be int32 ({batch},) on {query.device}; got {starts.dtype} {tuple(starts.shape)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int (a sliding layer's tokens) or None; got {window!r}")
    sliding = window is not None and seq > window  # otherwise the window hides no key
    rk_pad, rv_pad = pad_width(key_width), pad_width(value_rank)
    held = quantized_keys is not None or quantized_values is not None
    cfg = launch_config(rk_pad, rv_pad, held)
    out = torch.empty((batch, length, q_heads, value_rank), dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    slopes = scoring.kernel_tensors(query)[3]
    dummy = starts
    grid = (cdiv(length, cfg.constexprs["BLOCK_M"]), batch * q_heads)
    _prefill_kernel[grid](
        query, query.stride(0), query.stride(1), query.stride(2),
        keys, keys if key_held is None else key_held, values, values if value_held is None else value_held,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        dummy if key_bounds is None else key_bounds, dummy if value_bounds is None else value_bounds,
        out, starts.contiguous(), dummy if slopes is None else slopes,
        q_heads, q_heads // kv_heads, length, seq, key_width, value_rank,
        float(scoring.scaling) * math.log2(math.e), window if sliding else 0,
        ALIBI=slopes is not None, SOFTCAP=scoring.softcap or 0.0,
        K_HELD=key_held is not None, V_HELD=value_held is not None, SLIDING=sliding,
        RK_PAD=rk_pad, RV_PAD=rv_pad, DOT_FP32=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )  # fmt: skip
    return out


# --- compile specs -----------------------------------------------------------------------------


def _signature(dtype: str) -> dict:
    sig = {"Q": f"*{dtype}", "q_b": "i32", "q_h": "i32", "q_t": "i32"}
    sig |= {name: f"*{dtype}" for name in ("K", "KH", "V", "VH")}
    sig |= {name: "i32" for name in ("kv_b", "kv_h", "k_r", "v_b", "v_h", "v_r")}
    sig |= {"KB": "*i32", "VB": "*i32", "OUT": f"*{dtype}", "STARTS": "*i32", "SLOPES": "*fp32"}
    ints = ("q_heads", "groups", "length", "seq", "key_width", "value_rank")
    return sig | {name: "i32" for name in ints} | {"qk_scale": "fp32", "window": "i32"}


def _pointers(signature: dict) -> tuple[str, ...]:
    """The pointer arguments, which a launch passes 16-byte aligned (torch's allocations; Triton specializes
    them): declared so in the compiles, as the launch's code has them."""
    return tuple(arg for arg, kind in signature.items() if kind.startswith("*"))


def prefill_spec(
    dtype: str, rk_pad: int, rv_pad: int, held: bool, alibi: bool, softcap: float | None = None,
    sliding: bool = False,
) -> KernelSpec:  # fmt: skip
    """The compile a launch makes at these tile widths (``rk_pad``: of the rank-space keys, or of the rebuilt
    ones in pre mode; ``held``: with the quantized views of keys and values; ``softcap``: Gemma-2's logit cap;
    ``sliding``: a window that hides keys)."""
    cfg = launch_config(rk_pad, rv_pad, held)
    constexprs = {
        "ALIBI": alibi, "SOFTCAP": float(softcap or 0.0), "K_HELD": held, "V_HELD": held, "SLIDING": sliding,
        "RK_PAD": rk_pad, "RV_PAD": rv_pad, "DOT_FP32": False, **cfg.constexprs,
    }  # fmt: skip
    return KernelSpec(
        name=f"lowrank_prefill[{dtype},rk{rk_pad},rv{rv_pad},held{int(held)}"
        f"{',alibi' if alibi else ''}{',softcap' if softcap else ''}{',sliding' if sliding else ''}]",
        fn=_prefill_kernel,
        signature=_signature(dtype),
        constexprs=constexprs,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        aligned=_pointers(_signature(dtype)),
    )


def compile_specs():
    """The launcher's configurations for the sm_80/sm_90 compile test: key and value tiles of every width, with
    and without the quantized (held) versions of keys and values (ALiBi at the equal widths); pre mode's, full
    heads of 64 or 128 features against narrower value ranks; capped logits (Gemma-2, no ALiBi) at the widest
    tiles, sliding windows with them; sliding windows at head size 128 (Mistral, Gemma-3)."""
    tiles = [(32, 32, True), (64, 64, True), (128, 128, True), (64, 32, False), (128, 64, False)]
    for dtype in ("fp16", "bf16"):
        for rk_pad, rv_pad, alibi in tiles:
            for held in (False, True):
                yield prefill_spec(dtype, rk_pad, rv_pad, held, alibi)
        for rk_pad in (128, 256):  # Gemma-2's heads: 128 (27B), 256 (2B, 9B); its sliding layers
            for held, sliding in itertools.product((False, True), repeat=2):
                yield prefill_spec(dtype, rk_pad, rk_pad, held, False, softcap=50.0, sliding=sliding)
        yield prefill_spec(dtype, 128, 128, held=True, alibi=False, sliding=True)  # Mistral's heads


# --- static roofline cases ---------------------------------------------------------------------

# (name, query heads, KV heads, head size, key rank, value rank): the benchmark shapes (0.6x ranks)
ROOFLINE_SHAPES = [("llama3-8b", 32, 8, 128, 77, 77), ("smollm2-135m", 9, 3, 64, 38, 38)]


def roofline_cases(batch: int = 1, length: int = 8192):
    """Prefill of a ``length``-token prompt at the benchmark shapes (rank and pre modes, no held versions).

    A program holds BLOCK_M queries of one head and reads the keys and values before them: per key token
    it reads ``(w_k + r_v) * 2`` bytes (fp16 states; ``w_k`` the key rank, or the head size of the keys pre
    mode rebuilt before the launch); the launch reads them about ``T / (2 BLOCK_M)`` times per query head
    (causal). The rebuild itself (pre mode, once per prompt, in PyTorch) is not counted."""
    for shape, heads, kv_heads, head_dim, key_rank, value_rank in ROOFLINE_SHAPES:
        for mode in ("rank", "pre"):
            key_width = head_dim if mode == "pre" else key_rank
            rk_pad, rv_pad = pad_width(key_width), pad_width(value_rank)
            cfg = launch_config(rk_pad, rv_pad, False)
            constexprs = {
                "ALIBI": False, "SOFTCAP": 0.0, "K_HELD": False, "V_HELD": False, "SLIDING": False,
                "RK_PAD": rk_pad, "RV_PAD": rv_pad, "DOT_FP32": False, **cfg.constexprs,
            }  # fmt: skip
            block_m = cfg.constexprs["BLOCK_M"]
            per_key = 2 * block_m * (rk_pad + rv_pad)  # MMA FLOPs per key token a program reads
            name = f"lowrank_prefill[{shape},{mode},T{length}]"
            signature = _signature("fp16")
            spec = KernelSpec(name, _prefill_kernel, signature, constexprs, cfg.num_warps, cfg.num_stages,
                              aligned=_pointers(signature))  # fmt: skip
            per_token = (key_width + value_rank) * 2
            query_blocks = cdiv(length, block_m)
            yield RooflineCase(
                name=name,
                spec=spec,
                tokens_per_iteration=cfg.constexprs["BLOCK_N"],
                bytes_per_token=per_token,
                total_bytes=batch * heads * query_blocks * (length / 2) * per_token,
                sdpa_bytes=batch * kv_heads * length * 2 * head_dim * 2,
                programs=batch * heads * query_blocks,
                flops=batch * heads * query_blocks * (length / 2) * per_key,
                sdpa_flops=batch * heads * length * length * 2 * head_dim,  # causal: half of 4 T^2 d a head
                workload={
                    "shape": shape, "mode": mode, "batch": batch, "context": length, "heads": heads,
                    "kv_heads": kv_heads, "head_dim": head_dim, "key_rank": key_rank, "value_rank": value_rank,
                },
            )  # fmt: skip
