"""Configuration of KV-cache quantization: a validated, JSON-serialisable dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch

from eigenkv.checks import require_bool, require_fields, require_int

SUPPORTED_BITS = (2, 3, 4, 8)
AXES = ("token", "channel")
KINDS = ("key", "value")  # the two streams of a layer
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class KVQuantConfig:
    """How a quantized KV cache stores keys and values.

    Attributes:
        bits: code width, one of 2, 3, 4, 8.
        group_size: elements sharing one scale (and zero point).
        axis_k: grouping of keys: ``"channel"`` (G consecutive tokens of one
            feature share a scale, as KIVI does for keys, whose few large
            channels would otherwise dominate every token's range) or
            ``"token"`` (G consecutive features of one token).
        axis_v: grouping of values (default ``"token"``).
        residual: most recent tokens kept in full precision (the KIVI window).
            With ``"channel"`` grouping, tokens of a group that has not filled
            yet also stay in full precision until it fills.
        symmetric: scale only (codes centred on zero) instead of scale + zero point.
        rotate: multiply the head dimension by a normalised Hadamard matrix
            before quantizing (and by its transpose after), spreading outlier
            channels over all channels; attention scores are unchanged because
            the rotation is orthonormal.
        scale_dtype: dtype of stored scales and zero points.
    """

    bits: int = 4
    group_size: int = 64
    axis_k: str = "channel"
    axis_v: str = "token"
    residual: int = 0
    symmetric: bool = False
    rotate: bool = False
    scale_dtype: str = "float16"

    def __post_init__(self):
        require_int("bits", self.bits)
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; use one of {SUPPORTED_BITS}")
        require_int("group_size", self.group_size, minimum=1)
        require_bool("symmetric", self.symmetric)
        require_bool("rotate", self.rotate)
        for name in ("axis_k", "axis_v"):
            if getattr(self, name) not in AXES:
                raise ValueError(f"{name}={getattr(self, name)!r}; use one of {AXES}")
        require_int("residual (tokens kept in full precision)", self.residual, minimum=0)
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r}; use one of {sorted(SCALE_DTYPES)}")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def axis(self, kind: str) -> str:
        """The grouping of the ``kind`` (``"key"``/``"value"``) stream: ``axis_k`` or ``axis_v``."""
        return self.axis_k if check_kind(kind) == "key" else self.axis_v

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KVQuantConfig:
        return cls(**require_fields("KVQuantConfig", data, [f.name for f in fields(cls)]))

    def label(self) -> str:
        """Short name for tables, e.g. ``4b-g64-kc-vt-r0``."""
        parts = [
            f"{self.bits}b",
            f"g{self.group_size}",
            f"k{self.axis_k[0]}",
            f"v{self.axis_v[0]}",
            f"r{self.residual}",
        ]
        if self.symmetric:
            parts.append("sym")
        if self.rotate:
            parts.append("rot")
        return "-".join(parts)


@dataclass(frozen=True)
class MixedKVQuantConfig:
    """Two precisions in one cache: per layer, the leading features of keys and values at ``high_bits``.

    Meant for a compressed model, whose cached features are components sorted by
    importance (``eigenkv.compress.components`` builds it from a plan): the few
    leading components get more bits. Every stream is stored as two quantized
    segments (leading features, the rest) with the same grouping, group size and
    window as ``base``, so both hold the same tokens at every step.

    Attributes:
        base: the quantizer of the other features (bits, group, axes, window).
        high_bits: bits of the leading features, greater than ``base.bits``.
        key_high, value_high: per layer, how many leading key / value features get ``high_bits``.
    """

    base: KVQuantConfig
    high_bits: int
    key_high: tuple[int, ...]
    value_high: tuple[int, ...]

    def __post_init__(self):
        if not isinstance(self.base, KVQuantConfig):
            raise TypeError(f"base must be a KVQuantConfig; got {type(self.base).__name__}")
        if self.base.rotate:
            raise ValueError("MixedKVQuantConfig splits features by position; base.rotate would mix them")
        if self.high_bits not in SUPPORTED_BITS or self.high_bits <= self.base.bits:
            raise ValueError(
                f"high_bits={self.high_bits!r} must be one of {SUPPORTED_BITS} and above base.bits={self.base.bits}"
            )
        if len(self.key_high) != len(self.value_high):
            raise ValueError(f"key_high has {len(self.key_high)} layers but value_high {len(self.value_high)}")
        for name in ("key_high", "value_high"):
            counts = getattr(self, name)
            if not all(isinstance(n, int) and n >= 0 for n in counts):
                raise ValueError(f"{name} must hold one int >= 0 per layer; got {counts!r}")
            object.__setattr__(self, name, tuple(counts))

    @property
    def layers(self) -> int:
        return len(self.key_high)

    def segments(self, layer: int, kind: str, width: int) -> list[tuple[int, KVQuantConfig]]:
        """``[(features, quantizer)]`` of layer ``layer``'s ``kind`` (``"key"``/``"value"``) stream, in order."""
        if not 0 <= layer < self.layers:
            raise ValueError(f"layer {layer} is out of range: this config describes {self.layers} layers")
        high = (self.key_high if kind == "key" else self.value_high)[layer]
        if high > width:
            raise ValueError(
                f"layer {layer} {kind}s have {width} features but {high} are configured at high precision; "
                "build the config from the plan applied to this model"
            )
        high_config = replace(self.base, bits=self.high_bits)
        return [(n, c) for n, c in ((high, high_config), (width - high, self.base)) if n > 0]

    def to_dict(self) -> dict:
        return {
            "base": self.base.to_dict(),
            "high_bits": self.high_bits,
            "key_high": list(self.key_high),
            "value_high": list(self.value_high),
        }

    @classmethod
    def from_dict(cls, data: dict) -> MixedKVQuantConfig:
        data = dict(data)
        return cls(base=KVQuantConfig.from_dict(data.pop("base")), **data)

    def label(self) -> str:
        """e.g. ``3b-g64-kc-vt-r0-hi8`` (``base`` label, then the high precision)."""
        return f"{self.base.label()}-hi{self.high_bits}"


@dataclass(frozen=True)
class LayerwiseKVQuantConfig:
    """A quantizer per layer and per kind (keys, values), for caches whose streams differ in bits, group size,
    grouping or window, or where some streams are not quantized at all.

    Attributes:
        keys: ``keys[i]`` quantizes layer ``i``'s keys; None stores them unquantized (in the window dtype, as an
            fp16 cache does).
        values: the same for the values; as long as ``keys``.

    ``LayerwiseKVQuantConfig.per_layer(configs)`` quantizes keys and values of layer ``i`` with ``configs[i]``.
    A stream follows its own config's grouping for its kind (``axis_k`` for keys, ``axis_v`` for values).
    """

    keys: tuple[KVQuantConfig | None, ...]
    values: tuple[KVQuantConfig | None, ...]

    def __post_init__(self):
        for name in KINDS:
            configs = getattr(self, f"{name}s")
            if isinstance(configs, (str, bytes, dict, KVQuantConfig)) or not hasattr(configs, "__iter__"):
                raise TypeError(f"{name}s must be a sequence of KVQuantConfig or None, one per layer; got {configs!r}")
            configs = tuple(configs)
            bad = [i for i, c in enumerate(configs) if c is not None and not isinstance(c, KVQuantConfig)]
            if not configs or bad:
                raise TypeError(
                    f"{name}s must be a non-empty sequence of KVQuantConfig or None (unquantized), one per layer"
                    + (f"; layer {bad[0]} is a {type(configs[bad[0]]).__name__}" if bad else "")
                )
            object.__setattr__(self, f"{name}s", configs)
        if len(self.keys) != len(self.values):
            raise ValueError(f"keys describe {len(self.keys)} layers but values {len(self.values)}; give one per layer")
        if all(c is None for c in self.keys + self.values):
            raise ValueError("every stream is unquantized: use no KV quantization (a dense cache) instead")

    @classmethod
    def per_layer(cls, configs) -> LayerwiseKVQuantConfig:
        """Keys and values of layer ``i`` quantized by ``configs[i]`` (a KVQuantConfig, or None: unquantized)."""
        configs = tuple(configs)
        return cls(configs, configs)

    @property
    def layers(self) -> int:
        return len(self.keys)

    def to_dict(self) -> dict:
        return {
            "keys": [None if c is None else c.to_dict() for c in self.keys],
            "values": [None if c is None else c.to_dict() for c in self.values],
        }

    @classmethod
    def from_dict(cls, data: dict) -> LayerwiseKVQuantConfig:
        """Inverse of :meth:`to_dict`; also reads the older ``{"layers": [config, ...]}`` (one config per layer)."""
        if not isinstance(data, dict) or set(data) not in ({"keys", "values"}, {"layers"}):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"a LayerwiseKVQuantConfig has the fields keys and values (or, older, layers); got {found}"
            )

        def configs(name: str) -> tuple[KVQuantConfig | None, ...]:
            items = data[name]
            if not isinstance(items, list):
                raise ValueError(f"LayerwiseKVQuantConfig {name} must be a list, one entry per layer")
            return tuple(None if c is None else KVQuantConfig.from_dict(c) for c in items)

        if "layers" in data:
            return cls.per_layer(configs("layers"))
        return cls(configs("keys"), configs("values"))

    def label(self) -> str:
        """The labels of the distinct layers, e.g. ``4b-g64-kc-vt-r0|k4b-g64-c-r0/vfp``: a layer quantizing keys
        and values alike has its config's label; otherwise ``k<keys>/v<values>`` (``fp``: unquantized)."""
        return "|".join(dict.fromkeys(_layer_label(k, v) for k, v in zip(self.keys, self.values, strict=True)))


