"""Wall time of a perplexity pass through a quantized cache, against the plain forward of the same model.

A perplexity window through ``QuantizedKV`` runs one multi-token forward whose
attention reads the cache causally (query ``p`` sees keys quantized as the cache
holds them after ``p + 1`` tokens, see ``eigenkv.quant.cache``). This measures
what that costs on SmolLM2-135M (float32), for:

- ``plain``: the model, no cache (``perplexity(model, windows)``);
- ``quant``: the model through the quantized cache, ``Recipe(kv=...)``
  (default: 4 bits, group 64, keys per channel, values per token);
- ``compressed``: the model compressed with Eigen Attention (``--method``, 0.6x),
  no cache;
- ``compressed+quant``: the compressed model through the quantized cache
  (``Recipe(lowrank=..., kv=...)``, the same plan).

The ratio of ``quant`` is to ``plain``, that of ``compressed+quant`` to
``compressed``. Settings are timed in turn, ``--repeats`` rounds after one
warm-up round; each time is the median of its rounds. Writes
``benchmarks/results/ppl_overhead_<cpu>.csv`` (``_versions`` with ``--attention versions``,
the reference path that attends to every version of every key). Timings on a
machine shared with other jobs are noise: every extra parallel region waits for
a descheduled thread.

    EIGENKV_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
        PYTHONPATH=. python benchmarks/bench_ppl_overhead.py [--windows 1] [--repeats 3] [--threads 2] \\
        [--attention versions]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks._common import RESULTS, device_slug, write_csv
from eigenkv import EigenConfig, KVQuantConfig, Recipe, apply_recipe, load_model, load_windows, perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=1, help="Wikitext-2 test windows per pass")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--calib-windows", type=int, default=2, help="Brown windows for the compression")
    parser.add_argument("--method", default="paper", choices=("paper", "eigenkv"))
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--attention",
        default="banded",
        choices=("banded", "versions"),
        help="the causal quantized view: block by block (banded_attention), or the reference over all versions "
        "of all keys (versions_attention, what eigenkv did before), to time both on the same machine",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention == "versions":
        from eigenkv.quant import cache

        cache.banded_attention = lambda query, key, value, mask, scaling: cache.versions_attention(
            query, key, value, mask, scaling
        )

    model, tokenizer = load_model(args.model, torch.float32)
    windows = load_windows("wikitext2", tokenizer, args.seq_len, count=args.windows)
    calib = load_windows("brown", tokenizer, args.seq_len, count=args.calib_windows)
    lowrank = EigenConfig.method(args.method, target_ratio=args.ratio)
    quant = KVQuantConfig(bits=args.bits, group_size=args.group_size)
    start = time.perf_counter()
    compressed = apply_recipe(copy.deepcopy(model), Recipe(lowrank=lowrank), calib, progress=False)
    print(f"compressed ({args.method}, {args.ratio}) in {time.perf_counter() - start:.1f}s")
    both = apply_recipe(copy.deepcopy(model), Recipe(lowrank=lowrank, kv=quant), plan=compressed.plan, progress=False)

    def run(m) -> tuple[float, float]:
        result = perplexity(m, windows, progress=False)
        return result.seconds, result.ppl

    settings = {  # each a recipe applied (CompressedModel), or the model as loaded
        "plain": model,
        f"quant-{quant.label()}": apply_recipe(model, Recipe(kv=quant)),
        f"compressed-{args.method}{args.ratio:g}": compressed,
        f"compressed-{args.method}{args.ratio:g}+quant-{quant.label()}": both,
    }
    names = list(settings)
    baseline = dict(zip(names, (names[0], names[0], names[2], names[2]), strict=True))
    times: dict[str, list[float]] = {name: [] for name in settings}
    ppl: dict[str, float] = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, m in settings.items():
            seconds, ppl[name] = run(m)
            if round_:
                times[name].append(seconds)
        if round_:
            print(f"round {round_}: " + ", ".join(f"{n}={times[n][-1]:.2f}s" for n in settings))

    machine = f"{platform.processor() or platform.machine()} ({platform.node()})"
    rows = []
    for name in settings:
        seconds = statistics.median(times[name])
        rows.append(
            {
                "setting": name,
                "seconds": round(seconds, 3),
                "ratio_to_plain_same_model": round(seconds / statistics.median(times[baseline[name]]), 3),
                "ppl": round(ppl[name], 4),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine": machine,
            }
        )
    width = max(len(r["setting"]) for r in rows)
    print(f"{'setting':<{width}}  seconds  ratio      ppl")
    for r in rows:
        print(f"{r['setting']:<{width}}  {r['seconds']:7.2f}  {r['ratio_to_plain_same_model']:5.2f}  {r['ppl']:7.3f}")
    suffix = "" if args.attention == "banded" else f"_{args.attention}"
    path = Path(args.out) if args.out else RESULTS / f"ppl_overhead_{device_slug()}{suffix}.csv"
    print(f"wrote {write_csv(rows, path)}")


if __name__ == "__main__":
    main()
