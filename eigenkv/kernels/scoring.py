"""How a query scores cached keys: one validated description shared by the attention kernels and their references.

Modes:

- ``"rank"``: queries and keys are both in rank space (``r_k`` features): post-RoPE
  Llama-family caches, OPT, MPT (plus ALiBi slopes).
- ``"pre"``: the cache holds pre-RoPE key coefficients ``c`` (``r_k`` features) and
  queries are rotated full vectors (``d`` features); key ``t`` is ``rope(c_t D^T, t)``
  with the decoder ``D`` of its KV head and the RoPE frequencies ``inv_freq``.

Either mode may cap the logits as Gemma-2 does (``softcap``): ``softcap * tanh(s / softcap)`` of the
scaled score ``s``, before the ALiBi bias and the mask (transformers' ``eager_attention_forward`` of
Gemma-2: scale, cap, add the mask, softmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Real

import torch

MODES = ("rank", "pre")
# Widest head the pre-mode kernels take: a program holds its head's key decoder, which at 256 features outgrows
# an A100's shared memory (sm_80: 163 KB a block). Wider heads score in PyTorch, or in rank mode (post-RoPE).
PRE_MAX_HEAD = 128


@dataclass(frozen=True)
class Scoring:
    """Scores ``scaling * q . k_t`` (capped at ``softcap``, plus ``slope_h * t`` with ALiBi) of key ``t`` at
    position ``t``.

    Attributes:
        scaling: softmax scale (``1/sqrt(d)``; 1.0 for prescaled queries).
        mode: ``"rank"`` or ``"pre"`` (module doc).
        key_decoder: pre mode, ``(1 or H_kv, d, r_k)`` decoders ``D_k``.
        inv_freq: pre mode, ``(d / 2,)`` RoPE inverse frequencies (fp32); ``rope_scale`` multiplies cos and sin.
        alibi_slopes: ``(H,)`` ALiBi slopes, or None.
        softcap: Gemma-2's ``attn_logit_softcapping``: scores become ``softcap * tanh(s / softcap)`` after the
            scaling, before the bias and the mask; a positive finite number, or None (no cap).
    """

    scaling: float
    mode: str = "rank"
    key_decoder: torch.Tensor | None = None
    inv_freq: torch.Tensor | None = None
    rope_scale: float = 1.0
    alibi_slopes: torch.Tensor | None = None
    softcap: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; use one of {MODES}")
        if self.mode == "pre" and (self.key_decoder is None or self.inv_freq is None):
            raise ValueError("pre mode needs key_decoder (1 or H_kv, d, r_k) and inv_freq (d / 2,)")
        if self.softcap is not None:
            cap = self.softcap
            if isinstance(cap, bool) or not isinstance(cap, Real) or not math.isfinite(cap) or cap <= 0:
                raise ValueError(f"softcap must be a positive finite number or None; got {cap!r}")
            object.__setattr__(self, "softcap", float(cap))

    def check(self, query: torch.Tensor, kv_heads: int, key_rank: int) -> None:
        """Refuse a scoring that does not fit ``query`` ``(B, H, ..., e)`` over ``kv_heads`` heads of ``key_rank``."""
        q_heads, width = query.shape[1], query.shape[-1]
        if self.mode == "pre":
            shape = tuple(self.key_decoder.shape)
            if len(shape) != 3 or shape[0] not in (1, kv_heads) or shape[1:] != (width, key_rank):
                raise ValueError(f"key_decoder must be (1 or {kv_heads}, d={width}, r_k={key_rank}); got {shape}")
            if width % 2 or tuple(self.inv_freq.shape) != (width // 2,):
                raise ValueError(f"pre mode needs an even head size and inv_freq of shape ({width // 2},)")
        elif width != key_rank:
            raise ValueError(f"rank mode: query width {width} must equal the key rank {key_rank}")
        if self.alibi_slopes is not None and tuple(self.alibi_slopes.shape) != (q_heads,):
            raise ValueError(f"alibi_slopes must be ({q_heads},); got {tuple(self.alibi_slopes.shape)}")

    def check_kernel(self, query: torch.Tensor, kv_heads: int, key_rank: int) -> None:
        """:meth:`check`, and the Triton kernels' limit: pre mode on heads of at most ``PRE_MAX_HEAD`` features."""
        self.check(query, kv_heads, key_rank)
        if self.mode == "pre" and query.shape[-1] > PRE_MAX_HEAD:
            raise ValueError(
                f"the pre-mode kernels take heads of up to {PRE_MAX_HEAD} features; got {query.shape[-1]}: use the "
                "reference, or rank mode (a model compressed with rope_mode='post')"
            )

    def kernel_tensors(self, query: torch.Tensor) -> tuple:
        """``(decoder, decoder head stride, inv_freq, slopes)`` on the query's device for a kernel launch
        (``None`` where unused)."""
        decoder = inv_freq = slopes = None
        head_stride = 0
        if self.mode == "pre":
            decoder = self.key_decoder.to(device=query.device, dtype=query.dtype).contiguous()
            head_stride = decoder.stride(0) if decoder.shape[0] > 1 else 0
            inv_freq = self.inv_freq.to(device=query.device, dtype=torch.float32).contiguous()
        if self.alibi_slopes is not None:
            slopes = self.alibi_slopes.to(device=query.device, dtype=torch.float32).contiguous()
        return decoder, head_stride, inv_freq, slopes

    def keys(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Reference: the keys queries score, ``(B, H_kv, S, e)``: rank-space keys as they are, pre-RoPE
        coefficients rebuilt and rotated (key ``t`` at position ``t``) in their dtype, after an fp32
        cos/sin table, as Hugging Face's Llama computes them."""
        if self.mode != "pre":
            return coefficients
        dtype = coefficients.dtype
        positions = torch.arange(coefficients.shape[-2], device=coefficients.device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq.to(coefficients.device, torch.float32)[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = (angles.cos() * self.rope_scale).to(dtype), (angles.sin() * self.rope_scale).to(dtype)
        keys = coefficients @ self.key_decoder.to(coefficients.device, dtype).transpose(-1, -2)
        half = keys.shape[-1] // 2
        rotated = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
        return keys * cos + rotated * sin

    def cap(self, scores: torch.Tensor) -> torch.Tensor:
        """Reference: scaled ``scores`` capped as Gemma-2 caps them (``softcap * tanh(s / softcap)``), in their
        dtype; unchanged without ``softcap``."""
        if self.softcap is None:
            return scores
        return torch.tanh(scores / self.softcap) * self.softcap

    def bias(self, positions: torch.Tensor) -> torch.Tensor | float:
        """Reference: ALiBi bias ``(H, S)`` fp32 of keys at ``positions`` (0.0 without ALiBi)."""
        if self.alibi_slopes is None:
            return 0.0
        return self.alibi_slopes.float().to(positions.device)[:, None] * positions.float()[None, :]

    def exact(self) -> Scoring:
        """The same scoring with a float64 decoder (for float64 references)."""
        if self.key_decoder is None:
            return self
        return replace(self, key_decoder=self.key_decoder.double())
