"""Attention modules that compute in rank space, built from a model's own modules by folding bases.

Notation per layer: ``H`` query heads, ``H_kv`` KV heads (``g = H / H_kv`` query
heads per KV head), head size ``d``, key rank ``r_k``, value rank ``r_v``.
A basis is a pair of ``(d, r)`` matrices ``E`` (encoder) and ``D`` (decoder)
with ``D^T E = I`` (see ``basis.py``): ``x`` is stored as ``c = x E`` and read
as ``x^ = c D^T``. PCA bases have ``E = D = U`` with orthonormal columns; at
``r = d``, ``E D^T = I`` and every module here equals the one it replaces.

Folding (weights ``W`` are ``(out, in)``; head ``i`` owns rows ``i*d:(i+1)*d``):

- values, every family: ``W_v'[i] = E_v[i]^T W_v[i]`` (and the bias), and the
  output projection reads rank space: ``W_o'[:, j] = W_o[:, j] D_v[kv(j)]``
  for query head ``j`` (since ``o = W_o v^ = W_o D_v c``); the cache holds
  ``(B, H_kv, S, r_v)`` values.
- keys, no RoPE (OPT, MPT): ``W_k'[i] = E_k[i]^T W_k[i]`` and
  ``W_q'[j] = D_k[kv(j)]^T W_q[j]``, because ``q k^^T = q D_k E_k^T k^T =
  (q D_k)(k E_k)^T``: scores are computed with ``r_k``-sized vectors and the
  softmax scale stays ``1/sqrt(d)``. With PCA both are ``U`` (the paper's
  joint basis); with output-aware bases queries are not approximated at all.
- keys, RoPE ``"pre"`` (the paper): ``W_k'[i] = E_k^T W_k[i]``; the cache
  holds ``(B, H_kv, S, r_k)`` pre-RoPE coefficients; attention rebuilds
  ``K = c D_k^T`` and rotates each key at its own position (never the
  current one: that is the reference code's decoding bug); queries stay full
  rank. The decoders (one ``(d, r_k)`` per layer for PCA, one per KV head for
  output-aware bases) are kept at run time.
- keys, RoPE ``"post"``: queries and keys are rotated as the model does, then
  ``k E_k[i]`` and ``q D_k[kv(j)]`` (the same identity as without RoPE); RoPE
  sits between the weights and the basis, so nothing folds and both are kept
  (one matrix when ``E = D``), counted in the KV accounting.
- query/key norms (Qwen3, OLMo-2: an RMSNorm of each head's, or of all heads',
  projected queries and keys before RoPE): a basis cannot fold through the
  norm, so pre-RoPE keys are projected after it at run time (``c = k E_k``, one
  ``(d, r_k)`` matmul per head and token, the encoder kept and counted like the
  post-RoPE bases); queries and post-RoPE keys are normalised as the model does
  before anything else. Values have no norm and fold as above.

Only the attention modules are replaced; the rest of the Hugging Face model
(masks, caches, ``generate``) is untouched, and any transformers ``Cache``
holds the rank-space tensors (its sequence axis is unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from eigenkv.kernels.scoring import PRE_MAX_HEAD, Scoring
from eigenkv.quant import routing

MODES = ("pre", "post", "none")


def split_heads(x: torch.Tensor, heads: int, head_dim: int, norm: nn.Module | None) -> torch.Tensor:
    """A projection ``(B, T, heads * d)`` as ``(B, T, heads, d)``, normalised as the model's own ``q_norm`` /
    ``k_norm`` does: per head (Qwen3, Gemma-3: the norm's size is ``d``) or across all heads (OLMo-2)."""
    shape = (*x.shape[:2], heads, head_dim)
    if norm is None:
        return x.view(shape)
    if norm.weight.shape[-1] == head_dim:
        return norm(x.view(shape))
    return norm(x).view(shape)


def fold_rows(linear: nn.Linear, basis: torch.Tensor, heads: int, rows: slice | None = None) -> nn.Linear:
    """``Linear`` whose head ``i`` outputs ``U[i]^T y_i``: ``(heads * r)`` outputs from ``(heads * d)``.

    Args:
        linear: the projection; ``rows`` selects its ``heads * d`` output rows (a fused QKV).
        basis: ``(heads or 1, d, r)``; a single basis is shared by all heads.
    """
    weight = linear.weight[rows] if rows is not None else linear.weight
    bias = None if linear.bias is None else (linear.bias[rows] if rows is not None else linear.bias)
    d, r = basis.shape[-2:]
    u = basis.to(device=weight.device, dtype=torch.float64).expand(heads, d, r)
    w = torch.einsum("hdr,hdi->hri", u, weight.to(torch.float64).view(heads, d, -1)).reshape(heads * r, -1)
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if bias is not None:
            out.bias.copy_(torch.einsum("hdr,hd->hr", u, bias.to(torch.float64).view(heads, d)).reshape(-1))
    return out.requires_grad_(linear.weight.requires_grad)


def fold_columns(linear: nn.Linear, decoder: torch.Tensor, q_heads: int) -> nn.Linear:
    """Output projection that reads rank-space values: ``(out, H * d)`` -> ``(out, H * r_v)``.

    Args:
        decoder: ``(H_kv, d, r_v)`` value decoders; query head ``j`` reads KV head ``j // (H / H_kv)``.
    """
    kv_heads, d, r = decoder.shape
    u = decoder.to(device=linear.weight.device, dtype=torch.float64)
    u = u.repeat_interleave(q_heads // kv_heads, dim=0)  # (H, d, r)
    weight = linear.weight.to(torch.float64).view(linear.out_features, q_heads, d)
    w = torch.einsum("ohd,hdr->ohr", weight, u).reshape(linear.out_features, q_heads * r)
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    return out.requires_grad_(linear.weight.requires_grad)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of the Llama family: ``x`` (B, H, T, d), ``cos``/``sin`` (B or 1, T, d_rot); computed in the wider of
    the two dtypes and returned in ``x``'s, as the models do (OLMo-2 keeps its angles in float32). Partial
    rotary (``d_rot < d``, Phi-3 / GPT-NeoX style) rotates the first ``d_rot`` features and passes the rest."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        part, rest = x[..., :rotary], x[..., rotary:]
        return torch.cat([(part * cos + rotate_half(part) * sin).to(x.dtype), rest], dim=-1)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def head_size(module: nn.Module) -> int:
    """``d`` of a Llama-family module (GPT-NeoX names it ``head_size``)."""
    return module.head_dim if hasattr(module, "head_dim") else module.head_size


def output_linear(module: nn.Module) -> nn.Linear:
    """A Llama-family module's output projection (GPT-NeoX: ``dense``)."""
    return module.o_proj if hasattr(module, "o_proj") else module.dense


def fused_rows(module: nn.Module) -> tuple[nn.Linear, list[torch.Tensor]] | None:
    """A fused projection and the row indices of its queries, keys and values, or None when not fused.

    Phi-3's ``qkv_proj``: all queries, then all keys, then all values; GPT-NeoX's ``query_key_value``: per
    head, its query, key and value rows (``3 d`` rows a head)."""
    d = head_size(module)
    if getattr(module, "qkv_proj", None) is not None:
        config, fused = module.config, module.qkv_proj
        sizes = (config.num_attention_heads * d, config.num_key_value_heads * d, config.num_key_value_heads * d)
        return fused, list(torch.arange(sum(sizes)).split(sizes))
    if getattr(module, "query_key_value", None) is not None:
        fused = module.query_key_value
        rows = torch.arange(fused.out_features).view(-1, 3, d)  # (heads, q/k/v, d)
        return fused, [rows[:, i].reshape(-1) for i in range(3)]
    return None


def qkv_sizes(module: nn.Module) -> tuple[int, int, int]:
    """Output features of a Llama-family module's query, key and value projections (fused or not)."""
    fused = fused_rows(module)
    if fused is None:
        return module.q_proj.out_features, module.k_proj.out_features, module.v_proj.out_features
    return tuple(len(rows) for rows in fused[1])


def project(module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module's projected queries, keys and values ``(B, T, heads * d)`` each (a fused projection split)."""
    fused = fused_rows(module)
    if fused is None:
        return module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden)
    out = fused[0](hidden)
    return tuple(out.index_select(-1, rows.to(out.device)) for rows in fused[1])


def split_qkv(module: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """``(q_proj, k_proj, v_proj)`` of a Llama-family attention module; a fused projection (Phi-3, GPT-NeoX) is
    split into three linear layers holding copies of its rows."""
    fused = fused_rows(module)
    if fused is None:
        return module.q_proj, module.k_proj, module.v_proj
    linear, index = fused
    parts = []
    for rows in index:
        part = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None)
        part.to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            part.weight.copy_(linear.weight[rows])
            if linear.bias is not None:
                part.bias.copy_(linear.bias[rows])
        parts.append(part)
    return tuple(parts)


def _attention_function(config) -> Callable:
    """The attention function the model is set to use (sdpa, eager, eigenkv_quant, ...)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, _eager_attention)


def _pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[-1] == width:
        return x
    padded = nn.functional.pad(x, (0, width - x.shape[-1]))
    return routing.map_twin(x, padded, lambda t: nn.functional.pad(t, (0, width - t.shape[-1])))


def attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs) -> tuple[torch.Tensor, object]:
    """The model's attention function on rank-space tensors; output ``(B, T, H, r_v)``.

    Fused SDPA kernels need one head size for queries, keys and values (with
    ``r_k != r_v`` torch falls back to its unfused path, about 6x slower on
    CPU), so the narrower side is zero-padded: zero key columns add nothing to
    the scores, zero value columns are sliced off the output.
    """
    attention_mask = routing.fit_mask(attention_mask, key.shape[-2])
    width = max(query.shape[-1], value.shape[-1])
    query, key, value_padded = (_pad_last(x, width) for x in (query, key, value))
    out, weights = _attention_function(module.config)(
        module, query, key, value_padded, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    return out[..., : value.shape[-1]], weights


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs):
    """Plain softmax attention with GQA; ``query`` (B, H, T, e), ``key`` (B, H_kv, S, e), ``value`` (B, H_kv, S, r);
    ``softcap`` caps the scores as Gemma-2 does."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., : key.shape[-2]], torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@dataclass(frozen=True)
class KeptBases:
    """The kept columns of one layer's bases.

    Attributes:
        key, key_dual: ``(1 or H_kv, d, r_k)`` encoders ``E_k`` and decoders ``D_k``.
        value, value_dual: ``(H_kv, d, r_v)`` encoders ``E_v`` and decoders ``D_v``.
        The duals are ``None`` for orthonormal (PCA) bases, where ``D = E``.
    """

    key: torch.Tensor
    value: torch.Tensor
    key_dual: torch.Tensor | None = None
    value_dual: torch.Tensor | None = None

    @property
    def key_decoder(self) -> torch.Tensor:
        return self.key if self.key_dual is None else self.key_dual

    @property
    def value_decoder(self) -> torch.Tensor:
        return self.value if self.value_dual is None else self.value_dual


class EigenAttention(nn.Module):
    """Base of the rank-space attention modules (see the module doc).

    Attributes:
        key_rank, value_rank: ``r_k``, ``r_v``.
        kv_heads: KV heads (the cache's head axis).
        mode: ``"pre"``/``"post"`` (RoPE models) or ``"none"``.
    """

    mode: str

    def __init__(self, original: nn.Module, bases: KeptBases):
        super().__init__()
        self.layer_idx = original.layer_idx
        self.key_rank = int(bases.key.shape[-1])
        self.value_rank = int(bases.value.shape[-1])

    def runtime_basis_elements(self) -> int:
        """Elements of the bases attention reads at run time (counted in the KV accounting as fixed bytes)."""
        kept = (getattr(self, name, None) for name in ("key_basis", "query_basis", "key_encoder"))
        return sum(basis.numel() for basis in kept if basis is not None)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, mode={self.mode}, key_rank={self.key_rank}, value_rank={self.value_rank}"


class EigenLlamaAttention(EigenAttention):
    """Rank-space attention of the Llama family (Llama, Mistral, Qwen2; GQA, qkv biases); RoPE pre or post."""

    def __init__(self, original, bases: KeptBases, mode: str, rotary):
        super().__init__(original, bases)
        if mode not in ("pre", "post"):
            raise ValueError(f"Llama-family attention compresses in RoPE mode 'pre' or 'post'; got {mode!r}")
        self.mode = mode
        self.config = original.config
        self.head_dim = head_size(original)
        self.scaling = original.scaling
        self.attention_dropout = original.attention_dropout
        self.is_causal = True
        # Qwen2 names its window on the module, Mistral only in its config.
        self.sliding_window = getattr(original, "sliding_window", getattr(original.config, "sliding_window", None))
        if not getattr(original, "is_causal", True):
            raise NotImplementedError(
                f"{type(original).__name__} attends bidirectionally; eigenkv's attention is causal"
            )
        self.softcap = getattr(original, "attn_logit_softcapping", None)  # Gemma-2: capped logits
        q_proj, k_proj, v_proj = split_qkv(original)
        self.q_heads = q_proj.out_features // self.head_dim
        self.kv_heads = k_proj.out_features // self.head_dim
        self.num_key_value_groups = self.q_heads // self.kv_heads
        rope = getattr(original.config, "rope_parameters", None) or {}
        partial = float(rope.get("partial_rotary_factor", getattr(original.config, "partial_rotary_factor", 1.0)))
        # The pre-RoPE kernels rotate whole heads in registers, with the key decoder held per program: partial
        # rotary (the first features rotated) and heads over 128 features (Gemma's 256: the decoder alone
        # outgrows an A100's shared memory) take the PyTorch path, which rebuilds and rotates such keys.
        self.pre_rope_kernels = partial >= 1.0 and self.head_dim <= PRE_MAX_HEAD
        # pre-RoPE: the RoPE of this layer (``eigenkv.compress.families.LayerRope``: the model's own module,
        # not a submodule of this one; Gemma-3's sliding layers have their own)
        object.__setattr__(self, "_rotary", rotary)
        weight = k_proj.weight
        self.q_proj = q_proj
        self.q_norm = getattr(original, "q_norm", None)  # Qwen3, OLMo-2: normalised queries and keys
        self.k_norm = getattr(original, "k_norm", None)

        def kept(x):
            return x.to(weight.device, weight.dtype).contiguous()

        self.register_buffer("key_encoder", None)
        if mode == "pre" and self.k_norm is not None:  # nothing folds through the norm: projected at run time
            self.k_proj = k_proj
            self.register_buffer("key_encoder", kept(bases.key))  # (1 or H_kv, d, r_k)
            self.register_buffer("key_basis", kept(bases.key_decoder))
            self.register_buffer("query_basis", None)
        elif mode == "pre":
            self.k_proj = fold_rows(k_proj, bases.key, self.kv_heads)
            self.register_buffer("key_basis", kept(bases.key_decoder))  # (1 or H_kv, d, r_k): rebuilds keys
            self.register_buffer("query_basis", None)
        else:
            self.k_proj = k_proj
            self.register_buffer("key_basis", kept(bases.key))  # (H_kv, d, r_k)
            self.register_buffer("query_basis", None if bases.key_dual is None else kept(bases.key_dual))
        self.v_proj = fold_rows(v_proj, bases.value, self.kv_heads)
        self.o_proj = fold_columns(output_linear(original), bases.value_decoder, self.q_heads)

    def _scoring(self) -> Scoring:
        """How queries score the cached keys, for the attention kernels."""
        if self.mode == "post":
            return Scoring(self.scaling, softcap=self.softcap)
        rope_scale = self._rotary.attention_scaling
        inv_freq = self._rotary.inv_freq.to(self.key_basis.device)  # the model's RoPE may sit on another device
        return Scoring(self.scaling, "pre", self.key_basis, inv_freq, rope_scale, softcap=self.softcap)

    def _angles(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of the model's RoPE at ``positions``, on ``hidden``'s device (a model spread over devices
        computes its RoPE on the device of its own, whose accelerate hook leaves the angles there)."""
        cos, sin = self._rotary(hidden, positions)
        return cos.to(hidden.device), sin.to(hidden.device)

    def _rope_table(self, hidden: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, stop, device=hidden.device).unsqueeze(0)
        return self._angles(hidden, positions)  # each (1, stop - start, d)

    def rebuild_keys(self, coefficients: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys ``(B, H_kv, S, r_k)`` -> rotated full keys ``(B, H_kv, S, d)``, key ``s`` by ``cos[:, s]``."""
        return apply_rope(coefficients @ self.key_basis.transpose(-1, -2), cos, sin)

    def _dropped(self, key: torch.Tensor, tokens: int) -> int:
        """Keys a sliding layer's cache no longer returns of the ``tokens`` seen (0 in full-attention layers,
        whose caches may hold their counts on the device)."""
        return 0 if self.sliding_window is None else tokens - routing.packed(key).tokens

    def _pre_rope_keys(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE key coefficients ``(B, H_kv, T, r_k)``: the folded projection, or (with a key norm) the
        normalised keys projected on the encoder."""
        if self.key_encoder is None:
            return split_heads(self.k_proj(hidden_states), self.kv_heads, self.key_rank, None).transpose(1, 2)
        keys = split_heads(self.k_proj(hidden_states), self.kv_heads, self.head_dim, self.k_norm)  # (B, T, H_kv, d)
        encoder = self.key_encoder.expand(self.kv_heads, -1, -1)
        return torch.einsum("bthd,hdr->bhtr", keys, encoder)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        past_key_values = kwargs.pop("layer_past", past_key_values)  # GPT-NeoX's name for the cache
        if self.softcap is not None:
            kwargs["softcap"] = self.softcap
        batch, length, _ = hidden_states.shape
        query = split_heads(self.q_proj(hidden_states), self.q_heads, self.head_dim, self.q_norm).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, self.kv_heads, self.value_rank).transpose(1, 2)
        training = self.training and self.attention_dropout > 0
        kernel = routing.kernels_apply(query, training, **kwargs) and (self.mode == "post" or self.pre_rope_kernels)
        if self.mode == "pre":
            key = self._pre_rope_keys(hidden_states)
            past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, self.layer_idx)
            dropped = self._dropped(key, past + length)
            if kernel:  # keys rebuilt and rotated inside the kernels at their index; the new queries here at theirs
                cos, sin = self._angles(hidden_states, routing.new_positions(key, past - dropped, length))
                rotated = apply_rope(query, cos, sin)
                out = routing.kernel_attention(
                    rotated, key, value, attention_mask, self._scoring(), window=self.sliding_window
                )
                if out is not None:
                    return self.o_proj(out.reshape(batch, length, -1)), None
            key, value = routing.resolve(key), routing.resolve(value)
            # Every position rotates by its index in the cache (a sliding layer's first held key: its count of
            # dropped keys): scores depend only on position differences, so this equals the model's rotation
            # for any per-sequence offset (left padding), and each cached key is rotated at its own position.
            cos, sin = self._rope_table(hidden_states, dropped, past + length)
            query = apply_rope(query, cos[:, -length:], sin[:, -length:])
            keys = routing.map_twin(key, self.rebuild_keys(key, cos, sin), lambda k: self.rebuild_keys(k, cos, sin))
        else:
            key = split_heads(self.k_proj(hidden_states), self.kv_heads, self.head_dim, self.k_norm).transpose(1, 2)
            cos, sin = position_embeddings
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
            query_basis = self.key_basis if self.query_basis is None else self.query_basis
            per_query_head = query_basis.repeat_interleave(self.num_key_value_groups, dim=0)
            query = torch.einsum("bhtd,hdr->bhtr", query, per_query_head)
            key = torch.einsum("bhtd,hdr->bhtr", key, self.key_basis)
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, self.layer_idx)
            if kernel:
                out = routing.kernel_attention(
                    query, key, value, attention_mask, self._scoring(), window=self.sliding_window
                )
                if out is not None:
                    return self.o_proj(out.reshape(batch, length, -1)), None
            keys, value = routing.resolve(key), routing.resolve(value)
        if self.sliding_window is not None:
            kwargs.setdefault("sliding_window", self.sliding_window)
        dropout = self.attention_dropout if self.training else 0.0
        out, weights = attend(self, query, keys, value, attention_mask, self.scaling, dropout, **kwargs)
        return self.o_proj(out.reshape(batch, length, -1)), weights


class EigenOPTAttention(EigenAttention):
    """Rank-space OPT attention: joint key/query basis per head, biases folded."""

    mode = "none"

    def __init__(self, original, bases: KeptBases):
        super().__init__(original, bases)
        self.config = original.config
        self.num_heads = self.kv_heads = original.num_heads
        self.head_dim = original.head_dim
        self.scaling = original.scaling
        self.dropout = original.dropout
        self.is_causal = True
        self.q_proj = fold_rows(original.q_proj, bases.key_decoder, self.num_heads)
        self.k_proj = fold_rows(original.k_proj, bases.key, self.num_heads)
        self.v_proj = fold_rows(original.v_proj, bases.value, self.num_heads)
        self.out_proj = fold_columns(original.out_proj, bases.value_decoder, self.num_heads)

    def forward(self, hidden_states, past_key_values=None, attention_mask=None, output_attentions=False, **kwargs):
        batch, length, _ = hidden_states.shape
        query = (self.q_proj(hidden_states) * self.scaling).view(batch, length, -1, self.key_rank).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, length, -1, self.key_rank).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, -1, self.value_rank).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        training = self.training and self.dropout > 0
        if routing.kernels_apply(query, training, output_attentions=output_attentions, **kwargs):
            out = routing.kernel_attention(query, key, value, attention_mask, Scoring(1.0))  # q is prescaled
            if out is not None:
                return self.out_proj(out.reshape(batch, length, -1)), None
        key, value = routing.resolve(key), routing.resolve(value)
        dropout = self.dropout if self.training else 0.0
        out, weights = attend(self, query, key, value, attention_mask, 1.0, dropout, **kwargs)  # q is prescaled
        return self.out_proj(out.reshape(batch, length, -1)), weights


class EigenMptAttention(EigenAttention):
    """Rank-space MPT attention: the fused ``Wqkv`` folded part by part; ALiBi bias as the model adds it."""

    mode = "none"

    def __init__(self, original, bases: KeptBases):
        super().__init__(original, bases)
        if original.clip_qkv:
            raise ValueError(
                "MPT with attn_config.clip_qkv clamps the full-rank q/k/v, which a folded basis cannot reproduce; "
                "compress a model without clip_qkv"
            )
        self.n_heads = self.kv_heads = original.n_heads
        self.head_dim = original.head_dim
        self.softmax_scale = original.softmax_scale
        self.attn_dropout_p = original.attn_dropout_p
        hidden = original.hidden_size
        parts = [
            fold_rows(original.Wqkv, bases.key_decoder, self.n_heads, slice(0, hidden)),
            fold_rows(original.Wqkv, bases.key, self.n_heads, slice(hidden, 2 * hidden)),
            fold_rows(original.Wqkv, bases.value, self.n_heads, slice(2 * hidden, 3 * hidden)),
        ]
        self.split = [p.out_features for p in parts]
        self.Wqkv = nn.Linear(hidden, sum(self.split), bias=original.Wqkv.bias is not None)
        self.Wqkv.to(device=original.Wqkv.weight.device, dtype=original.Wqkv.weight.dtype)
        with torch.no_grad():
            self.Wqkv.weight.copy_(torch.cat([p.weight for p in parts]))
            if self.Wqkv.bias is not None:
                self.Wqkv.bias.copy_(torch.cat([p.bias for p in parts]))
        self.out_proj = fold_columns(original.out_proj, bases.value_decoder, self.n_heads)

    def forward(self, hidden_states, position_bias, past_key_values=None, attention_mask=None, **kwargs):
        batch, length = hidden_states.shape[:2]
        query, key, value = self.Wqkv(hidden_states).split(self.split, dim=2)
        query = query.reshape(batch, length, self.n_heads, self.key_rank).transpose(1, 2)
        key = key.reshape(batch, length, self.n_heads, self.key_rank).transpose(1, 2)
        value = value.reshape(batch, length, self.n_heads, self.value_rank).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        training = self.training and self.attn_dropout_p > 0
        if (
            position_bias is not None
            and position_bias.shape[-1] >= 2
            and (attention_mask is not None or length == 1)  # MPT applies no causal mask without one
            and routing.kernels_apply(query, training, **kwargs)
        ):
            # MPT's bias is slope_h * (j - (max_len - 1)); the kernels add slope_h * j (same softmax)
            slopes = (position_bias[:, 0, -1] - position_bias[:, 0, -2]).float()
            scoring = Scoring(self.softmax_scale, alibi_slopes=slopes)
            out = routing.kernel_attention(query, key, value, attention_mask, scoring, masked_is_true=True)
            if out is not None:
                return self.out_proj(out.reshape(batch, length, -1)), None
        key, value = routing.resolve(key), routing.resolve(value)
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.softmax_scale
        # Same slicing of the ALiBi bias as MptAttention: it depends on key positions only.
        query_length = length if past_key_values is None else length + past_key_values.get_seq_length()
        if position_bias is not None:
            key_length = key.shape[-2]
            q_index = max(0, position_bias.size(1) - query_length)
            k_index = max(0, position_bias.size(2) - key_length)
            scores = scores + position_bias[:, q_index:, k_index:]
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask, torch.finfo(query.dtype).min)
        weights = nn.functional.softmax(scores.float(), dim=-1).to(value.dtype)
        weights = nn.functional.dropout(weights, p=self.attn_dropout_p, training=self.training)
        context = torch.matmul(weights, value).permute(0, 2, 1, 3).reshape(batch, length, -1)
        return self.out_proj(context), weights
