"""Resumable experiment runs: one folder per setting, records appended, plans calibrated once.

A :class:`RunFolder` is named after its settings and holds ``config.json``
(a rerun with other settings is refused, never overwritten), JSON-lines
records appended as they finish (a partial last line left by a killed run is
dropped; any other corrupt line is an error) and the plans it calibrated.

An :class:`Experiment` is what the curve, the planner and the benchmarks
share: the model, the evaluated and calibration texts, one calibration per
RoPE mode, and a plan per low-rank setting, each loaded or computed on first
use; :meth:`Experiment.apply` runs a recipe through ``apply_recipe`` on a
fresh copy of the model, and :meth:`Experiment.measure` records its
perplexity and bytes.
"""

from __future__ import annotations

import copy
import csv
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eigenkv.compress.budget import BudgetConfig, Sensitivity, measure_sensitivity
from eigenkv.compress.build import compress_model
from eigenkv.compress.calibrate import Calibration, calibrate
from eigenkv.compress.config import EigenConfig
from eigenkv.compress.families import family_of
from eigenkv.compress.plan import EigenPlan
from eigenkv.compress.signature import model_signature
from eigenkv.data import TokenWindows, load_windows
from eigenkv.eval.perplexity import perplexity
from eigenkv.io import atomic_write_json, atomic_write_text
from eigenkv.models import load_model, resolve_dtype
from eigenkv.pipeline import CompressedModel, apply_recipe
from eigenkv.recipe import Recipe

# The calibration record a reused plan must match (the rest is timing).
CALIBRATION_KEYS = ("source", "seq_len", "windows", "first_window", "text_sha256", "bos")


def environment(device: str | None = None) -> dict:
    """Software and hardware a result was measured with."""
    import transformers

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "device": name,
        "device_used": device or "cpu",
        "threads": torch.get_num_threads(),
    }


