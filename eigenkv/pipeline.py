"""The one pipeline: apply a :class:`~eigenkv.recipe.Recipe` to a model, save the result, load it back.

    compressed = apply_recipe(model, recipe, calibration)   # low rank -> components -> cache -> weights
    eigenkv.perplexity(compressed, windows)                 # attention reads the quantized cache
    compressed.kv_bytes(seq_len=2048).gb                    # every stored byte
    compressed.save_pretrained("out")                       # recipe, plan, folded weights, checksums
    again = from_pretrained("out")                          # the same model, no calibration
    fresh = load_compressed(original_model, "out")          # the recipe onto a fresh copy of the model

A saved folder holds ``eigenkv.json`` (format, recipe, cache config, the
SHA-256 of every other file, sealed), ``plan/`` (bases and ranks, applicable to
the original model in any dtype), ``model.safetensors`` + ``config.json`` (the
folded weights, loadable without the original) and, when given, the tokenizer.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from eigenkv.compress.budget import BudgetConfig, ByteAllotment, Sensitivity, allot_bytes
from eigenkv.compress.build import apply_plan, compress_model
from eigenkv.compress.calibrate import Calibration
from eigenkv.compress.components import prepare_components
from eigenkv.compress.plan import EigenPlan
from eigenkv.data import TokenWindows
from eigenkv.devices import refuse_offloaded
from eigenkv.graphs import StaticGeneration, generate_static
from eigenkv.io import atomic_directory, atomic_write_json, read_sealed, seal, sha256_file
from eigenkv.memory import KVBytes, kv_cache_bytes
from eigenkv.models import resolve_dtype
from eigenkv.quant.cache import QuantizedKV, QuantizedKVCache
from eigenkv.quant.config import AnyKVQuantConfig, quant_config_from_dict
from eigenkv.quant.weights import quantize_weights
from eigenkv.recipe import Recipe

FORMAT = "eigenkv-compressed/1"
MANIFEST, PLAN_DIR, WEIGHTS = "eigenkv.json", "plan", "model.safetensors"


@dataclass
class CompressedModel:
    """A model with a recipe applied: the model (changed in place), its plan and its cache quantizer.

    Use it as a context manager (or pass it to ``eigenkv.perplexity``) so that
    attention reads the quantized cache causally; :meth:`new_cache` makes the
    caches, :meth:`kv_bytes` counts them.

    Attributes:
        model: the Hugging Face model, compressed in place.
        recipe: what was applied.
        plan: the low-rank plan folded into the model (components prepared), or None.
        cache_config: the quantizer of the KV cache (per layer and precision), or None.
    """

    model: nn.Module
    recipe: Recipe
    plan: EigenPlan | None = None
    cache_config: AnyKVQuantConfig | None = None

    def new_cache(self, max_tokens: int = 0, capturable: bool = False) -> QuantizedKVCache | None:
        """A fresh quantized cache for this model (None without KV quantization: the model's own cache);
        ``max_tokens``: room reserved up front (prompt + new tokens; 0: grow as needed); ``capturable``: decode
        steps can be captured in a CUDA graph (``eigenkv.graphs``)."""
        if self.cache_config is None:
            return None
        return QuantizedKV(self.model, self.cache_config).new_cache(max_tokens, capturable)

    def attention(self):
        """Context in which the model's attention reads the quantized cache causally (or a no-op)."""
        return nullcontext(self) if self.cache_config is None else QuantizedKV(self.model, self.cache_config)

    def __enter__(self) -> CompressedModel:
        context = self.attention()
        context.__enter__()
        self.__dict__.setdefault("_entered", []).append(context)  # re-entrant: perplexity(c) inside `with c`
        return self

    def __exit__(self, *exc) -> None:
        self.__dict__["_entered"].pop().__exit__(*exc)

    def kv_bytes(self, seq_len: int = 2048, batch_size: int = 1, dtype: torch.dtype | None = None) -> KVBytes:
        """Bytes of this model's KV cache (codes, scales, zeros, windows, bases) for ``batch_size`` x ``seq_len``."""
        return kv_cache_bytes(self.model, seq_len=seq_len, batch_size=batch_size, dtype=dtype, quant=self.cache_config)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """``model.generate`` through the compressed, quantized cache (``(B, T)`` int64 ids in, ids out); room
        for the prompt and ``max_new_tokens`` is reserved up front, and the cache's flags checked at the end."""
        new_tokens = kwargs.get("max_new_tokens") or 0
        cache = self.new_cache(max_tokens=input_ids.shape[-1] + new_tokens if new_tokens else 0)
        with self:
            out = self.model.generate(input_ids, past_key_values=cache, **kwargs)
        if cache is not None:
            cache.check()
        return out

    def generate_static(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> StaticGeneration:
        """Greedy decoding with the decode step captured once in a CUDA graph and replayed
        (:func:`eigenkv.graphs.generate_static`; eager steps on CPU): a capturable quantized cache sized for
        the prompt and ``max_new_tokens``. ``kwargs``: ``attention_mask``, ``cuda_graph``, ``eos_token_id``,
        ``pad_token_id``."""
        if self.cache_config is None:
            raise ValueError(
                "generate_static decodes through a capturable quantized cache; this recipe quantizes no KV cache "
                "(give it kv_bits)"
            )
        cache = self.new_cache(max_tokens=input_ids.shape[-1] + max_new_tokens, capturable=True)
        with self:
            return generate_static(self.model, input_ids, cache, max_new_tokens, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, *, tokenizer=None, overwrite: bool = False) -> Path:
        """Save the recipe, plan, cache config and folded weights to ``path`` (see the module doc).

        The folder is written under a temporary name and renamed, so it is complete or absent.
        """
        from safetensors.torch import save_model

        path = Path(path)
        # device_map support: an offloaded model's weights are not in memory to be saved
        refuse_offloaded(
            self.model,
            "save_pretrained",
            "to save it, apply the recipe to the model loaded without offloading (device_map=None or a map "
            "without 'cpu'/'disk' entries; apply_recipe(..., plan=compressed.plan) skips calibration) and save "
            "that, or keep the plan alone: compressed.plan.save(folder), applied later with "
            "apply_recipe(model, recipe, plan=EigenPlan.load(folder))",
        )
        if any(hasattr(module, "lora_A") for module in self.model.modules()):
            raise ValueError(
                "this model carries LoRA adapters (eigenkv.finetune): save_pretrained stores the compressed model "
                "alone; merge them first (eigenkv.finetune.merge_adapters) or save them with save_adapters"
            )
        if self.recipe.weights is not None:
            raise ValueError(
                "save_pretrained stores float weights; this model's weights are already quantized "
                f"({self.recipe.weights}): save the recipe without weights and pass weights="
                f"{self.recipe.weights!r} to from_pretrained / load_compressed"
            )
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} exists; choose another folder or pass overwrite=True")
            shutil.rmtree(path)
        with atomic_directory(path) as staging:
            if self.plan is not None:
                self.plan.save(staging / PLAN_DIR)
            save_model(self.model, str(staging / WEIGHTS))
            self.model.config.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            files = sorted(p for p in staging.rglob("*") if p.is_file())
            manifest = {
                "format": FORMAT,
                "recipe": self.recipe.to_dict(),
                "cache_config": None if self.cache_config is None else self.cache_config.to_dict(),
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                "files": {str(p.relative_to(staging)): sha256_file(p) for p in files},
            }
            atomic_write_json(staging / MANIFEST, seal(manifest))
        return path


def apply_recipe(
    model: nn.Module,
    recipe: Recipe,
    calibration: TokenWindows | Calibration | None = None,
    *,
    plan: EigenPlan | None = None,
    progress: bool = True,
) -> CompressedModel:
    """Apply ``recipe`` to ``model`` in place: low rank, then components, cache quantizer, weights.

    Args:
        model: a Hugging Face causal LM (Llama family, OPT or MPT for low rank; any model for
            quantization alone), in eval mode, uncompressed.
        recipe: what to do.
        calibration: ``(N, T)`` calibration windows (or an earlier ``Calibration`` of this model),
            needed when ``recipe.lowrank`` is set and no ``plan`` is given.
        plan: a plan made earlier for this model with ``recipe.lowrank`` (``compress_model(...,
            apply=False)`` or a saved one), to skip calibration.
        progress: progress bars.

    Returns:
        The :class:`CompressedModel`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module (a Hugging Face causal LM); got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be an eigenkv.Recipe; got {type(recipe).__name__}")
    if recipe.weights is not None:  # device_map support: refused before the model is changed
        refuse_offloaded(model, "bitsandbytes weight quantization", "place every layer on a device to quantize them")
    layers = model.config.get_text_config().num_hidden_layers
    cache = recipe.cache_config(layers)
    if recipe.lowrank is not None:
        if plan is None:
            if calibration is None:
                raise ValueError(
                    "this recipe compresses the attention (lowrank is set): pass calibration windows "
                    "(eigenkv.load_windows('brown', tokenizer, ...)) or a plan made for this model"
                )
            plan = compress_model(model, calibration, recipe.lowrank, progress=progress, apply=False)
        elif plan.config != recipe.lowrank:
            raise ValueError(
                f"the plan was made with {plan.config.label()}, the recipe asks for {recipe.lowrank.label()}; "
                "pass the plan of this recipe or calibration windows"
            )
        if recipe.components is not None:
            plan, cache = prepare_components(plan, recipe.components, recipe.kv)
        apply_plan(model, plan)
    elif plan is not None:
        raise ValueError("a plan was given but the recipe has no lowrank settings; set Recipe.lowrank")
    if recipe.weights is not None:
        quantize_weights(model, recipe.weights)
    return CompressedModel(model, recipe, plan, cache)


def allotted_recipe(allotment: ByteAllotment, config: BudgetConfig) -> Recipe:
    """The recipe of a byte allotment: its ranks (an ``EigenConfig`` with ``ranks``, when it compresses) and a
    quantizer per layer and kind (``kv`` the most common one, ``kv_layers`` the layers that differ)."""
    lowrank = config.eigen().with_ranks(allotment.ranks) if allotment.lowrank else None
    pairs = list(zip(allotment.keys, allotment.values, strict=True))
    quantized = Counter(q for pair in pairs for q in pair if q is not None)
    if not quantized:
        return Recipe(lowrank=lowrank)
    kv = quantized.most_common(1)[0][0]
    layers = {i: pair for i, pair in enumerate(pairs) if pair != (kv, kv)}
    return Recipe(lowrank=lowrank, kv=kv, kv_layers=layers)


def recipes_for_budget(sensitivity: Sensitivity, budget_bytes: int) -> list[tuple[Recipe, ByteAllotment]]:
    """The allotted recipe of each candidate within ``budget_bytes`` (KV bytes at ``sensitivity.config.seq_len``
    tokens, batch 1), best predicted first: with Eigen Attention (when the sensitivity measured low ranks),
    without, and without but with Hadamard-rotated quantizers allowed (when measured). A candidate whose smallest
    cache exceeds the budget is left out; none fitting raises ValueError.

    Example::

        calib = calibrate(model, windows, gradients=True)
        sensitivity = measure_sensitivity(model, calib)              # minutes, once per model
        recipe, allotment = recipes_for_budget(sensitivity, int(0.2 * fp16_bytes))[0]
        compressed = apply_recipe(model, recipe, calib)
    """
    out, refusals = [], []
    candidates = [(True, False)] if sensitivity.config.lowrank else []
    candidates += [(False, False)] + ([(False, True)] if sensitivity.rotatable else [])
    for lowrank, rotate in candidates:
        try:
            allotment = allot_bytes(sensitivity, budget_bytes, lowrank, rotate)
        except ValueError as err:
            refusals.append(str(err))
            continue
        if rotate and not allotment.rotate:  # rotation did not pay for its matrix: the unrotated one is better
            continue
        out.append((allotted_recipe(allotment, sensitivity.config), allotment))
    if not out:
        raise ValueError(refusals[-1])
    return sorted(out, key=lambda pair: (pair[1].predicted, pair[1].lowrank, pair[1].rotate))  # ties: the simpler


def _read_manifest(path: Path) -> dict:
    """``eigenkv.json`` of a saved folder, with every listed file checked against its SHA-256."""
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} is not a saved eigenkv model: it has no {MANIFEST} (save with save_pretrained)"
        )
    manifest = read_sealed(file, FORMAT, "model")
    return manifest


def _restore(model: nn.Module, manifest: dict, plan: EigenPlan | None, weights: str | None) -> CompressedModel:
    recipe = Recipe.from_dict(manifest["recipe"])
    if weights is not None:
        recipe = recipe.with_changes(weights=weights)
        quantize_weights(model, weights)
    cache = None if manifest["cache_config"] is None else quant_config_from_dict(manifest["cache_config"])
    return CompressedModel(model, recipe, plan, cache)


def load_compressed(model: nn.Module, path: str | os.PathLike, *, weights: str | None = None) -> CompressedModel:
    """Apply what ``path`` (a ``save_pretrained`` folder) holds onto a fresh copy of the original model.

    The model may be loaded in another dtype than the one calibrated (float32 ->
    float16/bfloat16); any other change to its attention weights is refused.

    Args:
        weights: quantize the weights too (``"int8"``/``"nf4"``).
    """
    path = Path(path)
    manifest = _read_manifest(path)
    plan = EigenPlan.load(path / PLAN_DIR) if (path / PLAN_DIR).is_dir() else None
    if plan is not None:
        apply_plan(model, plan)
    return _restore(model, manifest, plan, weights)


def from_pretrained(
    path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: str | None = None, weights=None
) -> CompressedModel:
    """Load a ``save_pretrained`` folder: the compressed model with its folded weights, no original needed.

    Args:
        dtype: cast the model (default: as saved); device: move it (default: CPU).
        weights: quantize the weights after loading (``"int8"``/``"nf4"``).
    """
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    try:  # transformers >= 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    path = Path(path)
    manifest = _read_manifest(path)
    config = AutoConfig.from_pretrained(path)
    saved_dtype = resolve_dtype(manifest["dtype"])
    with no_init_weights():  # every weight is overwritten by the saved ones
        model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype).eval()
    plan = EigenPlan.load(path / PLAN_DIR) if (path / PLAN_DIR).is_dir() else None
    if plan is not None:
        apply_plan(model, plan, check=False)  # the structure; the folded weights are loaded next
    missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    if unexpected or [k for k in missing if not _tied(model, k)]:
        raise ValueError(
            f"{path / WEIGHTS} does not fit the model its recipe builds (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); save the model again"
        )
    if dtype is not None or device is not None:
        model.to(device=device, dtype=None if dtype is None else resolve_dtype(dtype))
    return _restore(model, manifest, plan, weights)


def _tied(model: nn.Module, key: str) -> bool:
    """Whether ``key`` is a weight tied to another (saved once), such as an LM head tied to the embeddings."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied
