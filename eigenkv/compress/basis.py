"""Bases from Gram matrices, and the paper's rank rule.

For a representation matrix ``R`` (rows are vectors of size ``d``), its right
singular vectors are the eigenvectors of ``G = R^T R`` and its singular values
``s = sqrt(eig(G))``; ``eigh`` on the float64 Gram gives both.

Which Gram builds which basis:

- values: one basis per KV head, from that head's values.
- keys, ``"pre"`` (Llama family): one basis for the layer, from the sum of its
  KV heads' pre-RoPE key Grams (the rebuild basis is then shared by all heads).
- keys, ``"post"`` and ``"none"`` (joint key/query basis, per KV head): the
  key Gram and the Gram of the queries that read that head, each divided by
  its trace before summing. Undivided, queries dominate (with GQA several
  query heads feed one KV head, and their scale differs from the keys': on
  SmolLM2 the query/key trace ratio runs from 0.9 to 3.4), so the basis would
  serve queries, not the keys that fill the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eigenkv.compress.calibrate import LayerStats


@dataclass
class LayerBases:
    """Full eigenbases of one layer, columns sorted by decreasing eigenvalue.

    Attributes:
        keys: ``(1 or H_kv, d, d)`` float64 (1: shared by the layer's KV heads).
        values: ``(H_kv, d, d)`` float64.
        key_eigenvalues, value_eigenvalues: ``(1 or H_kv, d)`` and ``(H_kv, d)``, descending, >= 0.
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_eigenvalues: torch.Tensor
    value_eigenvalues: torch.Tensor


def eigenbasis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(..., d, d)`` symmetric PSD -> eigenvalues ``(..., d)`` descending (clamped at 0), vectors ``(..., d, d)``."""
    if not torch.isfinite(gram).all():
        raise ValueError("a Gram matrix holds NaN or Inf; recalibrate in float32")
    values, vectors = torch.linalg.eigh(gram.to(torch.float64))
    return values.flip(-1).clamp_min(0), vectors.flip(-1)


def _trace_normalised(gram: torch.Tensor) -> torch.Tensor:
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    if (trace <= 0).any():
        raise ValueError("a calibration Gram matrix is zero (an all-zero projection?); it has no basis")
    return gram / trace[..., None, None]


def layer_bases(stats: LayerStats, mode: str) -> LayerBases:
    """Bases of one layer for RoPE mode ``"pre"``, ``"post"`` or ``"none"`` (see the module doc)."""
    if stats.tokens == 0:
        raise ValueError("this layer saw no calibration tokens")
    if mode == "pre":
        key_gram = stats.keys.sum(0, keepdim=True)
    elif mode in ("post", "none"):
        key_gram = _trace_normalised(stats.keys) + _trace_normalised(stats.queries)
    else:
        raise ValueError(f"mode must be 'pre', 'post' or 'none'; got {mode!r}")
    key_eigenvalues, keys = eigenbasis(key_gram)
    value_eigenvalues, values = eigenbasis(stats.values)
    return LayerBases(keys, values, key_eigenvalues, value_eigenvalues)


def rank_for_eps(eigenvalues: torch.Tensor, eps: float) -> int:
    """The paper's rule: components whose normalised cumulative singular value is below ``eps``.

    With ``s`` the singular values (square roots of ``eigenvalues``, descending)
    and ``c_r = sum_{i<=r} s_i / sum s``, the rank is the smallest ``r`` with
    ``c_r >= eps`` (so ``eps = 1`` keeps everything). Normalised by the sum of
    ``s``, not of ``s^2``, as the paper does.

    Args:
        eigenvalues: ``(..., d)`` descending; with several bases (heads), the
            largest rank among them (ranks are uniform within a layer).
    """
    s = eigenvalues.clamp_min(0).sqrt()
    cumulative = s.cumsum(-1) / s.sum(-1, keepdim=True).clamp_min(1e-300)
    needed = (cumulative < eps - 1e-9).sum(-1) + 1
    return int(needed.clamp(max=eigenvalues.shape[-1]).max())