class RunFolder:
    """A run folder for ``config`` under ``root / name`` (see the module doc).

    Args:
        extends: ``extends(stored) -> bool``: whether a stored config is this one less some
            additions (then the run is extended and ``config.json`` updated).
    """

    def __init__(self, root: str | Path, name: str, config: dict, extends=None):
        self.path = Path(root) / name
        self.path.mkdir(parents=True, exist_ok=True)
        file = self.path / "config.json"
        if file.exists():
            try:
                stored = json.loads(file.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{file} is corrupt ({err}); delete the run folder to start again") from None
            if stored != config and not (extends is not None and extends(stored)):
                raise FileExistsError(
                    f"{self.path} holds a run with other settings; choose another --out-root or delete it"
                )
        if not file.exists() or json.loads(file.read_text()) != config:
            atomic_write_json(file, config)

    def records(self, name: str, key: str = "label") -> dict[str, dict]:
        """``key`` -> row of ``name`` (JSON lines); a partial last line is dropped from the file."""
        path = self.path / name
        lines = path.read_text().splitlines() if path.exists() else []
        rows = {}
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number != len(lines):
                    raise ValueError(f"{path} line {number} is corrupt; delete that line to resume") from None
                atomic_write_text(path, "".join(line + "\n" for line in lines[:-1]))
                break
            rows[row[key]] = row
        return rows

    def append(self, name: str, row: dict, csv_fields: list[str] | None = None) -> None:
        """Append ``row`` to ``name`` (JSON lines, the record) and, with ``csv_fields``, to its CSV view."""
        with open(self.path / name, "a") as f:
            f.write(json.dumps(row) + "\n")
        if csv_fields:
            view = (self.path / name).with_suffix(".csv")
            new = not view.exists()
            with open(view, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=csv_fields, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(row)


@dataclass(frozen=True)
class Texts:
    """Where an experiment's text comes from."""

    dataset: str = "wikitext2"
    windows: int | None = 3  # evaluated windows from the start of the split; None: all
    seq_len: int = 2048
    calib_dataset: str = "brown"
    calib_windows: int = 16
    bos: str = "none"

    @classmethod
    def of(cls, config) -> Texts:
        """The texts named by a curve or planner config (same field names)."""
        names = ("dataset", "windows", "seq_len", "calib_dataset", "calib_windows", "bos")
        return cls(**{name: getattr(config, name) for name in names})


class Experiment:
    """Model, texts, calibrations and plans of one run, each loaded or computed on first use.

    Args:
        folder: where plans and records go.
        model: alias, folder or hub id; dtype: its dtype for calibration and evaluation.
        texts: evaluated and calibration text.
        plans: a folder of plans shared between runs: ``plans/<model name>/<config label>`` is
            reused when it fits this model and calibration text, and new plans are saved there
            too (always also in ``folder/plans``).
        device, cache_dir, data_dir: where to run, the eigenkv cache, the offline text folder.
    """

    def __init__(
        self,
        folder: RunFolder,
        model: str,
        texts: Texts,
        *,
        dtype: str = "float32",
        plans: str | Path | None = None,
        device: str | None = None,
        cache_dir: str | None = None,
        data_dir: str | None = None,
        progress: bool = True,
    ):
        self.folder, self.model_name, self.texts = folder, model, texts
        self.dtype, self.device, self.cache_dir, self.data_dir = dtype, device, cache_dir, data_dir
        self.plans_dir = None if plans is None else Path(plans) / Path(model).name
        self.progress = progress
        self._original = self._tokenizer = self._evaluated = self._calib = None
        self._calibrations: dict[bool, Calibration] = {}
        self._plans: dict[str, EigenPlan] = {}
        self._sensitivities: dict[str, Sensitivity] = {}

    @property
    def original(self):
        if self._original is None:
            self._original, self._tokenizer = load_model(
                self.model_name, dtype=resolve_dtype(self.dtype), device=self.device or "cpu", cache=self.cache_dir
            )
        return self._original

    @property
    def tokenizer(self):
        self.original  # noqa: B018  (loads the tokenizer with the model)
        return self._tokenizer

    def windows(self, dataset: str, seq_len: int, *, count: int | None, start: int = 0, split=None) -> TokenWindows:
        """Token windows of a text with this experiment's tokenizer, BOS policy and data folder."""
        return load_windows(
            dataset,
            self.tokenizer,
            seq_len,
            split=split,
            start=start,
            count=count,
            bos=self.texts.bos,
            data_dir_path=self.data_dir,
        )

    @property
    def evaluated(self) -> TokenWindows:
        if self._evaluated is None:
            t = self.texts
            self._evaluated = self.windows(t.dataset, t.seq_len, count=t.windows)
        return self._evaluated

    @property
    def calibration_windows(self) -> TokenWindows:
        if self._calib is None:
            t = self.texts
            self._calib = self.windows(t.calib_dataset, t.seq_len, count=t.calib_windows)
            if not self._calib.disjoint_from(self.evaluated):
                raise ValueError(
                    "the calibration windows overlap the evaluated ones; calibrate on other text (--calib-dataset)"
                )
        return self._calib

    def held_out(self, count: int, seq_len: int, split: str | None = None) -> TokenWindows:
        """Windows of the evaluated corpus after the evaluated ones (or of another ``split`` of it), disjoint
        from the evaluated and calibration text: where a choice between recipes is measured."""
        t = self.texts
        if split is None and t.windows is None:
            raise ValueError("every window of the evaluated text is evaluated: name a split for held-out text")
        after = 0 if split is not None else t.windows * t.seq_len
        windows = self.windows(t.dataset, seq_len, count=count, start=-(-after // seq_len), split=split)
        if not (windows.disjoint_from(self.evaluated) and windows.disjoint_from(self.calibration_windows)):
            raise ValueError("the held-out text overlaps the evaluated or calibration text; choose other datasets")
        return windows

    def sensitivity(self, config: BudgetConfig) -> Sensitivity:
        """The byte allotment's measurements for ``config`` on this model and calibration text: read from
        ``sensitivity.json`` in the run folder when they were made there with the same settings, else measured
        (minutes) and saved."""
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in self._sensitivities:
            file = self.folder.path / "sensitivity.json"
            record = {"budget": config.to_dict(), "calibration": self.calibration_windows.describe()}
            stored = json.loads(file.read_text()) if file.is_file() else {}
            digests = model_signature(self.original)["weights_sha256"]
            if {k: stored.get(k) for k in record} == record and stored["signature"]["weights_sha256"] == digests:
                self._sensitivities[key] = Sensitivity.from_dict(stored)
            else:
                rotated = config.rope_mode == "post" and family_of(self.original) == "llama"
                calibration = self.calibration(rotated)
                measured = measure_sensitivity(self.original, calibration, config, progress=self.progress)
                atomic_write_json(file, {**record, **measured.to_dict(), "calibration_seconds": calibration.seconds})
                self._sensitivities[key] = measured
        return self._sensitivities[key]

    def calibration(self, rotated: bool) -> Calibration:
        """One calibration (with loss gradients) per RoPE mode, shared by every plan."""
        if rotated not in self._calibrations:
            self._calibrations[rotated] = calibrate(
                self.original, self.calibration_windows, rotated=rotated, gradients=True, progress=self.progress
            )
        return self._calibrations[rotated]

    def plan(self, eigen: EigenConfig) -> EigenPlan:
        """The plan of ``eigen`` for this model and calibration text: reused when one was saved, else computed."""
        name = eigen.label()
        if name not in self._plans:
            own = self.folder.path / "plans" / name
            for folder in ([self.plans_dir / name] if self.plans_dir else []) + [own]:
                if (folder / "plan.json").is_file() and self._fits(plan := EigenPlan.load(folder), eigen):
                    self._plans[name] = plan
                    break
            else:
                rotated = eigen.rope_mode == "post" and family_of(self.original) == "llama"  # RoPE models only
                calibration = self.calibration(rotated=rotated)
                plan = compress_model(self.original, calibration, eigen, progress=self.progress, apply=False)
                plan.save(own, overwrite=own.exists())
                if self.plans_dir is not None and not (self.plans_dir / name).exists():
                    plan.save(self.plans_dir / name)
                self._plans[name] = plan
        return self._plans[name]

    def _fits(self, plan: EigenPlan, eigen: EigenConfig) -> bool:
        """Whether a saved plan was made with ``eigen`` for this model on this calibration text."""
        wanted = self.calibration_windows.describe()
        same_text = all(plan.calibration.get(k) == wanted.get(k) for k in CALIBRATION_KEYS)
        digests = model_signature(self.original)["weights_sha256"]
        return plan.config == eigen and same_text and plan.signature["weights_sha256"] == digests

    def apply(self, recipe: Recipe) -> CompressedModel:
        """``recipe`` applied to a fresh copy of the model (its plan reused or computed once)."""
        plan = None if recipe.lowrank is None else self.plan(recipe.lowrank)
        return apply_recipe(copy.deepcopy(self.original), recipe, plan=plan, progress=self.progress)

    def measure(self, recipe: Recipe, windows: TokenWindows | None = None, desc: str = "") -> dict:
        """Perplexity of ``recipe`` on ``windows`` (default: the evaluated ones) and its KV bytes."""
        windows = self.evaluated if windows is None else windows
        start = time.perf_counter()
        compressed = self.apply(recipe)
        result = perplexity(compressed, windows, progress=self.progress, desc=desc or recipe.label())
        kv = compressed.kv_bytes(seq_len=2048)
        return {
            "recipe": recipe.to_dict(),
            "ppl": result.ppl,
            "nll": result.nll,
            "tokens": result.tokens,
            "kv_gb_n2048": kv.gb,
            "kv_bytes_n2048": kv.total,
            "kv_bytes_eval_seq_len": compressed.kv_bytes(seq_len=windows.seq_len).total,
            "plan_ratio": None if compressed.plan is None else compressed.plan.ratio,
            "seconds": time.perf_counter() - start,
            "perplexity_seconds": result.seconds,
            "windows": windows.describe(),
            "environment": environment(self.device),
        }
