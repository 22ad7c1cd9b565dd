"""Configuration of KV-cache quantization: a validated, JSON-serialisable dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

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
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; use one of {SUPPORTED_BITS}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int; got {self.group_size!r}")
        for name in ("axis_k", "axis_v"):
            if getattr(self, name) not in AXES:
                raise ValueError(f"{name}={getattr(self, name)!r}; use one of {AXES}")
        if not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"residual must be an int >= 0 (tokens kept in full precision); got {self.residual!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r}; use one of {sorted(SCALE_DTYPES)}")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KVQuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown KVQuantConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

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
