"""Benchmark one decode step of attention on the packed low-rank cache against SDPA on the fp16 cache.

For each attention shape (Llama-3-8B: 32 query heads, 8 KV heads, head size
128; SmolLM2-135M: 9 / 3 / 64) and point (batch x context), one layer's decode
attention is timed:

- ``sdpa_fp16`` under each SDPA backend that runs (``mode``: flash, efficient,
  cudnn, math, forced with ``torch.nn.attention.sdpa_kernel``) on the
  uncompressed fp16 cache. The ``g`` query heads of a KV head are passed as ``g``
  query rows of that head, ``(B, H_kv, g, d)``: exact for a decode step (no
  mask), every backend takes it, and each cached byte is read once: the
  strongest way to call SDPA here. ``flash_attn`` too when the package is installed;
- ``eigenkv`` (``mode`` rank / pre): :func:`eigenkv.kernels.lowrank_decode` on a
  cache at ``--ratio`` of the head size (keys per channel, values per token,
  ``--bits`` codes, group ``--group``), built through the library's
  :class:`~eigenkv.quant.store.QuantizedStream` from random states, so it is
  laid out as the kernel reads it whatever the storage layout; scores in rank
  space (post-RoPE and no-RoPE models) or with the in-kernel pre-RoPE key rebuild.

Each is timed ``plain`` (CUDA events around a Python call, median, after an L2
flush: CPU launch overhead counts where it exceeds the GPU time) and, with
``--graph``, replayed from a CUDA graph (GPU time only); ``--register-caps``
times the kernel again at other register caps (mode ``rank@168r``: programs
per SM against spills). Metrics: ``ms``,
``bytes`` (what the method reads: the bytes the packed stream's tensors really
hold, plus the decoders in pre mode; K and V for SDPA), ``GB/s`` of those
bytes, ``pct_copy`` (of the device's copy bandwidth, a 1 GiB device-to-device
copy counting read + write) and ``speedup_vs_sdpa`` (over the fastest SDPA
backend under the same timing). Rows are appended to a long-format CSV as they
are measured (a killed run keeps them); a plot named after the device follows.

Without CUDA it times the PyTorch references on short contexts and says so:
kernel numbers need a GPU. ``--cpu-smoke`` runs the kernels instead, in the
Triton interpreter at tiny sizes, to check the benchmark's plumbing on CPU.

    PYTHONPATH=. python benchmarks/bench_decode.py [--contexts 1024,32768] [--batches 1,8]
    PYTHONPATH=. python benchmarks/bench_decode.py --points 8x32768,1x32768 --shapes llama3-8b --graph --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
import traceback
from dataclasses import dataclass
from functools import partial

import torch

from benchmarks._common import (
    RowLog,
    add_gpu_step_arguments,
    copy_bandwidth_gbs,
    measure_ms,
    plot_latency_panels,
    results_path,
    sdpa_backends,
    short_error,
    try_sdpa_backend,
)

if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET when a kernel module is imported: set it first, so that the import works
    # (and --cpu-smoke can run the kernels in the interpreter).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from eigenkv.kernels.lowrank_decode import lowrank_decode, lowrank_decode_reference  # noqa: E402
from eigenkv.kernels.scoring import Scoring  # noqa: E402
from eigenkv.quant.config import KVQuantConfig  # noqa: E402
from eigenkv.quant.packing import PackedStream  # noqa: E402
from eigenkv.quant.store import QuantizedStream  # noqa: E402

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}  # query heads, KV heads, head size
PUSH_TOKENS = 32768  # tokens stored per push: bounds the quantizer's temporaries at long contexts


# --- the packed cache, built through the library's store ------------------------------------------


def packed_random_stream(
    batch: int, heads: int, tokens: int, width: int, config: KVQuantConfig, axis: str, dtype, device, seed: int
) -> PackedStream:
    """``tokens`` random N(0, 1) states ``(batch, heads, tokens, width)`` stored as a cache stores them
    (:class:`QuantizedStream` with ``config``, grouped along ``axis``), as the kernels read them.

    Going through the store keeps the benchmark right when the packed layout changes."""
    generator = torch.Generator(device=device).manual_seed(seed)
    stream = QuantizedStream(config, axis, None)
    for first in range(0, tokens, PUSH_TOKENS):
        n = min(PUSH_TOKENS, tokens - first)
        stream.push(torch.randn(batch, heads, n, width, dtype=dtype, device=device, generator=generator))
    return stream.packed()


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor a packed stream holds (its fields and its segments' fields), whatever fields it has."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    return []


def stored_bytes(*objs) -> int:
    """Bytes the tensors of ``objs`` (packed streams, decoders) hold, each tensor counted once:
    measured, not computed from a layout formula, so padding in the layout is counted as read."""
    seen, total = set(), 0
    for t in (t for obj in objs for t in _tensors(obj)):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@dataclass
class DecodeCase:
    """One layer's decode inputs at one point: the packed streams, and per mode a query and its scoring."""

    keys: PackedStream
    values: PackedStream
    queries: dict  # mode -> (query, scoring)
    decoder: torch.Tensor


