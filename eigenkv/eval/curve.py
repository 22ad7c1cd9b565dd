"""The paper's Figure 3: perplexity against KV-cache GB, quantization alone vs Eigen Attention + quantization.

``run_curve(CurveConfig(...))`` evaluates, for one model and text:

- ``baseline``: the model as loaded (cache counted in fp16);
- ``quant``: the quantized cache alone over ``bits x groups``;
- ``<method>-eigen<r>``: Eigen Attention with each method (``paper``: PCA
  bases, uniform ranks; ``eigenkv``: output-aware bases, Fisher allotment) at
  each ratio ``r`` alone, then followed by the same quantization grid. One
  calibration (with loss gradients) serves every method and ratio.
- ``<method>-eigen<r>+<components>``: the same plans with their components
  prepared for quantization (``eigenkv.compress.components``: ``scale``,
  ``rot``, ``hi<bits>[x<fraction>]``) over the grid (grid points at or above
  the high precision are skipped).

The run folder (named after the settings) holds ``config.json`` (a rerun with
other settings is refused, except one that only adds component variants,
which extends the run), ``points.jsonl`` and ``points.csv`` (one row per
point, appended as it finishes; a rerun skips finished points and never
overwrites), the compression plans (``plans/``: calibrated once per ratio
and reloaded by every point that uses it), ``curve.png``/``curve.svg`` and
``pareto.md``.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from eigenkv.io import atomic_write_json, atomic_write_text
from eigenkv.plots import pyplot, save_figure

QUICK_WINDOWS = 3


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
        calib_dataset, calib_windows: calibration text (disjoint from the evaluated text).
    """

    model: str = "smollm2-135m"
    dataset: str = "wikitext2"
    windows: int | None = QUICK_WINDOWS
    seq_len: int = 2048
    bits: tuple[int, ...] = (8, 4, 3, 2)
    groups: tuple[int, ...] = (128, 64, 32)
    axis_k: str = "channel"
    axis_v: str = "token"
    ratios: tuple[float, ...] = (0.6,)
    methods: tuple[str, ...] = ("paper", "eigenkv")
    components: tuple[str, ...] = ("hi4x0.25",)
    rope_mode: str = "pre"
    calib_dataset: str = "brown"
    calib_windows: int = 16
    dtype: str = "float32"

    def __post_init__(self):
        from eigenkv.quant import KVQuantConfig

        if self.windows is not None and self.windows < 1:
            raise ValueError(f"windows must be >= 1 or None (all); got {self.windows}")
        for bits in self.bits:
            for group in self.groups:
                KVQuantConfig(bits=bits, group_size=group, axis_k=self.axis_k, axis_v=self.axis_v)
        for ratio in self.ratios:
            for method in self.methods:
                self.eigen_config(method, ratio)
        from eigenkv.compress.components import ComponentQuantConfig

        for spec in self.components:
            ComponentQuantConfig.parse(spec)

    def eigen_config(self, method: str, ratio: float):
        from eigenkv.compress import EigenConfig

        return EigenConfig.method(method, target_ratio=ratio, rope_mode=self.rope_mode)

    def run_name(self) -> str:
        windows = "all" if self.windows is None else self.windows
        name = Path(self.model).name
        ratios = "-".join(f"{r:g}" for r in self.ratios)
        methods = "+".join(self.methods)
        return f"curve_{name}_{self.dataset}_{windows}x{self.seq_len}_eigen{ratios}-{self.rope_mode}-{methods}"

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists, as read back from JSON

    def points(self) -> list[tuple[str, str, str | None, object, object]]:
        """``(label, curve, plan name or None, KVQuantConfig | None, ComponentQuantConfig | None)``, baseline first."""
        from eigenkv.compress.components import ComponentQuantConfig
        from eigenkv.quant import KVQuantConfig

        grid = [
            KVQuantConfig(bits=b, group_size=g, axis_k=self.axis_k, axis_v=self.axis_v)
            for b in self.bits
            for g in self.groups
        ]
        points = [("baseline", "baseline", None, None, None)]
        points += [(f"quant {q.label()}", "quant", None, q, None) for q in grid]
        for method in self.methods:
            for ratio in self.ratios:
                plan = f"{method}-eigen{ratio:g}"
                points.append((plan, f"{plan}+quant", plan, None, None))
                points += [(f"{plan} {q.label()}", f"{plan}+quant", plan, q, None) for q in grid]
                for spec in self.components:
                    options = ComponentQuantConfig.parse(spec)
                    curve = f"{plan}+{options.label()}"
                    points += [
                        (f"{curve} {q.label()}", curve, plan, q, options)
                        for q in grid
                        if options.high_bits is None or options.high_bits > q.bits
                    ]
        return points

    def extends(self, stored: dict) -> bool:
        """Whether ``stored`` (a run's ``config.json``) is this sweep less some component variants."""
        mine = self.to_dict()
        old = {**stored, "components": stored.get("components", [])}
        same = all(old.get(k) == v for k, v in mine.items() if k != "components") and old.keys() == mine.keys()
        return same and set(old["components"]) <= set(mine["components"])

    def plan_settings(self) -> dict:
        """Plan name -> ``EigenConfig`` for every Eigen point."""
        return {f"{m}-eigen{r:g}": self.eigen_config(m, r) for m in self.methods for r in self.ratios}


