"""Compare eigenkv's QuantizedKVCache with transformers' QuantizedCache (quanto backend).

Two measurements on the default model:

1. "one forward": perplexity of 2048-token windows evaluated in one forward
   each, the cache passed as ``past_key_values`` (how a prompt is prefilled,
   and how a perplexity evaluation runs).
2. "token by token": the NLL of the first ``--decode-tokens`` tokens of window
   0, fed one token per forward through the cache (how generation reads it).

eigenkv's side is the recipe ``Recipe(kv=KVQuantConfig(...))`` applied with
``apply_recipe`` (the same model and windows as transformers' caches). The run
folder (``eigenkv.eval.runs``) holds ``config.json`` and ``table.md``.

Needs ``pip install optimum-quanto`` (an optional test dependency).

    EIGENKV_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/compare_hf_quantized_cache.py
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache, QuantizedCache

from benchmarks._common import run_folder
from eigenkv import KVQuantConfig, Recipe, perplexity
from eigenkv.eval.runs import Experiment, Texts
from eigenkv.io import atomic_write_text


@torch.no_grad()
def stepwise_ppl(model, ids: torch.Tensor, cache) -> float:
    nll = 0.0
    for t in range(ids.shape[1] - 1):
        logits = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1].float()
        nll += F.cross_entropy(logits, ids[:, t + 1]).item()
    return math.exp(nll / (ids.shape[1] - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=512)
    parser.add_argument("--residual", type=int, default=128, help="full-precision window of both caches")
    parser.add_argument("--bits", default="4,2")
    parser.add_argument("--groups", default="64")
    parser.add_argument("--out", default="results/compare_hf_quantized_cache")
    args = parser.parse_args()
    out = Path(args.out)
    folder = run_folder(out, args)
    experiment = Experiment(folder, args.model, Texts(windows=args.windows, seq_len=args.seq_len), progress=False)
    model, windows = experiment.original, experiment.evaluated
    decode_ids = windows.input_ids[:1, : args.decode_tokens]

    rows = [
        {
            "cache": "transformers DynamicCache (unquantized)",
            "one_forward_ppl": perplexity(model, windows, progress=False).ppl,
            "token_by_token_ppl": stepwise_ppl(model, decode_ids, DynamicCache(config=model.config)),
        }
    ]
    for bits in [int(b) for b in args.bits.split(",")]:
        for group in [int(g) for g in args.groups.split(",")]:

            def hf_cache(bits=bits, group=group):
                return QuantizedCache(
                    "quanto", model.config, nbits=bits, q_group_size=group, residual_length=args.residual
                )

            rows.append(
                {
                    "cache": f"transformers QuantizedCache quanto {bits}-bit g{group} residual {args.residual}",
                    "one_forward_ppl": perplexity(model, windows, progress=False, make_cache=hf_cache).ppl,
                    "token_by_token_ppl": stepwise_ppl(model, decode_ids, hf_cache()),
                }
            )
            recipe = Recipe(kv=KVQuantConfig(bits=bits, group_size=group, residual=args.residual))
            compressed = experiment.apply(recipe)
            one_forward = perplexity(compressed, windows, progress=False).ppl
            with compressed:  # attention reads the quantized cache
                token_by_token = stepwise_ppl(compressed.model, decode_ids, compressed.new_cache())
            rows.append(
                {
                    "cache": f"eigenkv QuantizedKVCache {recipe.kv.label()}",
                    "recipe": recipe.to_dict(),
                    "one_forward_ppl": one_forward,
                    "token_by_token_ppl": token_by_token,
                }
            )
            print(json.dumps(rows[-2:]), flush=True)
    lines = [
        f"| cache | one forward, {args.windows}x{args.seq_len} ppl | token by token, {args.decode_tokens} tokens ppl |",
        "|---|---|---|",
    ]
    lines += [f"| {r['cache']} | {r['one_forward_ppl']:.3f} | {r['token_by_token_ppl']:.3f} |" for r in rows]
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
