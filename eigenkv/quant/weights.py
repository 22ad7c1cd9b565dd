"""Weight quantization with bitsandbytes, composed with a compressed, quantized KV cache.

``quantize_weights(model, "int8" | "nf4")`` replaces the model's ``nn.Linear``
layers (including those Eigen Attention folded its bases into) by
bitsandbytes' ``Linear8bitLt`` (LLM.int8() weights, one fp32 scale per row) or
``Linear4bit`` (NF4, blocks of 64 with double-quantized absmax), in place.
Embeddings and the output head stay as they are (the head is usually tied to
the embeddings; transformers' bitsandbytes integration skips it too).
``weight_bytes(model)`` counts what the model stores: every distinct tensor of
its ``state_dict``, quantization states included.

bitsandbytes >= 0.48 runs both formats on CPU as well as CUDA; install it with
``pip install 'eigenkv[bnb]'``.
"""

from __future__ import annotations

import torch
from torch import nn

from eigenkv.devices import refuse_offloaded

WEIGHT_FORMATS = ("int8", "nf4")


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "weight quantization needs bitsandbytes: pip install 'eigenkv[bnb]' (or bitsandbytes>=0.48)"
        ) from err
    return bitsandbytes


def _quantized_linear(linear: nn.Linear, fmt: str, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bitsandbytes()
    weight = linear.weight.data.detach().clone()
    if fmt == "int8":
        # threshold 0: every feature in int8 (no fp16 outlier decomposition), the honest 1-byte weight
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False, threshold=0.0
        )
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
        )
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
    return new.to(linear.weight.device)  # bitsandbytes quantizes when the weight is moved to its device


@torch.no_grad()
def quantize_weights(model: nn.Module, fmt: str, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (but those named in ``skip``) by its bitsandbytes twin, in place.

    Args:
        model: a float model (float32, float16 or bfloat16 weights), compressed or not.
        fmt: ``"int8"`` (LLM.int8() weights) or ``"nf4"`` (4-bit NormalFloat, double-quantized scales).
        skip: module names (last component) left in their dtype.

    Returns:
        ``model``, whose linear layers now compute in the dtype of their original weights.
    """
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {fmt!r} is not supported; use one of {WEIGHT_FORMATS}")
    _bitsandbytes()
    refuse_offloaded(model, "bitsandbytes weight quantization", "place every layer on a device to quantize them")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in skip
    ]
    if not targets:
        raise ValueError("this model has no nn.Linear layers left to quantize (already quantized?)")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized_linear(linear, fmt, linear.weight.dtype))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor the model's ``state_dict`` holds (tied weights once; quant states included)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in model.state_dict(keep_vars=False).values():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total
