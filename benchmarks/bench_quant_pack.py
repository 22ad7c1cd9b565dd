"""Benchmark the fused quantize+pack and unpack+dequantize kernels against their torch references.

Shapes are KV-cache flushes and reads: rows = tokens x KV heads, a row of
head size 128, grouped per token (G features of a row) or per channel (G
consecutive rows of a feature; the same packed rows). Writes
a long-format CSV and a plot of achieved GB/s (bytes read + written) under
benchmarks/results/, named after the device; "copy" is the device's
practical bandwidth ceiling. Without CUDA only the references are timed.

    PYTHONPATH=. python benchmarks/bench_quant_pack.py
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

import torch

from benchmarks._common import RESULTS, device_name, device_slug, time_ms, write_csv

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # only so that the import works; kernels are not timed on CPU

from eigenkv.kernels.quant_pack import (  # noqa: E402
    quantize_pack,
    quantize_pack_reference,
    unpack_dequantize,
    unpack_dequantize_reference,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        print("no CUDA device: timing the torch references only; kernel numbers need a GPU")
    token_counts = (1024, 8192, 32768, 131072) if cuda else (1024, 8192)
    rows_out = []
    for tokens in token_counts:
        for bits, group, axis in [(b, g, a) for b in (2, 3, 4, 8) for g in (32, 64, 128) for a in ("token", "channel")]:
            n_rows, n_cols = tokens * 8, 128  # 8 KV heads of head size 128 (Llama-3-8B)
            x = torch.randn(n_rows, n_cols, device=device, dtype=torch.float16)
            packed, scale, zero = quantize_pack_reference(x, bits, group, axis=axis, paired=True)
            small = packed.numel() + 2 * (scale.numel() + zero.numel())
            big = x.numel() * 2
            quant_args = (x, bits, group)
            options = {"axis": axis, "paired": True}
            dequant_args = (packed, scale, zero, bits, group, n_cols, torch.float16)
            providers = {
                ("quantize_pack", "torch"): partial(quantize_pack_reference, *quant_args, **options),
                ("unpack_dequantize", "torch"): partial(unpack_dequantize_reference, *dequant_args, **options),
            }
            if cuda:
                providers[("quantize_pack", "triton")] = partial(quantize_pack, *quant_args, **options)
                providers[("unpack_dequantize", "triton")] = partial(unpack_dequantize, *dequant_args, **options)
                providers[("copy", "torch")] = x.clone
            for (op, provider), fn in providers.items():
                ms = time_ms(fn)
                moved = 2 * big if op == "copy" else big + small
                common = {
                    "op": op,
                    "provider": provider,
                    "tokens": tokens,
                    "rows": n_rows,
                    "cols": n_cols,
                    "bits": bits,
                    "group": group,
                    "axis": axis,
                    "dtype": "float16",
                    "device": device_name(),
                }
                rows_out.append({**common, "metric": "ms", "value": round(ms, 5)})
                rows_out.append({**common, "metric": "GB/s", "value": round(moved / ms / 1e6, 2)})
                print(
                    f"{op:18s} {provider:6s} tokens={tokens:6d} b={bits} G={group:3d} {axis:7s} {ms:9.4f} ms "
                    f"{moved / ms / 1e6:8.1f} GB/s",
                    flush=True,
                )
    out = write_csv(rows_out, Path(args.out) if args.out else RESULTS / f"quant_pack_{device_slug()}.csv")
    print(f"wrote {out}")
    _plot(rows_out, out.with_suffix(".png"))


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for op, provider in sorted({(r["op"], r["provider"]) for r in rows}):
        pts = [
            r
            for r in rows
            if (r["op"], r["provider"]) == (op, provider)
            and r["metric"] == "GB/s"
            and r["bits"] == 4
            and r["group"] == 64
            and r["axis"] == "token"
        ]
        ax.plot([r["tokens"] for r in pts], [r["value"] for r in pts], marker="o", label=f"{op} ({provider})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens (8 KV heads x 128, fp16, 4-bit, group 64 per token)")
    ax.set_ylabel("achieved GB/s (read + written)")
    ax.set_title(f"quantize/pack kernels on {rows[0]['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
