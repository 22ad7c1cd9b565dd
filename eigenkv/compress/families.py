"""Which attention modules a model has, how to read their q/k/v, and how to replace them.

Supported: the Llama family (``LlamaAttention``, ``MistralAttention``,
``Qwen2Attention``: RoPE, GQA, optional qkv biases; ``Qwen3Attention``,
``Olmo2Attention`` and ``Gemma3Attention``: the same with query/key norms, and
Gemma-3's sliding-window layers and query scaling; ``Gemma2Attention``: capped
attention logits; ``Phi3Attention`` and
``GPTNeoXAttention``: fused query/key/value projections, partial RoPE),
``OPTAttention`` and
``MptAttention`` (fused ``Wqkv``, ALiBi). Anything else is refused with the list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eigenkv.compress.attention import (
    EigenAttention,
    EigenLlamaAttention,
    EigenMptAttention,
    EigenOPTAttention,
    KeptBases,
    apply_rope,
    head_size,
    output_linear,
    project,
    qkv_sizes,
    split_heads,
)
from eigenkv.devices import execution_device, onloaded, place_like

LLAMA_LIKE = (
    "LlamaAttention",
    "MistralAttention",
    "Qwen2Attention",
    "Qwen3Attention",
    "Olmo2Attention",
    "Gemma2Attention",
    "Gemma3Attention",
    "Phi3Attention",
    "GPTNeoXAttention",
)
FAMILIES = {**dict.fromkeys(LLAMA_LIKE, "llama"), "OPTAttention": "opt", "MptAttention": "mpt"}


@dataclass(frozen=True)
class AttentionSite:
    """One attention module and where it hangs in the model."""

    layer: int
    parent: nn.Module
    attr: str
    module: nn.Module


def family_of(model: nn.Module) -> str:
    """``"llama"``, ``"opt"`` or ``"mpt"``; a clear error for anything else or an already compressed model."""
    names = {type(m).__name__ for m in model.modules()}
    if any(isinstance(m, EigenAttention) for m in model.modules()):
        raise ValueError("this model is already compressed; load a fresh copy first")
    found = {FAMILIES[n] for n in names if n in FAMILIES}
    if len(found) != 1:
        kinds = sorted(n for n in names if n.endswith("Attention")) or ["none"]
        raise ValueError(
            f"unsupported model {type(model).__name__} (attention modules: {', '.join(kinds)}); "
            f"eigenkv compresses {', '.join(FAMILIES)}"
        )
    return found.pop()


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every attention module (original or compressed), in layer order."""
    sites = []
    named = dict(model.named_modules())
    for name, module in model.named_modules():
        if type(module).__name__ in FAMILIES or isinstance(module, EigenAttention):
            parent_name, _, attr = name.rpartition(".")
            layer = module.layer_idx
            if layer is None:
                raise ValueError(f"{name} has no layer_idx; build the model with transformers >= 4.48")
            sites.append(AttentionSite(int(layer), named[parent_name], attr, module))
    sites.sort(key=lambda s: s.layer)
    if [s.layer for s in sites] != list(range(len(sites))):
        raise ValueError(f"attention layer indices are not 0..n-1: {[s.layer for s in sites]}")
    return sites


@dataclass(frozen=True)
class HeadShape:
    q_heads: int
    kv_heads: int
    head_dim: int