def _layer_label(keys: KVQuantConfig | None, values: KVQuantConfig | None) -> str:
    if keys == values and keys is not None:
        return keys.label()
    return f"k{_stream_label(keys, 'key')}/v{_stream_label(values, 'value')}"


def _stream_label(config: KVQuantConfig | None, kind: str) -> str:
    """e.g. ``4b-g64-c-r0`` (bits, group, this kind's grouping, window), ``fp`` when unquantized."""
    if config is None:
        return "fp"
    parts = [f"{config.bits}b", f"g{config.group_size}", config.axis(kind)[0], f"r{config.residual}"]
    return "-".join(parts + ["sym"] * config.symmetric + ["rot"] * config.rotate)


AnyKVQuantConfig = KVQuantConfig | MixedKVQuantConfig | LayerwiseKVQuantConfig


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; use one of {KINDS}")
    return kind


def config_layers(config: AnyKVQuantConfig) -> int | None:
    """How many layers ``config`` describes (None: any number, one quantizer for all)."""
    if isinstance(config, (MixedKVQuantConfig, LayerwiseKVQuantConfig)):
        return config.layers
    return None


def check_layers(config: AnyKVQuantConfig, layers: int) -> None:
    """Refuse a per-layer config written for another number of layers."""
    described = config_layers(config)
    if described is not None and described != layers:
        raise ValueError(
            f"the {type(config).__name__} describes {described} layers; this model has {layers}: "
            "build it for this model"
        )


