"""Is the planner's proxy a perplexity predictor? Proxy loss vs measured perplexity over a curve's points.

Scores the recipe of every point of a finished curve run (``eigenkv curve``)
with the planner's proxy (next-token loss on held-out text, see
``eigenkv.eval.planner``; scores are kept in the planner run's ``proxy.jsonl``
and reused, under the planner's labels) and writes ``proxy_check.md`` and
``proxy_check.png`` into the planner run folder: Spearman and Pearson
correlation of the proxy NLL with the measured ``ln ppl``, and how often the
proxy orders two points as their perplexity does.

    EIGENKV_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/check_planner_proxy.py \\
        --planner-run results/planner/plan_smollm2-135m_... --curve-run results/curve_smollm2-135m_...
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks._common import pearson_r, spearman_rho
from eigenkv import ComponentQuantConfig, EigenConfig, Recipe
from eigenkv.eval.planner import PlannerConfig, PlannerExperiment, candidates, score_recipes
from eigenkv.eval.runs import RunFolder
from eigenkv.quant.config import base_config, quant_config_from_dict


def _recipe(row: dict) -> Recipe:
    """A curve point's recipe (rows written before recipes were recorded: rebuilt from their fields)."""
    if "recipe" in row:
        return Recipe.from_dict(row["recipe"])
    options = row.get("components") or None  # the options and the layers' counts at high precision
    fields = ComponentQuantConfig().to_dict()
    return Recipe(
        lowrank=None if row["eigen"] is None else EigenConfig.from_dict(row["eigen"]),
        components=options and ComponentQuantConfig(**{k: options[k] for k in fields}),
        kv=None if row["quant"] is None else base_config(quant_config_from_dict(row["quant"])),
    )


def _config(stored: dict) -> PlannerConfig:
    return PlannerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--planner-run", required=True, help="a planner run folder (holds config.json)")
    parser.add_argument("--curve-run", required=True, help="a finished curve run folder (holds points.jsonl)")
    args = parser.parse_args()

    planner_dir = Path(args.planner_run)
    config = _config(json.loads((planner_dir / "config.json").read_text()))
    # a run stored before a setting was added extends to this one (config.json gains the default)
    folder = RunFolder(planner_dir.parent, planner_dir.name, config.to_dict(), extends=lambda old: True)
    experiment = PlannerExperiment(config, folder)
    labels = {recipe: label for label, recipe in candidates(config).items()}  # the planner's names for its recipes
    own = EigenConfig.method(config.method, rope_mode=config.rope_mode)
    pairs = []
    for line in (Path(args.curve_run) / "points.jsonl").read_text().splitlines():
        row = json.loads(line)
        recipe = _recipe(row)
        if recipe == Recipe():  # the baseline
            continue
        low = recipe.lowrank
        if low is not None and low != own.with_ratio(low.target_ratio):
            continue  # the planner compresses with its own method only
        pairs.append((labels.get(recipe, recipe.label()), recipe, row))
    scores = score_recipes(experiment, {label: recipe for label, recipe, _ in pairs}, "proxy", print)
    proxy = [scores[label]["nll"] for label, _, _ in pairs]
    measured = [math.log(r["ppl"]) for _, _, r in pairs]
    spearman = spearman_rho(proxy, measured)
    pearson = pearson_r(proxy, measured)
    agree = total = 0
    for i in range(len(pairs)):
        for j in range(i + 1, len(pairs)):
            total += 1
            agree += (proxy[i] - proxy[j]) * (measured[i] - measured[j]) > 0
    text = config.dataset if config.proxy == "evaluated" else config.calib_dataset
    lines = [
        f"proxy ({config.proxy_windows} x {config.proxy_seq_len} held-out tokens of {text}) vs measured "
        f"ln ppl ({args.curve_run}): {len(pairs)} points",
        "",
        f"Spearman {spearman:.3f}, Pearson {pearson:.3f}; pairs ordered alike {agree}/{total} ({agree / total:.1%})",
        "",
        "| point | proxy NLL | measured ppl |",
        "|---|---|---|",
    ]
    ordered = sorted(zip(pairs, proxy, strict=True), key=lambda t: t[1])
    lines += [f"| {label} | {p:.4f} | {r['ppl']:.2f} |" for (label, _, r), p in ordered]
    (folder.path / "proxy_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:3]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(proxy, measured, s=12)
    ax.set_xlabel(f"proxy NLL (held-out {text} text)")
    ax.set_ylabel("ln perplexity (evaluated windows)")
    ax.set_title(f"planner proxy: Spearman {spearman:.3f}, Pearson {pearson:.3f}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder.path / "proxy_check.png", dpi=120)


if __name__ == "__main__":
    main()
