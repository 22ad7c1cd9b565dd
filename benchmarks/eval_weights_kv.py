"""Weights + KV memory: bitsandbytes weight quantization composed with a compressed, quantized KV cache.

Evaluates every (weights, KV) pair, each one ``Recipe`` (the saved plan's low
rank, components, KV quantizer, ``weights``) applied with ``apply_recipe``, on
the first windows of Wikitext-2 and writes ``points.jsonl`` (one row per pair
with its recipe, resumable), ``table.md`` and ``table.csv``: perplexity, weight
bytes as held, weight bytes with the unquantized tensors (embeddings, norms) in
fp16 as a deployment holds them, KV bytes at n = 2048 (batch 1) and the total.

    EIGENKV_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/eval_weights_kv.py \\
        --plan results/<curve run>/plans/eigen0.6-pre-output-fisher --windows 3 --out results/weights_kv
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from benchmarks._common import device_name, run_folder, write_csv
from eigenkv import ComponentQuantConfig, EigenPlan, KVQuantConfig, Recipe, apply_recipe, perplexity
from eigenkv.eval.runs import Experiment, Texts, environment
from eigenkv.quant.weights import weight_bytes

WEIGHTS = ("fp32", "int8", "nf4")
CSV_FIELDS = ["label", "weights", "kv", "ppl", "weight_bytes", "weight_bytes_fp16_rest", "kv_bytes_n2048"]
CSV_FIELDS += ["total_bytes_fp16_rest", "seconds", "device"]


def kv_settings(plan: EigenPlan | None, components: str) -> dict[str, Recipe]:
    """KV name -> recipe without weight quantization."""
    settings = {"fp16 KV": Recipe(), "quant 4b/g64": Recipe(kv=KVQuantConfig(bits=4, group_size=64))}
    if plan is not None:
        settings["eigen 0.6 4b/g128"] = Recipe(lowrank=plan.config, kv=KVQuantConfig(bits=4, group_size=128))
        if components:
            options = ComponentQuantConfig.parse(components)
            kv = KVQuantConfig(bits=3, group_size=64)
            settings[f"eigen 0.6+{components} 3b/g64"] = Recipe(lowrank=plan.config, components=options, kv=kv)
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plan", default=None, help="a saved compression plan of this model (eigenkv compress)")
    parser.add_argument("--components", default="", help="component variant for one more eigen row, e.g. scale")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--weights", default=",".join(WEIGHTS))
    parser.add_argument("--out", default="results/weights_kv")
    args = parser.parse_args()

    out = Path(args.out)
    folder = run_folder(out, args, device=device_name())
    experiment = Experiment(folder, args.model, Texts(windows=args.windows, seq_len=args.seq_len))
    plan = None if args.plan is None else EigenPlan.load(args.plan)
    done = folder.records("points.jsonl")
    for kv_name, kv_recipe in kv_settings(plan, args.components).items():
        for fmt in args.weights.split(","):
            label = f"{fmt} weights, {kv_name}"
            if label in done:
                continue
            recipe = kv_recipe.with_changes(weights=None if fmt == "fp32" else fmt)
            used = None if recipe.lowrank is None else plan
            start = time.perf_counter()
            compressed = apply_recipe(copy.deepcopy(experiment.original), recipe, plan=used, progress=False)
            result = perplexity(compressed, experiment.evaluated, desc=label)
            # what a deployment holds: the same recipe with the unquantized tensors in fp16
            half = apply_recipe(copy.deepcopy(experiment.original).half(), recipe, plan=used, progress=False)
            kv_bytes = compressed.kv_bytes(seq_len=2048, batch_size=1).total
            row = {
                "label": label,
                "weights": fmt,
                "kv": kv_name,
                "recipe": recipe.to_dict(),
                "ppl": result.ppl,
                "nll": result.nll,
                "weight_bytes": weight_bytes(compressed.model),
                "weight_bytes_fp16_rest": weight_bytes(half.model),
                "kv_bytes_n2048": kv_bytes,
                "total_bytes_fp16_rest": weight_bytes(half.model) + kv_bytes,
                "seconds": time.perf_counter() - start,
                "windows": experiment.evaluated.describe(),
                "device": device_name(),
                "environment": environment(),
            }
            folder.append("points.jsonl", row)
            done[label] = row
            print(f"{label:45s} ppl {result.ppl:8.3f}  weights {row['weight_bytes'] / 2**30:.4f} GB", flush=True)
    rows = list(done.values())
    write_csv([{k: r.get(k) for k in CSV_FIELDS} for r in rows], out / "table.csv")
    gb = 2**30
    lines = [
        f"{args.model}, {args.windows} x {args.seq_len} Wikitext-2 windows, {device_name()}. "
        "Weights: bytes of the state_dict as evaluated (fp32 compute) and with unquantized tensors in fp16; "
        "KV at n = 2048, batch 1 (codes, scales, zeros, windows, bases).",
        "",
        "| weights | KV cache | ppl | weights GB (fp32 rest) | weights GB (fp16 rest) | KV GB | total GB (fp16 rest) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["total_bytes_fp16_rest"], reverse=True):
        lines.append(
            f"| {r['weights']} | {r['kv']} | {r['ppl']:.2f} | {r['weight_bytes'] / gb:.4f} | "
            f"{r['weight_bytes_fp16_rest'] / gb:.4f} | {r['kv_bytes_n2048'] / gb:.5f} | "
            f"{r['total_bytes_fp16_rest'] / gb:.4f} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
