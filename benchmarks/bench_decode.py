"""Benchmark one decode step of attention on the packed low-rank cache against SDPA on the fp16 cache.

For each attention shape (Llama-3-8B: 32 query heads, 8 KV heads, head size
128; SmolLM2-135M: 9 / 3 / 64), batch (1, 8) and context (1k to 128k tokens),
one layer's decode attention is timed:

- ``sdpa_fp16``: ``torch.nn.functional.scaled_dot_product_attention`` (GQA) on
  the uncompressed fp16 cache; ``flash_attn`` too when the package is installed;
- ``eigenkv_post`` / ``eigenkv_pre``: :func:`eigenkv.kernels.lowrank_decode` on
  a cache at ``--ratio`` of the head size (keys per channel, values per token,
  ``--bits`` codes, group ``--group``), scores in rank space (post-RoPE and
  no-RoPE models) or with the in-kernel pre-RoPE key rebuild.

"GB/s" is the bytes the method must read (everything stored: codes, scales,
zeros, window, and the decoders in pre mode) over its time; ``copy`` is the
device's practical bandwidth (a large device-to-device copy). The script also
prints, per shape and batch, the first context from which each compressed
path is faster than SDPA. Writes a long-format CSV and a plot named after the
device. Without CUDA it times the PyTorch references on short contexts and says
so: kernel numbers need a GPU.

    PYTHONPATH=. python benchmarks/bench_decode.py [--contexts 1024,32768] [--batches 1,8]
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

from eigenkv.kernels.lowrank_decode import lowrank_decode, lowrank_decode_reference  # noqa: E402
from eigenkv.kernels.scoring import Scoring  # noqa: E402
from eigenkv.quant.packing import PackedStream, Segment, packed_length  # noqa: E402

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}  # query heads, KV heads, head size


def random_stream(batch, heads, tokens, width, bits, group, axis, dtype, device) -> PackedStream:
    """A stream laid out as a cache holding ``tokens`` tokens (random codes): per-channel streams keep
    the incomplete last group in the window, per-token streams quantize everything."""
    quantized = tokens if axis == "token" else tokens // group * group
    if axis == "token":
        code_shape = (batch, heads, quantized, packed_length(width, bits))
        param_shape = (batch, heads, quantized, -(-width // group))
    else:
        code_shape = (batch, heads, quantized // group * packed_length(group, bits), width)
        param_shape = (batch, heads, quantized // group, width)
    codes = torch.randint(0, 256, code_shape, dtype=torch.uint8, device=device)
    scale = torch.rand(param_shape, dtype=torch.float16, device=device) * 0.1
    zero = -torch.rand(param_shape, dtype=torch.float16, device=device)
    window = torch.randn(batch, heads, tokens - quantized, width, dtype=dtype, device=device)
    return PackedStream((Segment(codes, scale, zero, bits, width),), window, quantized, axis, group)


def stored_bytes(*streams: PackedStream) -> int:
    size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
    total = 0
    for stream in streams:
        total += size(stream.window)
        for s in stream.segments:
            total += size(s.codes) + size(s.scale) + size(s.zero)
    return total


def copy_bandwidth(device) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write)."""
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / time_ms(partial(y.copy_, x)) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default=None, help="comma-separated; default 1k..128k (GPU) or 1k,4k (CPU)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    default_contexts = "1024,2048,4096,8192,16384,32768,65536,131072" if cuda else "1024,4096"
    contexts = [int(c) for c in (args.contexts or default_contexts).split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if not cuda:
        print(
            "no CUDA device: timing the PyTorch references (lowrank_decode_reference, SDPA); kernel numbers need a GPU"
        )
        batches = [b for b in batches if b == 1] or [1]
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None
    dtype = torch.float16
    rows = []
    common_base = {"device": device_name(), "dtype": "float16", "ratio": args.ratio, "bits": args.bits}
    common_base["group"] = args.group
    if cuda:
        copy = copy_bandwidth(device)
        rows.append({**common_base, "shape": "-", "batch": 0, "context": 0, "method": "copy", "metric": "GB/s"})
        rows[-1]["value"] = round(copy, 1)
        print(f"device copy bandwidth: {copy:.0f} GB/s")
    for shape in args.shapes.split(","):
        q_heads, kv_heads, d = SHAPES[shape]
        rank = max(1, round(args.ratio * d))
        for batch in batches:
            for context in contexts:
                common = {**common_base, "shape": shape, "batch": batch, "context": context}
                torch.manual_seed(0)
                keys = random_stream(batch, kv_heads, context, rank, args.bits, args.group, "channel", dtype, device)
                values = random_stream(batch, kv_heads, context, rank, args.bits, args.group, "token", dtype, device)
                decoder = torch.linalg.qr(torch.randn(kv_heads, d, d, device=device))[0][..., :rank].to(dtype)
                inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
                q_rank = torch.randn(batch, q_heads, rank, dtype=dtype, device=device)
                q_full = torch.randn(batch, q_heads, d, dtype=dtype, device=device)
                pre = Scoring(d**-0.5, "pre", decoder, inv_freq)
                fp16_bytes = 2 * batch * kv_heads * context * d * 2
                low_bytes = stored_bytes(keys, values)
                methods = {}
                k_full = torch.randn(batch, kv_heads, context, d, dtype=dtype, device=device)
                v_full = torch.randn_like(k_full)
                q_sdpa = torch.randn(batch, q_heads, 1, d, dtype=dtype, device=device)
                methods["sdpa_fp16"] = (
                    partial(torch.nn.functional.scaled_dot_product_attention, q_sdpa, k_full, v_full, enable_gqa=True),
                    fp16_bytes,
                )
                if flash_attn_with_kvcache is not None and cuda:
                    kf, vf = k_full.transpose(1, 2).contiguous(), v_full.transpose(1, 2).contiguous()
                    qf = q_sdpa.transpose(1, 2).contiguous()
                    methods["flash_attn_fp16"] = (partial(flash_attn_with_kvcache, qf, kf, vf), fp16_bytes)
                decode = lowrank_decode if cuda else lowrank_decode_reference
                methods["eigenkv_post"] = (partial(decode, q_rank, keys, values, Scoring(d**-0.5)), low_bytes)
                pre_bytes = low_bytes + decoder.numel() * decoder.element_size()
                methods["eigenkv_pre"] = (partial(decode, q_full, keys, values, pre), pre_bytes)
                times = {}
                for method, (fn, moved) in methods.items():
                    ms = times[method] = time_ms(fn)
                    provider = "triton" if cuda and method.startswith("eigenkv") else "torch"
                    rows.append({**common, "method": method, "provider": provider, "metric": "ms", "value": ms})
                    gbps = moved / ms / 1e6
                    rows.append({**common, "method": method, "provider": provider, "metric": "GB/s", "value": gbps})
                    rows.append({**common, "method": method, "provider": provider, "metric": "bytes", "value": moved})
                    speedup = times["sdpa_fp16"] / ms
                    rows.append({**common, "method": method, "provider": provider, "metric": "speedup_vs_sdpa"})
                    rows[-1]["value"] = round(speedup, 3)
                    print(
                        f"{shape:13s} B={batch} S={context:6d} {method:16s} {ms:9.4f} ms {gbps:8.1f} GB/s "
                        f"x{speedup:5.2f} vs sdpa ({moved / 2**20:.1f} MiB)",
                        flush=True,
                    )
                del k_full, v_full, keys, values
    for row in rows:
        row.setdefault("provider", "torch")
    _report_crossover(rows)
    out = Path(args.out) if args.out else RESULTS / f"decode_{device_slug()}.csv"
    out = write_csv(rows, out)
    print(f"wrote {out}")
    plot_latency_panels(
        rows,
        out.with_suffix(".png"),
        "context",
        "context (tokens)",
        "ms per decode step (one layer)",
        "decode attention",
    )


def _report_crossover(rows: list[dict]) -> None:
    """Print the first context from which each compressed path beats SDPA (per shape and batch)."""
    speed = [r for r in rows if r["metric"] == "speedup_vs_sdpa" and r["method"].startswith("eigenkv")]
    for key in sorted({(r["shape"], r["batch"], r["method"]) for r in speed}):
        pts = sorted((r["context"], r["value"]) for r in speed if (r["shape"], r["batch"], r["method"]) == key)
        faster = [c for i, (c, _) in enumerate(pts) if all(v > 1 for _, v in pts[i:])]
        where = f"from {faster[0]} tokens" if faster else "at none of the measured contexts"
        print(f"{key[0]} B={key[1]} {key[2]}: faster than sdpa_fp16 {where}")


if __name__ == "__main__":
    main()