def stream_config(config: AnyKVQuantConfig, layer: int, kind: str) -> KVQuantConfig | None:
    """The quantizer of layer ``layer``'s ``kind`` (``"key"``/``"value"``) stream, None when it is unquantized:
    its bits, group size, grouping (``axis(kind)``), window and rotation. A ``MixedKVQuantConfig``'s streams
    follow its ``base`` in all but the bits of their leading features (:func:`layer_segments`)."""
    check_kind(kind)
    if isinstance(config, LayerwiseKVQuantConfig):
        if not 0 <= layer < config.layers:
            raise ValueError(f"layer {layer} is out of range: this config describes {config.layers} layers")
        return (config.keys if kind == "key" else config.values)[layer]
    return base_config(config)


def layer_segments(config: AnyKVQuantConfig, layer: int, kind: str, width: int) -> list[tuple[int, KVQuantConfig]]:
    """``[(features, quantizer)]`` of layer ``layer``'s quantized ``kind`` (``"key"``/``"value"``) stream, in
    feature order."""
    if isinstance(config, MixedKVQuantConfig):
        return config.segments(layer, kind, width)
    quantizer = stream_config(config, layer, kind)
    if quantizer is None:
        raise ValueError(f"layer {layer}'s {kind}s are not quantized: they have no quantized segments")
    return [(width, quantizer)]


