"""Benchmark causal prefill attention in rank space against SDPA at full head size.

For each attention shape (Llama-3-8B: 32 query heads, 8 KV heads, head size
128; SmolLM2-135M: 9 / 3 / 64), batch (1, 8) and prompt length, one layer's
prompt attention is timed:

- ``sdpa_fp16``: ``scaled_dot_product_attention(is_causal=True)`` (GQA) on fp16
  queries, keys and values of the full head size;
- ``eigenkv_post`` / ``eigenkv_pre``: :func:`eigenkv.kernels.lowrank_prefill` at
  ``--ratio`` of the head size, scores in rank space, or keys rebuilt from
  pre-RoPE coefficients and rotated in the kernel (queries stay full size);
- ``eigenkv_post_quantized``: rank space reading the causal quantized view of a
  quantized cache (a second version of every key and value, as a prompt through
  ``QuantizedKV`` does).

Reports ms, achieved TFLOP/s of the attention work (``B H T^2 (e + r_v)``: the
causal half of two matmuls; pre mode's key rebuild is not counted) and the
speed-up over SDPA; writes a long-format
CSV and a plot named after the device. Without CUDA it times the PyTorch
references on short prompts and says so: kernel numbers need a GPU.

    PYTHONPATH=. python benchmarks/bench_prefill.py [--lengths 1024,8192] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

import torch

from benchmarks._common import RESULTS, device_name, device_slug, plot_latency_panels, time_ms, write_csv

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # only so that the import works; kernels are not timed on CPU

from benchmarks.bench_decode import SHAPES  # noqa: E402
from eigenkv.kernels.lowrank_prefill import lowrank_prefill, lowrank_prefill_reference  # noqa: E402
from eigenkv.kernels.scoring import Scoring  # noqa: E402

MAX_TOKENS = 8 * 32768  # batch x length per point: longer prompts only at batch 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=None, help="comma-separated; default 1k..128k (GPU) or 256,1024 (CPU)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    lengths = [int(n) for n in (args.lengths or ("1024,4096,16384,32768,131072" if cuda else "256,1024")).split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if not cuda:
        print(
            "no CUDA device: timing the PyTorch references (lowrank_prefill_reference, SDPA); kernel numbers need a GPU"
        )
        batches = [1]
    prefill = lowrank_prefill if cuda else lowrank_prefill_reference
    dtype = torch.float16
    rows = []
    for shape in args.shapes.split(","):
        q_heads, kv_heads, d = SHAPES[shape]
        rank = max(1, round(args.ratio * d))
        for batch in batches:
            for length in lengths:
                if batch * length > MAX_TOKENS:
                    continue
                common = {"device": device_name(), "dtype": "float16", "ratio": args.ratio, "shape": shape}
                common |= {"batch": batch, "length": length}
                torch.manual_seed(0)

                def states(width, heads, batch=batch, length=length):
                    return torch.randn(batch, heads, length, width, dtype=dtype, device=device)

                q_full, k_full, v_full = states(d, q_heads), states(d, kv_heads), states(d, kv_heads)
                q_rank, k_rank, v_rank = states(rank, q_heads), states(rank, kv_heads), states(rank, kv_heads)
                decoder = torch.linalg.qr(torch.randn(kv_heads, d, d, device=device))[0][..., :rank].to(dtype)
                inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
                bounds = torch.arange(length, dtype=torch.int32, device=device)  # every older token quantized
                causal = batch * q_heads * length * length  # query-key pairs x 2 (causal half)
                methods = {
                    "sdpa_fp16": (
                        partial(
                            torch.nn.functional.scaled_dot_product_attention,
                            q_full,
                            k_full,
                            v_full,
                            is_causal=True,
                            enable_gqa=True,
                        ),
                        causal * 2 * d,
                    ),  # fmt: skip
                    "eigenkv_post": (partial(prefill, q_rank, k_rank, v_rank, Scoring(d**-0.5)), causal * 2 * rank),
                    "eigenkv_pre": (
                        partial(prefill, q_full, k_rank, v_rank, Scoring(d**-0.5, "pre", decoder, inv_freq)),
                        causal * (d + rank),  # the in-kernel key rebuild is not counted
                    ),
                    "eigenkv_post_quantized": (
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
                    ),  # fmt: skip
                }
                times = {}
                for method, (fn, flops) in methods.items():
                    try:
                        ms = times[method] = time_ms(fn, warmup=2, reps=5)
                    except torch.OutOfMemoryError:
                        print(f"{shape} B={batch} T={length} {method}: out of memory")
                        continue
                    provider = "triton" if cuda and method.startswith("eigenkv") else "torch"
                    base = {**common, "method": method, "provider": provider}
                    tflops = flops / ms / 1e9
                    speedup = times["sdpa_fp16"] / ms
                    rows += [
                        {**base, "metric": "ms", "value": ms},
                        {**base, "metric": "TFLOP/s", "value": round(tflops, 3)},
                        {**base, "metric": "speedup_vs_sdpa", "value": round(speedup, 3)},
                    ]
                    print(
                        f"{shape:13s} B={batch} T={length:6d} {method:22s} {ms:10.3f} ms {tflops:7.2f} TFLOP/s "
                        f"x{speedup:5.2f} vs sdpa",
                        flush=True,
                    )
    out = write_csv(rows, Path(args.out) if args.out else RESULTS / f"prefill_{device_slug()}.csv")
    print(f"wrote {out}")
    plot_latency_panels(
        rows,
        out.with_suffix(".png"),
        "length",
        "prompt length (tokens)",
        "ms per prompt (one layer)",
        "causal prefill attention",
    )


if __name__ == "__main__":
    main()