def decode_case(
    shape: str,
    batch: int,
    context: int,
    ratio: float,
    config: KVQuantConfig,
    dtype,
    device,
    seed: int = 0,
    query_scale: float = 1.0,
) -> DecodeCase:
    """Random keys and values stored at ``ratio`` of the head size (keys per ``config.axis_k``, values per
    ``config.axis_v``), rank-space queries (rank mode) and rotated full queries with random orthonormal
    decoders and Llama's RoPE frequencies (pre mode); queries scaled by ``query_scale`` (a sharper softmax)."""
    q_heads, kv_heads, d = SHAPES[shape]
    rank = max(1, round(ratio * d))
    keys = packed_random_stream(batch, kv_heads, context, rank, config, config.axis_k, dtype, device, seed)
    values = packed_random_stream(batch, kv_heads, context, rank, config, config.axis_v, dtype, device, seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)  # small tensors: made on CPU, moved
    decoder = torch.linalg.qr(torch.randn(kv_heads, d, d, generator=generator))[0][..., :rank]
    decoder = decoder.to(device, dtype).contiguous()  # as a model holds its bases: no copy per launch
    inv_freq = (1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))).to(device)  # Llama-3 theta
    q_rank = query_scale * torch.randn(batch, q_heads, rank, generator=generator)
    q_full = query_scale * torch.randn(batch, q_heads, d, generator=generator)
    queries = {
        "rank": (q_rank.to(device, dtype), Scoring(d**-0.5)),
        "pre": (q_full.to(device, dtype), Scoring(d**-0.5, "pre", decoder, inv_freq)),
    }
    return DecodeCase(keys, values, queries, decoder)


# --- one point ------------------------------------------------------------------------------------


