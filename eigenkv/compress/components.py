"""Quantization-aware components: rescale, rotate and split a plan's cached coefficients before quantizing.

The coefficients a compressed cache holds are sorted by importance and their
sizes differ by orders of magnitude, so one group-wise quantizer over them
spends its range on the first few. Three options, all folded into the plan's
bases (``E' = E T``, ``D' = D T^{-T}`` keeps ``D'^T E' = I``, so the model
without quantization is unchanged and nothing runs at inference time):

- ``scale``: divide each component by its calibration RMS (``T = diag(1/s)``),
  so every component of a group has unit variance. A linear error model says
  this lowers a shared-range group's error (component ``i``'s error becomes
  proportional to ``s_i^2`` instead of ``max_j s_j^2``), but min-max groups
  store their extremes exactly, and the dominant component usually *is* the
  extreme: equalising the variances takes that exactness from the component
  that matters most. Measured on SmolLM2 it loses (0.6x + 2-bit g128: 62 ->
  104 ppl); it stays an option to measure on other models. Per-channel groups
  (keys, KIVI style) are scale invariant; it acts on per-token groups (values).
- ``high_bits`` (mixed precision, as ResQ keeps its top subspace in 8 bits):
  the leading ``k`` components of each layer's keys and values are stored at
  ``high_bits``, the rest at the quantizer's bits (a ``MixedKVQuantConfig``).
  ``k`` is ``ceil(high_fraction * r)``, or, with ``high_fraction=None``, chosen
  per layer from the spectrum by the reverse water-filling rule: component
  ``i`` (weighted eigenvalue ``l_i``) gets the high precision when its error
  at high bits would still be at least the mean component's error at low bits,
  ``l_i * 4^-high >= mean(l) * 4^-low``.
- ``rotate``: a seeded random orthogonal rotation of each precision block
  (``T = Q``), which spreads one token's outlying component over its group (as
  KVLinC's Hadamard rotation does for heads; ranks are not powers of two,
  hence a random orthogonal matrix). It equalises variances too and loses for
  the same reason (and mixes the per-channel key groups).

``prepare_components(plan, options, quant)`` returns the transformed plan and
the cache configuration to use with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from eigenkv.checks import require_bool, require_fields, require_int, require_number
from eigenkv.compress.plan import EigenPlan
from eigenkv.quant.config import SUPPORTED_BITS, KVQuantConfig, MixedKVQuantConfig


@dataclass(frozen=True)
class ComponentQuantConfig:
    """How a compressed cache's components are prepared for quantization (see the module doc).

    Attributes:
        scale: unit-variance components (needs a plan with coefficient variances).
        rotate: random orthogonal rotation within each precision block.
        high_bits: bits of the leading components; None: one precision.
        high_fraction: fraction of each layer's components at ``high_bits``;
            None: chosen per layer from the spectrum.
        seed: seed of the rotations.
    """

    scale: bool = False
    rotate: bool = False
    high_bits: int | None = None
    high_fraction: float | None = None
    seed: int = 0

    def __post_init__(self):
        require_bool("scale", self.scale)
        require_bool("rotate", self.rotate)
        require_int("seed", self.seed)
        if self.high_bits is not None:
            require_int("high_bits", self.high_bits)
        if self.high_fraction is not None:
            require_number("high_fraction", self.high_fraction, 0, 1, low_open=True)
        if self.high_bits is not None and self.high_bits not in SUPPORTED_BITS:
            raise ValueError(f"high_bits={self.high_bits!r}; use one of {SUPPORTED_BITS} or None")
        if self.high_fraction is not None:
            if self.high_bits is None:
                raise ValueError("high_fraction needs high_bits (the precision of those components)")
            if not 0 < self.high_fraction <= 1:
                raise ValueError(f"high_fraction must be in (0, 1]; got {self.high_fraction!r}")

    def label(self) -> str:
        """Short name, the inverse of :meth:`parse`: e.g. ``scale``, ``scale+rot+hi8x0.25``, ``hi8``."""
        parts = ["scale"] if self.scale else []
        parts += ["rot"] if self.rotate else []
        if self.high_bits is not None:
            parts.append(f"hi{self.high_bits}" + ("" if self.high_fraction is None else f"x{self.high_fraction:g}"))
        return "+".join(parts) or "plain"

    @classmethod
    def parse(cls, spec: str) -> ComponentQuantConfig:
        """``"scale"``, ``"rot"``, ``"hi8"`` (per layer from the spectrum), ``"hi8x0.25"``, joined by ``+``."""
        fields: dict = {}
        for part in spec.split("+"):
            if part == "scale":
                fields["scale"] = True
            elif part == "rot":
                fields["rotate"] = True
            elif part.startswith("hi") and part[2:3].isdigit():
                bits, _, fraction = part[2:].partition("x")
                try:
                    fields["high_bits"] = int(bits)
                    fields["high_fraction"] = float(fraction) if fraction else None
                except ValueError:
                    raise ValueError(
                        f"cannot read {part!r} in {spec!r}: write hi<bits> or hi<bits>x<fraction>"
                    ) from None
            elif part != "plain":
                raise ValueError(
                    f"unknown component option {part!r} in {spec!r}; use scale, rot, hi<bits>[x<fraction>]"
                )
        return cls(**fields)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ComponentQuantConfig:
        return cls(**require_fields("ComponentQuantConfig", data, cls.__dataclass_fields__))


def high_components(eigenvalues: torch.Tensor, rank: int, options: ComponentQuantConfig, low_bits: int) -> int:
    """How many leading components of one layer's keys or values get ``options.high_bits``.

    Args:
        eigenvalues: ``(1 or H_kv, d)`` the basis spectrum, descending (importance of each component).
        rank: components kept.
    """
    if options.high_bits is None or rank == 0:
        return 0
    if options.high_fraction is not None:
        return min(rank, math.ceil(options.high_fraction * rank))
    kept = eigenvalues.to(torch.float64).mean(0)[:rank].clamp_min(0)
    threshold = kept.mean() * 4.0 ** (options.high_bits - low_bits)
    return int((kept >= threshold).sum())


def _rotation(size: int, seed: int) -> torch.Tensor:
    """A ``(size, size)`` float64 random orthogonal matrix (Haar, from a seeded QR)."""
    if size <= 1:
        return torch.ones(size, size, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _transform(
    encoder: torch.Tensor, decoder: torch.Tensor, variance: torch.Tensor | None, split: int, rotate: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``E T`` and ``D T^{-T}`` for ``T = diag(1/s) Q`` (``s`` from ``variance``, ``Q`` block-diagonal)."""
    e, dec = encoder.to(torch.float64), decoder.to(torch.float64)
    if variance is not None:
        rms = variance.to(torch.float64).clamp_min(1e-12).sqrt()  # (H_kv, r)
        if e.shape[0] == 1:  # one basis shared by the heads: one scale per component
            rms = rms.pow(2).mean(0, keepdim=True).sqrt()
        e, dec = e / rms[:, None, :], dec * rms[:, None, :]
    if rotate:
        r = e.shape[-1]
        q = torch.block_diag(_rotation(split, seed), _rotation(r - split, seed + 1)) if split else _rotation(r, seed)
        e, dec = e @ q, dec @ q  # Q orthogonal: Q^{-T} = Q
    return e.to(torch.float32), dec.to(torch.float32)