def _kv_bytes(model, quant, seq_len: int):
    from eigenkv.memory import kv_cache_bytes

    return kv_cache_bytes(model, seq_len=seq_len, batch_size=1, quant=quant)


def run_curve(config: CurveConfig, out_root: str | Path = "results", progress: bool = True) -> Path:
    """Evaluate every point of ``config`` not yet in its run folder; write the figure and table. Returns the folder."""
    import copy

    from eigenkv.compress import EigenPlan, apply_plan, compress_model
    from eigenkv.compress.calibrate import calibrate
    from eigenkv.compress.components import prepare_components
    from eigenkv.data import load_windows
    from eigenkv.models import load_model, resolve_dtype
    from eigenkv.eval.perplexity import perplexity
    from eigenkv.quant import QuantizedKV
    from eigenkv.quant.config import base_config

    out = Path(out_root) / config.run_name()
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "config.json"
    if config_file.exists():
        stored = json.loads(config_file.read_text())
        if stored != config.to_dict():
            if not config.extends(stored):
                raise FileExistsError(f"{out} holds a sweep with other settings; choose another --out-root")
            atomic_write_json(config_file, config.to_dict())  # the same sweep with more component variants
    else:
        atomic_write_json(config_file, config.to_dict())
    rows = read_points(out)
    done = {row["label"] for row in rows}
    todo = [p for p in config.points() if p[0] not in done]

    original = tokenizer = windows = calibration = None
    plans: dict[str, EigenPlan] = {}
    settings = config.plan_settings()
    for label, method, plan_name, quant, options in todo:
        if original is None:
            original, tokenizer = load_model(config.model, dtype=resolve_dtype(config.dtype))
            windows = load_windows(config.dataset, tokenizer, config.seq_len, count=config.windows)
        model = original
        if plan_name is not None:
            plan_dir = out / "plans" / plan_name
            if plan_name not in plans:
                if plan_dir.exists():
                    plans[plan_name] = EigenPlan.load(plan_dir)
                else:
                    if calibration is None:
                        calib = load_windows(
                            config.calib_dataset, tokenizer, config.seq_len, count=config.calib_windows
                        )
                        if not calib.disjoint_from(windows):
                            raise ValueError(
                                "calibration windows overlap the evaluated windows; calibrate on other text"
                            )
                        calibration = calibrate(
                            original, calib, rotated=config.rope_mode == "post", gradients=True, progress=progress
                        )
                    eigen = settings[plan_name]
                    plans[plan_name] = compress_model(copy.deepcopy(original), calibration, eigen, progress=progress)
                    plans[plan_name].save(plan_dir)
            plan = plans[plan_name]
            if options is not None:
                plan, quant = prepare_components(plan, options, quant)
            model = apply_plan(copy.deepcopy(original), plan)
        start = time.perf_counter()
        if quant is None:
            result = perplexity(model, windows, progress=progress, desc=label)
        else:
            with QuantizedKV(model, quant) as kv:
                result = perplexity(model, windows, progress=progress, desc=label, make_cache=kv.new_cache)
        reported = _kv_bytes(model, quant, 2048)
        row = {
            "label": label,
            "method": method,
            "ratio": None if plan_name is None else settings[plan_name].target_ratio,
            "eigen": None if plan_name is None else settings[plan_name].to_dict(),
            "quant": None if quant is None else quant.to_dict(),
            "components": None if options is None else {**options.to_dict(), **plan.extra["components"]},
            "bits": None if quant is None else base_config(quant).bits,
            "group_size": None if quant is None else base_config(quant).group_size,
            "kv_gb_n2048": reported.gb,
            "kv_bytes_n2048": reported.total,
            "kv_bytes_eval_seq_len": _kv_bytes(model, quant, config.seq_len).total,
            "ppl": result.ppl,
            "nll": result.nll,
            "tokens": result.tokens,
            "seconds": time.perf_counter() - start,
            "plan": None if plan_name is None else str((out / "plans" / plan_name).resolve()),
            "windows": windows.describe(),
            "environment": {
                "torch": torch.__version__,
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
            },
        }
        append_point(out, row)
        rows.append(row)
        if progress:
            print(f"{label:36s} ppl={result.ppl:9.4f} kv={reported.gb:.5f} GB", flush=True)
        if model is not original:
            del model
    plot_curve(rows, out / "curve.png", title=config.run_name())
    plot_curve(rows, out / "curve.svg", title=config.run_name())
    atomic_write_text(out / "pareto.md", pareto_table(rows))
    return out


CSV_FIELDS = ["label", "method", "ratio", "bits", "group_size", "kv_gb_n2048", "ppl", "tokens", "seconds"]


def append_point(out: Path, row: dict) -> None:
    """Append one row to ``points.jsonl`` and ``points.csv`` (the JSON line is the record; the CSV a view)."""
    with open(out / "points.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    csv_path = out / "points.csv"
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_points(out: Path) -> list[dict]:
    """Rows of ``points.jsonl``; a partial last line (a run killed mid-write) is dropped from the file."""
    path = Path(out) / "points.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{path} line {number} is corrupt; delete that line to resume") from None
            atomic_write_text(path, "".join(line + "\n" for line in lines[:-1]))
    return rows


def _point_name(row: dict) -> str:
    if row["bits"] is None:
        return "fp16"
    high = (row.get("components") or {}).get("high_bits")
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
