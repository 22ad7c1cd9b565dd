"""Perplexity and KV size of the quantized cache over a grid of settings (issue 3's table).

For bits x group size x axes (per-token, KIVI-style) x rotation, evaluates the
model through ``QuantizedKVCache`` (every attention read of the past goes
through the cache) and records perplexity and the cache's bytes at n = 2048
(fp16 window, as the paper counts). One JSON line per point is appended to
``<out>/points.jsonl`` as it finishes; a rerun skips finished points. A
markdown table is written at the end.

    EIGENKV_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 python benchmarks/eval_kv_quant.py --windows 8
"""

from __future__ import annotations

import argparse
import itertools
import platform
from pathlib import Path

import torch

from benchmarks._common import PointRun
from eigenkv.io import atomic_write_text
from eigenkv.eval import kv_cache_bytes, load_model, load_windows, perplexity
from eigenkv.quant import KVQuantConfig, QuantizedKV

AXES = {"per-token": ("token", "token"), "KIVI": ("channel", "token")}


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
    run = PointRun(out, vars(args) | {"torch": torch.__version__, "machine": platform.machine()})
    done = run.done

    model, tokenizer = load_model(args.model)
    windows = load_windows("wikitext2", tokenizer, args.seq_len, count=args.windows)
    fp16 = kv_cache_bytes(model)
    settings = [("fp16", None)]
    for bits, group, (axes_name, (axis_k, axis_v)), rotate in itertools.product(
        [int(b) for b in args.bits.split(",")], [int(g) for g in args.groups.split(",")], AXES.items(), (False, True)
    ):
        cfg = KVQuantConfig(
            bits=bits, group_size=group, axis_k=axis_k, axis_v=axis_v, residual=args.residual, rotate=rotate
        )
        settings.append((f"{axes_name} {cfg.label()}", cfg))
    for label, cfg in settings:
        if label in done:
            continue
        if cfg is None:
            result = perplexity(model, windows, desc=label)
        else:
            with QuantizedKV(model, cfg) as kv:
                result = perplexity(model, windows, make_cache=kv.new_cache, desc=label)
        kv_bytes = kv_cache_bytes(model, quant=cfg)
        row = {
            "label": label,
            "config": None if cfg is None else cfg.to_dict(),
            "ppl": result.ppl,
            "kv_gb_n2048": kv_bytes.gb,
            "fraction_of_fp16": kv_bytes.fraction_of(fp16),
            "tokens": result.tokens,
            "seconds": result.seconds,
            "windows": windows.describe(),
        }
        run.record(row)
        print(
            f"{label:32s} ppl={result.ppl:9.4f} kv={kv_bytes.gb:.5f} GB ({kv_bytes.fraction_of(fp16):.3f})", flush=True
        )

    table = render_table(
        done, bits=[int(b) for b in args.bits.split(",")], groups=[int(g) for g in args.groups.split(",")]
    )
    atomic_write_text(out / "table.md", table)
    print(table)


def render_table(rows: dict, bits: list[int], groups: list[int], residual: int = 0) -> str:
    """Markdown: one row per (bits, group), one column per axes x rotation; cells 'ppl (GB, fraction)'."""
    fp16 = rows["fp16"]
    lines = [
        f"fp16: ppl {fp16['ppl']:.3f}, {fp16['kv_gb_n2048']:.4f} GB",
        "",
        "| bits | group | per-token | per-token + rotation | KIVI (keys per channel) | KIVI + rotation |",
        "|---|---|---|---|---|---|",
    ]
    for b in bits:
        for g in groups:
            cells = []
            for axes_name, (axis_k, axis_v) in AXES.items():
                for rotate in (False, True):
                    cfg = KVQuantConfig(
                        bits=b, group_size=g, axis_k=axis_k, axis_v=axis_v, residual=residual, rotate=rotate
                    )
                    r = rows.get(f"{axes_name} {cfg.label()}")
                    cells.append(
                        "-" if r is None else f"{r['ppl']:.2f} ({r['kv_gb_n2048']:.4f} GB, {r['fraction_of_fp16']:.3f})"
                    )
            lines.append(f"| {b} | {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
