"""One byte budget for the KV cache, spent on ranks and bit widths together.

Every layer's keys and every layer's values (a *stream*) get one option: a
rank ``r`` (the leading ``r`` components of the layer's basis; ``r = d_h``
keeps them all) and a quantizer (``bits`` x ``groups``, the grouping axes and
window of :class:`BudgetConfig`) or none (16-bit). Quantization alone (every
rank full) and low rank alone (no quantizer) are corners of this space.

**Cost**: an option costs the bytes the accounting (``eigenkv.memory``) counts
for the stream at ``seq_len`` tokens, batch 1: codes, scales, zero points,
full-precision window and padding, for all KV heads, plus, for keys, the
bases attention keeps at run time at that rank (pre-RoPE keys are rebuilt
from them). The model without Eigen Attention keeps no bases.

**Predicted loss** (empirical Fisher, as the rank allotment of ``allot.py``:
``1/2 sum_t (g_t . dy_t)^2 / tokens``, ``dy`` the change of the layer's
attention output on a kept calibration window, ``g`` the loss gradient there),
layers and the two kinds taken as additive:

    F(r, q) = F_rank(r) + F_q * s(r)

- ``F_rank(r)``: the rank curve (the stream at rank ``r``, nothing quantized);
- ``F_q``: the stream at full rank, quantized by ``q`` as a real cache holds
  it (keys per channel and values per token by default, causally: the query
  at position ``p`` reads what the cache holds after ``p + 1`` tokens); the
  other stream exact;
- ``s(r)``: the share of the quantization loss left at rank ``r``, measured
  for one reference quantizer (``reference_bits`` at the middle group size) at
  ``rank_points`` of the head size and interpolated (``s(d_h) = 1``).

Measured: the rank curve (``allot.GRID_POINTS`` ranks), every quantizer of
at most ``NOISE_BITS`` bits at full rank (wider ones scaled from it by the
rounding-noise law), and the reference quantizer at a few ranks, instead of
the full rank x bits x groups product. Why the product form: quantization adds an
error to every cached coefficient, ``sum_i w_i sigma_i^2`` in loss, with
``sigma_i`` set by the group's range and the bits; truncating to rank ``r``
removes the terms ``i >= r`` and changes neither the ranges (set by the
leading components) nor the bits, so the share left depends on ``r`` and the
weights, not on ``q``. The curve in ``benchmarks/eval_allot.py`` checks the
prediction against measured perplexities.

**Choice**: among the options of every stream, the set minimising the summed
predicted loss within the budget, a multiple-choice knapsack solved exactly on
a grid of ``UNITS`` byte units (each option's bytes rounded up, so the choice
fits), then filled greedily with exact bytes. Three candidates are solved: the
model with Eigen Attention (every layer through its bases), without (full
rank, no bases: per-layer mixed-precision quantization), and without with
Hadamard-rotated quantizers allowed too (``rotate``: the rotation spreads
outlier channels, and the one matrix is paid from the budget; rank-space
caches are not rotated). The planner and the curve measure the candidates on
held-out text and keep the best (``eigenkv.eval.planner``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from eigenkv.checks import require_bool, require_choice, require_fields, require_int
from eigenkv.compress.allot import Allotter, LayerSize, interpolate, truncate
from eigenkv.compress.build import fit_bases
from eigenkv.compress.calibrate import Calibration
from eigenkv.compress.config import BASES, ROPE_MODES, EigenConfig
from eigenkv.compress.families import attention_sites, build_eigen_attention, family_of, head_shape
from eigenkv.compress.sensitivity import OutputChange
from eigenkv.compress.signature import model_signature
from eigenkv.memory import DenseStorage, QuantizedStorage, Storage, slide, sliding_layer, stream_storage
from eigenkv.quant.config import AXES, KINDS, SUPPORTED_BITS, KVQuantConfig, LayerwiseKVQuantConfig, layer_windows

UNITS = 1 << 14  # byte units of the exact knapsack (rounding each option up costs < 1 / UNITS of the budget each)
# Codes wider than this are not measured: rounding to 2^b levels adds noise of variance proportional to
# (2^b - 1)^-2, which holds ever better as b grows, so their loss is the widest measured width's scaled by it
# (8 bits: 1/289 of 4 bits'; measuring would resolve little beyond the calibration's noise).
NOISE_BITS = 4


@dataclass(frozen=True)
class BudgetConfig:
    """Which options a byte allotment chooses among (saved beside every allotted recipe).

    Attributes:
        bits: bit widths a stream may be quantized to (empty: none).
        groups: group sizes.
        unquantized: a stream may stay unquantized (16-bit).
        lowrank: ranks below the head size are allowed (False: per-layer mixed-precision quantization of
            the full-rank cache, without Eigen Attention).
        rotate: the model without Eigen Attention may also quantize streams after a Hadamard rotation of the
            head dimension (a third candidate; rank-space caches are not rotated, and head sizes that are not
            powers of two are skipped).
        axis_k, axis_v, residual, symmetric, scale_dtype: the quantizer settings every option shares
            (see ``KVQuantConfig``).
        basis, rope_mode, min_rank, rank_multiple: the low-rank settings (see ``EigenConfig``).
        reference_bits: bits of the quantizer whose loss at reduced ranks gives the share ``s(r)`` (None: the
            middle of the measured widths, those of at most ``NOISE_BITS`` bits).
        rank_points: fractions of the head size where ``s(r)`` is measured.
        seq_len: tokens per sequence the budget is counted at (batch 1).
    """

    bits: tuple[int, ...] = (2, 3, 4, 8)
    groups: tuple[int, ...] = (32, 64, 128)
    unquantized: bool = True
    lowrank: bool = True
    rotate: bool = True
    axis_k: str = "channel"
    axis_v: str = "token"
    residual: int = 0
    symmetric: bool = False
    scale_dtype: str = "float16"
    basis: str = "output"
    rope_mode: str = "pre"
    min_rank: int = 1
    rank_multiple: int = 1
    reference_bits: int | None = None
    rank_points: tuple[float, ...] = (0.25, 0.5, 0.75)
    seq_len: int = 2048

    def __post_init__(self):
        for name in ("bits", "groups", "rank_points"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)):
                raise ValueError(f"BudgetConfig.{name} must be a list; got {value!r}")
            object.__setattr__(self, name, tuple(value))
        unknown = [b for b in self.bits if b not in SUPPORTED_BITS]
        if unknown:
            raise ValueError(f"BudgetConfig.bits {unknown} are not supported; choose among {SUPPORTED_BITS}")
        for g in self.groups:
            require_int("BudgetConfig.groups entry", g, minimum=1)
        if self.bits and not self.groups:
            raise ValueError("BudgetConfig.groups is empty: give the group sizes the quantized options use")
        require_bool("unquantized", self.unquantized)
        require_bool("lowrank", self.lowrank)
        require_bool("rotate", self.rotate)
        if not self.bits and not self.unquantized:
            raise ValueError("no option left: allow some bits, or unquantized=True")
        require_choice("axis_k", self.axis_k, AXES)
        require_choice("axis_v", self.axis_v, AXES)
        require_choice("basis", self.basis, BASES)
        require_choice("rope_mode", self.rope_mode, ROPE_MODES)
        for name in ("min_rank", "rank_multiple", "seq_len"):
            require_int(name, getattr(self, name), minimum=1)
        require_int("residual", self.residual, minimum=0)
        if self.reference_bits is not None and self.reference_bits not in self.bits:
            raise ValueError(f"reference_bits={self.reference_bits} must be one of bits {self.bits}")
        if any(not 0 < p < 1 for p in self.rank_points):
            raise ValueError(f"rank_points are fractions of the head size in (0, 1); got {self.rank_points}")
        self.quantizers()  # KVQuantConfig validates every option

    def quantizers(self, rotate: bool = False) -> list[KVQuantConfig]:
        """Every quantizer option of a stream (``rotate``: their Hadamard-rotated versions)."""
        return [
            KVQuantConfig(
                bits=b,
                group_size=g,
                axis_k=self.axis_k,
                axis_v=self.axis_v,
                residual=self.residual,
                symmetric=self.symmetric,
                scale_dtype=self.scale_dtype,
                rotate=rotate,
            )
            for b in self.bits
            for g in self.groups
        ]

    @property
    def reference(self) -> KVQuantConfig | None:
        """The quantizer measured at reduced ranks: ``reference_bits`` (or the middle measured width) at the
        middle group size."""
        if not self.bits:
            return None
        measured = sorted(b for b in self.bits if b <= NOISE_BITS) or sorted(self.bits)
        bits = self.reference_bits or measured[len(measured) // 2]
        group = sorted(self.groups)[len(self.groups) // 2]
        return next(q for q in self.quantizers() if q.bits == bits and q.group_size == group)

    def eigen(self) -> EigenConfig:
        """The low-rank settings (at a placeholder ratio; an allotment gives the ranks)."""
        return EigenConfig(
            basis=self.basis, rope_mode=self.rope_mode, min_rank=self.min_rank, rank_multiple=self.rank_multiple
        )

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> BudgetConfig:
        return cls(**require_fields("BudgetConfig", data, cls.__dataclass_fields__))


@dataclass
class StreamLosses:
    """Measured predicted losses of one stream (one layer's keys or values).

    Attributes:
        rank: ``F_rank(r)`` for every rank ``r = 0..d`` (interpolated between measured ranks).
        quant: quantizer label -> ``F_q``, the stream at full rank in the compressed model.
        share: ``s(r)`` for every rank ``r = 0..d``.
        original: quantizer label -> ``F_q`` in the model without Eigen Attention.
    """

    rank: list[float]
    quant: dict[str, float] = field(default_factory=dict)
    share: list[float] = field(default_factory=list)
    original: dict[str, float] = field(default_factory=dict)


@dataclass
class Sensitivity:
    """Everything the allotment predicts from, for one model, calibration and :class:`BudgetConfig`.

    Attributes:
        streams: per layer ``(keys, values)``.
        sizes: per layer KV heads and head size.
        windows: per layer its sliding window (None: full attention).
        key_basis: per layer ``(a, b)``: bases kept at run time hold ``a + b * r_k`` elements.
        config: the options measured.
        evaluations, seconds: how many layer measurements, and how long they took.
        signature: the model it was measured on.
    """

    streams: list[tuple[StreamLosses, StreamLosses]]
    sizes: list[LayerSize]
    windows: list[int | None]
    key_basis: list[tuple[int, int]]
    config: BudgetConfig
    evaluations: int
    seconds: float
    signature: dict

    @property
    def rotatable(self) -> bool:
        """Whether rotated quantizers were measured (on the model without Eigen Attention)."""
        return any(label.endswith("-rot") for label in self.streams[0][0].original)

    @property
    def rotation_bytes(self) -> int:
        """Bytes of the Hadamard matrix a rotated cache keeps (float32, head size squared), as the accounting
        counts it."""
        return 4 * self.sizes[0].head_dim ** 2

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "streams": [[asdict(k), asdict(v)] for k, v in self.streams],
            "sizes": [[s.kv_heads, s.head_dim] for s in self.sizes],
            "windows": self.windows,
            "key_basis": [list(b) for b in self.key_basis],
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "signature": self.signature,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Sensitivity:
        try:
            return cls(
                streams=[(StreamLosses(**k), StreamLosses(**v)) for k, v in data["streams"]],
                sizes=[LayerSize(int(h), int(d)) for h, d in data["sizes"]],
                windows=[None if w is None else int(w) for w in data["windows"]],
                key_basis=[(int(a), int(b)) for a, b in data["key_basis"]],
                config=BudgetConfig.from_dict(data["config"]),
                evaluations=int(data["evaluations"]),
                seconds=float(data["seconds"]),
                signature=data["signature"],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed sensitivity record ({err!r}); measure it again") from None


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module, calib: Calibration, config: BudgetConfig | None = None, *, progress: bool = True
) -> Sensitivity:
    """Measure the predicted losses of every option of ``config`` on ``model`` (unmodified).

    Args:
        calib: ``calibrate(model, windows, gradients=True, rotated=rope_mode == "post")`` of this model.

    Raises:
        ValueError: a calibration of another model, of the other RoPE mode, or without gradients.
    """
    config = config or BudgetConfig()
    if not isinstance(calib, Calibration):
        raise TypeError(f"calib must be a Calibration (eigenkv.compress.calibrate); got {type(calib).__name__}")
    if calib.signature != model_signature(model):
        raise ValueError("this Calibration was collected on another model; calibrate this one")
    if not calib.has_gradients:
        raise ValueError(
            "a byte allotment predicts losses from loss gradients: calibrate(model, windows, gradients=True)"
        )
    family = family_of(model)
    mode = config.rope_mode if family == "llama" else "none"
    if calib.rotated != (mode == "post"):
        raise ValueError(f"rope_mode={mode!r} needs a calibration with rotated={mode == 'post'}")
    start = time.perf_counter()
    sites = attention_sites(model)
    sizes = [LayerSize(s.kv_heads, s.head_dim) for s in (head_shape(site.module) for site in sites)]
    eigen = config.eigen()
    bases = fit_bases(model, sites, calib, eigen, mode)
    measure = OutputChange(model, sites, calib, bases, mode)
    evaluations = 0
    curves: list = [([0.0] * (s.head_dim + 1),) * 2 for s in sizes]  # full rank only: no rank curve
    if config.lowrank:
        allotter = Allotter(bases, sizes, eigen, measure.relative_error, measure.predicted_loss)
        key = ("sensitivity", config.basis, config.min_rank)
        if key in calib.derived:  # shared with the rank allotment of the same calibration
            allotter.use_curves(*calib.derived[key])
        else:
            calib.derived[key] = (allotter.curves(), allotter.sensitivity_evaluations)
            evaluations += allotter.sensitivity_evaluations
        curves = allotter.curves()
    streams = []
    rotatable = config.rotate and len({s.head_dim for s in sizes}) == 1 and _power_of_two(sizes[0].head_dim)
    layers = tqdm(range(len(sites)), desc="sensitivity", unit="layer", disable=not progress)
    for layer in layers:
        d = sizes[layer].head_dim
        pair = []
        for kind in KINDS:
            losses = StreamLosses(rank=list(curves[layer][KINDS.index(kind)]))
            quantizers = config.quantizers() + (config.quantizers(rotate=True) if rotatable else [])
            for q in sorted(quantizers, key=lambda q: q.bits):  # narrow first: wide ones scale them
                twin = config.lowrank and not q.rotate  # rank-space caches are not rotated
                base = _noise_base(q, config)
                if base is not None:  # wide codes: scaled from a narrower width (see NOISE_BITS)
                    factor = ((2**base.bits - 1) / (2**q.bits - 1)) ** 2
                    losses.original[q.label()] = losses.original[base.label()] * factor
                    if twin:
                        losses.quant[q.label()] = losses.quant[base.label()] * factor
                    continue
                losses.original[q.label()] = _loss(measure, layer, kind, None, q)
                evaluations += 1
                if twin:
                    losses.quant[q.label()] = _loss(measure, layer, kind, d, q)
                    evaluations += 1
            if config.lowrank and config.reference is not None:
                full = losses.quant[config.reference.label()]
                measured = {d: 1.0}
                for point in config.rank_points:
                    r = max(config.min_rank, min(d - 1, round(point * d)))
                    extra = _loss(measure, layer, kind, r, config.reference, d) - losses.rank[r]
                    measured[r] = max(0.0, extra) / full if full > 0 else 1.0
                    evaluations += 1
                losses.share = interpolate(measured, d, non_increasing=False)
            pair.append(losses)
        streams.append(tuple(pair))
    return Sensitivity(
        streams=streams,
        sizes=sizes,
        windows=layer_windows(model.config),
        key_basis=_key_basis(model, sites, bases, mode, sizes) if config.lowrank else [(0, 0)] * len(sizes),
        config=config,
        evaluations=evaluations,
        seconds=time.perf_counter() - start,
        signature=calib.signature,
    )


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _noise_base(q: KVQuantConfig, config: BudgetConfig) -> KVQuantConfig | None:
    """The quantizer whose measured loss predicts ``q``'s: the widest of ``config.bits`` at most ``NOISE_BITS``
    with the same group, when ``q`` is wider than ``NOISE_BITS`` (None: ``q`` is measured)."""
    narrower = [b for b in config.bits if b <= NOISE_BITS]
    if q.bits <= NOISE_BITS or not narrower:
        return None
    return replace(q, bits=max(narrower))


def _loss(measure: OutputChange, layer: int, kind: str, rank: int | None, quant: KVQuantConfig, d: int = 0) -> float:
    """Predicted loss of ``layer``'s ``kind`` stream at ``rank`` (None: the original module) quantized by
    ``quant``, the other stream exact at full rank (``d``)."""
    ranks = (None, None) if rank is None else (rank, d or rank) if kind == "key" else (d or rank, rank)
    return measure.predicted_loss(layer, *ranks, **{kind + "s": quant})


def _key_basis(model, sites, bases, mode: str, sizes: list[LayerSize]) -> list[tuple[int, int]]:
    """Per layer ``(a, b)`` with ``a + b * r_k`` the basis elements attention keeps at run time (read from twins
    at two key ranks, and checked at a third: they hold matrices of ``r_k`` columns)."""

    def elements(layer: int, r_k: int) -> int:
        d = sizes[layer].head_dim
        twin = build_eigen_attention(model, sites[layer].module, truncate(bases[layer], r_k, d), mode)
        return twin.runtime_basis_elements()

    out = []
    for layer, size in enumerate(sizes):
        one, two = elements(layer, 1), elements(layer, 2)
        a, b = 2 * one - two, two - one
        if size.head_dim > 2 and elements(layer, size.head_dim) != a + b * size.head_dim:
            raise ValueError(f"layer {layer} keeps bases that do not grow linearly with the key rank")
        out.append((a, b))
    return out


@dataclass
class ByteAllotment:
    """What a byte allotment chose.

    Attributes:
        lowrank: the model goes through Eigen Attention (False: the original attention, every rank full).
        rotate: some stream is quantized after a Hadamard rotation (without Eigen Attention).
        ranks: per layer ``(r_k, r_v)`` (the head size when full).
        keys, values: per layer the quantizer of its keys / values (None: unquantized).
        bytes: the cache's bytes at ``seq_len`` tokens, batch 1, as the accounting counts them.
        budget: the budget in bytes.
        predicted: the predicted increase of the mean next-token loss.
        streams: one row per layer and kind (rank, bits, group, bytes, predicted loss).
    """

    lowrank: bool
    rotate: bool
    ranks: list[tuple[int, int]]
    keys: list[KVQuantConfig | None]
    values: list[KVQuantConfig | None]
    bytes: int
    budget: int
    predicted: float
    streams: list[dict]

    def to_dict(self) -> dict:
        return {
            "lowrank": self.lowrank,
            "rotate": self.rotate,
            "ranks": [list(r) for r in self.ranks],
            "keys": [None if q is None else q.to_dict() for q in self.keys],
            "values": [None if q is None else q.to_dict() for q in self.values],
            "bytes": self.bytes,
            "budget": self.budget,
            "predicted": self.predicted,
            "streams": self.streams,
        }


@dataclass(frozen=True)
class _Option:
    bytes: int
    loss: float
    rank: int
    quant: KVQuantConfig | None


def stream_bytes(width: int, quant: KVQuantConfig | None, kind: str, size: LayerSize, window, seq_len: int) -> int:
    """Bytes of one stream of ``width`` features per head (all KV heads) at ``seq_len`` tokens, batch 1."""
    storage: Storage
    if quant is None:
        storage = slide(DenseStorage(width, torch.float16), window)
    else:
        axis = quant.axis_k if kind == "key" else quant.axis_v
        storage = QuantizedStorage(width, quant, axis, torch.float16, window)
    return size.kv_heads * sum(storage.nbytes(seq_len).values())


def _options(sens: Sensitivity, layer: int, kind: str, lowrank: bool, rotate: bool = False) -> list[_Option]:
    """Every option of a stream with its bytes and predicted loss, the dominated ones removed (``rotate``: the
    Hadamard-rotated quantizers too, without Eigen Attention)."""
    cfg, size, window = sens.config, sens.sizes[layer], sens.windows[layer]
    d = size.head_dim
    losses = sens.streams[layer][KINDS.index(kind)]
    quantizers: list[KVQuantConfig | None] = [*cfg.quantizers()] + ([None] if cfg.unquantized else [])
    quantizers += cfg.quantizers(rotate=True) if rotate else []
    options = []
    if lowrank:
        ranks = sorted(
            {max(cfg.min_rank, min(d, cfg.rank_multiple * math.ceil(r / cfg.rank_multiple))) for r in range(1, d + 1)}
        )
        a, b = sens.key_basis[layer]
        for r in ranks:
            basis = 2 * (a + b * r) if kind == "key" else 0  # fp16, as the accounting counts the bases
            for q in quantizers:
                loss = losses.rank[r] + (0.0 if q is None else losses.quant[q.label()] * losses.share[r])
                options.append(_Option(stream_bytes(r, q, kind, size, window, cfg.seq_len) + basis, loss, r, q))
    else:
        for q in quantizers:
            loss = 0.0 if q is None else losses.original[q.label()]
            options.append(_Option(stream_bytes(d, q, kind, size, window, cfg.seq_len), loss, d, q))
    options.sort(key=lambda o: (o.bytes, o.loss))
    front, best = [], math.inf
    for o in options:  # the Pareto front: more bytes only for less loss
        if o.loss < best:
            front.append(o)
            best = o.loss
    return front


def allot_bytes(sens: Sensitivity, budget: int, lowrank: bool, rotate: bool = False) -> ByteAllotment:
    """The options minimising the predicted loss within ``budget`` bytes (see the module doc).

    Args:
        lowrank: the candidate with Eigen Attention (True) or without (False).
        rotate: without Eigen Attention, also the Hadamard-rotated quantizers (the rotation matrix, kept once,
            is paid from the budget).

    Raises:
        ValueError: the budget is below the smallest cache the options allow, or options were not measured.
    """
    if lowrank and not sens.config.lowrank:
        raise ValueError("this sensitivity was measured with lowrank=False: it predicts full-rank options only")
    if rotate and (lowrank or not sens.rotatable):
        raise ValueError(
            "rotated quantizers apply to the model without Eigen Attention, measured with BudgetConfig(rotate=True) "
            "on a model whose heads all have one power-of-two size"
        )
    items = [_options(sens, layer, kind, lowrank, rotate) for layer in range(len(sens.sizes)) for kind in KINDS]
    fixed = sens.rotation_bytes if rotate else 0  # a rotated choice keeps the matrix
    smallest = sum(opts[0].bytes for opts in items)
    if smallest + fixed > budget:
        raise ValueError(
            f"the budget of {budget} bytes is below the smallest cache these options allow "
            f"({smallest + fixed} bytes at {sens.config.seq_len} tokens{'' if lowrank else ' without low rank'}); "
            "raise the budget, or allow fewer bits, lower ranks or larger groups"
        )
    # Sliding-window layers drop their oldest tokens together, in units every sliding stream allows, so a
    # stream's bytes there depend a little on the others': solve, count the choice exactly, and solve again
    # within what the overshoot leaves (once at most, for models without sliding layers never).
    room = budget - fixed
    while True:
        choice = _knapsack(items, room / UNITS)
        chosen = _fill(items, [opts[c] for opts, c in zip(items, choice, strict=True)], room)
        total = _exact_bytes(sens, chosen, lowrank)
        if total <= budget or room <= smallest:
            break
        room = max(smallest, room - (total - budget))
    if total > budget:
        raise ValueError(f"no choice of these options fits {budget} bytes once sliding layers are counted exactly")
    layers = len(sens.sizes)
    rows = [
        {
            "layer": i // 2,
            "kind": KINDS[i % 2],
            "rank": o.rank,
            "bits": None if o.quant is None else o.quant.bits,
            "group_size": None if o.quant is None else o.quant.group_size,
            "rotate": o.quant is not None and o.quant.rotate,
            "bytes": o.bytes,
            "predicted": o.loss,
        }
        for i, o in enumerate(chosen)
    ]
    return ByteAllotment(
        lowrank=lowrank,
        rotate=any(q is not None and q.rotate for q in (o.quant for o in chosen)),
        ranks=[(chosen[2 * i].rank, chosen[2 * i + 1].rank) for i in range(layers)],
        keys=[chosen[2 * i].quant for i in range(layers)],
        values=[chosen[2 * i + 1].quant for i in range(layers)],
        bytes=total,
        budget=budget,
        predicted=sum(o.loss for o in chosen),
        streams=rows,
    )


def _exact_bytes(sens: Sensitivity, chosen: list[_Option], lowrank: bool) -> int:
    """The chosen cache's bytes as the accounting counts the whole layout (sliding layers' shared drops)."""
    keys, values = tuple(o.quant for o in chosen[0::2]), tuple(o.quant for o in chosen[1::2])
    if all(q is None for q in keys + values):
        return sum(o.bytes for o in chosen)  # dense streams: each layer slides on its own
    config = LayerwiseKVQuantConfig(keys=keys, values=values)
    total = 0
    for layer, size in enumerate(sens.sizes):
        slid = sliding_layer(config, sens.windows, layer)
        for kind, option in zip(KINDS, chosen[2 * layer : 2 * layer + 2], strict=True):
            storage = stream_storage(option.rank, config, kind, layer, torch.float16, slid)
            total += size.kv_heads * sum(storage.nbytes(sens.config.seq_len).values())
    a_b = [2 * (a + b * chosen[2 * i].rank) for i, (a, b) in enumerate(sens.key_basis)] if lowrank else []
    rotation = sens.rotation_bytes if any(c is not None and c.rotate for c in keys + values) else 0
    return total + sum(a_b) + rotation


def _knapsack(items: list[list[_Option]], unit: float) -> list[int]:
    """Exact multiple-choice knapsack on byte units: per item the index of its option."""
    best = np.zeros(UNITS + 1)  # least loss of the items so far within b units
    picks = []
    for opts in items:
        new = np.full(UNITS + 1, np.inf)
        pick = np.full(UNITS + 1, -1, dtype=np.int32)
        for index, o in enumerate(opts):
            w = math.ceil(o.bytes / unit - 1e-9)
            if w > UNITS:
                continue
            candidate = np.full(UNITS + 1, np.inf)
            candidate[w:] = best[: UNITS + 1 - w] + o.loss
            better = candidate < new
            new[better], pick[better] = candidate[better], index
        best = new
        picks.append(pick)
    if not np.isfinite(best[UNITS]):  # rounding up left no room: the smallest options fit exactly
        return [0] * len(items)
    out, b = [], UNITS
    for opts, pick in zip(reversed(items), reversed(picks), strict=True):
        index = int(pick[b])
        out.append(index)
        b -= math.ceil(opts[index].bytes / unit - 1e-9)
    return out[::-1]


def _fill(items: list[list[_Option]], chosen: list[_Option], budget: int) -> list[_Option]:
    """Spend what rounding left: the upgrade saving most loss per byte that fits, until none does."""
    chosen = list(chosen)
    left = budget - sum(o.bytes for o in chosen)
    while True:
        best = None
        for i, opts in enumerate(items):
            for o in opts:
                extra = o.bytes - chosen[i].bytes
                if 0 <= extra <= left and o.loss < chosen[i].loss:
                    gain = (chosen[i].loss - o.loss) / max(extra, 1)
                    if best is None or gain > best[0]:
                        best = (gain, i, o)
        if best is None:
            return chosen
        _, i, o = best
        left -= o.bytes - chosen[i].bytes
        chosen[i] = o
