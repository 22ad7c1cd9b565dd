"""Accuracy on lm-evaluation-harness tasks of a model compressed by a recipe (needs ``pip install 'eigenkv[tasks]'``).

    compressed = eigenkv.apply_recipe(model, recipe, calibration)
    config = TaskConfig(tasks=("hellaswag", "arc_easy"))                # hub tasks (network or HF cache)
    config = TaskConfig(tasks=("my_task",), include_path="my_tasks/")   # a local YAML + data file
    results = evaluate_tasks(compressed, tokenizer, config)             # lm-eval's results dict
    results["results"]["my_task"]["acc,none"]
    save_task_results(results, "out/")                                  # results.json (lm-eval format), recipe.json

Every forward pass lm-eval makes goes through the compressed model, and, when the
recipe quantizes the KV cache, through a fresh quantized cache read causally:
query ``t`` attends to keys and values as the cache held them when token ``t``
was decoded (codes of finished groups, the full-precision window), so a
one-forward loglikelihood scores what token-by-token decoding would. Because
that view is causal, the right padding lm-eval adds to batches never reaches
a scored position: batch sizes give the same loglikelihoods. Generation tasks
decode through the quantized cache as ``CompressedModel.generate`` does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from eigenkv.checks import require_bool, require_fields, require_int
from eigenkv.io import atomic_write_text
from eigenkv.pipeline import CompressedModel
from eigenkv.recipe import Recipe

try:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable
except ImportError as err:  # an optional dependency: say how to get it
    raise ImportError(
        f"eigenkv.eval.tasks runs lm-evaluation-harness tasks, which is not installed ({err}); "
        "install it with: pip install 'eigenkv[tasks]' (lm-eval>=0.4.5)"
    ) from err

VERSION = 1
RESULTS = "results.json"  # lm-eval's aggregated results, as lm-eval writes them


@dataclass(frozen=True)
class TaskConfig:
    """Which lm-eval tasks to run, and how.

    Attributes:
        tasks: task (or group) names, from lm-eval's registry or from ``include_path``.
        include_path: a folder of local task YAML files (their data files may sit beside them).
        num_fewshot: few-shot examples per prompt (None: each task's default).
        limit: documents per task (an int count; None: all).
        batch_size: sequences per forward; the causal quantized view makes it exact (see the module doc).
        max_length: longest context in tokens (None: the model's ``max_position_embeddings``).
        seed: seed of lm-eval's sampling of few-shot examples and of torch/numpy.
        log_samples: also keep every document's prompt, target and scores (``samples_<task>.jsonl``).
    """

    tasks: tuple[str, ...]
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 1
    max_length: int | None = None
    seed: int = 0
    log_samples: bool = False
    version: int = field(default=VERSION, repr=False)

    def __post_init__(self):
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        tasks = tuple(t.strip() for name in tasks for t in str(name).split(",") if t.strip())
        if not tasks:
            raise ValueError("TaskConfig.tasks is empty; name at least one lm-eval task, e.g. tasks=('arc_easy',)")
        object.__setattr__(self, "tasks", tasks)
        if self.include_path is not None:
            path = Path(self.include_path).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"TaskConfig.include_path {path} is not a folder; give the folder holding the task YAML files"
                )
            object.__setattr__(self, "include_path", str(path.resolve()))
        if self.num_fewshot is not None:
            require_int("TaskConfig.num_fewshot", self.num_fewshot, 0)
        if self.limit is not None:
            require_int("TaskConfig.limit", self.limit, 1)
        require_int("TaskConfig.batch_size", self.batch_size, 1)
        if self.max_length is not None:
            require_int("TaskConfig.max_length", self.max_length, 2)
        require_int("TaskConfig.seed", self.seed, 0)
        require_bool("TaskConfig.log_samples", self.log_samples)
        if self.version != VERSION:
            raise ValueError(f"TaskConfig version {self.version} is not supported (this eigenkv reads {VERSION})")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tasks"] = list(self.tasks)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TaskConfig:
        require_fields("TaskConfig", data, {f for f in cls.__dataclass_fields__})
        return cls(**data)


class CompressedLM(HFLM):
    """lm-eval's Hugging Face model class reading a :class:`~eigenkv.CompressedModel`'s quantized cache.

    Args:
        compressed: the model with its recipe applied (``CompressedModel(model, Recipe())`` for a baseline).
        tokenizer: its tokenizer.
        batch_size: sequences per forward.
        max_length: longest context (None: the model's).
    """

    def __init__(self, compressed: CompressedModel, tokenizer, batch_size: int = 1, max_length: int | None = None):
        super().__init__(pretrained=compressed.model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        self.compressed = compressed

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """``(B, T)`` int64 ids -> ``(B, T, vocab)`` logits, through a fresh quantized cache when there is one."""
        if attn_mask is not None or labels is not None:
            raise ValueError("eigenkv compresses decoder-only models; this task asks for an encoder-decoder call")
        with torch.no_grad(), self.compressed:
            cache = self.compressed.new_cache()
            return self.model(input_ids=inps, past_key_values=cache, use_cache=cache is not None).logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        cache = self.compressed.new_cache()
        with torch.no_grad(), self.compressed:
            out = super()._model_generate(context, max_length, stop, past_key_values=cache, **generation_kwargs)
        if cache is not None:
            cache.check()
        return out


def task_manager(config: TaskConfig) -> TaskManager:
    """lm-eval's task index for ``config``: the local folder alone when it defines every task (indexing
    lm-eval's own 14k task files takes seconds), else lm-eval's tasks and the local folder."""
    if config.include_path is not None:
        local = TaskManager(include_path=config.include_path, include_defaults=False)
        if all(task in local.all_tasks for task in config.tasks):
            return local
    return TaskManager(include_path=config.include_path)


def evaluate_tasks(compressed: CompressedModel, tokenizer, config: TaskConfig, *, progress: bool = True) -> dict:
    """Run ``config.tasks`` on ``compressed`` with lm-eval.

    Args:
        compressed: the compressed model (or a plain model: it is evaluated as it is).
        tokenizer: its tokenizer.
        config: the tasks and settings.
        progress: lm-eval's progress bars and log lines.

    Returns:
        lm-eval's results dict (``results``, ``configs``, ``versions``, ``n-shot``, ``n-samples``, ...;
        ``samples`` too when ``config.log_samples``), with ``eigenkv`` added: the task config and the recipe.
    """
    if not isinstance(config, TaskConfig):
        raise TypeError(f"config must be an eigenkv TaskConfig; got {type(config).__name__}")
    if not isinstance(compressed, CompressedModel):
        if not isinstance(compressed, torch.nn.Module):
            raise TypeError(f"expected a CompressedModel or a Hugging Face model; got {type(compressed).__name__}")
        compressed = CompressedModel(compressed, Recipe())
    manager = task_manager(config)
    unknown = [t for t in config.tasks if t not in manager.all_tasks]
    if unknown:
        where = f" nor in {config.include_path}" if config.include_path else " (local tasks need include_path)"
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}: not in lm-eval's registry{where}")
    lm = CompressedLM(compressed, tokenizer, batch_size=config.batch_size, max_length=config.max_length)
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.INFO if progress else logging.ERROR)
    try:
        results = simple_evaluate(
            model=lm,
            tasks=list(config.tasks),
            num_fewshot=config.num_fewshot,
            limit=config.limit,
            task_manager=manager,
            log_samples=config.log_samples,
            random_seed=config.seed,
            numpy_random_seed=config.seed,
            torch_random_seed=config.seed,
            fewshot_random_seed=config.seed,
        )
    finally:
        logger.setLevel(level)
    results["eigenkv"] = {"task_config": config.to_dict(), "recipe": compressed.recipe.to_dict()}
    return results


def accuracy_rows(results: dict) -> list[dict]:
    """One row per task and metric of ``results`` (``task, metric, filter, value, stderr``), sorted."""
    rows = []
    for task, metrics in sorted(results["results"].items()):
        for key, value in sorted(metrics.items()):
            metric, _, kind = key.partition(",")
            if not kind or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{kind}")
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "filter": kind,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                }
            )
    return rows


def save_task_results(results: dict, folder: str | os.PathLike) -> Path:
    """Write ``results`` into ``folder`` (created): ``results.json`` as lm-eval writes its aggregated results,
    ``recipe.json`` (the applied recipe, ``Recipe.load`` reads it) and ``samples_<task>.jsonl`` when the run
    logged samples. Every file is written atomically. Returns ``folder``."""
    folder = Path(folder)
    results = dict(results)
    samples = results.pop("samples", None)
    recipe = Recipe.from_dict(results["eigenkv"]["recipe"])
    for task, rows in (samples or {}).items():
        lines = (json.dumps(row, default=handle_non_serializable, ensure_ascii=False) for row in rows)
        atomic_write_text(folder / f"samples_{task}.jsonl", "".join(line + "\n" for line in lines))
    recipe.save(folder / "recipe.json")
    atomic_write_text(
        folder / RESULTS, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
    )
    return folder


def load_task_results(folder: str | os.PathLike) -> dict:
    """The results ``save_task_results`` wrote to ``folder``, checked to be an eigenkv task run."""
    path = Path(folder) / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the tasks first (eigenkv tasks --out {folder})")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete the folder and run the tasks again") from None
    if not isinstance(results, dict) or "results" not in results or "eigenkv" not in results:
        raise ValueError(f"{path} is not an eigenkv task result (no 'results' or 'eigenkv' entry)")
    TaskConfig.from_dict(results["eigenkv"]["task_config"])
    return results


__all__ = [
    "CompressedLM",
    "TaskConfig",
    "accuracy_rows",
    "evaluate_tasks",
    "task_manager",
    "load_task_results",
    "save_task_results",
]
