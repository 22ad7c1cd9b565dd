"""A recipe: one validated, frozen, versioned config of everything eigenkv does to a model.

    Recipe(
        lowrank=EigenConfig(target_ratio=0.6),          # Eigen Attention (None: full rank)
        components=ComponentQuantConfig(high_bits=4),   # how the low-rank components are quantized
        kv=KVQuantConfig(bits=3, group_size=64),        # the quantized KV cache (None: fp16 cache)
        kv_layers={0: KVQuantConfig(bits=8), 5: (KVQuantConfig(bits=4), None)},  # per-layer overrides of ``kv``
        weights="int8",                                 # bitsandbytes weights (None: as loaded)
    )

``eigenkv.apply_recipe(model, recipe, calibration)`` applies it; it is saved
(as JSON, with its format and version) beside every artifact and result, and
``Recipe.from_dict`` refuses unknown fields, wrong types and other versions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from eigenkv.checks import require_choice, require_fields, require_int
from eigenkv.compress.components import ComponentQuantConfig
from eigenkv.compress.config import EigenConfig
from eigenkv.io import atomic_write_json
from eigenkv.quant.config import AnyKVQuantConfig, KVQuantConfig, LayerwiseKVQuantConfig
from eigenkv.quant.weights import WEIGHT_FORMATS

FORMAT = "eigenkv-recipe"
VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """Everything done to a model (see the module doc). The empty recipe leaves the model as it is.

    Attributes:
        lowrank: Eigen Attention settings (ratio or error budget, method, basis, allotment, RoPE
            mode); None: no low rank.
        components: how the cached low-rank components are prepared for quantization (needs
            ``lowrank`` and ``kv``); None: as they are.
        kv: quantizer of the KV cache; None: an unquantized cache.
        kv_layers: ``{layer: override}`` for layers quantized differently from ``kv`` (stored as sorted
            ``(layer, override)`` pairs). An override is a ``KVQuantConfig`` (keys and values), or a pair
            ``(keys, values)`` of a ``KVQuantConfig`` or None (that stream unquantized); a pair of one config
            twice is held as that config. JSON: a config object, or ``{"keys": config | null, "values": ...}``.
        weights: ``"int8"`` or ``"nf4"`` weight quantization (bitsandbytes); None: none.
    """

    lowrank: EigenConfig | None = None
    components: ComponentQuantConfig | None = None
    kv: KVQuantConfig | None = None
    kv_layers: tuple[tuple[int, LayerOverride], ...] = ()
    weights: str | None = None

    def __post_init__(self):
        for name, kind in (("lowrank", EigenConfig), ("components", ComponentQuantConfig), ("kv", KVQuantConfig)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"Recipe.{name} must be a {kind.__name__} or None; got {type(value).__name__}")
        pairs = self.kv_layers.items() if isinstance(self.kv_layers, dict) else self.kv_layers
        try:
            pairs = [(require_int("kv_layers layer", int_key(k), 0), c) for k, c in pairs]
        except (TypeError, ValueError) as err:
            raise ValueError(f"Recipe.kv_layers must map layer numbers to overrides: {err}") from None
        pairs = tuple(sorted(((k, _override(k, c)) for k, c in pairs), key=lambda pair: pair[0]))
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("Recipe.kv_layers names a layer twice")
        object.__setattr__(self, "kv_layers", pairs)
        if pairs and self.kv is None:
            raise ValueError("Recipe.kv_layers overrides kv for some layers; set kv for the others")
        if self.components is not None:
            if self.lowrank is None or self.kv is None:
                raise ValueError("Recipe.components prepares low-rank components for quantization: set lowrank and kv")
            if self.components.high_bits is not None and pairs:
                raise ValueError("Recipe.components.high_bits and kv_layers cannot be combined; use one of them")
        if self.weights is not None:
            require_choice("Recipe.weights", self.weights, WEIGHT_FORMATS)

    def cache_config(self, layers: int) -> AnyKVQuantConfig | None:
        """The cache quantizer of a model with ``layers`` layers, before components are prepared."""
        if self.kv is None:
            return None
        if not self.kv_layers:
            return self.kv
        overrides = dict(self.kv_layers)
        if max(overrides) >= layers:
            raise ValueError(f"Recipe.kv_layers names layer {max(overrides)}; this model has {layers} layers")
        streams = [overrides.get(i, self.kv) for i in range(layers)]
        streams = [s if isinstance(s, tuple) else (s, s) for s in streams]
        return LayerwiseKVQuantConfig(tuple(k for k, _ in streams), tuple(v for _, v in streams))

    def with_changes(self, **changes) -> Recipe:
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)

    def label(self) -> str:
        """Short name for tables, e.g. ``eigen0.6-pre-output-fisher+hi4x0.25+3b-g64-kc-vt-r0``."""
        parts = [] if self.lowrank is None else [self.lowrank.label()]
        parts += [] if self.components is None else [self.components.label()]
        if self.kv is not None:
            parts.append(self.kv.label() + ("+layers" if self.kv_layers else ""))
        parts += [] if self.weights is None else [f"w-{self.weights}"]
        return "+".join(parts) or "fp16"

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "lowrank": None if self.lowrank is None else self.lowrank.to_dict(),
            "components": None if self.components is None else self.components.to_dict(),
            "kv": None if self.kv is None else self.kv.to_dict(),
            "kv_layers": {str(k): _override_to_dict(c) for k, c in self.kv_layers},
            "weights": self.weights,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """Inverse of :meth:`to_dict`; refuses other formats and versions, unknown fields and wrong types."""
        require_fields("recipe", data, ("format", "version", "lowrank", "components", "kv", "kv_layers", "weights"))
        if data.get("format") != FORMAT:
            raise ValueError(f"not an eigenkv recipe: format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise ValueError(
                f"recipe version {data.get('version')!r} is not supported by this eigenkv (it reads version "
                f"{VERSION}); upgrade eigenkv or rewrite the recipe"
            )
        try:
            layers = data.get("kv_layers") or {}
            if not isinstance(layers, dict):
                raise ValueError(
                    f"kv_layers must be an object of layer -> KVQuantConfig or {{keys, values}}; "
                    f"got {type(layers).__name__}"
                )
            return cls(
                lowrank=None if data.get("lowrank") is None else EigenConfig.from_dict(data["lowrank"]),
                components=None
                if data.get("components") is None
                else ComponentQuantConfig.from_dict(data["components"]),
                kv=None if data.get("kv") is None else KVQuantConfig.from_dict(data["kv"]),
                kv_layers={int_key(k): _override_from_dict(k, c) for k, c in layers.items()},
                weights=data.get("weights"),
            )
        except TypeError as err:  # a field of the wrong JSON type (a list where an object belongs)
            raise ValueError(f"malformed recipe: {err}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the recipe as JSON (atomically)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """Read a recipe JSON file; a missing, unreadable or invalid file raises a clear error."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no recipe file at {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not JSON ({err}); write it with Recipe.save") from None
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


