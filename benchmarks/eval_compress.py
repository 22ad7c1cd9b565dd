"""Perplexity of Eigen Attention at several KV ratios, RoPE modes, bases and allotments.

Every point is a ``Recipe(lowrank=EigenConfig(...))`` measured through the
shared experiment (``eigenkv.eval.runs``): one calibration per RoPE mode (the
statistics do not depend on the ratio) serves every plan, each plan is saved
under ``<out>/plans/`` and reused by a rerun. One JSON line per point (with its
recipe) is appended to ``<out>/points.jsonl`` as it finishes; a rerun skips
finished points and refuses a folder holding another configuration. A markdown
table is written at the end.

    EIGENKV_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/eval_compress.py \\
        --windows 8 --ratios 0.8,0.7,0.6,0.5 --modes pre,post --bases pca,output --allots uniform,budget,fisher

Each Eigen row also records the Fisher proxy's predicted loss increase for
its ranks (``predicted_nll_increase``), to check the proxy against perplexity.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from benchmarks._common import run_folder
from eigenkv import EigenConfig, Recipe
from eigenkv.eval.runs import Experiment, Texts
from eigenkv.io import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=16, help="Wikitext-2 test windows evaluated")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--calib-dataset", default="brown")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--ratios", default="1.0,0.8,0.7,0.6,0.5")
    parser.add_argument("--modes", default="pre,post")
    parser.add_argument("--bases", default="pca,output")
    parser.add_argument("--allots", default="uniform,budget,fisher")
    parser.add_argument("--out", default=None, help="run folder (default results/compress_<model>_<windows>x<seq>)")
    args = parser.parse_args()
    out = Path(args.out or f"results/compress_{args.model}_{args.windows}x{args.seq_len}")
    folder = run_folder(out, args)
    texts = Texts(
        windows=args.windows, seq_len=args.seq_len, calib_dataset=args.calib_dataset, calib_windows=args.calib_windows
    )
    experiment = Experiment(folder, args.model, texts)
    done = folder.records("points.jsonl")

    def record(row: dict) -> None:
        row["fraction_of_fp16"] = row["kv_gb_n2048"] / done.get("baseline", row)["kv_gb_n2048"]
        folder.append("points.jsonl", row)
        done[row["label"]] = row
        print(
            f"{row['label']:28s} ppl={row['ppl']:9.4f} kv={row['kv_gb_n2048']:.5f} GB ({row['fraction_of_fp16']:.3f})"
        )

    if "baseline" not in done:
        record({"label": "baseline", **experiment.measure(Recipe(), desc="baseline")})
    ratios = [float(r) for r in args.ratios.split(",")]
    columns = [(m, b, a) for m in args.modes.split(",") for b in args.bases.split(",") for a in args.allots.split(",")]
    for mode, basis, allot in columns:
        for ratio in ratios:
            config = EigenConfig(target_ratio=ratio, rope_mode=mode, basis=basis, allot=allot)
            label = config.label()
            if label in done or (allot != "uniform" and ratio == 1.0):
                continue
            start = time.perf_counter()
            plan = experiment.plan(config)  # saved in <out>/plans/<label>; the first of a mode also calibrates
            plan_seconds = time.perf_counter() - start
            if ratio == 0.6:  # the rank-assignment figure beside the tables (plans/ is not committed)
                shutil.copyfile(folder.path / "plans" / label / "ranks.png", out / f"ranks_{label}.png")
            row = experiment.measure(Recipe(lowrank=config), desc=label)
            record(
                {
                    "label": label,
                    "config": config.to_dict(),
                    "ratio": plan.ratio,
                    "ranks": plan.ranks,
                    "layer_errors": plan.errors,
                    "predicted_nll_increase": plan.extra.get("predicted_nll_increase"),
                    **row,
                    "calibration": plan.calibration,
                    "compress_seconds": plan_seconds,
                }
            )
    table = render_table(done, ratios, columns)
    atomic_write_text(out / "table.md", table)
    print(table)
    check = proxy_check(done, out)
    atomic_write_text(out / "proxy.md", check)
    print(check)


def proxy_check(rows: dict, out: Path) -> str:
    """Markdown: the Fisher proxy's predicted loss increase against the measured one, for every plan
    whose (mode, basis) also has a Fisher-allotted plan (whose measured curves score it)."""
    import json
    import math

    base = math.log(rows["baseline"]["ppl"])
    curves, lines, pairs = {}, [], []
    for label, row in rows.items():
        extra_path = out / "plans" / label / "plan.json"
        if row.get("config", {}).get("allot") == "fisher" and extra_path.exists():
            c = row["config"]
            curves[(c["rope_mode"], c["basis"])] = json.loads(extra_path.read_text())["extra"]["sensitivity"]
    lines += [
        "| plan | ratio | predicted loss increase | measured (ln ppl - ln baseline) |",
        "|---|---|---|---|",
    ]
    for label, row in sorted(rows.items()):
        c = row.get("config")
        if c is None or (c["rope_mode"], c["basis"]) not in curves:
            continue
        sens = curves[(c["rope_mode"], c["basis"])]
        predicted = sum(sens["keys"][i][rk] + sens["values"][i][rv] for i, (rk, rv) in enumerate(row["ranks"]))
        measured = math.log(row["ppl"]) - base
        pairs.append((predicted, measured))
        lines.append(f"| {label} | {row['ratio']:.3f} | {predicted:.4f} | {measured:.4f} |")
    if len(pairs) >= 3:
        import numpy as np

        x, y = np.array(pairs).T
        pearson = float(np.corrcoef(x, y)[0, 1])
        spearman = float(np.corrcoef(x.argsort().argsort(), y.argsort().argsort())[0, 1])
        lines += ["", f"Spearman {spearman:.3f}, Pearson {pearson:.3f} over {len(pairs)} plans"]
        _plot_proxy(x, y, out / "proxy.png", f"{out.name}: Spearman {spearman:.3f}, Pearson {pearson:.3f}")
    return "\n".join(lines) + "\n"


def _plot_proxy(predicted, measured, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.scatter(predicted, measured, s=18)
    top = float(max(predicted.max(), measured.max())) * 1.05
    ax.plot([0, top], [0, top], color="gray", lw=0.8, ls="--", label="measured = predicted")
    ax.set_xlabel("predicted loss increase (sum of Fisher curves)")
    ax.set_ylabel("measured ln(ppl) - ln(baseline ppl)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_table(rows: dict, ratios: list[float], columns: list[tuple[str, str, str]]) -> str:
    """Markdown: a row per ratio, a column per (mode, basis, allotment); cells "ppl (fraction of fp16 with bases)"."""
    base = rows["baseline"]
    lines = [
        f"baseline: ppl {base['ppl']:.3f}, {base['kv_gb_n2048']:.4f} GB at n = 2048",
        "",
        "| ratio | " + " | ".join(f"{m}-RoPE, {b}, {a}" for m, b, a in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for ratio in ratios:
        cells = []
        for mode, basis, allot in columns:
            row = rows.get(EigenConfig(target_ratio=ratio, rope_mode=mode, basis=basis, allot=allot).label())
            if row is None and ratio == 1.0:
                row = rows.get(EigenConfig(target_ratio=ratio, rope_mode=mode, basis=basis, allot="uniform").label())
            cells.append("-" if row is None else f"{row['ppl']:.2f} ({row['fraction_of_fp16']:.3f})")
        lines.append(f"| {ratio:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
