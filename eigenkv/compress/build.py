"""Compressing a model with Eigen Attention: calibrate, fit bases, allot ranks, fold.

``compress_model(model, windows, config)`` runs the whole low-rank method on
``model`` in place and returns the :class:`~eigenkv.compress.plan.EigenPlan`;
``apply_plan(model, plan)`` folds a saved plan into a fresh copy of the same
model without recalibrating (and refuses any other model).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from eigenkv.compress.allot import Allotter, LayerSize, truncate
from eigenkv.compress.attention import EigenAttention
from eigenkv.compress.basis import coefficient_variance, layer_bases
from eigenkv.compress.calibrate import Calibration, calibrate
from eigenkv.compress.config import EigenConfig
from eigenkv.compress.families import (
    attention_sites,
    build_eigen_attention,
    family_of,
    head_shape,
    layer_rope,
    output_gram,
    replace,
    rope_rotations,
)
from eigenkv.compress.plan import EigenPlan
from eigenkv.compress.sensitivity import OutputChange
from eigenkv.compress.signature import check_signature, model_signature
from eigenkv.data import TokenWindows
from eigenkv.quant.config import layer_windows


@torch.no_grad()
def compress_model(
    model: nn.Module,
    calibration: TokenWindows | Calibration,
    config: EigenConfig | None = None,
    *,
    progress: bool = True,
    apply: bool = True,
) -> EigenPlan:
    """Calibrate, allot ranks and fold the bases into ``model``'s attention, in place.

    Args:
        model: a Llama-family, OPT or MPT causal LM (eval mode; float32 recommended for calibration).
        calibration: ``(N, T)`` token windows (Brown, or Wikitext-2 windows
            disjoint from those evaluated; recorded in the plan), or the
            :class:`~eigenkv.compress.calibrate.Calibration` of an earlier
            ``calibrate(model, windows, gradients=True)`` on this model, to try
            several configs without running the model again.
        config: bases and ranks (default ``EigenConfig()``: 0.6x, pre-RoPE,
            output-aware bases, Fisher allotment).
        progress: progress bars.
        apply: fold the plan into ``model`` (False: leave the model as it is, e.g. to prepare
            the plan's components first, see ``eigenkv.compress.components``).

    Returns:
        The :class:`EigenPlan` (save it with ``plan.save(dir)``).
    """
    config = config or EigenConfig()
    if not isinstance(config, EigenConfig):
        raise TypeError(f"config must be an EigenConfig; got {type(config).__name__}")
    family = family_of(model)
    mode = config.rope_mode if family == "llama" else "none"
    if config.basis == "output-rope" and mode != "pre":
        raise ValueError(f"basis 'output-rope' weights pre-RoPE keys; a {family} model has none: use basis='output'")
    signature = model_signature(model)
    sites = attention_sites(model)
    for site in sites:
        head_shape(site.module)  # refuses unsupported variants before the long calibration
    calib = _statistics(model, calibration, config, mode, signature, progress)
    start = time.perf_counter()
    bases = fit_bases(model, sites, calib, config, mode)
    ranks, allotter, extra = _allot(model, sites, calib, bases, config, mode, progress)
    kept = [truncate(b, *r) for b, r in zip(bases, ranks, strict=True)]
    plan = EigenPlan(
        config=config,
        mode=mode,
        ranks=ranks,
        key_bases=[k.key.to(torch.float32) for k in kept],
        value_bases=[k.value.to(torch.float32) for k in kept],
        key_eigenvalues=[b.key_eigenvalues for b in bases],
        value_eigenvalues=[b.value_eigenvalues for b in bases],
        errors=[allotter.error(layer, *r) for layer, r in enumerate(ranks)],
        calibration={
            **calib.source,
            "calibration_seconds": calib.seconds,
            "allotment_seconds": time.perf_counter() - start,
            "error_evaluations": allotter.evaluations,
            "error_budget": allotter.budget,
        },
        signature=signature,
        extra=extra,
        key_duals=[] if config.basis == "pca" else [k.key_decoder.to(torch.float32) for k in kept],
        value_duals=[] if config.basis == "pca" else [k.value_decoder.to(torch.float32) for k in kept],
        key_variances=[coefficient_variance(s.keys, k.key, s.tokens) for s, k in zip(calib.layers, kept, strict=True)],
        value_variances=[
            coefficient_variance(s.values, k.value, s.tokens) for s, k in zip(calib.layers, kept, strict=True)
        ],
    )
    if apply:
        apply_plan(model, plan)
    return plan


def _uses_fisher(config: EigenConfig) -> bool:
    return config.allot == "fisher" and config.target_ratio is not None


def _statistics(model, calibration, config: EigenConfig, mode: str, signature: dict, progress: bool) -> Calibration:
    """The calibration statistics: collected now from windows, or an earlier ``Calibration`` checked to fit."""
    fisher = _uses_fisher(config)
    if not isinstance(calibration, Calibration):
        return calibrate(
            model,
            calibration,
            rotated=mode == "post",
            error_windows=config.error_windows,
            gradients=fisher,
            progress=progress,
        )
    if calibration.signature != signature:
        raise ValueError("this Calibration was collected on another model; calibrate this one")
    if calibration.rotated != (mode == "post"):
        raise ValueError(
            f"this Calibration holds {'post' if calibration.rotated else 'pre'}-RoPE statistics; "
            f"rope_mode={mode!r} needs the other kind: calibrate(model, windows, rotated=...)"
        )
    if fisher and not calibration.has_gradients:
        raise ValueError("allot='fisher' needs loss gradients: calibrate(model, windows, gradients=True)")
    return calibration


def fit_bases(model, sites: list, calib: Calibration, config: EigenConfig, mode: str) -> list:
    """Full-rank bases of every layer (PCA or output-aware), sorted by importance."""
    rotations = {}  # per (RoPE, window): layers of one kind share them (Gemma-3: local and global)
    windows = layer_windows(model.config) if config.basis == "output-rope" else None

    def rope_of(site):
        if windows is None:
            return None
        rope, window = layer_rope(model, site.layer), windows[site.layer]
        key = (id(rope.module), rope.layer_type, window)
        if key not in rotations:
            length = int(calib.source["seq_len"])
            rotations[key] = rope_rotations(rope, length, head_shape(site.module).head_dim, window)
        return rotations[key]

    return [
        layer_bases(
            stats,
            mode,
            config.basis,
            value_weight=None if config.basis == "pca" else output_gram(site.module),
            rope=rope_of(site),
        )
        for stats, site in zip(calib.layers, sites, strict=True)
    ]


def _allot(model, sites, calib: Calibration, bases: list, config: EigenConfig, mode: str, progress: bool):
    """``(ranks per layer, the Allotter, plan extras)``: ranks meeting the ratio or the error budget."""
    fisher = _uses_fisher(config)
    sizes = [LayerSize(s.kv_heads, s.head_dim) for s in map(head_shape, (site.module for site in sites))]
    measure = OutputChange(model, sites, calib, bases, mode)
    sensitivity = measure.predicted_loss if fisher else None
    allotter = Allotter(bases, sizes, config, measure.relative_error, sensitivity, progress=progress)
    if fisher:  # the curves depend on the calibration and bases, not on the ratio: measure them once
        key = ("sensitivity", config.basis, config.min_rank)
        if key in calib.derived:
            allotter.use_curves(*calib.derived[key])
        else:
            calib.derived[key] = (allotter.curves(), allotter.sensitivity_evaluations)
    if config.ranks is not None:
        ranks = given_ranks(config.ranks, sizes)
    elif config.target_ratio is not None:
        ranks = allotter.target(config.target_ratio)
    else:
        ranks = allotter.error_budget(config.error_budget)
    extra = {}
    if fisher:
        curves = allotter.curves()
        extra["predicted_loss"] = [[curves[i][0][rk], curves[i][1][rv]] for i, (rk, rv) in enumerate(ranks)]
        extra["predicted_nll_increase"] = allotter.predicted(ranks)
        # The measured curves themselves (index = rank): score other allotments, draw them.
        extra["sensitivity"] = {"keys": [k for k, _ in curves], "values": [v for _, v in curves]}
    return ranks, allotter, extra


def given_ranks(ranks, sizes: list[LayerSize]) -> list[tuple[int, int]]:
    """``EigenConfig.ranks`` checked against the model: one pair per layer, each within the head size."""
    if len(ranks) != len(sizes):
        raise ValueError(f"EigenConfig.ranks lists {len(ranks)} layers; this model has {len(sizes)}")
    for layer, ((r_k, r_v), size) in enumerate(zip(ranks, sizes, strict=True)):
        if max(r_k, r_v) > size.head_dim:
            raise ValueError(
                f"EigenConfig.ranks gives layer {layer} ranks ({r_k}, {r_v}); its heads have {size.head_dim} features"
            )
    return [tuple(r) for r in ranks]


def apply_plan(model: nn.Module, plan: EigenPlan, *, check: bool = True) -> nn.Module:
    """Replace every attention module of ``model`` by its rank-space twin from ``plan``, in place.

    On a model spread over devices (``load_model(..., device_map=...)``), each layer's folded attention computes
    on that layer's device, and a layer whose weights accelerate offloaded keeps its folded weights offloaded
    the same way (CPU memory, or the offload folder).

    Args:
        check: refuse a model whose attention weights are not those the plan was fitted to
            (:func:`~eigenkv.compress.signature.check_signature`). Only loading a saved compressed
            model turns it off, to rebuild the structure before loading the folded weights.
    """
    family = family_of(model)
    if check:
        check_signature(plan.signature, model)
    if (family == "llama") != (plan.mode != "none"):
        raise ValueError(f"plan mode {plan.mode!r} does not fit a {family} model")
    for site in attention_sites(model):
        replace(site, build_eigen_attention(model, site.module, plan.kept(site.layer), plan.mode, offload=True))
    return model


def is_compressed(model: nn.Module) -> bool:
    """Whether ``model``'s attention runs in rank space (compressed by :func:`compress_model` or :func:`apply_plan`)."""
    return any(isinstance(m, EigenAttention) for m in model.modules())
