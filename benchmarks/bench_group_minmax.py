"""Benchmark the group_minmax kernel against torch (amin/amax over groups).

Writes a long-format CSV (one row per provider, shape and metric) and a plot
of achieved GB/s under benchmarks/results/, named after the device. On a
machine without CUDA only the torch reference is timed: kernel numbers need a GPU.

    PYTHONPATH=. python benchmarks/bench_group_minmax.py
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from benchmarks._common import RESULTS, device_name, device_slug, time_ms, write_csv

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # only so that the import works; the kernel is not timed on CPU

from eigenkv.kernels.group_minmax import group_minmax, group_minmax_reference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="CSV path (default: results/group_minmax_<device>.csv)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    # "copy" (x.clone(), counted as read + write) is the device's practical bandwidth ceiling.
    providers = {"copy": lambda x, group: x.clone(), "torch": group_minmax_reference}
    if cuda:
        providers["triton"] = group_minmax
    else:
        print("no CUDA device: timing the torch reference only; kernel numbers need a GPU")

    rows = []
    # A KV tensor (tokens x kv_heads*head_dim) per-token grouping, from 1k to 128k tokens.
    for tokens in (1024, 8192, 32768, 131072):
        for dim, group in ((1024, 64), (1024, 128), (192, 32)):
            for dtype in (torch.float16, torch.bfloat16):
                x = torch.randn(tokens, dim, dtype=dtype, device=device)
                stats_bytes = x.numel() * x.element_size() + 2 * (x.numel() // group) * x.element_size()
                for name, fn in providers.items():
                    ms = time_ms(lambda fn=fn, x=x, group=group: fn(x, group))
                    moved = 2 * x.numel() * x.element_size() if name == "copy" else stats_bytes
                    common = {
                        "kernel": "group_minmax",
                        "provider": name,
                        "dtype": str(dtype).removeprefix("torch."),
                        "tokens": tokens,
                        "dim": dim,
                        "group": group,
                        "device": device_name(),
                    }
                    rows.append({**common, "metric": "ms", "value": round(ms, 5)})
                    rows.append({**common, "metric": "GB/s", "value": round(moved / ms / 1e6, 2)})
                    print(
                        f"{name:7s} {common['dtype']:9s} tokens={tokens:6d} dim={dim:5d} G={group:4d} "
                        f"{ms:8.4f} ms {moved / ms / 1e6:8.1f} GB/s"
                    )
    out = write_csv(rows, Path(args.out) if args.out else RESULTS / f"group_minmax_{device_slug()}.csv")
    print(f"wrote {out}")
    _plot(rows, out.with_suffix(".png"))


def _plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for provider in sorted({r["provider"] for r in rows}):
        pts = [
            r
            for r in rows
            if r["provider"] == provider
            and r["metric"] == "GB/s"
            and r["dtype"] == "float16"
            and r["dim"] == 1024
            and r["group"] == 64
        ]
        ax.plot([r["tokens"] for r in pts], [r["value"] for r in pts], marker="o", label=provider)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens (dim 1024, group 64, fp16)")
    ax.set_ylabel("achieved GB/s")
    ax.set_title(f"group_minmax on {rows[0]['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
