"""Perplexity of Eigen Attention at several KV ratios, RoPE modes and allotments (issue 4's table).

Calibrates once per RoPE mode (the statistics do not depend on the ratio),
then for each (allotment, ratio) compresses a fresh copy of the model from that
calibration and evaluates it. One JSON line per point is appended to
``<out>/points.jsonl`` as it finishes; a rerun skips finished points and
refuses a folder holding another configuration. Plans are saved under
``<out>/plans/``; a markdown table is written at the end.

    EIGENKV_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 python benchmarks/eval_compress.py \\
        --windows 16 --ratios 1.0,0.8,0.7,0.6,0.5 --modes pre,post --allots uniform,budget
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch

from benchmarks._common import PointRun
from eigenkv._atomic import atomic_write_text
from eigenkv.compress import EigenConfig, compress_model
from eigenkv.compress.calibrate import calibrate
from eigenkv.eval import kv_cache_bytes, load_model, load_windows, perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=16, help="Wikitext-2 test windows evaluated")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--calib-dataset", default="brown")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--ratios", default="1.0,0.8,0.7,0.6,0.5")
    parser.add_argument("--modes", default="pre,post")
    parser.add_argument("--allots", default="uniform,budget")
    parser.add_argument("--out", default=None, help="run folder (default results/compress_<model>_<windows>x<seq>)")
    args = parser.parse_args()
    out = Path(args.out or f"results/compress_{args.model}_{args.windows}x{args.seq_len}")
    run_config = vars(args) | {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    run = PointRun(out, run_config)
    done = run.done

    original, tokenizer = load_model(args.model)
    windows = load_windows("wikitext2", tokenizer, args.seq_len, count=args.windows)
    calib_windows = load_windows(args.calib_dataset, tokenizer, args.seq_len, count=args.calib_windows)
    fp16 = kv_cache_bytes(original)

    def record(row: dict) -> None:
        run.record(row)
        print(
            f"{row['label']:28s} ppl={row['ppl']:9.4f} kv={row['kv_gb_n2048']:.5f} GB ({row['fraction_of_fp16']:.3f})",
            flush=True,
        )

    if "baseline" not in done:
        result = perplexity(original, windows, desc="baseline")
        record(
            {
                "label": "baseline",
                "ppl": result.ppl,
                "kv_gb_n2048": fp16.gb,
                "fraction_of_fp16": 1.0,
                "tokens": result.tokens,
                "seconds": result.seconds,
                "windows": windows.describe(),
            }
        )
    ratios = [float(r) for r in args.ratios.split(",")]
    for mode in args.modes.split(","):
        calibration = None
        for allot in args.allots.split(","):
            for ratio in ratios:
                config = EigenConfig(target_ratio=ratio, rope_mode=mode, allot=allot)
                label = config.label()
                if label in done or (allot != "uniform" and ratio == 1.0):
                    continue
                if calibration is None:
                    calibration = calibrate(original, calib_windows, rotated=mode == "post")
                model = copy.deepcopy(original)
                start = time.perf_counter()
                plan = compress_model(model, calibration, config)
                compress_seconds = time.perf_counter() - start
                plan.save(out / "plans" / label, overwrite=True)
                result = perplexity(model, windows, desc=label)
                kv_bytes = kv_cache_bytes(model)
                record(
                    {
                        "label": label,
                        "config": config.to_dict(),
                        "ratio": plan.ratio,
                        "ranks": plan.ranks,
                        "layer_errors": plan.errors,
                        "ppl": result.ppl,
                        "kv_gb_n2048": kv_bytes.gb,
                        "fraction_of_fp16": kv_bytes.fraction_of(fp16),
                        "tokens": result.tokens,
                        "seconds": result.seconds,
                        "calibration": plan.calibration,
                        "compress_seconds": compress_seconds,
                        "windows": windows.describe(),
                    }
                )
                del model
    table = render_table(done, ratios, args.modes.split(","), args.allots.split(","))
    atomic_write_text(out / "table.md", table)
    print(table)


def render_table(rows: dict, ratios: list[float], modes: list[str], allots: list[str]) -> str:
    """Markdown: one row per ratio, one column per (mode, allotment); cells 'ppl (fraction of fp16 incl. bases)'."""
    base = rows["baseline"]
    columns = [(m, a) for m in modes for a in allots]
    lines = [
        f"baseline: ppl {base['ppl']:.3f}, {base['kv_gb_n2048']:.4f} GB at n = 2048",
        "",
        "| ratio | " + " | ".join(f"{m}-RoPE, {a}" for m, a in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for ratio in ratios:
        cells = []
        for mode, allot in columns:
            row = rows.get(EigenConfig(target_ratio=ratio, rope_mode=mode, allot=allot).label())
            if row is None and ratio == 1.0:
                row = rows.get(EigenConfig(target_ratio=ratio, rope_mode=mode, allot="uniform").label())
            cells.append("-" if row is None else f"{row['ppl']:.2f} ({row['fraction_of_fp16']:.3f})")
        lines.append(f"| {ratio:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
