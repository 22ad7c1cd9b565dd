"""Shared benchmark plumbing: device naming, timing, long-format CSV and plots."""

from __future__ import annotations

import csv
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def device_slug() -> str:
    return "".join(c if c.isalnum() else "-" for c in device_name().lower()).strip("-").replace("--", "-")


def time_ms(fn, warmup: int = 5, reps: int = 20) -> float:
    """Median milliseconds of ``fn()``: CUDA events via triton.testing.do_bench on GPU, perf_counter on CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup * 5, rep=reps * 5, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def plot_latency_panels(rows: list[dict], path: Path, x: str, xlabel: str, ylabel: str, title: str) -> None:
    """One log-log panel of ``ms`` against ``x`` per (shape, batch), a line per method (rows in long format)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["metric"] == "ms" and r.get("shape", "-") != "-"]
    panels = sorted({(r["shape"], r["batch"]) for r in timed})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (shape, batch) in zip(axes[0], panels, strict=True):
        for method in sorted({r["method"] for r in timed}):
            pts = [r for r in timed if (r["shape"], r["batch"], r["method"]) == (shape, batch, method)]
            ax.plot([r[x] for r in pts], [r["value"] for r in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{shape}, batch {batch}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} on {rows[0]['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def run_folder(out: Path, args, **extra):
    """The ``eigenkv.eval.runs.RunFolder`` at ``out`` for a script's settings (its options but ``--out``, and
    ``extra``); a folder holding a run with other settings is refused."""
    from eigenkv.eval.runs import RunFolder

    config = {k: v for k, v in vars(args).items() if k != "out"} | extra
    try:
        return RunFolder(out.parent, out.name, config)
    except FileExistsError:
        raise SystemExit(f"{out} holds a run with other settings; choose another --out or delete it") from None
