"""The byte allotment against the uniform settings, from a finished curve run with ``--budgets``.

Reads ``points.jsonl`` and ``sensitivity.json`` of an ``eigenkv curve`` run
and writes ``allot_report.md`` into it:

- for every budget (fraction of the fp16 cache at n = 2048): the best point of
  each curve within it (quantization alone, rotated, the paper's and eigenkv's
  0.6x + quantization) and the allotted recipe, with the allotted one's margin
  over the best uniform point;
- the predicted loss increase against the measured one (``ln ppl - ln
  ppl_baseline``) over the allotted points, and over every candidate on the
  held-out text: Spearman and Pearson;
- how long the calibration and the sensitivity measurements took.

    PYTHONPATH=. python benchmarks/allot_report.py results/curve_smollm2-135m_wikitext2_8x2048_...
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks._common import pearson_r, spearman_rho
from eigenkv.io import atomic_write_text

UNIFORM = ("quant", "quant-rot", "paper-eigen0.6+quant", "eigenkv-eigen0.6+quant")


def best_within(rows: list[dict], method: str, budget_bytes: float) -> dict | None:
    within = [r for r in rows if r["method"] == method and r["kv_bytes_n2048"] <= budget_bytes]
    return min(within, key=lambda r: r["ppl"]) if within else None


def describe(row: dict | None, fp16: int) -> str:
    if row is None:
        return "-"
    name = "fp16" if row["bits"] is None else f"{row['bits']}b/g{row['group_size']}"
    return f"{row['ppl']:.2f} ({name}, {row['kv_bytes_n2048'] / fp16:.3f}x)"


def report(run: Path) -> str:
    rows = [json.loads(line) for line in (run / "points.jsonl").read_text().splitlines()]
    base = next(r for r in rows if r["method"] == "baseline")
    fp16 = base["kv_bytes_n2048"]
    allotted = sorted((r for r in rows if r["method"] == "allotted"), key=lambda r: r["budget"])
    methods = [m for m in UNIFORM if any(r["method"] == m for r in rows)]
    lines = [
        f"# Byte allotment vs uniform settings: {run.name}",
        "",
        f"baseline ppl {base['ppl']:.3f}; budgets are fractions of the fp16 cache at n = 2048 ({fp16} bytes)",
        "",
        "| budget | " + " | ".join(methods) + " | allotted | allotted - best uniform |",
        "|---|" + "---|" * (len(methods) + 2),
    ]
    for row in allotted:
        budget = row["budget"] * fp16
        best = [best_within(rows, m, budget) for m in methods]
        uniform = [b["ppl"] for b in best if b is not None]
        margin = f"{row['ppl'] - min(uniform):+.2f}" if uniform else "-"
        cells = [describe(b, fp16) for b in best]
        chosen = next(c for c in row["candidates"] if c["recipe"] == row["recipe"])["candidate"]
        mine = f"**{row['ppl']:.2f}** ({chosen}, {row['kv_bytes_n2048'] / fp16:.3f}x)"
        lines.append(f"| {row['budget']:g}x | " + " | ".join(cells) + f" | {mine} | {margin} |")
    measured = [math.log(r["ppl"] / base["ppl"]) for r in allotted]
    predicted = [r["predicted"] for r in allotted]
    lines += ["", "## Predicted vs measured loss increase", ""]
    lines += [
        "| budget | candidate | predicted | measured (chosen, evaluated text) | held-out NLL |",
        "|---|---|---|---|---|",
    ]
    pairs = []
    for row in allotted:
        for c in row["candidates"]:
            chosen = (c["recipe"] == row["recipe"]) and abs(c["predicted"] - row["predicted"]) < 1e-15
            kind = c["candidate"]
            value = f"{math.log(row['ppl'] / base['ppl']):.4f}" if chosen else ""
            nll = "" if c["held_out_nll"] is None else f"{c['held_out_nll']:.4f}"
            label = kind + (" (chosen)" if chosen else "")
            lines.append(f"| {row['budget']:g}x | {label} | {c['predicted']:.4f} | {value} | {nll} |")
            if c["held_out_nll"] is not None:
                pairs.append((c["predicted"], c["held_out_nll"]))
    if len(allotted) > 2:
        lines += [
            "",
            "chosen recipes, predicted vs measured on the evaluated text: "
            f"Spearman {spearman_rho(predicted, measured):.3f}, Pearson {pearson_r(predicted, measured):.3f} "
            f"({len(allotted)} budgets)",
        ]
    if len(pairs) > 2:
        xs, ys = zip(*pairs, strict=True)
        lines.append(
            f"every candidate, predicted vs held-out NLL: Spearman {spearman_rho(list(xs), list(ys)):.3f}, "
            f"Pearson {pearson_r(list(xs), list(ys)):.3f} ({len(pairs)} candidates)"
        )
    sens = json.loads((run / "sensitivity.json").read_text())
    calibration = sens.get("calibration_seconds", float("nan"))
    lines += [
        "",
        f"calibration {calibration:.0f} s + sensitivity {sens['seconds']:.0f} s ({sens['evaluations']} layer "
        f"measurements) = {calibration + sens['seconds']:.0f} s; each allotment solves in well under a second",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a curve run folder made with --budgets")
    args = parser.parse_args()
    text = report(args.run)
    atomic_write_text(args.run / "allot_report.md", text)
    print(text)


if __name__ == "__main__":
    main()
