"""Is the planner's proxy a perplexity predictor? Proxy loss vs measured perplexity over a curve's points.

Scores every point of a finished curve run (``eigenkv curve``) with the
planner's proxy (next-token loss on held-out calibration-corpus text; scores
are kept in the planner run's ``proxy.jsonl`` and reused) and writes
``proxy_check.md`` and ``proxy_check.png`` into the planner run folder:
Spearman and Pearson correlation of the proxy NLL with the measured
``ln ppl``, and how often the proxy orders two points as their perplexity does.

    EIGENKV_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/check_planner_proxy.py \\
        --planner-run results/planner/plan_smollm2-135m_... --curve-run results/curve_smollm2-135m_...
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ranks = [0.0] * len(xs)
    for rank, i in enumerate(order):
        ranks[i] = float(rank)
    return ranks


def _pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return cov / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--planner-run", required=True, help="a planner run folder (holds config.json)")
    parser.add_argument("--curve-run", required=True, help="a finished curve run folder (holds points.jsonl)")
    args = parser.parse_args()

    from eigenkv.compress.components import ComponentQuantConfig
    from eigenkv.eval.curve import read_points
    from eigenkv.eval.planner import Candidate, PlannerConfig, open_run
    from eigenkv.quant.config import base_config, quant_config_from_dict

    planner_dir = Path(args.planner_run)
    stored = json.loads((planner_dir / "config.json").read_text())
    config = PlannerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
    run = open_run(config, planner_dir.parent)
    rows = [r for r in read_points(Path(args.curve_run)) if r["method"] != "baseline"]
    pairs = []
    for row in rows:
        if row["ratio"] is not None and not row["method"].startswith(config.method):
            continue  # the planner compresses with its own method only
        quant = None if row["quant"] is None else base_config(quant_config_from_dict(row["quant"]))
        spec = (
            "plain"
            if not row.get("components")
            else ComponentQuantConfig(
                **{k: row["components"][k] for k in ("scale", "rotate", "high_bits", "high_fraction", "seed")}
            ).label()
        )
        pairs.append((Candidate(row["ratio"] or 1.0, quant, spec), row))
    scores = run.scores([c for c, _ in pairs], "proxy")
    proxy = [scores[c.label]["nll"] for c, _ in pairs]
    measured = [math.log(r["ppl"]) for _, r in pairs]
    spearman = _pearson(_ranks(proxy), _ranks(measured))
    pearson = _pearson(proxy, measured)
    agree = total = 0
    for i in range(len(pairs)):
        for j in range(i + 1, len(pairs)):
            total += 1
            agree += (proxy[i] - proxy[j]) * (measured[i] - measured[j]) > 0
    lines = [
        f"proxy ({config.proxy_windows} x {config.proxy_seq_len} held-out tokens of "
        f"{config.dataset if config.proxy == 'evaluated' else config.calib_dataset}) vs measured "
        f"ln ppl ({args.curve_run}): {len(pairs)} points",
        "",
        f"Spearman {spearman:.3f}, Pearson {pearson:.3f}; pairs ordered alike {agree}/{total} ({agree / total:.1%})",
        "",
        "| point | proxy NLL | measured ppl |",
        "|---|---|---|",
    ]
    lines += [
        f"| {c.label} | {p:.4f} | {r['ppl']:.2f} |"
        for (c, r), p in sorted(zip(pairs, proxy, strict=True), key=lambda t: t[1])
    ]
    (run.out / "proxy_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:3]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(proxy, measured, s=12)
    ax.set_xlabel("proxy NLL (held-out calibration text)")
    ax.set_ylabel("ln perplexity (evaluated windows)")
    ax.set_title(f"planner proxy: Spearman {spearman:.3f}, Pearson {pearson:.3f}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run.out / "proxy_check.png", dpi=120)


if __name__ == "__main__":
    main()
