"""Per-group minimum and maximum along the last axis (the statistics of an asymmetric quantizer).

``x`` of shape ``(..., D)`` is split along its last axis into ``D / G`` groups of
``G`` consecutive elements; for each group the kernel returns its minimum and
maximum. A group that holds a NaN yields NaN for both, as ``torch.amin`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eigenkv.kernels.backend import check_kernel_device
from eigenkv.kernels.utils import KernelConfig, cdiv, next_power_of_2, on_input_device

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GROUP = 1024
# Elements per program: enough to hide load latency, few enough that every
# config stays well inside the register file (checked by the sm_80/sm_90 compile test).
_TILE_ELEMENTS = 4096


def group_minmax_reference(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference: ``x`` (..., D) -> ``(mins, maxs)``, each (..., D // group_size), dtype of ``x``."""
    _check_inputs(x, group_size)
    grouped = x.unflatten(-1, (x.shape[-1] // group_size, group_size))
    return grouped.amin(dim=-1), grouped.amax(dim=-1)


@triton.jit
def _group_minmax_kernel(
    X,  # (n_rows, n_groups * GROUP), contiguous
    MIN,  # (n_rows, n_groups)
    MAX,  # (n_rows, n_groups)
    n_rows,
    n_groups,
    GROUP: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_G: tl.constexpr,  # next power of two >= GROUP (tl.arange needs one)
):
    pid = tl.program_id(0)
    row_block = pid // n_groups
    group = pid % n_groups
    rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_G)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < GROUP)
    offsets = rows[:, None].to(tl.int64) * (n_groups * GROUP) + group * GROUP + cols[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(mask, x, float("inf")), axis=1)
    hi = tl.max(tl.where(mask, x, float("-inf")), axis=1)
    # tl.min/tl.max do not propagate NaN; torch.amin/amax do, so flag it explicitly.
    has_nan = tl.max(((x != x) & mask).to(tl.int32), axis=1) > 0
    lo = tl.where(has_nan, float("nan"), lo)
    hi = tl.where(has_nan, float("nan"), hi)
    out = rows.to(tl.int64) * n_groups + group
    tl.store(MIN + out, lo.to(MIN.dtype.element_ty), mask=row_ok)
    tl.store(MAX + out, hi.to(MAX.dtype.element_ty), mask=row_ok)


def launch_config(group_size: int) -> KernelConfig:
    """Block sizes the launcher uses for a group size (also what the compile test checks)."""
    block_g = max(16, next_power_of_2(group_size))
    return KernelConfig(constexprs={"BLOCK_G": block_g, "BLOCK_ROWS": max(1, _TILE_ELEMENTS // block_g)}, num_warps=4)


@on_input_device
def group_minmax(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel: ``x`` (..., D) fp16/bf16/fp32 -> ``(mins, maxs)``, each (..., D // group_size), dtype of ``x``.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    _check_inputs(x, group_size)
    check_kernel_device(x, "group_minmax", "group_minmax_reference")
    if group_size > MAX_GROUP:
        raise ValueError(f"group_size {group_size} is above the kernel's limit {MAX_GROUP}; use smaller groups")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    n_rows, n_groups = x2.shape[0], x2.shape[1] // group_size
    mins = torch.empty((n_rows, n_groups), dtype=x.dtype, device=x.device)
    maxs = torch.empty_like(mins)
    if n_rows:
        cfg = launch_config(group_size)
        grid = (cdiv(n_rows, cfg.constexprs["BLOCK_ROWS"]) * n_groups,)
        _group_minmax_kernel[grid](
            x2, mins, maxs, n_rows, n_groups, GROUP=group_size, num_warps=cfg.num_warps, **cfg.constexprs
        )
    out_shape = (*x.shape[:-1], n_groups)
    return mins.view(out_shape), maxs.view(out_shape)


def _check_inputs(x: torch.Tensor, group_size: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: float16, bfloat16, float32")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x needs a non-empty last axis; got shape {tuple(x.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int; got {group_size!r}")
    if x.shape[-1] % group_size:
        divisors = [g for g in (16, 32, 64, 128) if x.shape[-1] % g == 0] or [x.shape[-1]]
        raise ValueError(
            f"group_size {group_size} does not divide the last axis ({x.shape[-1]}); "
            f"use a divisor such as {divisors[-1]}"
        )


def compile_specs():
    """Every (signature, constexprs, num_warps) the launcher can use, for the sm_80/sm_90 compile test."""
    from eigenkv.kernels.utils import KernelSpec

    for dtype in ("fp16", "bf16", "fp32"):
        for block_g in (16, 32, 64, 128, 256, 512, 1024):
            cfg = launch_config(block_g)
            yield KernelSpec(
                name=f"group_minmax[{dtype},G={block_g}]",
                fn=_group_minmax_kernel,
                signature={
                    "X": f"*{dtype}",
                    "MIN": f"*{dtype}",
                    "MAX": f"*{dtype}",
                    "n_rows": "i32",
                    "n_groups": "i32",
                },
                constexprs={"GROUP": block_g, **cfg.constexprs},
                num_warps=cfg.num_warps,
            )