def prepare_components(
    plan: EigenPlan, options: ComponentQuantConfig, quant: KVQuantConfig
) -> tuple[EigenPlan, KVQuantConfig | MixedKVQuantConfig]:
    """The plan with transformed bases, and the cache config that quantizes it as ``options`` says.

    Args:
        plan: a plan from ``compress_model`` (not already prepared).
        options: what to do to the components.
        quant: the quantizer (of every component, or of those after the leading ones).

    Returns:
        ``(plan, config)``: apply the plan with ``apply_plan`` and quantize with
        ``QuantizedKV(model, config)``; ``config`` is a ``MixedKVQuantConfig`` when
        ``options.high_bits`` is set.
    """
    if not isinstance(options, ComponentQuantConfig):
        raise TypeError(f"options must be a ComponentQuantConfig; got {type(options).__name__}")
    if not isinstance(quant, KVQuantConfig):
        raise TypeError(f"quant must be a KVQuantConfig; got {type(quant).__name__}")
    if quant.rotate:
        raise ValueError("quant.rotate rotates head dimensions; use ComponentQuantConfig(rotate=True) for components")
    if "components" in plan.extra:
        raise ValueError("this plan's components are already prepared; prepare the plan compress_model returned")
    if options.high_bits is not None and options.high_bits <= quant.bits:
        raise ValueError(f"high_bits={options.high_bits} must exceed the quantizer's {quant.bits} bits")
    if options.scale and not plan.key_variances:
        raise ValueError(
            "scale=True needs per-component coefficient variances, which this plan (saved before they were "
            "recorded) lacks; recompute it with compress_model"
        )
    keys, values, key_duals, value_duals, key_high, value_high = [], [], [], [], [], []
    for layer, (r_k, r_v) in enumerate(plan.ranks):
        kept = plan.kept(layer)
        kinds = (
            (r_k, kept.key, kept.key_decoder, plan.key_eigenvalues, plan.key_variances, keys, key_duals, key_high),
            (r_v, kept.value, kept.value_decoder, plan.value_eigenvalues, plan.value_variances, values, value_duals,
             value_high),
        )  # fmt: skip
        for index, (rank, encoder, decoder, eig, variances, out, duals, high) in enumerate(kinds):
            split = high_components(eig[layer], rank, options, quant.bits)
            variance = variances[layer] if options.scale else None
            seed = options.seed + 4 * layer + 2 * index  # two rotations (blocks) per layer and kind
            e, d = _transform(encoder, decoder, variance, split, options.rotate, seed)
            out.append(e)
            duals.append(d)
            high.append(split)
    rescaled = options.scale or bool(plan.key_duals)
    prepared = replace(
        plan,
        key_bases=keys,
        value_bases=values,
        key_duals=key_duals if rescaled else [],
        value_duals=value_duals if rescaled else [],
        key_variances=[],  # no longer the variances of these coefficients
        value_variances=[],
        extra={**plan.extra, "components": {**options.to_dict(), "key_high": key_high, "value_high": value_high}},
    )
    prepared.validate()
    if options.high_bits is None:
        return prepared, quant
    return prepared, MixedKVQuantConfig(quant, options.high_bits, tuple(key_high), tuple(value_high))
