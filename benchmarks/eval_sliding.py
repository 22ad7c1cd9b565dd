"""Real weights in a sliding-window architecture: perplexity and KV bytes of low rank and quantization there.

No pretrained sliding-window model (Mistral, Gemma-2/3) is available offline, so this takes SmolLM2-135M's
trained weights into transformers' Mistral architecture, whose parameters are Llama's one for one, with every
layer attending a sliding window of ``--window`` tokens. The sliding model is not the trained one (it never saw
a window), so its fp16 perplexity is the baseline the other points are compared with; the full-attention model
is listed for reference. Each point is a :class:`~eigenkv.Recipe` applied to a fresh copy (Eigen Attention
pre-RoPE and post-RoPE, a 2-bit cache, both); perplexity on Wikitext-2, bytes by the accounting at ``n =
--seq-len`` (sliding layers hold their window). The run folder gets ``config.json`` and ``points.jsonl``
(one row per point, appended as it finishes; a rerun skips finished points) and ``points.md``.

    EIGENKV_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/eval_sliding.py --windows 4
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import eigenkv
from benchmarks._common import run_folder
from eigenkv import EigenConfig, KVQuantConfig, Recipe
from eigenkv.io import atomic_write_text


def as_mistral(llama, window: int):
    """``llama`` (a ``LlamaForCausalLM`` without qkv biases) as a ``MistralForCausalLM`` with the same weights,
    every layer attending the last ``window`` tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    c = llama.config
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("Mistral's layers have no biases; this Llama has some")
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
             "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters")  # fmt: skip
    config = MistralConfig(**{name: getattr(c, name) for name in names if hasattr(c, name)}, sliding_window=window)
    model = MistralForCausalLM(config).to(llama.dtype).eval()
    model.load_state_dict(llama.state_dict(), strict=True)
    return model


def points(bits: int, group: int, ratio: float) -> dict[str, Recipe]:
    kv = KVQuantConfig(bits=bits, group_size=group)
    return {
        "fp16": Recipe(),
        f"{kv.label()}": Recipe(kv=kv),
        f"eigen{ratio}-pre": Recipe(lowrank=EigenConfig(target_ratio=ratio, rope_mode="pre")),
        f"eigen{ratio}-post": Recipe(lowrank=EigenConfig(target_ratio=ratio, rope_mode="post")),
        f"eigen{ratio}-pre + {kv.label()}": Recipe(lowrank=EigenConfig(target_ratio=ratio, rope_mode="pre"), kv=kv),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a Llama-architecture model without biases")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4, help="evaluated Wikitext-2 windows")
    parser.add_argument("--calib-windows", type=int, default=8, help="calibration windows (Brown corpus)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or f"results/sliding_{args.model}_w{args.window}_{args.windows}x{args.seq_len}")
    folder = run_folder(out, args)
    torch.manual_seed(0)
    llama, tokenizer = eigenkv.load_model(args.model)
    evaluated = eigenkv.load_windows("wikitext2", tokenizer, seq_len=args.seq_len, count=args.windows)
    calibration = eigenkv.load_windows("brown", tokenizer, seq_len=args.seq_len, count=args.calib_windows)
    sliding = as_mistral(llama, args.window)

    done = folder.records("points.jsonl")
    rows = [("full attention (Llama) fp16", llama, Recipe())]
    for label, recipe in points(args.bits, args.group, args.ratio).items():
        rows.append((f"sliding {args.window}: {label}", sliding, recipe))
    plans = {}  # a low-rank plan per EigenConfig: the combined point reuses the pre-RoPE one
    for label, base, recipe in rows:
        if label in done:
            continue
        model = copy.deepcopy(base)
        key = recipe.lowrank and recipe.lowrank.label()
        compressed = eigenkv.apply_recipe(
            model, recipe, calibration if recipe.lowrank and key not in plans else None, plan=plans.get(key)
        )
        plans[key] = compressed.plan
        result = eigenkv.perplexity(compressed, evaluated, desc=label)
        counted = eigenkv.kv_cache_bytes(model, seq_len=args.seq_len, quant=compressed.cache_config)
        row = {"label": label, "recipe": recipe.to_dict(), "ppl": result.ppl, "kv_bytes": counted.total}
        folder.append("points.jsonl", row)
        done[label] = row
        print(f"{label:44s} ppl={row['ppl']:9.4f} kv={row['kv_bytes']:>10,d} B", flush=True)

    lines = [f"# {args.model} weights in Mistral's architecture, sliding window {args.window}", "",
             f"Wikitext-2, {args.windows} x {args.seq_len} tokens; KV bytes at n = {args.seq_len}, batch 1 "
             "(fp16 window, as the paper counts; sliding layers hold their window). Made by "
             "`benchmarks/eval_sliding.py` (its config beside this file).", "",
             "| point | perplexity | KV bytes | of sliding fp16 |", "|---|---|---|---|"]  # fmt: skip
    reference = done[f"sliding {args.window}: fp16"]["kv_bytes"]
    for label, _, _ in rows:
        r = done[label]
        lines.append(f"| {label} | {r['ppl']:.3f} | {r['kv_bytes']:,} | {r['kv_bytes'] / reference:.3f} |")
    atomic_write_text(folder.path / "points.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
