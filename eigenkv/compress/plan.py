"""A compression plan (config, ranks, bases, calibration record), its artifact, and applying it.

``compress_model(model, windows, config)`` calibrates, allots ranks, folds the
bases into the model's attention modules in place and returns the
:class:`EigenPlan`; ``plan.save(dir)`` writes ``plan.json`` + ``bases.safetensors``
atomically; ``load_compressed(model, dir)`` re-applies a saved plan to a fresh
copy of the same model without recalibrating, and refuses a plan made for
another model or with a corrupt artifact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from eigenkv._atomic import atomic_directory
from eigenkv.compress.allot import Allotter, LayerSize, kv_ratio, truncate
from eigenkv.compress.attention import EigenAttention, KeptBases
from eigenkv.compress.basis import layer_bases
from eigenkv.compress.calibrate import Calibration, calibrate
from eigenkv.compress.config import EigenConfig
from eigenkv.compress.families import (
    attention_sites,
    build_eigen_attention,
    family_of,
    head_shape,
    output_gram,
    replace,
    rope_rotations,
)
from eigenkv.eval.data import TokenWindows

FORMAT = "eigenkv-plan/2"  # /2 adds output-aware bases (decoders); /1 plans (PCA only) still load
PLAN_FILE, BASES_FILE = "plan.json", "bases.safetensors"


def model_signature(model: nn.Module) -> dict:
    """What a plan must match: family, attention shapes per layer, and a digest of some attention weights."""
    family = family_of(model)
    sites = attention_sites(model)
    shapes = [head_shape(s.module) for s in sites]
    digest = hashlib.sha256()
    for site in (sites[0], sites[-1]):
        weight = site.module.Wqkv.weight if family == "mpt" else site.module.k_proj.weight
        digest.update(weight.detach().flatten()[:4096].to(torch.float32).cpu().numpy().tobytes())
    config = model.config
    return {
        "family": family,
        "model_type": getattr(config, "model_type", None),
        "layers": len(sites),
        "q_heads": [s.q_heads for s in shapes],
        "kv_heads": [s.kv_heads for s in shapes],
        "head_dim": [s.head_dim for s in shapes],
        "weights_sha256": digest.hexdigest(),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
    }


@dataclass
class EigenPlan:
    """Everything needed to compress a model again without recalibrating.

    Attributes:
        config: the settings that produced it.
        mode: ``"pre"``/``"post"`` (RoPE models) or ``"none"`` (OPT, MPT).
        ranks: per layer ``(r_k, r_v)``.
        key_bases: per layer ``(1 or H_kv, d, r_k)`` float32 encoders ``E_k``
            (orthonormal columns for PCA).
        value_bases: per layer ``(H_kv, d, r_v)`` float32 encoders ``E_v``.
        key_duals, value_duals: the decoders ``D`` (``D^T E = I``), same shapes;
            empty for PCA bases, whose decoders are the encoders.
        key_eigenvalues, value_eigenvalues: per layer the full spectra ``(1 or H_kv, d)``.
        key_variances, value_variances: per layer ``(H_kv, r)`` float64 mean square of each
            cached coefficient on the calibration tokens (what ``components`` scales by);
            empty in plans saved before they were recorded.
        errors: per layer the relative attention-output error at the chosen ranks on the kept windows.
        calibration: which windows calibrated it, how many tokens, and timings.
        signature: the model it belongs to (:func:`model_signature`).
    """

    config: EigenConfig
    mode: str
    ranks: list[tuple[int, int]]
    key_bases: list[torch.Tensor]
    value_bases: list[torch.Tensor]
    key_eigenvalues: list[torch.Tensor]
    value_eigenvalues: list[torch.Tensor]
    errors: list[float]
    calibration: dict
    signature: dict
    extra: dict = field(default_factory=dict)
    key_duals: list[torch.Tensor] = field(default_factory=list)
    value_duals: list[torch.Tensor] = field(default_factory=list)
    key_variances: list[torch.Tensor] = field(default_factory=list)
    value_variances: list[torch.Tensor] = field(default_factory=list)

    def kept(self, layer: int) -> KeptBases:
        """The bases of ``layer`` as the attention modules take them."""
        return KeptBases(
            key=self.key_bases[layer],
            value=self.value_bases[layer],
            key_dual=self.key_duals[layer] if self.key_duals else None,
            value_dual=self.value_duals[layer] if self.value_duals else None,
        )

    @property
    def sizes(self) -> list[LayerSize]:
        return [LayerSize(k, d) for k, d in zip(self.signature["kv_heads"], self.signature["head_dim"], strict=True)]

    @property
    def ratio(self) -> float:
        """Per-token KV elements kept, over the uncompressed cache's."""
        return kv_ratio(self.ranks, self.sizes)

    def summary(self) -> str:
        ks = [r for r, _ in self.ranks]
        vs = [r for _, r in self.ranks]
        return (
            f"{self.config.label()} ({self.config.method_name} method, {self.signature['family']}, mode {self.mode}): "
            f"ratio {self.ratio:.4f}; "
            f"key ranks {min(ks)}-{max(ks)} (mean {sum(ks) / len(ks):.1f}), "
            f"value ranks {min(vs)}-{max(vs)} (mean {sum(vs) / len(vs):.1f})"
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "method": self.config.method_name,
            "mode": self.mode,
            "ratio": self.ratio,
            "ranks": [list(r) for r in self.ranks],
            "errors": self.errors,
            "calibration": self.calibration,
            "signature": self.signature,
            "extra": self.extra,
        }

    def plot_ranks(self, path: str | os.PathLike) -> Path:
        """Bar chart of the key and value rank of every layer (PNG or SVG by suffix)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = range(len(self.ranks))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(self.ranks)), 3.2))
        ax.bar([i - 0.2 for i in layers], [k for k, _ in self.ranks], width=0.4, label="keys $r_k$")
        ax.bar([i + 0.2 for i in layers], [v for _, v in self.ranks], width=0.4, label="values $r_v$")
        ax.axhline(max(self.signature["head_dim"]), color="gray", lw=0.8, ls="--", label="head size")
        ax.set_xlabel("layer")
        ax.set_ylabel("rank")
        name = Path(self.signature.get("name_or_path") or self.signature["model_type"]).name
        ax.set_title(f"{name}: {self.config.label()}, mode {self.mode}, KV ratio {self.ratio:.3f}", fontsize=9)
        ax.set_ylim(0, max(self.signature["head_dim"]) * 1.25)
        ax.legend(fontsize=7, ncols=3, loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)

    def save(self, path: str | os.PathLike, overwrite: bool = False, figure: bool = True) -> Path:
        """Write ``path/plan.json``, ``path/bases.safetensors`` and (``figure``) ``path/ranks.png``.

        The folder is staged and renamed in one step, so it is complete or absent.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} exists; choose another folder or pass overwrite=True")
            import shutil

            shutil.rmtree(path)
        tensors = {}
        for i in range(len(self.ranks)):
            tensors[f"layers.{i}.key_basis"] = self.key_bases[i].to(torch.float32).contiguous()
            tensors[f"layers.{i}.value_basis"] = self.value_bases[i].to(torch.float32).contiguous()
            tensors[f"layers.{i}.key_eigenvalues"] = self.key_eigenvalues[i].to(torch.float64).contiguous()
            tensors[f"layers.{i}.value_eigenvalues"] = self.value_eigenvalues[i].to(torch.float64).contiguous()
            if self.key_duals:
                tensors[f"layers.{i}.key_dual"] = self.key_duals[i].to(torch.float32).contiguous()
                tensors[f"layers.{i}.value_dual"] = self.value_duals[i].to(torch.float32).contiguous()
            if self.key_variances:
                tensors[f"layers.{i}.key_variance"] = self.key_variances[i].to(torch.float64).contiguous()
                tensors[f"layers.{i}.value_variance"] = self.value_variances[i].to(torch.float64).contiguous()
        with atomic_directory(path) as staging:
            save_file(tensors, staging / BASES_FILE, metadata={"format": FORMAT})
            (staging / PLAN_FILE).write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
            if figure:
                self.plot_ranks(staging / "ranks.png")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EigenPlan:
        """Read a plan folder; a missing, truncated or inconsistent artifact raises ``ValueError``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / PLAN_FILE).is_file() or not (path / BASES_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a compression plan: it needs {PLAN_FILE} and {BASES_FILE}")
        try:
            meta = json.loads((path / PLAN_FILE).read_text())
            tensors = load_file(path / BASES_FILE)
        except (json.JSONDecodeError, SafetensorError, OSError) as err:
            raise ValueError(
                f"corrupt compression plan in {path}: {err}; recompute it with `eigenkv compress`"
            ) from err
        if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, "eigenkv-plan/1"):
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{path / PLAN_FILE} has format {found!r}, expected {FORMAT!r}")
        try:
            ranks = [(int(k), int(v)) for k, v in meta["ranks"]]
            config = meta["config"]
            if meta["format"] == "eigenkv-plan/1":  # written before output-aware bases existed
                config = {"basis": "pca", **config}
            config = EigenConfig.from_dict(config)
            names = ["key_basis", "value_basis", "key_eigenvalues", "value_eigenvalues"]
            for optional in (("key_dual", "value_dual"), ("key_variance", "value_variance")):
                names += list(optional) if f"layers.0.{optional[0]}" in tensors else []
            bases = {name: [tensors[f"layers.{i}.{name}"] for i in range(len(ranks))] for name in names}
            plan = cls(
                config=config,
                mode=meta["mode"],
                ranks=ranks,
                key_bases=bases["key_basis"],
                value_bases=bases["value_basis"],
                key_eigenvalues=bases["key_eigenvalues"],
                value_eigenvalues=bases["value_eigenvalues"],
                errors=meta["errors"],
                calibration=meta["calibration"],
                signature=meta["signature"],
                extra=meta.get("extra", {}),
                key_duals=bases.get("key_dual", []),
                value_duals=bases.get("value_dual", []),
                key_variances=bases.get("key_variance", []),
                value_variances=bases.get("value_variance", []),
            )
            plan.validate()
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"corrupt compression plan in {path}: {err!r}; recompute it with `eigenkv compress`"
            ) from err
        return plan

    def validate(self) -> None:
        """Shapes agree with the ranks and signature, and every pair is biorthogonal (``D^T E = I``)."""
        sig = self.signature
        if not (len(self.ranks) == len(self.key_bases) == len(self.value_bases) == sig["layers"]):
            raise ValueError(f"plan lists {len(self.ranks)} ranks for a {sig['layers']}-layer model")
        # PCA plans carry decoders only once components are rescaled (``eigenkv.compress.components``).
        if (self.config.basis != "pca" and not self.key_duals) or len(self.key_duals) != len(self.value_duals):
            raise ValueError(f"basis {self.config.basis!r} does not match the decoders stored")
        if self.key_variances and not (len(self.key_variances) == len(self.value_variances) == len(self.ranks)):
            raise ValueError("plan stores coefficient variances for some layers only")
        for i, (r_k, r_v) in enumerate(self.ranks):
            d, kv = sig["head_dim"][i], sig["kv_heads"][i]
            key_heads = 1 if self.mode == "pre" and self.config.basis == "pca" else kv
            kept = self.kept(i)
            for name, encoder, decoder, want in (
                ("key", kept.key, kept.key_decoder, (key_heads, d, r_k)),
                ("value", kept.value, kept.value_decoder, (kv, d, r_v)),
            ):
                if tuple(encoder.shape) != want or tuple(decoder.shape) != want:
                    raise ValueError(
                        f"layer {i} {name} bases have shapes {tuple(encoder.shape)}/{tuple(decoder.shape)}, "
                        f"expected {want}"
                    )
                product = decoder.transpose(-1, -2).to(torch.float64) @ encoder.to(torch.float64)
                eye = torch.eye(want[-1], dtype=torch.float64).expand_as(product)
                if not torch.allclose(product, eye, atol=1e-3):
                    raise ValueError(f"layer {i} {name} decoder and encoder are not biorthogonal: the plan is corrupt")
            if self.key_variances:
                for name, variances, r in (
                    ("key", self.key_variances[i], r_k),
                    ("value", self.value_variances[i], r_v),
                ):
                    if tuple(variances.shape) != (kv, r):
                        raise ValueError(
                            f"layer {i} {name} variances have shape {tuple(variances.shape)}, expected {(kv, r)}"
                        )


def _check_plan_matches(plan: EigenPlan, model: nn.Module) -> None:
    actual = model_signature(model)
    for key in ("family", "layers", "q_heads", "kv_heads", "head_dim", "weights_sha256"):
        if plan.signature[key] != actual[key]:
            raise ValueError(
                f"this plan was made for another model: {key} is {plan.signature[key]} in the plan but "
                f"{actual[key]} in this model ({plan.signature.get('name_or_path')} vs {actual.get('name_or_path')}); "
                "compress this model with its own calibration"
            )
    if actual["family"] != "llama" and plan.mode != "none" or actual["family"] == "llama" and plan.mode == "none":
        raise ValueError(f"plan mode {plan.mode!r} does not fit a {actual['family']} model")


def apply_plan(model: nn.Module, plan: EigenPlan) -> nn.Module:
    """Replace every attention module of ``model`` by its rank-space twin from ``plan``, in place."""
    _check_plan_matches(plan, model)
    for site in attention_sites(model):
        replace(site, build_eigen_attention(model, site.module, plan.kept(site.layer), plan.mode))
    return model


def load_compressed(model: nn.Module, path: str | os.PathLike) -> EigenPlan:
    """Compress ``model`` in place with the plan saved in ``path`` (no calibration); returns the plan."""
    plan = EigenPlan.load(path)
    apply_plan(model, plan)
    return plan


def is_compressed(model: nn.Module) -> bool:
    return any(isinstance(m, EigenAttention) for m in model.modules())


@torch.no_grad()
def compress_model(
    model: nn.Module,
    calibration: TokenWindows | Calibration,
    config: EigenConfig | None = None,
    *,
    progress: bool = True,
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
    fisher = config.allot == "fisher" and config.target_ratio is not None
    if isinstance(calibration, Calibration):
        calib = calibration
        if calib.signature != signature:
            raise ValueError("this Calibration was collected on another model; calibrate this one")
        if calib.rotated != (mode == "post"):
            raise ValueError(
                f"this Calibration holds {'post' if calib.rotated else 'pre'}-RoPE statistics; "
                f"rope_mode={mode!r} needs the other kind: calibrate(model, windows, rotated=...)"
            )
        if fisher and not calib.has_gradients:
            raise ValueError("allot='fisher' needs loss gradients: calibrate(model, windows, gradients=True)")
    else:
        calib = calibrate(
            model,
            calibration,
            rotated=mode == "post",
            error_windows=config.error_windows,
            gradients=fisher,
            progress=progress,
        )
    start = time.perf_counter()
    rope = None
    if config.basis == "output-rope":
        length = int(calib.source["seq_len"])
        rope = rope_rotations(model, length, head_shape(sites[0].module).head_dim)
    bases = [
        layer_bases(
            stats,
            mode,
            config.basis,
            value_weight=None if config.basis == "pca" else output_gram(site.module),
            rope=rope,
        )
        for stats, site in zip(calib.layers, sites, strict=True)
    ]
    sizes = [LayerSize(s.kv_heads, s.head_dim) for s in map(head_shape, (site.module for site in sites))]
    measure = _OutputChange(model, sites, calib, bases, mode)
    sensitivity = measure.predicted_loss if fisher else None
    allotter = Allotter(bases, sizes, config, measure.relative_error, sensitivity, progress=progress)
    if fisher:  # the curves depend on the calibration and bases, not on the ratio: measure them once
        key = ("sensitivity", config.basis, config.min_rank)
        if key in calib.derived:
            allotter.use_curves(*calib.derived[key])
        else:
            calib.derived[key] = (allotter.curves(), allotter.sensitivity_evaluations)
    if config.target_ratio is not None:
        ranks = allotter.target(config.target_ratio)
    else:
        ranks = allotter.error_budget(config.error_budget)
    errors = [allotter.error(layer, *r) for layer, r in enumerate(ranks)]
    allot_seconds = time.perf_counter() - start
    kept = [truncate(b, *r) for b, r in zip(bases, ranks, strict=True)]
    extra = {}
    if fisher:
        curves = allotter.curves()
        extra["predicted_loss"] = [[curves[i][0][rk], curves[i][1][rv]] for i, (rk, rv) in enumerate(ranks)]
        extra["predicted_nll_increase"] = allotter.predicted(ranks)
        # The measured curves themselves (index = rank): score other allotments, draw them.
        extra["sensitivity"] = {"keys": [k for k, _ in curves], "values": [v for _, v in curves]}
    plan = EigenPlan(
        config=config,
        mode=mode,
        ranks=ranks,
        key_bases=[k.key.to(torch.float32) for k in kept],
        value_bases=[k.value.to(torch.float32) for k in kept],
        key_eigenvalues=[b.key_eigenvalues for b in bases],
        value_eigenvalues=[b.value_eigenvalues for b in bases],
        errors=errors,
        calibration={
            **calib.source,
            "calibration_seconds": calib.seconds,
            "allotment_seconds": allot_seconds,
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
    apply_plan(model, plan)
    return plan


def coefficient_variance(gram: torch.Tensor, encoder: torch.Tensor, tokens: int) -> torch.Tensor:
    """Mean square of each coefficient ``x E`` over calibration tokens: ``diag(E^T G E) / N``.

    Args:
        gram: ``(H_kv, d, d)`` float64 sum of ``x^T x`` per KV head.
        encoder: ``(1 or H_kv, d, r)``.
    Returns:
        ``(H_kv, r)`` float64.
    """
    e = encoder.to(gram.device, torch.float64).expand(gram.shape[0], -1, -1)
    return torch.einsum("hdr,hde,her->hr", e, gram, e) / max(tokens, 1)


class _OutputChange:
    """How much one layer's attention output changes on the kept calibration windows at reduced ranks.

    The reference outputs are computed once per layer; each measurement folds
    the truncated bases into a twin of the layer and runs it on the same inputs.
    """

    def __init__(self, model: nn.Module, sites: list, calib: Calibration, bases: list, mode: str):
        self.model, self.sites, self.calib, self.bases, self.mode = model, sites, calib, bases, mode
        self._references: dict[int, list[torch.Tensor]] = {}

    @torch.no_grad()
    def _pairs(self, layer: int, r_k: int, r_v: int):
        site, inputs = self.sites[layer], self.calib.layers[layer].inputs
        if layer not in self._references:
            self._references[layer] = [site.module(*a, **kw)[0] for a, kw in inputs]
        twin = build_eigen_attention(self.model, site.module, truncate(self.bases[layer], r_k, r_v), self.mode)
        for (a, kw), y in zip(inputs, self._references[layer], strict=True):
            yield y, twin(*a, **kw)[0]

    def relative_error(self, layer: int, r_k: int, r_v: int) -> float:
        """``||Y^ - Y||_F / ||Y||_F`` (the paper's criterion)."""
        num = den = 0.0
        for y, y_hat in self._pairs(layer, r_k, r_v):
            num += float((y_hat - y).double().pow(2).sum())
            den += float(y.double().pow(2).sum())
        return math.sqrt(num / max(den, 1e-300))

    def predicted_loss(self, layer: int, r_k: int, r_v: int) -> float:
        """Empirical-Fisher estimate of the mean next-token loss increase: ``1/2 sum_t (g_t . dy_t)^2 / tokens``."""
        total = tokens = 0.0
        gradients = self.calib.layers[layer].gradients
        for (y, y_hat), g in zip(self._pairs(layer, r_k, r_v), gradients, strict=True):
            projected = ((y_hat - y).double() * g.to(y.device, torch.float64)).sum(-1)  # (1, T)
            total += 0.5 * float(projected.pow(2).sum())
            tokens += projected.numel()
        return total / max(tokens, 1.0)
