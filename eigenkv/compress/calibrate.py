"""Calibration: Gram matrices of queries, keys and values, streamed over windows.

A forward pre-hook on every attention module recomputes that module's q/k/v
from its input (the projections are a small part of a forward) and adds
``X^T X`` to float64 Gram matrices, so memory does not grow with the number of
calibration tokens (the reference code keeps every activation and calls
``torch.svd``). The inputs of the first ``error_windows`` windows are kept to
measure each layer's attention-output error later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from eigenkv.compress.families import attention_sites, head_shape, project_qkv
from eigenkv.compress.signature import model_signature
from eigenkv.data import TokenWindows
from eigenkv.devices import input_device, onloaded


@dataclass
class LayerStats:
    """Uncentered second moments of one attention layer, summed over calibration tokens.

    Attributes:
        queries: ``(H_kv, d, d)`` float64: sum over the query heads of each KV group.
        keys, values: ``(H_kv, d, d)`` float64, per KV head.
        tokens: calibration tokens seen (per head).
        inputs: ``(args, kwargs)`` of the attention module on the kept windows.
        gradients: per kept window, ``(1, T, hidden)`` float32 gradient of the
            window's summed next-token loss with respect to the module's output
            (collected with ``gradients=True``).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    tokens: int = 0
    inputs: list = field(default_factory=list)
    gradients: list = field(default_factory=list)


@dataclass
class Calibration:
    """Statistics of every layer, and a record of what produced them."""

    layers: list[LayerStats]
    rotated: bool
    source: dict
    seconds: float
    signature: dict
    has_gradients: bool = False
    # Results derived from these statistics alone (e.g. sensitivity curves per basis), shared by every
    # compression made from this calibration.
    derived: dict = field(default_factory=dict)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, d)`` -> ``(H, d, d)`` float64 ``sum_{b,t} x x^T``."""
    x = x.to(torch.float64)
    return torch.einsum("bhtd,bhte->hde", x, x)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    windows: TokenWindows,
    *,
    rotated: bool = False,
    error_windows: int = 1,
    gradients: bool = False,
    progress: bool = True,
) -> Calibration:
    """Run ``model`` on ``windows`` and collect each layer's q/k/v Gram matrices.

    Args:
        model: a supported Hugging Face causal LM (see ``families``), unmodified.
        windows: calibration token windows ``(N, T)``; record their source (Brown,
            or Wikitext-2 windows disjoint from the evaluated ones).
        rotated: collect post-RoPE queries and keys (the ``"post"`` mode).
        error_windows: windows whose attention inputs are kept for error measurements.
        gradients: also keep, on those windows, the gradient of the loss with
            respect to every attention output (one forward and backward pass
            each, with the LM head): the ``"fisher"`` allotment needs them.
        progress: show a progress bar.

    Raises:
        ValueError: no windows, or NaN/Inf in a layer's activations.
    """
    if not isinstance(windows, TokenWindows):
        raise TypeError(f"windows must be TokenWindows (eigenkv.eval.load_windows); got {type(windows).__name__}")
    if len(windows) == 0:
        raise ValueError("calibration needs at least one window; got none")
    sites = attention_sites(model)
    stats = []
    for site in sites:
        shape = head_shape(site.module)
        zeros = torch.zeros(shape.kv_heads, shape.head_dim, shape.head_dim, dtype=torch.float64)
        stats.append(LayerStats(zeros.clone(), zeros.clone(), zeros.clone()))
    keep = min(error_windows, len(windows))
    state = {"window": 0}

    def hook_for(layer: LayerStats):
        def hook(module, args, kwargs):
            # before the module's own accelerate hook: weights it alone loads (preload_module_classes) loaded here
            with onloaded(module, recurse=False):
                q, k, v = project_qkv(module, args, kwargs, rotated)
            batch, heads, length, d = q.shape
            grouped = q.reshape(batch, k.shape[1], heads // k.shape[1], length, d).flatten(2, 3)
            for target, x in ((layer.queries, grouped), (layer.keys, k), (layer.values, v)):
                target += _gram(x).cpu()
            layer.tokens += batch * length
            if state["window"] < keep:
                kept = {n: a for n, a in kwargs.items() if n not in ("past_key_values", "layer_past", "use_cache")}
                layer.inputs.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), kept))

        return hook

    handles = [
        s.module.register_forward_pre_hook(hook_for(st), with_kwargs=True) for s, st in zip(sites, stats, strict=True)
    ]
    device = input_device(model)  # a model spread over devices takes its ids where its embeddings compute
    start = time.perf_counter()
    try:
        body = model.base_model  # no LM head: its logits are large and unused here
        for i in tqdm(range(len(windows)), desc="calibrating", unit="window", disable=not progress):
            state["window"] = i
            body(input_ids=windows.input_ids[i : i + 1].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if gradients:
        for i in range(keep):
            _output_gradients(model, sites, stats, windows.input_ids[i : i + 1].to(device))
    for index, layer in enumerate(stats):
        for name in ("queries", "keys", "values"):
            if not torch.isfinite(getattr(layer, name)).all():
                raise ValueError(
                    f"calibration {name} of layer {index} contain NaN or Inf: the model overflows on this text "
                    "(load it in float32, or check its weights)"
                )
    source = {**windows.describe(), "tokens": len(windows) * windows.seq_len}
    return Calibration(
        layers=stats,
        rotated=rotated,
        source=source,
        seconds=time.perf_counter() - start,
        signature=model_signature(model),
        has_gradients=gradients,
    )


def _output_gradients(model: nn.Module, sites: list, stats: list[LayerStats], input_ids: torch.Tensor) -> None:
    """Append ``d(sum of next-token NLL) / d(attention output)`` of every layer for one window."""
    outputs: dict[int, torch.Tensor] = {}

    def keep_output(layer: int):
        def hook(module, args, output):
            outputs[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    def differentiable(module, args, output):  # grads flow even when the weights are frozen
        return output.detach().requires_grad_(True)

    handles = [s.module.register_forward_hook(keep_output(i)) for i, s in enumerate(sites)]
    handles.append(model.get_input_embeddings().register_forward_hook(differentiable))
    try:
        with torch.enable_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits
            targets = input_ids[0, 1:].to(logits.device)  # the LM head may compute on another device
            loss = nn.functional.cross_entropy(logits[0, :-1].float(), targets, reduction="sum")
            grads = torch.autograd.grad(loss, [outputs[i] for i in range(len(sites))])
    finally:
        for handle in handles:
            handle.remove()
    for layer, grad in zip(stats, grads, strict=True):
        if not torch.isfinite(grad).all():
            raise ValueError("loss gradients hold NaN or Inf: calibrate the model in float32")
        layer.gradients.append(grad.detach().float().cpu())