LayerOverride = KVQuantConfig | tuple[KVQuantConfig | None, KVQuantConfig | None]


def _override(layer: int, value) -> LayerOverride:
    """A ``kv_layers`` value checked: a KVQuantConfig, or a ``(keys, values)`` pair of KVQuantConfig or None
    (a pair of one config twice becomes that config)."""
    if isinstance(value, KVQuantConfig):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        keys, values = value
        if all(c is None or isinstance(c, KVQuantConfig) for c in (keys, values)):
            return keys if keys == values and keys is not None else (keys, values)
    raise ValueError(
        f"Recipe.kv_layers[{layer}] must be a KVQuantConfig (keys and values) or a pair (keys, values) of "
        f"KVQuantConfig or None (unquantized); got {value!r}"
    )


def _override_to_dict(override: LayerOverride) -> dict:
    if isinstance(override, KVQuantConfig):
        return override.to_dict()
    return {kind: None if c is None else c.to_dict() for kind, c in zip(("keys", "values"), override, strict=True)}


def _override_from_dict(layer, data) -> LayerOverride:
    """Inverse of :func:`_override_to_dict`: a KVQuantConfig object, or ``{"keys": ..., "values": ...}``."""
    if not isinstance(data, dict):
        raise ValueError(f"kv_layers[{layer!r}] must be a KVQuantConfig object or {{keys, values}}; got {data!r}")
    if "keys" not in data and "values" not in data:
        return KVQuantConfig.from_dict(data)
    if set(data) != {"keys", "values"}:
        raise ValueError(
            f"kv_layers[{layer!r}] quantizes keys and values apart: it needs exactly the fields keys and values "
            f"(each a KVQuantConfig object or null); got {sorted(data)}"
        )
    return tuple(None if data[kind] is None else KVQuantConfig.from_dict(data[kind]) for kind in ("keys", "values"))


def int_key(key) -> int:
    """A layer number from a JSON object key (``"3"``) or an int; ``ValueError`` otherwise."""
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    raise ValueError(f"layer numbers are non-negative integers; got {key!r}")
