"""Perplexity and KV size of the quantized cache over a grid of settings (issue 3's table).

For bits x group size x axes (per-token, KIVI-style) x rotation, measures the
recipe ``Recipe(kv=KVQuantConfig(...))`` (every attention read of the past goes
through the quantized cache) and records perplexity and the cache's bytes at
n = 2048 (fp16 window, as the paper counts). The run folder (``eigenkv.eval.runs``)
holds ``config.json`` and ``points.jsonl``, one row per point with its recipe,
appended as it finishes; a rerun skips finished points. A markdown table is
written at the end.

    EIGENKV_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/eval_kv_quant.py --windows 8
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from benchmarks._common import run_folder
from eigenkv import KVQuantConfig, Recipe
from eigenkv.eval.runs import Experiment, Texts
from eigenkv.io import atomic_write_text

AXES = {"per-token": ("token", "token"), "KIVI": ("channel", "token")}


def settings(bits: list[int], groups: list[int], residual: int) -> dict[str, Recipe]:
    """label -> recipe of every point, fp16 first."""
    points = {"fp16": Recipe()}
    for b, g, (axes, (axis_k, axis_v)), rotate in itertools.product(bits, groups, AXES.items(), (False, True)):
        kv = KVQuantConfig(bits=b, group_size=g, axis_k=axis_k, axis_v=axis_v, residual=residual, rotate=rotate)
        points[f"{axes} {kv.label()}"] = Recipe(kv=kv)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--bits", default="8,4,3,2")
    parser.add_argument("--groups", default="128,64,32")
    parser.add_argument("--residual", type=int, default=0)
    parser.add_argument("--out", default=None, help="run folder (default results/kv_quant_<model>_<windows>x<seq>)")
    args = parser.parse_args()
    out = Path(args.out or f"results/kv_quant_{args.model}_{args.windows}x{args.seq_len}")
    bits, groups = [int(b) for b in args.bits.split(",")], [int(g) for g in args.groups.split(",")]
    folder = run_folder(out, args)
    experiment = Experiment(folder, args.model, Texts(windows=args.windows, seq_len=args.seq_len))

    done = folder.records("points.jsonl")
    for label, recipe in settings(bits, groups, args.residual).items():
        if label in done:
            continue
        row = {"label": label, "config": recipe.kv and recipe.kv.to_dict(), **experiment.measure(recipe, desc=label)}
        row["fraction_of_fp16"] = row["kv_gb_n2048"] / done.get("fp16", row)["kv_gb_n2048"]
        folder.append("points.jsonl", row)
        done[label] = row
        print(f"{label:32s} ppl={row['ppl']:9.4f} kv={row['kv_gb_n2048']:.5f} GB ({row['fraction_of_fp16']:.3f})")

    table = render_table(done, bits, groups, args.residual)
    atomic_write_text(out / "table.md", table)
    print(table)


def render_table(rows: dict, bits: list[int], groups: list[int], residual: int = 0) -> str:
    """Markdown: one row per (bits, group), one column per axes x rotation; cells 'ppl (GB, fraction)'."""
    fp16 = rows["fp16"]
    points = settings(bits, groups, residual)
    lines = [
        f"fp16: ppl {fp16['ppl']:.3f}, {fp16['kv_gb_n2048']:.4f} GB",
        "",
        "| bits | group | per-token | per-token + rotation | KIVI (keys per channel) | KIVI + rotation |",
        "|---|---|---|---|---|---|",
    ]
    for b, g in itertools.product(bits, groups):
        cells = []
        for label, recipe in points.items():
            if recipe.kv is None or (recipe.kv.bits, recipe.kv.group_size) != (b, g):
                continue
            r = rows.get(label)
            cells.append(
                "-" if r is None else f"{r['ppl']:.2f} ({r['kv_gb_n2048']:.4f} GB, {r['fraction_of_fp16']:.3f})"
            )
        lines.append(f"| {b} | {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