def sdpa_inputs(shape: str, batch: int, context: int, device) -> tuple[torch.Tensor, ...]:
    """fp16 ``q (B, H_kv, g, d)``, ``k``, ``v (B, H_kv, S, d)``: a GQA decode step as ``g`` query rows
    per KV head (module doc)."""
    q_heads, kv_heads, d = SHAPES[shape]
    q = torch.randn(batch, kv_heads, q_heads // kv_heads, d, dtype=torch.float16, device=device)
    k = torch.randn(batch, kv_heads, context, d, dtype=torch.float16, device=device)
    return q, k, torch.randn_like(k)


def time_sdpa(log: RowLog, common: dict, backends: dict, timings: list[str], copy, timer: dict) -> dict:
    """Time SDPA on the fp16 cache under each backend that runs; return ``{timing: fastest ms}``."""
    from torch.nn.attention import sdpa_kernel

    q, k, v = sdpa_inputs(common["shape"], common["batch"], common["context"], compute_device())
    moved = (k.numel() + v.numel()) * k.element_size()
    sdpa = partial(torch.nn.functional.scaled_dot_product_attention, q, k, v)
    best: dict[str, float] = {}
    for name, backend in backends.items():
        why = try_sdpa_backend(backend, sdpa)
        log.add(**common, method="sdpa_fp16", mode=name, metric="runs", value=int(why is None))
        if why is not None:
            print(f"  sdpa_fp16[{name}] does not run here: {why}", flush=True)
            continue
        for timing in timings:
            with sdpa_kernel(backend):  # around the capture too: the backend is chosen when the graph is recorded
                ms = timed(log, {**common, "method": "sdpa_fp16", "mode": name}, sdpa, timing, timer)
            if ms is not None:
                best[timing] = min(best.get(timing, ms), ms)
                report(log, common, "sdpa_fp16", name, timing, ms, moved, copy, None)
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return best
    if q.is_cuda:  # flash-attn's own decode path, (B, S, H, d) layout with native GQA
        heads = SHAPES[common["shape"]][0]
        qf = q.reshape(q.shape[0], heads, 1, q.shape[-1]).transpose(1, 2).contiguous()
        kf, vf = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        fn = partial(flash_attn_with_kvcache, qf, kf, vf)
        for timing in timings:
            ms = timed(log, {**common, "method": "flash_attn_fp16", "mode": "kvcache"}, fn, timing, timer)
            if ms is not None:
                report(log, common, "flash_attn_fp16", "kvcache", timing, ms, moved, copy, None)
    return best


def time_eigenkv(
    log: RowLog, common: dict, case: DecodeCase, modes, timings, kernel: bool, sdpa, copy, timer, caps=(None,)
) -> None:
    """Time the decode kernel (or, without ``kernel``, its PyTorch reference) in each mode and timing; with
    ``caps`` (register caps, None for the launch config's), the kernel once per cap, as mode ``rank@168r``."""
    cache_bytes = stored_bytes(case.keys, case.values)
    log.add(**common, method="eigenkv", metric="cache_bytes", value=cache_bytes)
    for mode in modes:
        query, scoring = case.queries[mode]
        moved = cache_bytes + (stored_bytes(case.decoder) if mode == "pre" else 0)
        for cap in caps if kernel else (None,):
            if kernel:
                fn = partial(lowrank_decode, query, case.keys, case.values, scoring, max_registers=cap)
            else:
                fn = partial(lowrank_decode_reference, query, case.keys, case.values, scoring)
            label = mode if cap is None else f"{mode}@{cap}r"
            for timing in timings:
                ms = timed(log, {**common, "method": "eigenkv", "mode": label}, fn, timing, timer)
                if ms is not None:
                    report(log, common, "eigenkv", label, timing, ms, moved, copy, sdpa.get(timing))


def timed(log: RowLog, base: dict, fn, timing: str, timer: dict) -> float | None:
    """``measure_ms(fn, timing)``, or None after logging an ``error`` row: a failed capture or launch
    of one method must not cost the point's other measurements."""
    try:
        return measure_ms(fn, timing, **timer)
    except Exception as exc:
        traceback.print_exc()
        log.add(**base, timing=timing, metric="error", value=short_error(exc))
        print(f"  {base['method']}[{base['mode']}] {timing}: {short_error(exc)}", flush=True)
        if torch.cuda.is_available():
            with contextlib.suppress(Exception):  # an asynchronous error surfaces here, not in the next method
                torch.cuda.synchronize()
        return None


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def report(log: RowLog, common: dict, method: str, mode: str, timing: str, ms, moved, copy, sdpa_ms) -> None:
    """Log and print one timed method: ms, bytes, GB/s, % of the copy bandwidth, speed-up over SDPA."""
    base = {**common, "method": method, "mode": mode, "timing": timing}
    gbps = moved / ms / 1e6
    log.add(**base, metric="ms", value=round(ms, 5))
    log.add(**base, metric="bytes", value=moved)
    log.add(**base, metric="GB/s", value=round(gbps, 1))
    line = f"  {method + '[' + mode + ']':22s} {timing:5s} {ms:9.4f} ms {gbps:8.1f} GB/s ({moved / 2**20:7.1f} MiB)"
    if copy:
        log.add(**base, metric="pct_copy", value=round(100 * gbps / copy, 1))
        line += f" {100 * gbps / copy:5.1f}% of copy"
    if sdpa_ms:
        log.add(**base, metric="speedup_vs_sdpa", value=round(sdpa_ms / ms, 3))
        line += f"  x{sdpa_ms / ms:5.2f} vs fastest sdpa"
    print(line, flush=True)


def decode_point(log: RowLog, args, shape: str, batch: int, context: int, kernel: bool, copy) -> None:
    """Measure one (shape, batch, context): SDPA first (then its fp16 cache is freed), then eigenkv."""
    cuda = torch.cuda.is_available()
    timings = ["plain", "graph"] if args.graph and cuda else ["plain"]
    # CPU: the interpreter is slow (one call is enough to check the plumbing); the references take ms
    timer = {} if cuda else ({"warmup": 0, "reps": 1} if args.cpu_smoke else {"warmup": 1, "reps": 5})
    common = {"step": "decode", "shape": shape, "dtype": "float16", "batch": batch, "context": context}
    print(f"{shape} B={batch} S={context}", flush=True)
    sdpa = time_sdpa(log, common, sdpa_backends(args.sdpa_backends), timings, copy, timer)
    if cuda:
        torch.cuda.empty_cache()
    config = KVQuantConfig(bits=args.bits, group_size=args.group, residual=args.residual)
    case = decode_case(shape, batch, context, args.ratio, config, torch.float16, compute_device())
    time_eigenkv(log, common, case, args.modes.split(","), timings, kernel, sdpa, copy, timer, args.register_caps)


# --- main -----------------------------------------------------------------------------------------


def register_caps(text: str) -> list[int | None]:
    """``--register-caps``: ``"default,168"`` -> ``[None, 168]``."""
    caps = []
    for item in text.split(","):
        if item == "default":
            caps.append(None)
        elif item.isdigit() and 64 <= int(item) <= 255:
            caps.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"{item!r} is not a register cap: give 64-255 or 'default'")
    return caps


