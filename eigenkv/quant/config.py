"""Configuration of KV-cache quantization: a validated, JSON-serialisable dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch

from eigenkv.checks import require_bool, require_fields, require_int

SUPPORTED_BITS = (2, 3, 4, 8)
AXES = ("token", "channel")
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
    """A quantizer per layer, for caches whose layers differ in bits, group size or grouping.

    Attributes:
        layers: ``layers[i]`` quantizes layer ``i``'s keys and values.
    """

    layers: tuple[KVQuantConfig, ...]

    def __post_init__(self):
        layers = tuple(self.layers)
        if not layers or not all(isinstance(c, KVQuantConfig) for c in layers):
            raise TypeError("layers must be a non-empty sequence of KVQuantConfig, one per layer")
        object.__setattr__(self, "layers", layers)

    def to_dict(self) -> dict:
        return {"layers": [c.to_dict() for c in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> LayerwiseKVQuantConfig:
        if set(data) != {"layers"}:
            raise ValueError(f"a LayerwiseKVQuantConfig has one field, layers; got {sorted(data)}")
        return cls(tuple(KVQuantConfig.from_dict(c) for c in data["layers"]))

    def label(self) -> str:
        """The labels of the distinct layer configs, e.g. ``4b-g64-kc-vt-r0|3b-g64-kc-vt-r0``."""
        return "|".join(dict.fromkeys(c.label() for c in self.layers))


AnyKVQuantConfig = KVQuantConfig | MixedKVQuantConfig | LayerwiseKVQuantConfig


def config_layers(config: AnyKVQuantConfig) -> int | None:
    """How many layers ``config`` describes (None: any number, one quantizer for all)."""
    if isinstance(config, MixedKVQuantConfig):
        return config.layers
    if isinstance(config, LayerwiseKVQuantConfig):
        return len(config.layers)
    return None


def check_layers(config: AnyKVQuantConfig, layers: int) -> None:
    """Refuse a per-layer config written for another number of layers."""
    described = config_layers(config)
    if described is not None and described != layers:
        raise ValueError(
            f"the {type(config).__name__} describes {described} layers; this model has {layers}: "
            "build it for this model"
        )


def layer_config(config: AnyKVQuantConfig, layer: int) -> KVQuantConfig:
    """The quantizer whose grouping, group size and window every stream of ``layer`` follows."""
    if isinstance(config, LayerwiseKVQuantConfig):
        if not 0 <= layer < len(config.layers):
            raise ValueError(f"layer {layer} is out of range: this config describes {len(config.layers)} layers")
        return config.layers[layer]
    return base_config(config)


def layer_segments(config: AnyKVQuantConfig, layer: int, kind: str, width: int) -> list[tuple[int, KVQuantConfig]]:
    """``[(features, quantizer)]`` of layer ``layer``'s ``kind`` (``"key"``/``"value"``) stream, in feature order."""
    if isinstance(config, MixedKVQuantConfig):
        return config.segments(layer, kind, width)
    return [(width, layer_config(config, layer))]


def base_config(config: AnyKVQuantConfig) -> KVQuantConfig:
    """The quantizer whose grouping, group size and window every stream of ``config`` follows
    (for a ``LayerwiseKVQuantConfig``, only when every layer has the same)."""
    if isinstance(config, MixedKVQuantConfig):
        return config.base
    if isinstance(config, KVQuantConfig):
        return config
    if isinstance(config, LayerwiseKVQuantConfig):
        if len(set(config.layers)) != 1:
            raise ValueError("this LayerwiseKVQuantConfig quantizes layers differently; ask layer_config(config, i)")
        return config.layers[0]
    raise TypeError(
        f"expected a KVQuantConfig, MixedKVQuantConfig or LayerwiseKVQuantConfig; got {type(config).__name__}"
    )


def quant_config_from_dict(data: dict) -> AnyKVQuantConfig:
    """Inverse of every config's ``to_dict``."""
    if "layers" in data:
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


def sliding_dropped(tokens: int, window: int, config: KVQuantConfig) -> int:
    """First tokens a quantized sliding-window layer no longer holds once it holds ``tokens`` tokens: those
    before the next query's window (``tokens + 1 - window``), as far as both its streams have quantized them
    (the window's tokens stay), in whole units of both (``G`` tokens when either is grouped per channel), so
    that keys and values keep the same tokens."""
    g, r = config.group_size, config.residual
    quantized = min(quantized_prefix(tokens, axis, g, r) for axis in (config.axis_k, config.axis_v))
    unit = g if "channel" in (config.axis_k, config.axis_v) else 1
    return min(max(0, tokens + 1 - window), quantized) // unit * unit


def quantized_prefix(tokens: int, axis: str, group_size: int, residual: int) -> int:
    """``T_q``: how many of ``tokens`` held tokens are stored quantized (the rest is the full-precision window)."""
    # Per token: all but the last ``residual`` tokens. Per channel: only whole groups of G tokens
    # (a group shares one scale per feature, so it is quantized once it fills).
    old = max(0, tokens - residual)
    return old if axis == "token" else (old // group_size) * group_size
