"""A compression plan (config, ranks, bases, calibration record) and its artifact.

``plan.save(dir)`` writes ``plan.json`` + ``bases.safetensors`` (+ ``ranks.png``)
atomically; ``EigenPlan.load(dir)`` reads it back and refuses a truncated,
inconsistent or edited artifact (``plan.json`` records the SHA-256 of the
bases file and of its own content). ``eigenkv.compress.build`` makes and
applies plans.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eigenkv.compress.allot import LayerSize, kv_ratio
from eigenkv.compress.attention import KeptBases
from eigenkv.compress.config import EigenConfig
from eigenkv.io import atomic_directory, atomic_write_json, check_seal, seal, sha256_file
from eigenkv.plots import plot_ranks

# /3: exact weight digests per dtype and sealed files. Plans of /1 and /2 (digests of a few weights in one
# dtype) cannot be checked against a model: they are refused with a message to recompute them.
FORMAT = "eigenkv-plan/3"
PLAN_FILE, BASES_FILE = "plan.json", "bases.safetensors"


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
        signature: the model it belongs to (:func:`eigenkv.compress.signature.model_signature`).
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
            meta = {**self.to_json(), "bases_sha256": sha256_file(staging / BASES_FILE)}
            atomic_write_json(staging / PLAN_FILE, seal(meta))
            if figure:
                name = Path(self.signature.get("name_or_path") or self.signature["model_type"]).name
                title = f"{name}: {self.config.label()}, mode {self.mode}, KV ratio {self.ratio:.3f}"
                plot_ranks(self.ranks, max(self.signature["head_dim"]), title, staging / "ranks.png")
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
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise ValueError(
                f"corrupt compression plan in {path}: {err}; recompute it with `eigenkv compress`"
            ) from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(
                f"{path / PLAN_FILE} has format {found!r}; this version of eigenkv reads {FORMAT!r}: "
                "recompute the plan with `eigenkv compress`"
            )
        check_seal(meta, path / PLAN_FILE)
        if sha256_file(path / BASES_FILE) != meta.get("bases_sha256"):
            raise ValueError(
                f"{path / BASES_FILE} was modified after the plan was saved (its SHA-256 differs from the one "
                f"recorded in {PLAN_FILE}); recompute the plan with `eigenkv compress`"
            )
        try:
            tensors = load_file(path / BASES_FILE)
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"corrupt compression plan in {path}: {err}; recompute it with `eigenkv compress`"
            ) from err
        try:
            ranks = [(int(k), int(v)) for k, v in meta["ranks"]]
            config = EigenConfig.from_dict(meta["config"])
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
