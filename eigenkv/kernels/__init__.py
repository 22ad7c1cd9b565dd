"""Triton kernels, each beside its PyTorch reference.

On CPU they run only under ``TRITON_INTERPRET=1``, which Triton reads when a
kernel module is imported: the names below are loaded lazily, so importing
``eigenkv`` (or this package) does not import Triton. ``python -m
eigenkv.kernels.compile_check`` compiles every kernel for sm_80 and sm_90
without a GPU.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Scoring": "eigenkv.kernels.scoring",
    "group_minmax": "eigenkv.kernels.group_minmax",
    "group_minmax_reference": "eigenkv.kernels.group_minmax",
    "lowrank_decode": "eigenkv.kernels.lowrank_decode",
    "lowrank_decode_reference": "eigenkv.kernels.lowrank_decode",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'eigenkv.kernels' has no attribute {name!r}")
