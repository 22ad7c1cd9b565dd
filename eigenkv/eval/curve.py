"""The paper's Figure 3: perplexity against KV-cache GB, quantization alone vs Eigen Attention + quantization.

``run_curve(CurveConfig(...))`` evaluates, for one model and text, one recipe per point:

- ``baseline``: the model as loaded (cache counted in fp16);
- ``quant``: the quantized cache alone over ``bits x groups`` (and ``quant-rot``
  with the Hadamard rotation, with ``quant_rotate``);
- ``<method>-eigen<r>``: Eigen Attention with each method (``paper``: PCA
  bases, uniform ranks; ``eigenkv``: output-aware bases, Fisher allotment) at
  each ratio ``r`` alone, then followed by the same quantization grid. One
  calibration (with loss gradients) serves every method and ratio.
- ``<method>-eigen<r>+<components>``: the same plans with their components
  prepared for quantization (``scale``, ``rot``, ``hi<bits>[x<fraction>]``)
  over the grid (grid points at or above the high precision are skipped).
- ``allotted``: one point per budget in ``budgets`` (fractions of the fp16
  cache at n = 2048): ranks and bits chosen per layer and kind by the byte
  allotment (``eigenkv.compress.budget``; options: bits {2, 3, 4, 8} x groups
  {32, 64, 128} and 16-bit, any rank), its candidates (with Eigen Attention,
  without, and without with Hadamard-rotated quantizers) compared on held-out
  text after the evaluated windows
  (``eigenkv.eval.planner.choose_allotted``). Each point saves its allotment
  (``allotment_<budget>x.json``) and its figure (``allotment_<budget>x.png``).

The defaults are the quick headline comparison (``make demo``);
``CurveConfig.full()`` is the complete grid. The run folder (named after the
settings, see ``eigenkv.eval.runs``) holds ``config.json`` (a rerun with other
settings is refused, except one that only adds component variants, which
extends the run), ``points.jsonl``/``points.csv`` (one row per point with its
recipe, appended as it finishes; a rerun skips finished points), the plans
(``plans/``, or reused from ``plans=``), ``curve.png``/``curve.svg`` and
``pareto.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from eigenkv.checks import require_choice, require_int
from eigenkv.compress.budget import BudgetConfig
from eigenkv.compress.components import ComponentQuantConfig
from eigenkv.compress.config import EigenConfig
from eigenkv.eval.planner import allotment_kind, choose_allotted
from eigenkv.eval.runs import Experiment, RunFolder, Texts
from eigenkv.io import atomic_write_json, atomic_write_text
from eigenkv.plots import plot_allotment, pyplot, save_figure
from eigenkv.quant.config import AXES, KVQuantConfig
from eigenkv.recipe import Recipe

QUICK_WINDOWS = 3
HELD_OUT = (2, 1024)  # windows x tokens (at most seq_len) after the evaluated ones: where allotted candidates compete
CSV_FIELDS = ["label", "method", "ratio", "bits", "group_size", "kv_gb_n2048", "ppl", "tokens", "seconds"]


@dataclass(frozen=True)
class CurveConfig:
    """Settings of one KV-GB vs perplexity sweep (saved as the run's ``config.json``).

    Attributes:
        windows: evaluated windows from the start of the split; None: all of them.
        bits, groups: the quantization grid (keys and values on ``axis_k``/``axis_v``).
        ratios: Eigen Attention KV ratios; each is evaluated alone and with the grid.
        methods: Eigen methods (``EigenConfig.method``), one curve each per ratio.
        components: component variants (``ComponentQuantConfig.parse`` specs), one
            more curve each per method and ratio.
        rope_mode: Eigen RoPE mode (see ``EigenConfig``).
        quant_rotate: also quantization alone with the Hadamard rotation.
        budgets: KV budgets (fractions of the fp16 cache at n = 2048) of the byte allotment's curve.
        calib_dataset, calib_windows: calibration text (disjoint from the evaluated text).
        dtype, bos: the model's dtype and the BOS policy of the windows.
    """

    model: str = "smollm2-135m"
    dataset: str = "wikitext2"
    windows: int | None = QUICK_WINDOWS
    seq_len: int = 2048
    bits: tuple[int, ...] = (4, 3, 2)
    groups: tuple[int, ...] = (32,)
    axis_k: str = "channel"
    axis_v: str = "token"
    ratios: tuple[float, ...] = (0.6,)
    methods: tuple[str, ...] = ("paper", "eigenkv")
    components: tuple[str, ...] = ("hi4x0.25",)
    rope_mode: str = "pre"
    quant_rotate: bool = False
    budgets: tuple[float, ...] = ()
    calib_dataset: str = "brown"
    calib_windows: int = 16
    dtype: str = "float32"
    bos: str = "none"

    def __post_init__(self):
        for name in ("bits", "groups", "ratios", "methods", "components", "budgets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.windows is not None:
            require_int("windows", self.windows, minimum=1)
        require_int("seq_len", self.seq_len, minimum=2)
        require_int("calib_windows", self.calib_windows, minimum=1)
        require_choice("axis_k", self.axis_k, AXES)
        require_choice("axis_v", self.axis_v, AXES)
        if not self.bits or not self.groups:
            raise ValueError("the quantization grid needs at least one bit width and one group size")
        if any(not 0 < b <= 1 for b in self.budgets):
            raise ValueError(f"budgets are fractions of the fp16 cache in (0, 1]; got {self.budgets}")
        if self.budgets and self.windows is None:
            raise ValueError("the allotted curve chooses on held-out text after the evaluated windows: set windows")
        self.points()  # validates every recipe of the sweep

    @classmethod
    def full(cls, **overrides) -> CurveConfig:
        """The complete grid: bits {8, 4, 3, 2} x groups {128, 64, 32}."""
        return cls(**{"bits": (8, 4, 3, 2), "groups": (128, 64, 32), **overrides})

    def run_name(self) -> str:
        windows = "all" if self.windows is None else self.windows
        name = Path(self.model).name
        ratios = "-".join(f"{r:g}" for r in self.ratios)
        methods = "+".join(self.methods)
        grid = "b" + "".join(map(str, self.bits)) + "-g" + "-".join(map(str, self.groups))
        return f"curve_{name}_{self.dataset}_{windows}x{self.seq_len}_{grid}_eigen{ratios}-{self.rope_mode}-{methods}"

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists, as read back from JSON

    def points(self) -> list[tuple[str, str, Recipe]]:
        """``(label, curve, recipe)`` of every point, baseline first."""
        grid = [
            KVQuantConfig(bits=b, group_size=g, axis_k=self.axis_k, axis_v=self.axis_v)
            for b in self.bits
            for g in self.groups
        ]
        points = [("baseline", "baseline", Recipe())]
        points += [(f"quant {q.label()}", "quant", Recipe(kv=q)) for q in grid]
        if self.quant_rotate:
            rotated = [replace(q, rotate=True) for q in grid]
            points += [(f"quant {q.label()}", "quant-rot", Recipe(kv=q)) for q in rotated]
        for method in self.methods:
            for ratio in self.ratios:
                lowrank = EigenConfig.method(method, target_ratio=ratio, rope_mode=self.rope_mode)
                name = f"{method}-eigen{ratio:g}"
                points.append((name, f"{name}+quant", Recipe(lowrank=lowrank)))
                points += [(f"{name} {q.label()}", f"{name}+quant", Recipe(lowrank=lowrank, kv=q)) for q in grid]
                for spec in self.components:
                    options = ComponentQuantConfig.parse(spec)
                    curve = f"{name}+{options.label()}"
                    points += [
                        (f"{curve} {q.label()}", curve, Recipe(lowrank=lowrank, components=options, kv=q))
                        for q in grid
                        if options.high_bits is None or options.high_bits > q.bits
                    ]
        return points

    def budget_config(self) -> BudgetConfig:
        """The byte allotment's options (the issue's full set; this grid's axes and RoPE mode)."""
        return BudgetConfig(axis_k=self.axis_k, axis_v=self.axis_v, rope_mode=self.rope_mode)

    def extends(self, stored: dict) -> bool:
        """Whether ``stored`` (a run's ``config.json``) is this sweep less some component variants, budgets or
        the rotated quantization (fields added later count as their defaults)."""
        mine = self.to_dict()
        added = {"components": [], "budgets": [], "quant_rotate": False}
        old = {**added, **stored}
        same = all(old.get(k) == v for k, v in mine.items() if k not in added) and old.keys() == mine.keys()
        grows = set(old["components"]) <= set(mine["components"]) and set(old["budgets"]) <= set(mine["budgets"])
        return same and grows and old["quant_rotate"] <= mine["quant_rotate"]


def run_curve(
    config: CurveConfig,
    out_root: str | Path = "results",
    progress: bool = True,
    *,
    plans: str | Path | None = None,
    device: str | None = None,
    cache_dir: str | None = None,
    data_dir: str | None = None,
) -> Path:
    """Evaluate every point of ``config`` not yet in its run folder; write the figure and table. Returns the folder.

    Args:
        plans: a folder of saved plans to reuse (checked against the model and calibration text);
            plans computed here are saved there too.
    """
    folder = RunFolder(out_root, config.run_name(), config.to_dict(), extends=config.extends)
    experiment = Experiment(
        folder, config.model, Texts.of(config), dtype=config.dtype, plans=plans, device=device, cache_dir=cache_dir,
        data_dir=data_dir, progress=progress,
    )  # fmt: skip
    done = folder.records("points.jsonl")
    rows = list(done.values())
    if config.budgets:  # first: the sensitivity is the longest step, and the one whose time is reported
        rows += allotted_points(config, experiment, done)
    for label, curve, recipe in config.points():
        if label in done:
            continue
        row = {"label": label, "method": curve, **point_fields(recipe), **experiment.measure(recipe, desc=label)}
        folder.append("points.jsonl", row, CSV_FIELDS)
        rows.append(row)
        if progress:
            print(f"{label:36s} ppl={row['ppl']:9.4f} kv={row['kv_gb_n2048']:.5f} GB", flush=True)
    plot_curve(rows, folder.path / "curve.png", title=config.run_name())
    plot_curve(rows, folder.path / "curve.svg", title=config.run_name())
    atomic_write_text(folder.path / "pareto.md", pareto_table(rows))
    return folder.path


def allotted_points(config: CurveConfig, experiment: Experiment, done: dict) -> list[dict]:
    """Measure the allotted recipe of every budget not yet in ``done``; save its allotment and figure."""
    sensitivity = experiment.sensitivity(config.budget_config())
    fp16 = experiment.apply(Recipe()).kv_bytes(seq_len=2048).total
    held_out = experiment.held_out(HELD_OUT[0], min(HELD_OUT[1], config.seq_len))
    rows = []
    for budget in config.budgets:
        label = f"allotted {budget:g}x"
        if label in done:
            continue
        recipe, allotment, evidence = choose_allotted(experiment, sensitivity, int(budget * fp16), held_out)
        measured = experiment.measure(recipe, desc=label)
        row = {"label": label, "method": "allotted", **point_fields(recipe), **measured, "budget": budget}
        row |= {"predicted": allotment.predicted, "candidates": evidence}
        experiment.folder.append("points.jsonl", row, CSV_FIELDS)
        rows.append(row)
        name = f"allotment_{budget:g}x"
        atomic_write_json(experiment.folder.path / f"{name}.json", {"budget": budget, **allotment.to_dict()})
        head_dim = max(s.head_dim for s in sensitivity.sizes)
        title = f"{config.run_name()}: {budget:g}x of fp16, {allotment_kind(allotment)}"
        plot_allotment(allotment.streams, head_dim, title, experiment.folder.path / f"{name}.png")
        if experiment.progress:
            print(f"{label:36s} ppl={row['ppl']:9.4f} kv={row['kv_gb_n2048']:.5f} GB", flush=True)
    return rows


def point_fields(recipe: Recipe) -> dict:
    """The columns tables and figures group points by: ratio, bits, group size, high precision."""
    return {
        "ratio": None if recipe.lowrank is None else recipe.lowrank.target_ratio,
        "bits": None if recipe.kv is None else recipe.kv.bits,
        "group_size": None if recipe.kv is None else recipe.kv.group_size,
        "high_bits": None if recipe.components is None else recipe.components.high_bits,
    }


def _point_name(row: dict) -> str:
    if row["bits"] is None:
        return "fp16"
    high = row.get("high_bits", (row.get("components") or {}).get("high_bits"))
    return f"{row['bits']}b/g{row['group_size']}" + (f"+{high}b" if high else "")


def pareto_table(rows: list[dict]) -> str:
    """Markdown: for each KV budget (every point's size), the best point of each method within it."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "baseline"]
    base = next((r for r in rows if r["method"] == "baseline"), None)
    lines = []
    if base is not None:
        lines += [f"baseline: ppl {base['ppl']:.3f} at {base['kv_gb_n2048']:.4f} GB (n = 2048, fp16)", ""]
    first, others = methods[0], methods[1:]
    lines.append(
        "| KV budget (GB) | "
        + " | ".join(f"best {m}" for m in methods)
        + "".join(f" | {m} - {first}" for m in others)
        + " |"
    )
    lines.append("|---|" + "---|" * (len(methods) + len(others)))
    for budget in sorted({r["kv_gb_n2048"] for r in rows if r["method"] != "baseline"}):
        best = []
        for method in methods:
            within = [r for r in rows if r["method"] == method and r["kv_gb_n2048"] <= budget + 1e-12]
            best.append(min(within, key=lambda r: r["ppl"]) if within else None)
        cells = ["-" if b is None else f"{b['ppl']:.2f} ({_point_name(b)}, {b['kv_gb_n2048']:.4f} GB)" for b in best]
        diffs = ["-" if not (b and best[0]) else f"{b['ppl'] - best[0]['ppl']:+.2f}" for b in best[1:]]
        lines.append(f"| {budget:.5f} | " + " | ".join(cells + diffs) + " |")
    if others:
        lines += ["", f"differences: each method's best minus {first}'s best within the budget (negative: better)"]
    return "\n".join(lines) + "\n"


def plot_curve(rows: list[dict], path: Path, title: str = "") -> Path:
    """Perplexity (log) against KV GB: one curve per method, points labelled bits/group, baseline marked."""
    fig, ax = pyplot().subplots(figsize=(7.5, 4.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kv_gb_n2048"])
        xs, ys = [r["kv_gb_n2048"] for r in points], [r["ppl"] for r in points]
        if method == "baseline":
            ax.scatter(xs, ys, marker="*", s=160, color="black", zorder=3, label="fp16 baseline")
            ax.axhline(ys[0], color="black", lw=0.6, ls=":")
            continue
        ax.plot(xs, ys, marker="o", ms=4, lw=1, label=method)
        for r in points:
            ax.annotate(
                _point_name(r), (r["kv_gb_n2048"], r["ppl"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("KV cache at n = 2048, batch 1 (GB, all codes, scales, zeros, windows and bases)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
