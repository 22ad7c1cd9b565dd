"""Bases from Gram matrices, and the paper's rank rule.

For a representation matrix ``R`` (rows are vectors of size ``d``), its right
singular vectors are the eigenvectors of ``G = R^T R`` and its singular values
``s = sqrt(eig(G))``; ``eigh`` on the float64 Gram gives both.

Every basis is a pair ``(E, D)`` of ``(d, r)`` matrices with ``D^T E = I``:
a vector ``x`` (row) is stored as the coefficients ``c = x E`` and read back as
``x^ = c D^T``, so ``x -> x E D^T`` is a projection of rank ``r``.

- ``basis="pca"`` (the paper): ``E = D = U``, the top eigenvectors of ``G``;
  the projection is orthogonal and minimises ``sum ||x - x^||^2``.
- ``basis="output"``: errors are weighted by what they cost downstream,
  ``sum (x - x^) M (x - x^)^T``, with ``M`` the Gram of whatever reads ``x``:
  for values, the output-projection blocks of the query heads that read the
  KV head (``sum_j W_o[:, j]^T W_o[:, j]``); for keys, the queries that meet
  them (``sum_j Q_j^T Q_j`` over the calibration tokens, pre- or post-RoPE as
  the keys are). With ``y = x M^1/2`` the weighted error is the plain error of
  ``y``, so ``U`` = top eigenvectors of ``M^1/2 G M^1/2``, ``E = M^1/2 U``,
  ``D = M^-1/2 U``: an oblique projection, folded into the weights like the
  plain one. Scaling ``M`` changes nothing, so the query Grams need no
  normalising against the keys.
- ``basis="output-rope"`` (pre-RoPE keys only): as ``"output"``, but the key
  weight is the query Gram averaged over the rotations between a query and
  the keys it meets: a key error ``e`` changes a score by ``q R_D e^T`` when
  the query is ``D`` tokens after the key (``R_D`` the RoPE rotation of row
  vectors), so ``M = sum_D w_D R_D^T (Q^T Q) R_D`` with ``w_D`` the number of
  (query, key) pairs ``D`` tokens apart in a calibration window.

Which Gram builds which basis:

- values: one basis per KV head, from that head's values.
- keys, ``"pre"`` with ``"pca"`` (the paper): one basis for the layer, from
  the sum of its KV heads' pre-RoPE key Grams (the rebuild basis is then
  shared by all heads). With ``"output"``, one per KV head: each head's keys
  meet a different group of queries.
- keys, ``"post"`` and ``"none"``, ``"pca"``: a joint key/query basis per KV
  head (queries and keys are both projected on it): the key Gram and the Gram
  of the queries that read that head, each divided by its trace before
  summing. Undivided, queries dominate (with GQA several query heads feed one
  KV head, and on SmolLM2 the query/key trace ratio runs from 0.9 to 3.4), so
  the basis would serve queries, not the keys that fill the cache. With
  ``"output"`` the queries are not approximated at all: ``q k^^T = (q D)(k E)^T``
  is exact in rank space, so keys alone are projected, weighted by the queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eigenkv.compress.calibrate import LayerStats

BASES = ("pca", "output", "output-rope")

# Weight Grams whose eigenvalues spread more than this cannot be inverted reliably (float64).
MAX_CONDITION = 1e12


@dataclass
class LayerBases:
    """Full bases of one layer, columns sorted by decreasing (weighted) eigenvalue.

    Attributes:
        keys, key_duals: ``(1 or H_kv, d, d)`` float64 encoders ``E`` and
            decoders ``D`` (1: shared by the layer's KV heads); equal for PCA.
        values, value_duals: ``(H_kv, d, d)`` float64.
        key_eigenvalues, value_eigenvalues: ``(1 or H_kv, d)`` and ``(H_kv, d)``,
            descending, >= 0: the error each component removes when dropped.
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_eigenvalues: torch.Tensor
    value_eigenvalues: torch.Tensor
    key_duals: torch.Tensor | None = None
    value_duals: torch.Tensor | None = None

    def __post_init__(self):
        self.key_duals = self.keys if self.key_duals is None else self.key_duals
        self.value_duals = self.values if self.value_duals is None else self.value_duals


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


def _matrix_roots(weight: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``M^1/2`` and ``M^-1/2`` of ``(..., d, d)`` PSD matrices; refuses singular ones."""
    values, vectors = torch.linalg.eigh(weight.to(torch.float64))
    top = values.amax(-1, keepdim=True)
    if not torch.isfinite(values).all() or (top <= 0).any() or (values < top / MAX_CONDITION).any():
        worst = float((values.amin(-1) / top.squeeze(-1).clamp_min(1e-300)).min())
        raise ValueError(
            f"the {what} Gram is singular (smallest/largest eigenvalue {worst:.2e}): an output-aware basis divides "
            "by it; calibrate on more tokens (at least the head size per head), or use basis='pca'"
        )
    root = (vectors * values.sqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)
    inverse_root = (vectors * values.rsqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)
    return root, inverse_root


def weighted_basis(gram: torch.Tensor, weight: torch.Tensor, what: str) -> tuple[torch.Tensor, ...]:
    """Output-aware pair for ``(..., d, d)`` data and weight Grams (see the module doc).

    Returns:
        eigenvalues ``(..., d)`` descending (weighted error of each component, ``M``
        scaled to mean eigenvalue 1), encoders ``E = M^1/2 U`` and decoders
        ``D = M^-1/2 U``, each ``(..., d, d)``, with columns rescaled so that
        every encoder column has unit norm.
    """
    weight = weight.to(torch.float64)
    weight = weight / (weight.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]).clamp_min(1e-300)
    root, inverse_root = _matrix_roots(weight, what)
    eigenvalues, u = eigenbasis(root @ gram.to(torch.float64) @ root)
    encoders, decoders = root @ u, inverse_root @ u
    # Each column pair may be rescaled (e_i s, d_i / s) without changing the projection; unit-norm
    # encoder columns bound every cached coefficient |x . e_i| by |x|, as for PCA. (Unscaled, a query
    # Gram summed over 10^5 tokens made SmolLM2's key coefficients reach 9e4, past the fp16 range.)
    norms = encoders.norm(dim=-2, keepdim=True)
    return eigenvalues, encoders / norms, decoders * norms


def rope_averaged(weight: torch.Tensor, rotations: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``sum_D w_D R_D^T M R_D / sum w``: ``weight`` (..., d, d), ``rotations`` (N, d, d), ``counts`` (N,)."""
    w = (counts / counts.sum()).to(torch.float64)
    r = rotations.to(torch.float64)
    out = torch.zeros_like(weight, dtype=torch.float64)
    for start in range(0, r.shape[0], 256):  # bounded memory: 256 x heads x d x d at a time
        chunk, cw = r[start : start + 256], w[start : start + 256]
        out += torch.einsum("n,nji,...jk,nkl->...il", cw, chunk, weight.to(torch.float64), chunk)
    return out


def layer_bases(
    stats: LayerStats,
    mode: str,
    basis: str = "pca",
    *,
    value_weight: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LayerBases:
    """Bases of one layer for RoPE mode ``"pre"``, ``"post"`` or ``"none"`` (see the module doc).

    Args:
        stats: the layer's calibration Grams.
        basis: ``"pca"``, ``"output"`` or ``"output-rope"``.
        value_weight: ``(H_kv, d, d)`` Gram of the output-projection blocks per KV head (output bases).
        rope: ``(rotations (N, d, d), counts (N,))`` for ``"output-rope"``.
    """
    if stats.tokens == 0:
        raise ValueError("this layer saw no calibration tokens")
    if mode not in ("pre", "post", "none"):
        raise ValueError(f"mode must be 'pre', 'post' or 'none'; got {mode!r}")
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}; got {basis!r}")
    if basis == "pca":
        if mode == "pre":
            key_gram = stats.keys.sum(0, keepdim=True)
        else:
            key_gram = _trace_normalised(stats.keys) + _trace_normalised(stats.queries)
        key_eigenvalues, keys = eigenbasis(key_gram)
        value_eigenvalues, values = eigenbasis(stats.values)
        return LayerBases(keys, values, key_eigenvalues, value_eigenvalues)
    if value_weight is None:
        raise ValueError("output-aware bases need the output projection's Gram (value_weight)")
    if basis == "output-rope" and (mode != "pre" or rope is None):
        raise ValueError(
            "basis 'output-rope' averages over RoPE rotations: it needs rope_mode 'pre' (and the model's RoPE)"
        )
    _trace_normalised(stats.keys)  # refuses an all-zero key projection with its message
    query_weight = stats.queries if basis == "output" else rope_averaged(stats.queries, *rope)
    key_eigenvalues, keys, key_duals = weighted_basis(stats.keys, query_weight, "query")
    value_eigenvalues, values, value_duals = weighted_basis(stats.values, value_weight, "output-projection")
    return LayerBases(keys, values, key_eigenvalues, value_eigenvalues, key_duals, value_duals)


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


def coefficient_variance(gram: torch.Tensor, encoder: torch.Tensor, tokens: int) -> torch.Tensor:
    """Mean square of each coefficient ``x E`` over calibration tokens: ``diag(E^T G E) / N``.

    Args:
        gram: ``(H_kv, d, d)`` float64 sum of ``x^T x`` per KV head.
        encoder: ``(1 or H_kv, d, r)``.
    Returns:
        ``(H_kv, r)`` float64.
    """
    e = encoder.to(gram.device, torch.float64).expand(gram.shape[0], -1, -1)
    return torch.einsum("hdr,hde,her->hr", e, gram, e) / max(tokens, 1)
