"""LoRA recovery after compression: train small adapters on the compressed model's projections (peft).

Eigen Attention folds its bases into the attention's projections, which stay
plain ``nn.Linear`` layers; LoRA adapters on them (and optionally on the MLP)
recover part of what the low rank lost, while the bases, the ranks and so the
KV cache stay exactly as compressed::

    compressed = eigenkv.apply_recipe(model, recipe, calibration)
    compressed.save_pretrained("out")         # the compressed model first (its weights, without adapters)
    recovery = finetune(compressed, train_windows, LoraRecovery(steps=200, lr=1e-4),
                        evaluate=lambda m: eigenkv.perplexity(compressed, held_out, progress=False).ppl)
    recovery.evaluations                      # [(0, ppl before), ..., (200, ppl after)]; through the cache
    save_adapters(recovery, "out")            # out/adapters/ (peft) + out/finetune.json, beside the model
    again = load_adapters(eigenkv.from_pretrained("out"), "out", merge=True)   # merged: inference pays nothing

A runnable version on a tiny random Llama::

    import eigenkv, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from eigenkv.finetune import LoraRecovery, finetune
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(4, 96, (4, 32))
    windows = eigenkv.TokenWindows(ids, "random", 32, "none", 0, 4)
    compressed = eigenkv.apply_recipe(model, eigenkv.Recipe(lowrank=eigenkv.EigenConfig(target_ratio=0.5)),
                                      windows, progress=False)
    recovery = finetune(compressed, windows, LoraRecovery(steps=10, lr=1e-2), progress=False)
    print(recovery.losses[0], recovery.losses[-1])

How adapters live on a compressed model: :func:`finetune` and :func:`load_adapters`
inject peft's LoRA layers *in place* into ``compressed.model`` (which stays the
same Hugging Face model object, with its ``EigenAttention`` modules, so the
quantized cache, ``with compressed:``, ``compressed.new_cache()``, ``kv_bytes``
and ``eigenkv.perplexity(compressed, ...)`` work unchanged, with the adapters
active); the peft wrapper is kept in the :class:`Recovery`, which is recorded on
the ``CompressedModel`` (:func:`recovery_of`). :func:`merge_adapters` folds
the adapters into the projections' weights and removes the LoRA layers.

Saving: ``CompressedModel.save_pretrained`` writes every weight of the model,
so call it *before* :func:`finetune` (or after :func:`merge_adapters`, which
gives a folder whose folded weights include the adapters); :func:`save_adapters`
writes only ``adapters/`` and ``finetune.json``, which may sit inside a saved
compressed model's folder: its manifest checks the files it lists and ignores
others.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from eigenkv.checks import require_choice, require_fields, require_int, require_number
from eigenkv.compress.families import attention_sites
from eigenkv.data import TokenWindows
from eigenkv.devices import input_device
from eigenkv.io import atomic_directory, atomic_write_json, read_sealed, seal, sha256_file
from eigenkv.pipeline import CompressedModel
from eigenkv.recipe import Recipe

VERSION = 1
FORMAT = "eigenkv-lora/1"
TARGETS = ("attention", "attention+mlp")
ADAPTERS, RECORD = "adapters", "finetune.json"
ADAPTER_NAME = "default"  # peft's adapter name; saved in the folder's root
_RECORDED = "lora_recovery"  # key of the Recovery in a CompressedModel's __dict__


@dataclass(frozen=True)
class LoraRecovery:
    """How to train the LoRA adapters (validated; ``to_dict``/``from_dict`` with ``"version": 1``).

    Attributes:
        steps: optimizer steps (> 0).
        rank: LoRA rank ``r`` of every adapter.
        alpha: LoRA ``alpha``; an adapter adds ``(alpha / rank) * B A x``.
        dropout: dropout on the adapters' inputs during training, in ``[0, 1)``.
        targets: ``"attention"`` (every linear projection of every decoder layer's attention, folded ones
            included) or ``"attention+mlp"`` (and the MLP's); never the embeddings or the LM head.
        lr: AdamW learning rate (after the warmup).
        batch_size: windows per step (at most the number of training windows).
        seed: seeds the adapters' initialisation, the order of the windows and the dropout.
        weight_decay: AdamW weight decay (on the adapters only).
        warmup: steps over which the learning rate rises linearly to ``lr`` (0: none); constant after.
        eval_every: call ``evaluate`` every this many steps (0: only before training and at the end).
        max_grad_norm: clip the adapters' gradient norm to this (0: no clipping).
    """

    steps: int
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: str = "attention"
    lr: float = 2e-4
    batch_size: int = 1
    seed: int = 0
    weight_decay: float = 0.0
    warmup: int = 0
    eval_every: int = 0
    max_grad_norm: float = 1.0

    def __post_init__(self):
        require_int("LoraRecovery.steps", self.steps, 1)
        require_int("LoraRecovery.rank", self.rank, 1)
        require_number("LoraRecovery.alpha", self.alpha, 0, math.inf, low_open=True)
        require_number("LoraRecovery.dropout", self.dropout, 0, 1, high_open=True)
        require_choice("LoraRecovery.targets", self.targets, TARGETS)
        require_number("LoraRecovery.lr", self.lr, 0, math.inf, low_open=True)
        require_int("LoraRecovery.batch_size", self.batch_size, 1)
        require_int("LoraRecovery.seed", self.seed, 0)
        require_number("LoraRecovery.weight_decay", self.weight_decay, 0, math.inf)
        require_int("LoraRecovery.warmup", self.warmup, 0)
        if self.warmup > self.steps:
            raise ValueError(
                f"LoraRecovery.warmup ({self.warmup}) is longer than the training ({self.steps} steps); "
                "lower warmup or raise steps"
            )
        require_int("LoraRecovery.eval_every", self.eval_every, 0)
        require_number("LoraRecovery.max_grad_norm", self.max_grad_norm, 0, math.inf)

    def label(self) -> str:
        """Short name, e.g. ``lora-r8-a16-attention-500steps``."""
        return f"lora-r{self.rank}-a{self.alpha:g}-{self.targets}-{self.steps}steps"

    def to_dict(self) -> dict:
        return {"version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> LoraRecovery:
        """Inverse of :meth:`to_dict`; refuses other versions, unknown fields and invalid values."""
        known = ("version", *(f.name for f in fields(cls)))
        require_fields("LoRA recovery config", data, known)
        if data.get("version") != VERSION:
            raise ValueError(
                f"LoRA recovery config version {data.get('version')!r} is not supported by this eigenkv (it reads "
                f"version {VERSION}); upgrade eigenkv or write the config again"
            )
        if "steps" not in data:
            raise ValueError("a LoRA recovery config needs steps (the number of optimizer steps)")
        return cls(**{k: v for k, v in data.items() if k != "version"})


@dataclass
class Recovery:
    """The result of :func:`finetune` (or of :func:`load_adapters`, with the saved record).

    Attributes:
        config: how the adapters were trained.
        losses: the training loss (mean next-token cross-entropy, nats) of each step, ``steps`` floats.
        evaluations: ``(step, evaluate(model))`` before training (step 0), every ``eval_every`` steps and at
            the end; empty without ``evaluate``.
        seconds: wall time of the training (evaluations included).
        trainable_parameters: elements of the adapters.
        model: the peft wrapper (``peft.PeftModel``) around ``compressed.model``.
        recipe: the recipe of the compressed model the adapters were trained on.
        targets: ``{module name: (in_features, out_features)}`` of the adapted projections.
        merged: the adapters were folded into the weights (:func:`merge_adapters`); nothing left to save.
    """

    config: LoraRecovery
    losses: list[float]
    evaluations: list[tuple[int, float]]
    seconds: float
    trainable_parameters: int
    model: nn.Module
    recipe: Recipe | None = None
    targets: dict[str, tuple[int, int]] = field(default_factory=dict)
    merged: bool = False


def lora_targets(model: nn.Module, targets: str = "attention") -> list[str]:
    """Full module names of the ``nn.Linear`` layers the adapters go on, in layer order.

    ``"attention"``: every linear layer inside each decoder layer's attention module (original or
    compressed: the folded ``q_proj``/``k_proj``/``v_proj``/``o_proj``, OPT's ``out_proj``, MPT's ``Wqkv``).
    ``"attention+mlp"``: also every other linear layer of the decoder layer (the MLP: ``gate_proj``,
    ``up_proj``, ``down_proj``; OPT's ``fc1``/``fc2``). Never the embeddings or the LM head (they sit outside
    the decoder layers).
    """
    require_choice("targets", targets, TARGETS)
    names = {id(module): name for name, module in model.named_modules()}
    if any(hasattr(module, "base_layer") and hasattr(module, "lora_A") for module in model.modules()):
        raise ValueError(
            "this model already has LoRA adapters; merge them (merge_adapters) or start from a fresh compression"
        )
    sites = attention_sites(model)
    if not sites:
        raise ValueError(
            f"found no decoder-layer attention modules in {type(model).__name__}; LoRA recovery supports the "
            "families eigenkv compresses (eigenkv.compress.families)"
        )
    out = []
    for site in sites:
        attention = {id(m) for m in site.module.modules()}
        for name, module in site.parent.named_modules(prefix=names[id(site.parent)]):
            if not isinstance(module, nn.Linear):
                continue
            if id(module) in attention or targets == "attention+mlp":
                out.append(name)
    if not out:
        raise ValueError(f"the attention modules of {type(model).__name__} hold no nn.Linear projections to adapt")
    return out


def recovery_of(compressed: CompressedModel) -> Recovery:
    """The :class:`Recovery` whose adapters are in ``compressed.model`` (after :func:`finetune` or
    :func:`load_adapters` without merging); ``ValueError`` when it has none."""
    recovery = compressed.__dict__.get(_RECORDED)
    if recovery is None:
        raise ValueError(
            "this compressed model has no LoRA adapters (train them with finetune or load them with "
            "load_adapters; merged adapters are part of the weights)"
        )
    return recovery


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA recovery needs peft: pip install 'peft>=0.13'") from None
    return peft


def _token_ids(windows: TokenWindows | torch.Tensor, batch_size: int) -> torch.Tensor:
    ids = windows.input_ids if isinstance(windows, TokenWindows) else windows
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("windows must be TokenWindows or an (N, T) integer tensor of token ids")
    if ids.shape[1] < 2:
        raise ValueError(f"windows of {ids.shape[1]} token(s) have no next token to predict; use longer windows")
    if batch_size > ids.shape[0]:
        raise ValueError(
            f"LoraRecovery.batch_size ({batch_size}) exceeds the number of training windows ({ids.shape[0]}); "
            "lower batch_size or pass more windows"
        )
    return ids.long()


def _batches(count: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Row indices of each step: seeded permutations of the windows, one after another, cut in batches."""
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream += torch.randperm(count, generator=generator).tolist()
    return [torch.tensor(stream[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]


def _check_gradients(wrapped: nn.Module) -> None:
    """Every adapter got a gradient (a path without a backward would leave some untrained, silently)."""
    missing = [name for name, p in wrapped.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(
            f"{len(missing)} adapter parameters got no gradient ({', '.join(missing[:3])}, ...): a module between "
            "them and the loss computes without autograd; report it with the model's family and dtype"
        )


def _target_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    modules = dict(model.named_modules())
    return {name: (modules[name].in_features, modules[name].out_features) for name in names}


def finetune(
    compressed: CompressedModel,
    windows: TokenWindows | torch.Tensor,
    config: LoraRecovery,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    progress: bool = True,
) -> Recovery:
    """Train LoRA adapters on the compressed model's projections to recover its next-token loss.

    The adapters are injected in place into ``compressed.model`` (see the module doc); everything else is
    frozen (``requires_grad=False`` afterwards too) and every base parameter and buffer (the folded weights, the
    bases, the norms) stays bit-identical. Training runs WITHOUT the quantized KV cache (plain full-sequence
    forwards with ``use_cache=False``): rounding to integer codes has no useful gradient, and the adapters do
    not change what the cache quantizes, only the projections feeding it; evaluate through the cache
    (``with compressed:``) to measure the recovery the deployed model sees.

    Each step takes ``batch_size`` rows of ``windows`` (cycling through seeded permutations of them), computes
    the mean next-token cross-entropy (float32) and takes an AdamW step on the adapters (learning rate warmed up
    linearly over ``warmup`` steps, gradient norm clipped at ``max_grad_norm``). The model is in train mode only
    while training and in eval mode after. Runs are deterministic for a seed on one device; the global RNG is
    left as it was.

    Args:
        compressed: from ``apply_recipe`` / ``load_compressed`` / ``from_pretrained``, without adapters. Float
            weights only (not ``recipe.weights``-quantized).
        windows: ``(N, T)`` int64 token ids (``TokenWindows`` or a tensor) to train on.
        config: the training settings.
        evaluate: called as ``evaluate(compressed.model)`` (adapters active, eval mode, no gradients) before
            training, every ``config.eval_every`` steps and at the end; returns a float (lower or higher is
            better: it is only recorded), e.g. ``lambda m: eigenkv.perplexity(compressed, held_out).ppl``.
        progress: a tqdm bar over the steps.

    Returns:
        The :class:`Recovery` (also recorded on ``compressed``: :func:`recovery_of`).
    """
    if not isinstance(compressed, CompressedModel):
        raise TypeError(
            f"finetune trains adapters on a CompressedModel (eigenkv.apply_recipe); got {type(compressed).__name__}"
        )
    if not isinstance(config, LoraRecovery):
        raise TypeError(f"config must be a LoraRecovery; got {type(config).__name__}")
    if compressed.recipe.weights is not None:
        raise ValueError(
            f"this model's weights are quantized ({compressed.recipe.weights}); train adapters on the float "
            "model and quantize the weights after merging them"
        )
    if compressed.__dict__.get(_RECORDED) is not None:
        raise ValueError(
            "this compressed model already has LoRA adapters; merge them (merge_adapters) or start from a fresh "
            "compression"
        )
    peft = _peft()
    model = compressed.model
    ids = _token_ids(windows, config.batch_size)
    names = lora_targets(model, config.targets)
    shapes = _target_shapes(model, names)
    device = input_device(model)  # where the ids go (a model spread over devices: where its embeddings compute)
    lora = peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names, bias="none"
    )
    start = time.perf_counter()
    losses: list[float] = []
    evaluations: list[tuple[int, float]] = []

    def record(step: int) -> None:
        if evaluate is None:
            return
        model.eval()
        with torch.no_grad():
            evaluations.append((step, float(evaluate(model))))

    devices = [device] if device.type == "cuda" else []
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations inside peft
            wrapped = peft.get_peft_model(model, lora, adapter_name=ADAPTER_NAME)
        parameters = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
        warmup = config.warmup
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1)
        batches = _batches(len(ids), config.batch_size, config.steps, torch.Generator().manual_seed(config.seed))
        try:
            record(0)
            with tqdm(total=config.steps, desc="LoRA recovery", unit="step", disable=not progress) as bar:
                for step, rows in enumerate(batches, 1):
                    model.train()
                    batch = ids[rows].to(device)
                    optimizer.zero_grad(set_to_none=True)
                    # autograd records through the attention here, so it takes the PyTorch path, never the
                    # kernels (eigenkv.quant.routing.kernels_apply): gradients reach every adapter
                    logits = model(input_ids=batch, use_cache=False).logits
                    loss = nn.functional.cross_entropy(
                        logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten().to(logits.device), reduction="mean"
                    )
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"the training loss is {loss.item()} at step {step}; lower lr or raise warmup"
                        )
                    loss.backward()
                    if step == 1:
                        _check_gradients(wrapped)
                    if config.max_grad_norm:
                        nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                    optimizer.step()
                    schedule.step()
                    losses.append(loss.item())
                    bar.update()
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                    if config.eval_every and step % config.eval_every == 0:
                        record(step)
            if not evaluations or evaluations[-1][0] != config.steps:
                record(config.steps)
        except BaseException:
            wrapped.unload()  # the model as it was: no LoRA layers, the same flags
            for name, p in model.named_parameters():
                p.requires_grad_(trainable[name])
            raise
        finally:
            model.eval()
            optimizer.zero_grad(set_to_none=True)
    recovery = Recovery(
        config=config,
        losses=losses,
        evaluations=evaluations,
        seconds=time.perf_counter() - start,
        trainable_parameters=sum(p.numel() for p in parameters),
        model=wrapped,
        recipe=compressed.recipe,
        targets=shapes,
    )
    compressed.__dict__[_RECORDED] = recovery
    return recovery


