"""The best recipe for a KV memory budget: rank ratio, bits, group size and component options.

``plan_for_budget(PlannerConfig(...), budget_gb)``:

1. enumerates candidates: the byte allotment's recipes for the budget
   (``allot``: ranks and bits chosen per layer and kind from measured
   sensitivities, with and without Eigen Attention, see
   ``eigenkv.compress.budget``), and every Eigen ratio in ``ratios`` (1.0:
   no Eigen Attention) x quantization grid (and no quantization) x component
   variant, and sizes each exactly (``kv_cache_bytes`` at n = 2048, batch 1:
   codes, scales, zeros, windows, bases);
2. keeps those within the budget at least ``min_fill`` as large as the largest
   one within it (a setting that leaves most of the usable budget unused is
   not the best one);
3. scores them with a cheap proxy: the mean next-token loss on
   ``proxy_windows`` windows of ``proxy_seq_len`` tokens of held-out text.
   By default (``proxy="evaluated"``) that is the evaluated corpus right
   after the evaluated windows: the target distribution, disjoint from every
   window whose perplexity is reported (with a validation split, pass
   ``proxy_split``). ``proxy="calibration"`` takes the calibration corpus
   after the calibration windows instead, which may favour the compressed
   models, whose bases were fitted on that corpus;
4. measures the perplexity of the allotted recipes and of the ``finalists``
   best-scored others on the evaluated windows and chooses the best measured one.

Every candidate is a :class:`~eigenkv.recipe.Recipe`; the chosen one is
returned and saved as ``budget_<GB>.recipe.json``, ready for
``eigenkv.apply_recipe`` or ``eigenkv compress --recipe``. The run folder
(named after the settings, not the budget; see ``eigenkv.eval.runs``) keeps
``config.json``, the plans, ``sensitivity.json`` (the allotment's measurements), ``sizes.json``, ``proxy.jsonl`` and
``measured.jsonl`` (appended; reused by every later budget) and one
``budget_<GB>.json`` / ``.md`` report per budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from eigenkv.checks import require_choice, require_int, require_number
from eigenkv.compress.budget import BudgetConfig, ByteAllotment, Sensitivity
from eigenkv.compress.components import ComponentQuantConfig
from eigenkv.compress.config import EigenConfig
from eigenkv.data import TokenWindows
from eigenkv.eval.runs import Experiment, RunFolder, Texts
from eigenkv.io import atomic_write_json, atomic_write_text
from eigenkv.memory import GB
from eigenkv.pipeline import recipes_for_budget
from eigenkv.quant.config import KVQuantConfig
from eigenkv.recipe import Recipe


@dataclass(frozen=True)
class PlannerConfig:
    """Settings of a budget search (saved as the run's ``config.json``).

    Attributes:
        allot: include the byte allotment's recipes (ranks and bits per layer and kind within the budget).
        ratios: Eigen KV ratios of the uniform candidates; 1.0 means the uncompressed model.
        bits, groups: the quantization grid (plus no quantization), also the allotment's options.
        components: component variants (``ComponentQuantConfig.parse`` specs, ``plain`` = none),
            tried with every Eigen ratio.
        method: the Eigen method (``EigenConfig.method``).
        proxy: ``"evaluated"`` (the evaluated corpus after the evaluated windows, or ``proxy_split``
            of it) or ``"calibration"`` (the calibration corpus after the calibration windows).
        proxy_split: split of the evaluated corpus for the proxy (e.g. ``"validation"``); None: the
            evaluated split.
        proxy_windows, proxy_seq_len: how much held-out text the proxy loss is measured on.
        min_fill: candidates must be at least this fraction of the largest candidate within the budget.
        finalists: best-by-proxy uniform candidates measured on the evaluated windows.
    """

    model: str = "smollm2-135m"
    dataset: str = "wikitext2"
    windows: int = 3
    seq_len: int = 2048
    allot: bool = True
    ratios: tuple[float, ...] = (1.0,)
    bits: tuple[int, ...] = (8, 4, 3, 2)
    groups: tuple[int, ...] = (128, 64, 32)
    axis_k: str = "channel"
    axis_v: str = "token"
    components: tuple[str, ...] = ("plain",)
    method: str = "eigenkv"
    rope_mode: str = "pre"
    calib_dataset: str = "brown"
    calib_windows: int = 16
    proxy: str = "evaluated"
    proxy_split: str | None = None
    proxy_windows: int = 2
    proxy_seq_len: int = 1024
    min_fill: float = 0.6
    finalists: int = 3
    dtype: str = "float32"
    bos: str = "none"

    def __post_init__(self):
        for name in ("ratios", "bits", "groups", "components"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.ratios or any(not 0 < r <= 1 for r in self.ratios):
            raise ValueError(f"ratios must lie in (0, 1] (1.0: no Eigen Attention); got {self.ratios}")
        require_number("min_fill", self.min_fill, 0, 1, high_open=True)
        require_choice("proxy", self.proxy, ("evaluated", "calibration"))
        for name in ("finalists", "proxy_windows", "windows", "seq_len", "proxy_seq_len", "calib_windows"):
            require_int(name, getattr(self, name), minimum=1)
        candidates(self)  # validates every recipe
        self.budget_config()

    def budget_config(self) -> BudgetConfig:
        """The byte allotment's options: this grid's bits and groups, any rank, unquantized streams allowed."""
        return BudgetConfig(
            bits=self.bits,
            groups=self.groups,
            axis_k=self.axis_k,
            axis_v=self.axis_v,
            basis=EigenConfig.method(self.method).basis,
            rope_mode=self.rope_mode,
        )

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def run_name(self) -> str:
        ratios = "-".join(f"{r:g}" for r in self.ratios)
        return f"plan_{Path(self.model).name}_{self.dataset}_{self.windows}x{self.seq_len}_{self.method}{ratios}"


def candidates(config: PlannerConfig) -> dict[str, Recipe]:
    """label -> recipe of every setting the planner considers (components only with Eigen and quantization)."""
    grid = [None] + [
        KVQuantConfig(bits=b, group_size=g, axis_k=config.axis_k, axis_v=config.axis_v)
        for b in config.bits
        for g in config.groups
    ]
    out = {}
    for ratio in config.ratios:
        lowrank = (
            None if ratio == 1 else EigenConfig.method(config.method, target_ratio=ratio, rope_mode=config.rope_mode)
        )
        for kv in grid:
            for spec in config.components if lowrank is not None and kv is not None else ("plain",):
                options = ComponentQuantConfig.parse(spec)
                if options.high_bits is not None and options.high_bits <= kv.bits:
                    continue
                eigen = "fp16-model" if lowrank is None else f"eigen{ratio:g}" + ("" if spec == "plain" else f"+{spec}")
                label = f"{eigen} {'fp16' if kv is None else kv.label()}"
                out[label] = Recipe(lowrank=lowrank, components=None if spec == "plain" else options, kv=kv)
    return out


@dataclass
class BudgetChoice:
    """What ``plan_for_budget`` chose (a recipe), and the evidence."""

    budget_gb: float
    chosen: dict
    recipe: Recipe
    finalists: list[dict]
    considered: int
    report: Path


def score_recipes(experiment: Experiment, recipes: dict[str, Recipe], text: str, say) -> dict[str, dict]:
    """label -> ``{"nll", "ppl", "seconds"}`` of every recipe on ``text`` (``"proxy"`` or ``"evaluated"``),
    measuring those not yet recorded in ``proxy.jsonl`` / ``measured.jsonl``."""
    name = "proxy.jsonl" if text == "proxy" else "measured.jsonl"
    scores = experiment.folder.records(name)
    for label, recipe in recipes.items():
        if label in scores:
            continue
        windows = experiment.proxy if text == "proxy" else experiment.evaluated
        measured = experiment.measure(recipe, windows, desc=label)
        row = {"label": label, **{k: measured[k] for k in ("nll", "ppl", "seconds", "recipe")}}
        experiment.folder.append(name, row)
        scores[label] = row
        say(f"  {text} {label:45s} nll {row['nll']:.4f} ppl {row['ppl']:.3f}")
    return scores


class PlannerExperiment(Experiment):
    """The planner's experiment: also held-out proxy text, disjoint from the evaluated and calibration text."""

    def __init__(self, config: PlannerConfig, folder: RunFolder, **kwargs):
        super().__init__(folder, config.model, Texts.of(config), dtype=config.dtype, **kwargs)
        self.config = config
        self._proxy = None

    @property
    def proxy(self):
        if self._proxy is None:
            cfg = self.config
            if cfg.proxy == "calibration":
                start = math.ceil(cfg.calib_windows * cfg.seq_len / cfg.proxy_seq_len)
                proxy = self.windows(cfg.calib_dataset, cfg.proxy_seq_len, count=cfg.proxy_windows, start=start)
                if not (proxy.disjoint_from(self.evaluated) and proxy.disjoint_from(self.calibration_windows)):
                    raise ValueError("the proxy text overlaps the evaluated or calibration text; choose other datasets")
            else:  # after the evaluated windows, unless another split is named
                proxy = self.held_out(cfg.proxy_windows, cfg.proxy_seq_len, cfg.proxy_split)
            self._proxy = proxy
        return self._proxy


def plan_for_budget(
    config: PlannerConfig,
    budget_gb: float,
    out_root: str | Path = "results",
    progress: bool = True,
    **experiment_options,
) -> BudgetChoice:
    """Choose the recipe with the lowest perplexity whose KV cache fits ``budget_gb`` (n = 2048, batch 1).

    Args:
        experiment_options: ``plans``, ``device``, ``cache_dir``, ``data_dir`` (see ``Experiment``).

    Returns:
        :class:`BudgetChoice`; the report is also written to ``budget_<GB>.json`` / ``.md`` and the
        recipe to ``budget_<GB>.recipe.json`` in the run folder.
    """
    require_number("budget_gb", budget_gb, 0, math.inf, low_open=True, high_open=True)
    folder = RunFolder(out_root, config.run_name(), config.to_dict())
    experiment = PlannerExperiment(config, folder, progress=progress, **experiment_options)
    out = folder.path
    say = print if progress else (lambda *a, **k: None)

    sizes_file = out / "sizes.json"  # label -> bytes; sizing needs the plans, not the text
    sizes = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
    every = candidates(config)
    budget = budget_gb * GB
    allotted = allotted_candidates(experiment, config, int(budget), budget_gb) if config.allot else {}
    allotted = {label: r for label, r in allotted.items() if r not in every.values()}  # e.g. the fp16 model
    every.update(allotted)
    for label, recipe in every.items():
        if label not in sizes:
            sizes[label] = experiment.apply(recipe).kv_bytes(seq_len=2048).total
    atomic_write_json(sizes_file, sizes)
    within = [label for label in every if sizes[label] <= budget]
    if not within:
        smallest = min(sizes.values()) / GB
        raise ValueError(
            f"no candidate fits {budget_gb} GB (the smallest needs {smallest:.5f} GB); "
            "raise the budget or add lower ratios or bits"
        )
    largest = max(sizes[label] for label in within)
    fitting = {
        label: every[label] for label in within if sizes[label] >= config.min_fill * largest or label in allotted
    }
    say(
        f"{len(fitting)} of {len(every)} candidates fit {budget_gb} GB and fill >= {config.min_fill:.0%} of the largest"
    )

    proxy = score_recipes(experiment, fitting, "proxy", say)
    uniform = sorted((x for x in fitting if x not in allotted), key=lambda label: proxy[label]["nll"])
    ranked = [x for x in fitting if x in allotted] + uniform[: config.finalists]
    measured = score_recipes(experiment, {label: every[label] for label in ranked}, "evaluated", say)

    finalists = [
        {
            "label": label,
            "recipe": every[label].to_dict(),
            "kv_bytes_n2048": sizes[label],
            "kv_gb_n2048": sizes[label] / GB,
            "proxy_nll": proxy[label]["nll"],
            "ppl": measured[label]["ppl"],
        }
        for label in ranked
    ]
    chosen = min(finalists, key=lambda f: f["ppl"])
    recipe = every[chosen["label"]]
    report = write_report(out, budget_gb, chosen, finalists, len(fitting))
    recipe.save(out / f"budget_{budget_gb:g}.recipe.json")
    return BudgetChoice(budget_gb, chosen, recipe, finalists, len(fitting), report)


def allotted_candidates(experiment: Experiment, config: PlannerConfig, budget: int, budget_gb: float) -> dict:
    """label -> recipe of the byte allotment's candidates within ``budget`` bytes (with Eigen Attention and
    without); none when no allotment fits."""
    sensitivity = experiment.sensitivity(config.budget_config())
    try:
        pairs = recipes_for_budget(sensitivity, budget)
    except ValueError:
        return {}
    return {f"allotted-{allotment_kind(a)}@{budget_gb:g}GB": recipe for recipe, a in pairs}


def allotment_kind(allotment: ByteAllotment) -> str:
    """``eigen``, ``fullrank`` or ``fullrank-rot``: which candidate of the byte allotment."""
    return "eigen" if allotment.lowrank else "fullrank-rot" if allotment.rotate else "fullrank"


def choose_allotted(
    experiment: Experiment, sensitivity: Sensitivity, budget: int, held_out: TokenWindows
) -> tuple[Recipe, ByteAllotment, list[dict]]:
    """The byte allotment's recipe within ``budget`` bytes: of its candidates (with and without Eigen Attention),
    the one with the lower loss measured on ``held_out`` windows (the prediction adds layers and kinds; the
    measurement settles what it cannot rank). Returns ``(recipe, allotment, evidence per candidate)``."""
    pairs = recipes_for_budget(sensitivity, budget)
    evidence = []
    for recipe, allotment in pairs:
        nll = experiment.measure(recipe, held_out, desc="held-out")["nll"] if len(pairs) > 1 else None
        evidence.append({"candidate": allotment_kind(allotment), "lowrank": allotment.lowrank,
                         "predicted": allotment.predicted, "held_out_nll": nll, "bytes": allotment.bytes,
                         "recipe": recipe.to_dict()})  # fmt: skip
    best = min(range(len(pairs)), key=lambda i: evidence[i]["held_out_nll"] or 0.0)
    return pairs[best][0], pairs[best][1], evidence


def write_report(out: Path, budget_gb: float, chosen: dict, finalists: list[dict], considered: int) -> Path:
    """``budget_<GB>.json`` (the evidence) and ``budget_<GB>.md`` (its table) in the run folder ``out``."""
    report = out / f"budget_{budget_gb:g}.json"
    evidence = {"budget_gb": budget_gb, "chosen": chosen, "finalists": finalists, "considered": considered}
    atomic_write_json(report, evidence)
    lines = [
        f"budget {budget_gb:g} GB (KV at n = 2048, batch 1): {considered} candidates scored by the proxy",
        "",
        "| finalist | KV GB | proxy NLL | measured ppl |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {'**' + f['label'] + '**' if f is chosen else f['label']} | {f['kv_gb_n2048']:.5f} | "
        f"{f['proxy_nll']:.4f} | {f['ppl']:.3f} |"
        for f in finalists
    ]
    atomic_write_text(report.with_suffix(".md"), "\n".join(lines) + "\n")
    return report
