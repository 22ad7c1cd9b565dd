"""The best KV setting for a memory budget: rank ratio, bits, group size and component options.

``plan_for_budget(PlannerConfig(...), budget_gb)``:

1. enumerates candidates: every Eigen ratio in ``ratios`` (1.0: no Eigen
   Attention) x quantization grid (and no quantization) x component variant,
   and sizes each exactly (``kv_cache_bytes`` at n = 2048, batch 1: codes,
   scales, zeros, windows, bases);
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
4. measures the perplexity of the ``finalists`` best-scored on the evaluated
   windows and chooses the best measured one.

The run folder (named after the settings, not the budget) keeps ``config.json``,
the plans per ratio, ``proxy.jsonl`` and ``measured.jsonl`` (appended; reused
by every later budget) and one ``budget_<GB>.json`` / ``.md`` report per budget.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from eigenkv.io import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class PlannerConfig:
    """Settings of a budget search (saved as the run's ``config.json``).

    Attributes:
        ratios: Eigen KV ratios to consider; 1.0 means the uncompressed model.
        bits, groups: the quantization grid (plus no quantization).
        components: component variants (``ComponentQuantConfig.parse`` specs, ``plain`` = none),
            tried with every Eigen ratio.
        method: the Eigen method (``EigenConfig.method``).
        proxy: ``"evaluated"`` (the evaluated corpus after the evaluated windows, or ``proxy_split``
            of it) or ``"calibration"`` (the calibration corpus after the calibration windows).
        proxy_split: split of the evaluated corpus for the proxy (e.g. ``"validation"``); None: the
            evaluated split.
        proxy_windows, proxy_seq_len: how much held-out text the proxy loss is measured on.
        min_fill: candidates must be at least this fraction of the largest candidate within the budget.
        finalists: best-by-proxy candidates measured on the evaluated windows.
    """

    model: str = "smollm2-135m"
    dataset: str = "wikitext2"
    windows: int = 3
    seq_len: int = 2048
    ratios: tuple[float, ...] = (1.0, 0.8, 0.7, 0.6, 0.5)
    bits: tuple[int, ...] = (8, 4, 3, 2)
    groups: tuple[int, ...] = (128, 64, 32)
    axis_k: str = "channel"
    axis_v: str = "token"
    components: tuple[str, ...] = ("plain", "hi4x0.25")
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

    def __post_init__(self):
        from eigenkv.compress import EigenConfig
        from eigenkv.compress.components import ComponentQuantConfig
        from eigenkv.quant import KVQuantConfig

        if not self.ratios or any(not 0 < r <= 1 for r in self.ratios):
            raise ValueError(f"ratios must lie in (0, 1] (1.0: no Eigen Attention); got {self.ratios}")
        for r in self.ratios:
            if r < 1:
                EigenConfig.method(self.method, target_ratio=r, rope_mode=self.rope_mode)
        for b in self.bits:
            for g in self.groups:
                KVQuantConfig(bits=b, group_size=g, axis_k=self.axis_k, axis_v=self.axis_v)
        for spec in self.components:
            ComponentQuantConfig.parse(spec)
        if not 0 <= self.min_fill < 1:
            raise ValueError(f"min_fill must be in [0, 1); got {self.min_fill}")
        if self.proxy not in ("evaluated", "calibration"):
            raise ValueError(f"proxy={self.proxy!r}; use 'evaluated' or 'calibration'")
        if self.finalists < 1 or self.proxy_windows < 1 or self.windows < 1:
            raise ValueError("finalists, proxy_windows and windows must be >= 1")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def run_name(self) -> str:
        ratios = "-".join(f"{r:g}" for r in self.ratios)
        return f"plan_{Path(self.model).name}_{self.dataset}_{self.windows}x{self.seq_len}_{self.method}{ratios}"


@dataclass(frozen=True)
class Candidate:
    """One setting: Eigen ratio (1.0: none), quantizer (None: fp16 cache) and component variant."""

    ratio: float
    quant: object  # KVQuantConfig | None
    components: str = "plain"

    @property
    def label(self) -> str:
        eigen = (
            "fp16-model"
            if self.ratio == 1
            else f"eigen{self.ratio:g}" + ("" if self.components == "plain" else f"+{self.components}")
        )
        return f"{eigen} {'fp16' if self.quant is None else self.quant.label()}"


def candidates(config: PlannerConfig) -> list[Candidate]:
    """Every setting the planner considers (component variants only with Eigen and quantization)."""
    from eigenkv.compress.components import ComponentQuantConfig
    from eigenkv.quant import KVQuantConfig

    grid = [None] + [
        KVQuantConfig(bits=b, group_size=g, axis_k=config.axis_k, axis_v=config.axis_v)
        for b in config.bits
        for g in config.groups
    ]
    out = []
    for ratio in config.ratios:
        for quant in grid:
            for spec in config.components if ratio < 1 and quant is not None else ("plain",):
                high = ComponentQuantConfig.parse(spec).high_bits
                if high is None or high > quant.bits:
                    out.append(Candidate(ratio, quant, spec))
    return list(dict.fromkeys(out))


@dataclass
class BudgetChoice:
    """What ``plan_for_budget`` chose, and the evidence."""

    budget_gb: float
    chosen: dict
    finalists: list[dict]
    considered: int
    report: Path


def _jsonl(path: Path) -> dict[str, dict]:
    """label -> row of a JSON-lines record (a partial last line, from a killed run, is ignored and redone)."""
    rows = {}
    lines = path.read_text().splitlines() if path.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                atomic_write_text(path, "".join(line + "\n" for line in lines[:-1]))
                break
            raise ValueError(f"{path} line {number} is corrupt; delete that line to resume") from None
        rows[row["label"]] = row
    return rows


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


class PlannerRun:
    """Model, texts, calibration and plans of one planner run, loaded on first use."""

    def __init__(self, config: PlannerConfig, out: Path, progress: bool):
        self.config, self.out, self.progress = config, out, progress
        self._original = self._tokenizer = self._eval = self._calib = self._proxy = self._calibration = None
        self._plans: dict[float, object] = {}
        self._last = None  # ((ratio, variant), model) of the last compressed copy

    @property
    def original(self):
        if self._original is None:
            from eigenkv.models import load_model, resolve_dtype

            self._original, self._tokenizer = load_model(self.config.model, dtype=resolve_dtype(self.config.dtype))
        return self._original

    def texts(self):
        from eigenkv.data import load_windows

        if self._eval is None:
            cfg = self.config
            self.original  # noqa: B018  (loads the tokenizer)
            self._eval = load_windows(cfg.dataset, self._tokenizer, cfg.seq_len, count=cfg.windows)
            self._calib = load_windows(cfg.calib_dataset, self._tokenizer, cfg.seq_len, count=cfg.calib_windows)
            if cfg.proxy == "calibration":
                name, split, after = cfg.calib_dataset, None, cfg.calib_windows * cfg.seq_len
            else:  # after the evaluated windows, unless another split is named
                name, split = cfg.dataset, cfg.proxy_split
                after = 0 if split is not None else cfg.windows * cfg.seq_len
            start = math.ceil(after / cfg.proxy_seq_len)
            self._proxy = load_windows(
                name, self._tokenizer, cfg.proxy_seq_len, split=split, start=start, count=cfg.proxy_windows
            )
            if not (self._calib.disjoint_from(self._eval) and self._proxy.disjoint_from(self._eval)):
                raise ValueError("calibration, proxy and evaluated text overlap; choose other datasets or windows")
            if not self._proxy.disjoint_from(self._calib):
                raise ValueError("the proxy text overlaps the calibration text; choose other datasets")
        return self._eval, self._calib, self._proxy

    def plan(self, ratio: float):
        from eigenkv.compress import EigenConfig, EigenPlan, compress_model
        from eigenkv.compress.calibrate import calibrate

        if ratio not in self._plans:
            folder = self.out / "plans" / f"{self.config.method}-eigen{ratio:g}"
            if folder.exists():
                self._plans[ratio] = EigenPlan.load(folder)
            else:
                cfg = self.config
                if self._calibration is None:
                    _, calib, _ = self.texts()
                    self._calibration = calibrate(
                        self.original, calib, rotated=cfg.rope_mode == "post", gradients=True, progress=self.progress
                    )
                eigen = EigenConfig.method(cfg.method, target_ratio=ratio, rope_mode=cfg.rope_mode)
                plan = compress_model(copy.deepcopy(self.original), self._calibration, eigen, progress=self.progress)
                plan.save(folder)
                self._plans[ratio] = plan
        return self._plans[ratio]

    def model_for(self, candidate: Candidate, reuse: bool = False):
        """``(model, cache config)`` of a candidate: a compressed copy of the model, or the model itself.

        ``reuse``: return the copy made for the previous candidate of the same ratio and
        variant (same ranks and bases: enough to size a cache, not to evaluate one).
        """
        from eigenkv.compress import apply_plan
        from eigenkv.compress.components import ComponentQuantConfig, prepare_components

        if candidate.ratio == 1:
            return self.original, candidate.quant
        plan, quant = self.plan(candidate.ratio), candidate.quant
        if candidate.components != "plain":
            plan, quant = prepare_components(plan, ComponentQuantConfig.parse(candidate.components), quant)
        key = (candidate.ratio, candidate.components)
        if not (reuse and self._last is not None and self._last[0] == key):
            self._last = None  # free the previous copy first
            self._last = (key, apply_plan(copy.deepcopy(self.original), plan))
        return self._last[1], quant

    def scores(self, cands: list[Candidate], text: str, say=print) -> dict[str, dict]:
        """label -> ``{"nll", "ppl", "seconds"}`` of every candidate on ``text``, measuring those not yet recorded.

        Args:
            text: ``"proxy"`` (the held-out proxy text; ``proxy.jsonl``) or ``"evaluated"``
                (the evaluated windows; ``measured.jsonl``).
        """
        path = self.out / ("proxy.jsonl" if text == "proxy" else "measured.jsonl")
        scores = _jsonl(path)
        for candidate in cands:
            if candidate.label in scores:
                continue
            evaluated, _, proxy = self.texts()
            model, quant = self.model_for(candidate)
            start = time.perf_counter()
            nll = _nll(model, quant, proxy if text == "proxy" else evaluated, candidate.label)
            row = {"label": candidate.label, "nll": nll, "ppl": math.exp(nll), "seconds": time.perf_counter() - start}
            _append(path, row)
            scores[candidate.label] = row
            say(f"  {text} {candidate.label:45s} nll {nll:.4f} ppl {row['ppl']:.3f}")
        return scores


def open_run(config: PlannerConfig, out_root: str | Path = "results", progress: bool = True) -> PlannerRun:
    """The run folder of ``config`` (created, or checked against its ``config.json``) as a workspace."""
    out = Path(out_root) / config.run_name()
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "config.json"
    if config_file.exists() and json.loads(config_file.read_text()) != config.to_dict():
        raise FileExistsError(f"{out} holds a planner run with other settings; choose another --out-root")
    atomic_write_json(config_file, config.to_dict())
    return PlannerRun(config, out, progress)


def _nll(model, quant, windows, desc: str) -> float:
    from eigenkv.eval.perplexity import perplexity
    from eigenkv.quant import QuantizedKV

    if quant is None:
        return perplexity(model, windows, progress=False, desc=desc).nll
    with QuantizedKV(model, quant) as kv:
        return perplexity(model, windows, progress=False, desc=desc, make_cache=kv.new_cache).nll


def plan_for_budget(
    config: PlannerConfig, budget_gb: float, out_root: str | Path = "results", progress: bool = True
) -> BudgetChoice:
    """Choose the setting with the lowest perplexity whose KV cache fits ``budget_gb`` (n = 2048, batch 1).

    Returns:
        :class:`BudgetChoice`; the report is also written to ``budget_<GB>.json`` / ``.md`` in the run folder.
    """
    from eigenkv.memory import GB, kv_cache_bytes

    if not budget_gb > 0:
        raise ValueError(f"budget_gb must be positive; got {budget_gb}")
    work = open_run(config, out_root, progress)
    out = work.out
    say = print if progress else (lambda *a, **k: None)

    sizes_file = out / "sizes.json"  # label -> bytes; sizing needs the plans, not the text
    sizes = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
    every = candidates(config)
    for candidate in every:
        if candidate.label not in sizes:
            model, quant = work.model_for(candidate, reuse=True)
            sizes[candidate.label] = kv_cache_bytes(model, seq_len=2048, batch_size=1, quant=quant).total
    atomic_write_json(sizes_file, sizes)
    budget = budget_gb * GB
    within = [c for c in every if sizes[c.label] <= budget]
    if not within:
        smallest = min(sizes.values()) / GB
        raise ValueError(
            f"no candidate fits {budget_gb} GB (the smallest needs {smallest:.5f} GB); "
            "raise the budget or add lower ratios or bits"
        )
    largest = max(sizes[c.label] for c in within)
    fitting = [c for c in within if sizes[c.label] >= config.min_fill * largest]
    say(
        f"{len(fitting)} of {len(every)} candidates fit {budget_gb} GB and fill >= {config.min_fill:.0%} of the largest"
    )

    proxy = work.scores(fitting, "proxy", say)
    ranked = sorted(fitting, key=lambda c: proxy[c.label]["nll"])
    measured = work.scores(ranked[: config.finalists], "evaluated", say)

    def describe(c: Candidate) -> dict:
        return {
            "label": c.label,
            "ratio": c.ratio,
            "quant": None if c.quant is None else c.quant.to_dict(),
            "components": c.components,
            "kv_bytes_n2048": sizes[c.label],
            "kv_gb_n2048": sizes[c.label] / GB,
            "proxy_nll": proxy[c.label]["nll"],
            "ppl": measured[c.label]["ppl"],
            "plan": None if c.ratio == 1 else str(out / "plans" / f"{config.method}-eigen{c.ratio:g}"),
        }

    finalists = [describe(c) for c in ranked[: config.finalists]]
    chosen = min(finalists, key=lambda f: f["ppl"])
    report = out / f"budget_{budget_gb:g}.json"
    atomic_write_json(
        report, {"budget_gb": budget_gb, "chosen": chosen, "finalists": finalists, "considered": len(fitting)}
    )
    lines = [
        f"budget {budget_gb:g} GB (KV at n = 2048, batch 1): {len(fitting)} candidates scored by the proxy",
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
    return BudgetChoice(budget_gb, chosen, finalists, len(fitting), report)