def head_shape(module: nn.Module) -> HeadShape:
    name = type(module).__name__
    if name in LLAMA_LIKE:
        d = head_size(module)
        q_size, k_size, _ = qkv_sizes(module)
        return HeadShape(q_size // d, k_size // d, d)
    if name == "OPTAttention":
        return HeadShape(module.num_heads, module.num_heads, module.head_dim)
    if name == "MptAttention":
        return HeadShape(module.n_heads, module.n_heads, module.head_dim)
    raise ValueError(f"unsupported attention module {name}")


def project_qkv(module: nn.Module, args: tuple, kwargs: dict, rotated: bool):
    """The module's queries ``(B, H, T, d)``, keys and values ``(B, H_kv, T, d)`` for its inputs.

    ``rotated``: apply RoPE as the module does (Llama family) before returning.
    """
    hidden = args[0] if args else kwargs["hidden_states"]
    batch, length, _ = hidden.shape
    name = type(module).__name__
    if name == "MptAttention":
        q, k, v = module.Wqkv(hidden).chunk(3, dim=2)
        d = module.head_dim
        q, k, v = (x.view(batch, length, -1, d).transpose(1, 2) for x in (q, k, v))
    else:
        d = head_size(module)
        q, k, v = project(module, hidden)
        q, k = (
            split_heads(x, x.shape[-1] // d, d, getattr(module, norm, None)).transpose(1, 2)
            for x, norm in ((q, "q_norm"), (k, "k_norm"))
        )
        v = v.view(batch, length, -1, d).transpose(1, 2)
    if rotated:
        cos, sin = kwargs["position_embeddings"]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k, v


class LayerRope:
    """The model's rotary embedding as one decoder layer uses it: ``(cos, sin)`` at positions, the inverse
    frequencies and the attention scaling of that layer's RoPE.

    Most models have one RoPE for every layer (``model.model.rotary_emb``). Gemma-3 has two, a local one for
    its sliding-window layers and a global one: transformers 5 keeps both in one module (buffers
    ``sliding_attention_inv_freq``, ``full_attention_inv_freq``, called with the layer type), transformers 4
    in two (``rotary_emb_local`` for the sliding layers).
    """

    def __init__(self, module: nn.Module, layer_type: str | None = None):
        self.module = module
        self.layer_type = layer_type  # the per-type buffers' prefix; None: the module's own inv_freq

    @property
    def inv_freq(self) -> torch.Tensor:
        """``(d_rot / 2,)`` float32, as the model rotates now (dynamic scaling updates it in place)."""
        return getattr(self.module, "inv_freq" if self.layer_type is None else f"{self.layer_type}_inv_freq")

    @property
    def attention_scaling(self) -> float:
        name = "attention_scaling" if self.layer_type is None else f"{self.layer_type}_attention_scaling"
        return float(getattr(self.module, name, 1.0))

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``(B, T, d_rot)`` in ``x``'s dtype, at int64 ``positions`` ``(B, T)``."""
        if self.layer_type is None:
            return self.module(x, positions)
        return self.module(x, positions, self.layer_type)


def layer_rope(model: nn.Module, layer: int) -> LayerRope:
    """The RoPE decoder layer ``layer`` of ``model`` applies (see :class:`LayerRope`); a clear error without one."""
    modules = {name.rpartition(".")[2]: module for name, module in model.named_modules()}
    text = getattr(model.config, "text_config", None) or model.config
    types = getattr(text, "layer_types", None)
    layer_type = types[layer] if types is not None else "full_attention"
    if layer_type == "sliding_attention" and "rotary_emb_local" in modules:
        return LayerRope(modules["rotary_emb_local"])
    rotary = modules.get("rotary_emb")
    if rotary is not None and hasattr(rotary, "inv_freq"):
        return LayerRope(rotary)
    if rotary is not None and hasattr(rotary, f"{layer_type}_inv_freq"):
        return LayerRope(rotary, layer_type)
    raise ValueError(f"{type(model).__name__} has no rotary_emb module; pre-RoPE mode needs the model's RoPE")


def output_projection(module: nn.Module) -> nn.Linear:
    """The linear layer that maps the heads' outputs back to the residual stream."""
    return output_linear(module) if type(module).__name__ in LLAMA_LIKE else module.out_proj


def output_gram(module: nn.Module) -> torch.Tensor:
    """``(H_kv, d, d)`` float64: ``sum_j W_o[:, j]^T W_o[:, j]`` over the query heads ``j`` reading each KV head."""
    shape = head_shape(module)
    with onloaded(module):  # weights offloaded by accelerate (by the projection's hook or the module's): loaded
        weight = output_projection(module).weight.detach().to(torch.float64).cpu()
    blocks = weight.view(weight.shape[0], shape.q_heads, shape.head_dim)  # (hidden, H, d)
    grams = torch.einsum("ohd,ohe->hde", blocks, blocks)
    return grams.view(shape.kv_heads, shape.q_heads // shape.kv_heads, shape.head_dim, shape.head_dim).sum(1)


def rope_rotations(
    rope: LayerRope, length: int, head_dim: int, window: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE rotations of row vectors for offsets ``0..length-1`` ``(length, d, d)`` float64, and each
    offset's number of (query, key) pairs in a causal window of ``length`` tokens ``(length,)`` (a sliding
    ``window``: none at offsets it never sees)."""
    device = execution_device(rope.module) or torch.device("cpu")  # the model may be spread over devices
    positions = torch.arange(length, device=device).unsqueeze(0)
    probe = torch.zeros(1, device=device, dtype=torch.float32)
    cos, sin = (t[0].to(torch.float64).cpu() for t in rope(probe, positions))
    rd = cos.shape[-1]  # rotated features (partial rotary: the first rd; the others pass unrotated)
    eye = torch.eye(rd, dtype=torch.float64)
    rows = torch.cat((-eye[:, rd // 2 :], eye[:, : rd // 2]), dim=-1)  # rotate_half of each basis row
    rotations = torch.eye(head_dim, dtype=torch.float64).repeat(length, 1, 1)
    rotations[:, :rd, :rd] = eye * cos[:, None, :] + rows * sin[:, None, :]
    counts = torch.arange(length, 0, -1, dtype=torch.float64)
    if window is not None:
        counts[window:] = 0  # a query sees the keys less than ``window`` positions back
    return rotations, counts


def build_eigen_attention(
    model: nn.Module, module: nn.Module, bases: KeptBases, mode: str, *, offload: bool = False
) -> EigenAttention:
    """The rank-space twin of ``module`` with the kept ``bases`` (see attention.py).

    On a model spread over devices by accelerate, the twin is built on ``module``'s execution device (weights
    offloaded by accelerate are loaded to be folded) and placed as ``module`` was (``eigenkv.devices.place_like``);
    ``offload``: offload its folded weights as ``module``'s were (the twin replaces ``module`` for good);
    otherwise they stay on the execution device (a twin measured and dropped).
    """
    family = FAMILIES[type(module).__name__]
    with onloaded(module):
        if family == "llama":
            # post-RoPE attention rotates with the angles the model passes each layer (Gemma-3: two kinds)
            rope = layer_rope(model, module.layer_idx) if mode == "pre" else None
            twin = EigenLlamaAttention(module, bases, mode, rope)
        elif family == "opt":
            twin = EigenOPTAttention(module, bases)
        else:
            twin = EigenMptAttention(module, bases)
    return place_like(module, twin, offload=offload)


def replace(site: AttentionSite, new: nn.Module) -> None:
    setattr(site.parent, site.attr, new)