def base_config(config: AnyKVQuantConfig) -> KVQuantConfig:
    """The quantizer whose grouping, group size and window every stream of ``config`` follows
    (for a ``LayerwiseKVQuantConfig``, only when every stream of every layer has the same one)."""
    if isinstance(config, MixedKVQuantConfig):
        return config.base
    if isinstance(config, KVQuantConfig):
        return config
    if isinstance(config, LayerwiseKVQuantConfig):
        distinct = set(config.keys + config.values)
        if len(distinct) != 1 or None in distinct:
            raise ValueError(
                "this LayerwiseKVQuantConfig quantizes streams differently (or not at all); "
                "ask stream_config(config, layer, kind)"
            )
        return config.keys[0]
    raise TypeError(
        f"expected a KVQuantConfig, MixedKVQuantConfig or LayerwiseKVQuantConfig; got {type(config).__name__}"
    )


def quant_config_from_dict(data: dict) -> AnyKVQuantConfig:
    """Inverse of every config's ``to_dict``."""
    if "layers" in data or "keys" in data or "values" in data:
        return LayerwiseKVQuantConfig.from_dict(data)
    return MixedKVQuantConfig.from_dict(data) if "base" in data else KVQuantConfig.from_dict(data)


def layer_windows(model_config) -> list[int | None]:
    """Per decoder layer, the tokens its attention sees when it slides (``sliding_attention``), or None (full
    attention): as transformers builds a model's caches (``layer_types``; without them, a config naming a
    ``sliding_window`` slides every layer, unless ``use_sliding_window`` is False). Other layer types are refused."""
    text = getattr(model_config, "get_text_config", lambda **_: model_config)(decoder=True)
    layers = text.num_hidden_layers
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types is None:
        sliding = window is not None and getattr(text, "use_sliding_window", True)
        types = ["sliding_attention" if sliding else "full_attention"] * layers
    unknown = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported; eigenkv caches full and sliding-window attention")
    if "sliding_attention" in types and not window:
        raise ValueError(f"{type(text).__name__} has sliding layers but no sliding_window")
    return [int(window) if t == "sliding_attention" else None for t in types]


def sliding_streams(config: AnyKVQuantConfig, windows) -> tuple[tuple[KVQuantConfig | None, str], ...]:
    """The distinct ``(quantizer, kind)`` of the streams of the sliding-window layers (those whose ``windows[i]``,
    as :func:`layer_windows` gives them, is not None); None for an unquantized stream. What
    :func:`sliding_dropped` drops in step with."""
    return tuple(
        dict.fromkeys((stream_config(config, i, kind), kind) for i, w in enumerate(windows) if w for kind in KINDS)
    )


def sliding_dropped(tokens: int, window: int, streams) -> int:
    """First tokens the sliding-window layers of a quantized cache no longer hold once they hold ``tokens``
    tokens: those before the next query's window (``tokens + 1 - window``), as far as every stream has
    quantized them (the window's tokens stay), in whole units of every stream (``G`` tokens for a stream
    grouped per channel, the least common multiple of such ``G``), so that keys and values keep the same
    tokens in every sliding layer (transformers builds one mask for all of them, from the first one's sizes).

    ``streams``: ``(quantizer, kind)`` of the sliding layers' streams (:func:`sliding_streams`), keys grouped by
    ``axis_k``, values by ``axis_v``; an unquantized stream (None) can drop any token (a unit of 1)."""
    droppable, unit = max(0, tokens + 1 - window), 1
    for config, kind in streams:
        if config is not None:
            axis, g = config.axis(kind), config.group_size
            droppable = min(droppable, quantized_prefix(tokens, axis, g, config.residual))
            unit = math.lcm(unit, g if axis == "channel" else 1)
    return droppable // unit * unit


def quantized_prefix(tokens: int, axis: str, group_size: int, residual: int) -> int:
    """``T_q``: how many of ``tokens`` held tokens are stored quantized (the rest is the full-precision window)."""
    # Per token: all but the last ``residual`` tokens. Per channel: only whole groups of G tokens
    # (a group shares one scale per feature, so it is quantized once it fills).
    old = max(0, tokens - residual)
    return old if axis == "token" else (old // group_size) * group_size
