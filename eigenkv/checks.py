"""Validation of config fields: one clear message per mistake, naming the field and the fix.

Configs are often written by hand (JSON recipes, CLI flags), where ``4.0``
for a bit width or ``true`` for a group size are easy slips: an integer field
accepts only a real ``int`` (never a ``bool`` or a ``float``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def require_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` when it is an ``int`` (not a bool) within ``[minimum, maximum]``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}; got {value}")
    return value


def require_number(name: str, value, low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """``value`` when it is a finite real number (int or float, not bool) in the interval, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r} ({type(value).__name__})")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}; got {value!r}")
    return value


def require_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {value!r} ({type(value).__name__})")
    return value


def require_choice(name: str, value, choices: Iterable):
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def require_fields(kind: str, data, known: Iterable[str]) -> dict:
    """``data`` when it is a dict whose keys are all ``known``, else ``ValueError`` naming the unknown ones."""
    if not isinstance(data, dict):
        raise ValueError(f"a {kind} is a JSON object; got {type(data).__name__}")
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown {kind} fields {sorted(unknown)}; known: {sorted(known)}")
    return data