def parse_points(args, cuda: bool) -> list[tuple[int, int]]:
    """``[(batch, context)]``: ``--points`` in order, else the grid ``--batches`` x ``--contexts``."""
    if args.points:
        return [tuple(int(n) for n in p.lower().split("x")) for p in args.points.split(",")]
    default = "1024,2048,4096,8192,16384,32768,65536,131072" if cuda else "1024,4096"
    if args.cpu_smoke:
        default = "256"
    contexts = [int(c) for c in (args.contexts or default).split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if not cuda:
        batches = [b for b in batches if b == 1] or [1]
    return [(b, c) for b in batches for c in contexts]


def _curve(row: dict) -> tuple:
    return row["shape"], row["batch"], row["mode"], row["timing"]


def report_crossover(rows: list[dict]) -> None:
    """Print the first context from which each compressed path beats SDPA (per shape, batch, mode, timing)."""
    speed = [r for r in rows if r["metric"] == "speedup_vs_sdpa" and r["method"] == "eigenkv"]
    for key in sorted({_curve(r) for r in speed}):
        pts = sorted((r["context"], r["value"]) for r in speed if _curve(r) == key)
        faster = [c for i, (c, _) in enumerate(pts) if all(v > 1 for _, v in pts[i:])]
        where = f"from {faster[0]} tokens" if faster else "at none of the measured contexts"
        print(f"{key[0]} B={key[1]} eigenkv[{key[2]}] ({key[3]}): faster than sdpa_fp16 {where}")


def plot(rows: list[dict], path) -> None:
    """Latency against context per (shape, batch), one line per method[mode], plain timing (needs matplotlib)."""
    timed = [
        {**r, "method": f"{r['method']}[{r['mode']}]"} for r in rows if r["metric"] == "ms" and r["timing"] == "plain"
    ]
    plot_latency_panels(timed, path, "context", "context (tokens)", "ms per decode step (one layer)", "decode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default=None, help="comma-separated; default 1k..128k (GPU) or 1k,4k (CPU)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--points", default=None, help="BxS,... (e.g. 8x32768,1x32768), measured in this order")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--modes", default="rank,pre")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--residual", type=int, default=0, help="tokens kept in full precision (KVQuantConfig)")
    parser.add_argument("--graph", action="store_true", help="also time each method replayed from a CUDA graph")
    parser.add_argument("--register-caps", type=register_caps, default=[None], help="comma-separated register "
                        "caps per thread to time the kernel at (64-255, or 'default': the launch config's), e.g. "
                        "default,168,255")  # fmt: skip
    parser.add_argument("--sdpa-backends", default="flash,efficient,cudnn,math")
    add_gpu_step_arguments(parser)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    kernel = cuda or args.cpu_smoke
    if not cuda:
        what = "the kernels in the Triton interpreter" if kernel else "the PyTorch references"
        print(f"no CUDA device: timing {what} (and SDPA on CPU); kernel numbers need a GPU")
    log = RowLog(results_path(args.out, "decode"), fresh=not args.append)
    copy = None
    if cuda:
        copy = copy_bandwidth_gbs()
        log.add(step="decode", method="copy", mode="d2d", metric="GB/s", value=round(copy, 1))
        print(f"device copy bandwidth: {copy:.0f} GB/s (1 GiB device-to-device, read + write)", flush=True)
    began = time.perf_counter()
    for shape in args.shapes.split(","):
        for batch, context in parse_points(args, cuda):
            try:
                decode_point(log, args, shape, batch, context, kernel, copy)
            except Exception as exc:  # out of memory, a backend error: keep the other points
                traceback.print_exc()
                point = {"shape": shape, "batch": batch, "context": context}
                log.add(step="decode", **point, metric="error", value=short_error(exc))
            if cuda:
                torch.cuda.empty_cache()
    print(f"decode: {time.perf_counter() - began:.0f} s; rows in {log.path}")
    report_crossover(log.rows)
    plot(log.rows, log.path.with_suffix(".png"))


if __name__ == "__main__":
    main()