def save_adapters(source: Recovery | CompressedModel, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the adapters to ``folder/adapters/`` (peft's ``save_pretrained``: ``adapter_config.json``,
    ``adapter_model.safetensors`` float weights, a README) and ``folder/finetune.json`` (the config, recipe,
    target shapes, losses, evaluations, seconds and the SHA-256 of every adapter file; sealed).

    ``folder`` may be a ``CompressedModel.save_pretrained`` folder (its manifest ignores files it does not
    list) or any other; ``adapters/`` is written under a temporary name and renamed, ``finetune.json`` last
    and atomically, so a folder with a readable ``finetune.json`` has complete adapters.

    Args:
        source: a :class:`Recovery`, or a ``CompressedModel`` holding adapters (:func:`recovery_of`).
        overwrite: replace adapters saved there before (otherwise ``FileExistsError``).
    """
    recovery = recovery_of(source) if isinstance(source, CompressedModel) else source
    if not isinstance(recovery, Recovery):
        raise TypeError(f"save_adapters saves a Recovery or a CompressedModel; got {type(source).__name__}")
    if recovery.merged:
        raise ValueError(
            "these adapters were merged into the weights (merge_adapters); save the model with save_pretrained"
        )
    folder = Path(folder)
    adapters, record = folder / ADAPTERS, folder / RECORD
    if adapters.exists() or record.exists():
        if not overwrite:
            raise FileExistsError(f"{folder} already holds adapters; choose another folder or pass overwrite=True")
        record.unlink(missing_ok=True)  # first: a folder without finetune.json holds no adapters
        shutil.rmtree(adapters, ignore_errors=True)
    with atomic_directory(adapters) as staging, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        recovery.model.save_pretrained(str(staging), selected_adapters=[ADAPTER_NAME])
        files = {f"{ADAPTERS}/{p.relative_to(staging)}": sha256_file(p) for p in sorted(staging.rglob("*"))}
    missing = [f"{ADAPTERS}/{name}" for name in ("adapter_config.json", "adapter_model.safetensors")]
    if any(name not in files for name in missing):
        raise RuntimeError(f"peft wrote {sorted(files)} to {adapters}; expected {missing}")
    content = {
        "format": FORMAT,
        "config": recovery.config.to_dict(),
        "recipe": None if recovery.recipe is None else recovery.recipe.to_dict(),
        "targets": {name: list(shape) for name, shape in recovery.targets.items()},
        "losses": recovery.losses,
        "evaluations": [list(pair) for pair in recovery.evaluations],
        "seconds": recovery.seconds,
        "trainable_parameters": recovery.trainable_parameters,
        "files": files,
    }
    atomic_write_json(record, seal(content))
    return folder


def read_record(folder: str | os.PathLike) -> dict:
    """``finetune.json`` of a :func:`save_adapters` folder, its seal and every adapter file's SHA-256 checked."""
    folder = Path(folder)
    file = folder / RECORD
    if not file.is_file():
        raise FileNotFoundError(
            f"{folder} holds no LoRA adapters: it has no {RECORD} (write them with eigenkv.finetune.save_adapters)"
        )
    record = read_sealed(file, FORMAT, "adapters")
    return record


def load_adapters(compressed: CompressedModel, folder: str | os.PathLike, *, merge: bool = False) -> CompressedModel:
    """Load adapters written by :func:`save_adapters` onto a compressed model (the same recipe, from the same
    calibration or plan: ``load_compressed`` / ``from_pretrained`` of the folder it was saved beside).

    The adapters' target modules and shapes are checked against the model first: adapters of another model, or
    of this model compressed to other ranks (trained at 0.6x, loaded onto 0.5x), are refused with the
    differences. The loaded :class:`Recovery` (with the saved losses and evaluations) is recorded on
    ``compressed`` (:func:`recovery_of`).

    Args:
        merge: fold the adapters into the weights (:func:`merge_adapters`): plain ``nn.Linear`` projections
            again, no LoRA cost at inference.

    Returns:
        ``compressed`` (changed in place).
    """
    if not isinstance(compressed, CompressedModel):
        raise TypeError(f"load_adapters loads onto a CompressedModel; got {type(compressed).__name__}")
    folder = Path(folder)
    record = read_record(folder)
    if compressed.__dict__.get(_RECORDED) is not None:
        raise ValueError("this compressed model already has LoRA adapters; load onto a fresh compression")
    config = LoraRecovery.from_dict(record["config"])
    recipe = None if record["recipe"] is None else Recipe.from_dict(record["recipe"])
    saved = {name: tuple(shape) for name, shape in record["targets"].items()}
    model = compressed.model
    expected = lora_targets(model, config.targets)
    here = _target_shapes(model, expected)
    problems = [f"{name}: not in this model" for name in saved if name not in here]
    problems += [f"{name}: not in the adapters" for name in here if name not in saved]
    problems += [
        f"{name}: adapters (in, out) {saved[name]}, model {here[name]}"
        for name in saved
        if name in here and saved[name] != here[name]
    ]
    if problems:
        trained = "an unknown recipe" if recipe is None else recipe.label()
        raise ValueError(
            f"the adapters in {folder} do not fit this model: they were trained on a model compressed with "
            f"{trained}, this one is {compressed.recipe.label()} ({len(problems)} difference(s): "
            f"{'; '.join(problems[:4])}{'; ...' if len(problems) > 4 else ''}); load them onto the model they "
            "were trained on (the same recipe and calibration: load_compressed / from_pretrained of its folder)"
        )
    peft = _peft()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.PeftModel.from_pretrained(model, str(folder / ADAPTERS), adapter_name=ADAPTER_NAME)
    model.eval()
    compressed.__dict__[_RECORDED] = Recovery(
        config=config,
        losses=[float(x) for x in record["losses"]],
        evaluations=[(int(step), float(value)) for step, value in record["evaluations"]],
        seconds=float(record["seconds"]),
        trainable_parameters=int(record["trainable_parameters"]),
        model=wrapped,
        recipe=recipe,
        targets=saved,
    )
    return merge_adapters(compressed) if merge else compressed


def merge_adapters(compressed: CompressedModel) -> CompressedModel:
    """Fold the adapters into the projections' weights (peft's ``merge_and_unload``): ``W + (alpha / r) B A``
    in the weights' dtype; the LoRA layers are removed, so ``compressed.model`` is a plain compressed model
    again (``save_pretrained`` writes the recovered weights). Returns ``compressed``, changed in place."""
    recovery = recovery_of(compressed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        merged = recovery.model.merge_and_unload()
    if merged is not compressed.model:
        raise RuntimeError("peft returned another model when merging; the adapters were not merged in place")
    recovery.merged = True
    del compressed.__dict__[_RECORDED]
    return compressed
