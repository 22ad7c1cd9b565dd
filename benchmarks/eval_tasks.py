"""Task accuracy (lm-evaluation-harness) of the baseline, the quantized cache, 0.6x and 0.6x + quantization.

For each recipe, runs the tasks through ``eigenkv.eval.tasks.evaluate_tasks``
(every forward through the compressed model and its quantized cache) and
writes, into one run folder (``eigenkv.eval.runs``): ``config.json``,
``<recipe label>/`` with lm-eval's ``results.json`` and the recipe, one row per
task and metric appended to ``points.jsonl`` as each recipe finishes (a rerun
skips finished recipes), and ``tasks.md`` / ``tasks.csv`` at the end. The
default tasks are eigenkv's offline Wikitext-2 tasks (``eigenkv.eval.text_tasks``);
``--tasks hellaswag,arc_easy`` runs hub tasks where their data can be read.
Low-rank plans are calibrated on Brown (16 x 2048) and shared with the curves.

    EIGENKV_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/eval_tasks.py --documents 200
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

from benchmarks._common import run_folder
from eigenkv import EigenConfig, KVQuantConfig, Recipe, kv_cache_bytes
from eigenkv.eval.runs import Experiment, Texts, environment
from eigenkv.eval.tasks import TaskConfig, accuracy_rows, evaluate_tasks, save_task_results
from eigenkv.eval.text_tasks import TASKS as TEXT_TASKS
from eigenkv.eval.text_tasks import write_text_tasks
from eigenkv.io import atomic_write_text
from eigenkv.models import cache_dir


def recipes(bits: list[int], group: int, ratio: float) -> dict[str, Recipe]:
    """label -> recipe: the baseline, each quantized cache, ``ratio`` low rank, and low rank + each quantizer."""
    lowrank = EigenConfig.method("eigenkv", target_ratio=ratio)
    out = {"fp16": Recipe()}
    out |= {f"quant {b}b-g{group}": Recipe(kv=KVQuantConfig(bits=b, group_size=group)) for b in bits}
    out[f"eigenkv {ratio:g}x"] = Recipe(lowrank=lowrank)
    for b in bits:
        out[f"eigenkv {ratio:g}x + {b}b-g{group}"] = Recipe(lowrank=lowrank, kv=KVQuantConfig(bits=b, group_size=group))
    return out


def table(rows: list[dict]) -> tuple[str, str]:
    """``(markdown, csv)`` of the rows: one line per recipe, one column per task metric."""
    columns = sorted({(r["task"], r["metric"]) for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["task"], r["metric"]): r for r in rows}
    kv = {r["label"]: r["kv_fraction"] for r in rows}
    head = ["recipe", "KV / fp16"] + [f"{t} {m}" for t, m in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(head + [f"{t} {m} stderr" for t, m in columns])
    for label in labels:
        cells = [by[(label, t, m)] for t, m in columns]
        text = [f"{c['value']:.4f}" + ("" if c["stderr"] is None else f" ± {c['stderr']:.4f}") for c in cells]
        lines.append("| " + " | ".join([label, f"{kv[label]:.3f}"] + text) + " |")
        writer.writerow([label, f"{kv[label]:.4f}"] + [c["value"] for c in cells] + [c["stderr"] for c in cells])
    return "\n".join(lines) + "\n", buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default=",".join(TEXT_TASKS))
    parser.add_argument("--include-path", default=None, help="a folder of local task YAML files")
    parser.add_argument("--documents", type=int, default=200, help="documents per task")
    parser.add_argument("--bits", default="4,2", help="cache quantizers, alone and with low rank")
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=None, help="run folder (default results/tasks_<model>_<documents>docs)")
    args = parser.parse_args()
    out = Path(args.out or f"results/tasks_{args.model}_{args.documents}docs")
    folder = run_folder(out, args)
    experiment = Experiment(
        folder, args.model, Texts(windows=3), plans=cache_dir() / "plans", progress=False
    )  # calibration: Brown 16 x 2048, disjoint from Wikitext
    tasks = tuple(args.tasks.split(","))
    include = args.include_path
    if include is None and set(tasks) & set(TEXT_TASKS):
        include = folder.path / "text_tasks"
        write_text_tasks(include, documents=args.documents)
    config = TaskConfig(
        tasks=tasks,
        include_path=None if include is None else str(include),
        limit=args.documents,
        batch_size=args.batch_size,
    )
    done = folder.records("points.jsonl", key="label")
    fp16 = kv_cache_bytes(experiment.original, seq_len=2048)
    for label, recipe in recipes([int(b) for b in args.bits.split(",")], args.group, args.ratio).items():
        if label in done:
            continue
        start = time.perf_counter()
        compressed = experiment.apply(recipe)
        results = evaluate_tasks(compressed, experiment.tokenizer, config, progress=False)
        save_task_results(results, folder.path / label.replace(" ", "_"))
        kv = compressed.kv_bytes(seq_len=2048)
        row = {
            "label": label,
            "recipe": recipe.to_dict(),
            "rows": accuracy_rows(results),
            "kv_bytes_n2048": kv.total,
            "kv_fraction": kv.fraction_of(fp16),
            "seconds": time.perf_counter() - start,
            "environment": environment(),
        }
        folder.append("points.jsonl", row)
        print(f"{label}: " + ", ".join(f"{r['task']} {r['metric']} {r['value']:.4f}" for r in row["rows"]), flush=True)
    rows = [
        {"label": p["label"], "kv_fraction": p["kv_fraction"], **r}
        for p in folder.records("points.jsonl", key="label").values()
        for r in p["rows"]
    ]
    markdown, text = table(rows)
    atomic_write_text(folder.path / "tasks.md", markdown)
    atomic_write_text(folder.path / "tasks.csv", text)
    print(markdown)


if __name__ == "__main__":
    main()
