"""Weights + KV memory: bitsandbytes weight quantization composed with a compressed, quantized KV cache.

Evaluates every (weights, KV) pair on the first windows of Wikitext-2 and
writes ``points.jsonl`` (one row per pair, resumable), ``table.md`` and
``table.csv``: perplexity, weight bytes as held, weight bytes with the
unquantized tensors (embeddings, norms) in fp16 as a deployment holds them,
KV bytes at n = 2048 (batch 1) and the total.

    EIGENKV_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/eval_weights_kv.py \\
        --plan results/plans/eigenkv-eigen0.6 --windows 3 --out results/weights_kv
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from benchmarks._common import PointRun, device_name, write_csv

WEIGHTS = ("fp32", "int8", "nf4")


def kv_settings(plan_dir: str | None, components: str) -> dict:
    """name -> (plan folder or None, KVQuantConfig or None, component spec or None)."""
    from eigenkv.quant import KVQuantConfig

    settings = {
        "fp16 KV": (None, None, None),
        "quant 4b/g64": (None, KVQuantConfig(bits=4, group_size=64), None),
    }
    if plan_dir:
        settings["eigen 0.6 4b/g128"] = (plan_dir, KVQuantConfig(bits=4, group_size=128), None)
        if components:
            settings[f"eigen 0.6+{components} 3b/g64"] = (plan_dir, KVQuantConfig(bits=3, group_size=64), components)
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

    from eigenkv.compress import EigenPlan, apply_plan
    from eigenkv.compress.components import ComponentQuantConfig, prepare_components
    from eigenkv.eval import kv_cache_bytes, load_model, load_windows, perplexity
    from eigenkv.quant import QuantizedKV
    from eigenkv.quant.weights import quantize_weights, weight_bytes

    settings = kv_settings(args.plan, args.components)
    formats = args.weights.split(",")
    run = PointRun(Path(args.out), {**vars(args), "device": device_name()})
    original, tokenizer = load_model(args.model, dtype=torch.float32)
    windows = load_windows("wikitext2", tokenizer, args.seq_len, count=args.windows)
    for kv_name, (plan_dir, quant, spec) in settings.items():
        for fmt in formats:
            label = f"{fmt} weights, {kv_name}"
            if label in run.done:
                continue
            model = copy.deepcopy(original)
            if plan_dir is not None:
                plan = EigenPlan.load(plan_dir)
                if spec:
                    plan, quant = prepare_components(plan, ComponentQuantConfig.parse(spec), quant)
                apply_plan(model, plan)
            half = copy.deepcopy(model).half()  # what a deployment holds: unquantized tensors in fp16
            if fmt != "fp32":
                quantize_weights(model, fmt)
                quantize_weights(half, fmt)
            start = time.perf_counter()
            if quant is None:
                result = perplexity(model, windows, desc=label)
            else:
                with QuantizedKV(model, quant) as kv:
                    result = perplexity(model, windows, desc=label, make_cache=kv.new_cache)
            kv_bytes = kv_cache_bytes(model, seq_len=2048, batch_size=1, quant=quant).total
            row = {
                "label": label,
                "weights": fmt,
                "kv": kv_name,
                "ppl": result.ppl,
                "weight_bytes": weight_bytes(model),
                "weight_bytes_fp16_rest": weight_bytes(half),
                "kv_bytes_n2048": kv_bytes,
                "total_bytes_fp16_rest": weight_bytes(half) + kv_bytes,
                "seconds": time.perf_counter() - start,
                "windows": windows.describe(),
                "device": device_name(),
            }
            run.record(row)
            print(f"{label:45s} ppl {result.ppl:8.3f}  weights {row['weight_bytes'] / 2**30:.4f} GB", flush=True)
    rows = list(run.done.values())
    write_csv([{k: v for k, v in r.items() if k != "windows"} for r in rows], run.out / "table.csv")
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
    (run.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
