"""Benchmark causal prefill attention in rank space against SDPA at full head size.

For each attention shape (Llama-3-8B: 32 query heads, 8 KV heads, head size
128; SmolLM2-135M: 9 / 3 / 64), batch (1, 8) and prompt length, one layer's
prompt attention is timed:

- ``sdpa_fp16``: ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)``
  on fp16 queries, keys and values of the full head size, under the first SDPA
  backend that runs (``mode``: flash, efficient, cudnn; math only where nothing
  else runs and the prompt is short: it materialises the T x T scores);
- ``sdpa_rank_pad8``: :func:`eigenkv.kernels.sdpa_prefill.sdpa_prefill` in rank
  mode, the path a compressed model's prompt takes on CUDA when no query reads a
  quantized view (``eigenkv.quant.routing``): SDPA on the rank-space tensors, their
  features zero-padded to a multiple of 8 (the fused backends' requirement) and
  the scale set to ``d^-1/2``: exact, since zero features add nothing to a score
  and give zero output columns. Timed as shipped (``mode`` ``auto``: torch picks
  the backend, as in the models);
- ``sdpa_pre_rebuild`` (with ``--modes`` pre): ``sdpa_prefill`` in pre mode: keys
  rebuilt from their pre-RoPE coefficients and rotated (``Scoring.keys``), then
  SDPA at full head size with the rotated queries (the rebuild is timed, not
  counted in TFLOP/s);
- ``eigenkv`` (``mode`` rank / pre / rank_quantized_view): the kernel,
  :func:`eigenkv.kernels.lowrank_prefill` at ``--ratio`` of the head size,
  scores in rank space, or keys rebuilt from pre-RoPE coefficients and rotated
  in the kernel (queries stay full size), or rank space reading the causal
  quantized view of a quantized cache (a second version of every key and value,
  as a prompt through ``QuantizedKV`` does: the only one the models still send to
  the kernel, with ALiBi).

Metrics: ``ms`` (CUDA events, median, after an L2 flush), ``TFLOP/s`` of the
attention work (``B H T^2 (e + r_v)``: the causal half of two matmuls; pre mode's
key rebuild is not counted; padded features not counted either) and
``speedup_vs_sdpa`` (over ``sdpa_fp16``). Rows are appended to a long-format CSV
as they are measured (``context`` = prompt length); a plot named after the
device follows. Without CUDA it times the PyTorch references on short prompts
and says so: kernel numbers need a GPU; ``--cpu-smoke`` runs the kernel in the
Triton interpreter at tiny sizes instead, to check the plumbing.

    PYTHONPATH=. python benchmarks/bench_prefill.py [--lengths 1024,8192] [--batches 1,8] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from functools import partial

import torch

from benchmarks._common import (
    RowLog,
    add_gpu_step_arguments,
    measure_ms,
    plot_latency_panels,
    results_path,
    sdpa_backends,
    short_error,
    try_sdpa_backend,
)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel import: it works, and --cpu-smoke runs it

from benchmarks.bench_decode import SHAPES  # noqa: E402
from eigenkv.kernels.lowrank_prefill import lowrank_prefill, lowrank_prefill_reference  # noqa: E402
from eigenkv.kernels.scoring import Scoring  # noqa: E402
from eigenkv.kernels.sdpa_prefill import sdpa_prefill  # noqa: E402

MAX_TOKENS = 8 * 32768  # batch x length per point: longer prompts only at batch 1
MATH_MAX_LENGTH = 8192  # the math backend holds B H T^2 fp32 scores: beyond this it is slow or out of memory


def pick_sdpa(fn, length: int, names: str):
    """``(backend name, backend)`` of the first SDPA backend that runs ``fn`` (math last, short prompts only),
    or ``(None, None)``; prints why the others do not."""
    backends = sdpa_backends(names)
    for name, backend in sorted(backends.items(), key=lambda item: item[0] == "math"):
        if name == "math" and length > MATH_MAX_LENGTH:
            continue
        why = try_sdpa_backend(backend, fn)
        if why is None:
            return name, backend
        print(f"  sdpa[{name}] does not run here: {why}", flush=True)
    return None, None


def sdpa_methods(q_full, k_full, v_full, q_rank, k_rank, v_rank, pre: Scoring, length: int, args) -> list[tuple]:
    """``[(method, mode, fn, flops)]`` of SDPA: at full head size under the first backend that runs it (``fn``
    forces that backend; GQA as ``enable_gqa`` first, where no backend takes that, keys and values repeated
    per query head beforehand: mode ``<backend>+expand``), and ``sdpa_prefill`` as the models call it."""
    from torch.nn.attention import sdpa_kernel

    sdpa = partial(torch.nn.functional.scaled_dot_product_attention, is_causal=True)
    d = q_full.shape[-1]
    groups = q_full.shape[1] // k_full.shape[1]
    causal = q_full.shape[0] * q_full.shape[1] * length * length  # query-key pairs x 2 (causal half)
    methods = []
    call, suffix = partial(sdpa, q_full, k_full, v_full, enable_gqa=True), ""
    name, backend = pick_sdpa(call, length, args.sdpa_backends)
    if backend is None:  # keys and values repeated outside the timing (they are read `groups` times)
        call, suffix = partial(sdpa, q_full, *_expand(k_full, v_full, groups)), "+expand"
        name, backend = pick_sdpa(call, length, args.sdpa_backends)
    if backend is None:
        methods.append(("sdpa_fp16", "none", None, causal * 2 * d))
    else:

        def forced(call=call, backend=backend):
            with sdpa_kernel(backend):
                return call()

        methods.append(("sdpa_fp16", name + suffix, forced, causal * 2 * d))
    # the shipped prompt path (padding, GQA and backend choice inside); padded features not counted
    methods.append(
        (
            "sdpa_rank_pad8",
            "auto",
            partial(sdpa_prefill, q_rank, k_rank, v_rank, Scoring(d**-0.5)),
            causal * (k_rank.shape[-1] + v_rank.shape[-1]),
        )
    )
    if "pre" in args.modes.split(","):
        rebuild = partial(sdpa_prefill, q_full, k_rank, v_rank, pre)
        methods.append(("sdpa_pre_rebuild", "auto", rebuild, causal * (d + v_rank.shape[-1])))
    return methods


def _expand(k: torch.Tensor, v: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def prefill_point(log: RowLog, args, shape: str, batch: int, length: int, kernel: bool) -> None:
    """Time every method at one (shape, batch, prompt length); SDPA first, for the speed-ups."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16
    q_heads, kv_heads, d = SHAPES[shape]
    rank = max(1, round(args.ratio * d))
    common = {"step": "prefill", "shape": shape, "dtype": "float16", "batch": batch, "context": length}
    print(f"{shape} B={batch} T={length}", flush=True)
    torch.manual_seed(0)

    def states(width, heads):
        return torch.randn(batch, heads, length, width, dtype=dtype, device=device)

    q_full, k_full, v_full = states(d, q_heads), states(d, kv_heads), states(d, kv_heads)
    q_rank, k_rank, v_rank = states(rank, q_heads), states(rank, kv_heads), states(rank, kv_heads)
    decoder = torch.linalg.qr(torch.randn(kv_heads, d, d))[0][..., :rank].to(device, dtype)
    inv_freq = (1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))).to(device)
    bounds = torch.arange(length, dtype=torch.int32, device=device)  # every older token quantized
    causal = batch * q_heads * length * length
    prefill = lowrank_prefill if kernel else lowrank_prefill_reference
    pre = Scoring(d**-0.5, "pre", decoder, inv_freq)
    methods = sdpa_methods(q_full, k_full, v_full, q_rank, k_rank, v_rank, pre, length, args)
    methods += [
        ("eigenkv", "rank", partial(prefill, q_rank, k_rank, v_rank, Scoring(d**-0.5)), causal * 2 * rank),
        (
            "eigenkv",
            "pre",
            partial(prefill, q_full, k_rank, v_rank, pre),
            causal * (d + rank),  # the in-kernel key rebuild is not counted
        ),
        (
            "eigenkv",
            "rank_quantized_view",
            partial(
                prefill,
                q_rank,
                k_rank,
                v_rank,
                Scoring(d**-0.5),
                quantized_keys=(k_rank, bounds),
                quantized_values=(v_rank, bounds),
            ),
            causal * 2 * rank,
        ),
    ]
    modes = set(args.modes.split(","))
    # CPU: one call of each (the interpreter is slow, the references only need checking)
    timer = {"warmup": 2, "budget_ms": 300.0, "min_reps": 3, "max_reps": 20} if cuda else {"warmup": 0, "reps": 1}
    sdpa_ms = None
    for method, mode, fn, flops in methods:
        if method == "eigenkv" and mode not in modes:
            continue
        base = {**common, "method": method, "mode": mode, "timing": "plain"}
        if fn is None:
            log.add(**base, metric="error", value="no SDPA backend runs this")
            continue
        try:
            ms = measure_ms(fn, "plain", **timer)
        except Exception as exc:  # out of memory at long prompts, a launch error: keep the other methods
            traceback.print_exc()
            log.add(**base, metric="error", value=short_error(exc))
            if cuda:
                torch.cuda.empty_cache()
            continue
        sdpa_ms = ms if method == "sdpa_fp16" else sdpa_ms
        tflops = flops / ms / 1e9
        log.add(**base, metric="ms", value=round(ms, 4))
        log.add(**base, metric="TFLOP/s", value=round(tflops, 2))
        line = f"  {method + '[' + mode + ']':32s} {ms:10.3f} ms {tflops:7.2f} TFLOP/s"
        if sdpa_ms:
            log.add(**base, metric="speedup_vs_sdpa", value=round(sdpa_ms / ms, 3))
            line += f"  x{sdpa_ms / ms:5.2f} vs sdpa_fp16"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=None, help="comma-separated; default 1k..128k (GPU) or 256,1024 (CPU)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--modes", default="rank,pre,rank_quantized_view", help="eigenkv modes")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--sdpa-backends", default="flash,efficient,cudnn,math", help="tried in this order")
    add_gpu_step_arguments(parser, "no CUDA: run the kernel in the interpreter")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    kernel = cuda or args.cpu_smoke
    default = "1024,4096,16384,32768,131072" if cuda else ("64" if args.cpu_smoke else "256,1024")
    lengths = [int(n) for n in (args.lengths or default).split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if not cuda:
        what = "the kernel in the Triton interpreter" if kernel else "the PyTorch references"
        print(f"no CUDA device: timing {what} (and SDPA on CPU); kernel numbers need a GPU")
        batches = [1]
    log = RowLog(results_path(args.out, "prefill"), fresh=not args.append)
    began = time.perf_counter()
    for shape in args.shapes.split(","):
        for batch in batches:
            for length in lengths:
                if batch * length > MAX_TOKENS:
                    continue
                try:
                    prefill_point(log, args, shape, batch, length, kernel)
                except Exception as exc:
                    traceback.print_exc()
                    point = {"shape": shape, "batch": batch, "context": length}
                    log.add(step="prefill", **point, metric="error", value=short_error(exc))
                if cuda:
                    torch.cuda.empty_cache()
    print(f"prefill: {time.perf_counter() - began:.0f} s; rows in {log.path}")
    timed = [{**r, "method": f"{r['method']}[{r['mode']}]"} for r in log.rows if r["metric"] == "ms"]
    path, ylabel = log.path.with_suffix(".png"), "ms per prompt (one layer)"
    plot_latency_panels(timed, path, "context", "prompt length (tokens)", ylabel, "causal prefill attention")


if __name__ == "__main__":
    main()
