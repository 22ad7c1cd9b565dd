"""Which code path runs: Triton kernels or their PyTorch references (``$EIGENKV_BACKEND``).

Imports no Triton, so callers above the kernels (caches, attention routing)
can ask without loading it.
"""

from __future__ import annotations

import os

import torch

from eigenkv.env import env_flag

BACKENDS = ("auto", "triton", "torch")


def backend() -> str:
    """``$EIGENKV_BACKEND``: ``auto`` (Triton kernels on CUDA tensors, PyTorch references elsewhere),
    ``triton`` (kernels always; CPU tensors need ``TRITON_INTERPRET=1``) or ``torch`` (references always)."""
    value = os.environ.get("EIGENKV_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"EIGENKV_BACKEND={value!r}; use one of {BACKENDS}")
    return value


def use_triton(x: torch.Tensor) -> bool:
    """Whether eigenkv code paths should run their Triton kernel on ``x`` (see :func:`backend`)."""
    choice = backend()
    return choice == "triton" or (choice == "auto" and x.is_cuda)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env_flag("TRITON_INTERPRET")


def check_kernel_device(x: torch.Tensor, kernel: str, reference: str) -> None:
    """Refuse tensors a Triton kernel cannot run on, naming the fix."""
    if x.is_cuda:
        return
    if x.device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"{kernel} runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, set before importing eigenkv.kernels); "
        f"got a {x.device.type} tensor: move it to CUDA or call {reference}"
    )
