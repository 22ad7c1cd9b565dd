"""Which model a plan belongs to: attention shapes and exact digests of every attention weight.

A plan folds bases fitted to one model's weights; applied to any other model
(another checkpoint, a fine-tuned copy, one edited weight) it silently gives
wrong attention. The signature therefore holds a SHA-256 of every attention
weight and bias of every layer, and refuses any difference.

The same checkpoint loaded in another dtype must still match (a plan
calibrated in float32 serves the float16/bfloat16 model that runs on a GPU).
Loading a float32 checkpoint in a lower precision rounds each weight to the
nearest value of that dtype, so the digests are taken of the weights as they
are *and* of their float16 and bfloat16 roundings: a model loaded in either
dtype reproduces the digest of its dtype exactly, and any change to a weight
that survives that rounding is caught.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from eigenkv.compress.families import attention_sites, family_of, head_shape
from eigenkv.devices import onloaded

DIGEST_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Integer views of each width: the raw bits are hashed (bfloat16 has no numpy dtype).
_RAW = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def _attention_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter of every attention module (q/k/v/o weights and biases), named, in layer order."""
    named = []
    for site in attention_sites(model):
        for name, parameter in sorted(site.module.named_parameters()):
            named.append((f"layers.{site.layer}.{name}", parameter))
    return named


def weight_digests(model: nn.Module, dtypes: tuple[str, ...] = tuple(DIGEST_DTYPES)) -> dict[str, str]:
    """SHA-256 of every attention parameter (names, shapes and values), rounded to each of ``dtypes``.

    Rounding to a dtype wider than the model's (float32 of a float16 model)
    would only repeat the model's own values, so only the model's dtype and
    narrower ones are digested. Weights offloaded by accelerate are loaded one layer at a time to be read.
    """
    own = _attention_parameters(model)[0][1].dtype
    digests = {
        name: hashlib.sha256()
        for name, dtype in ((n, DIGEST_DTYPES[n]) for n in dtypes)
        # a wider dtype, or another of the same width, is not reachable by rounding this model
        if dtype.itemsize < own.itemsize or dtype == own
    }
    for site in attention_sites(model):  # layer by layer: the same bytes in the same order per digest
        with onloaded(site.module):
            for name, parameter in sorted(site.module.named_parameters()):
                for dtype, digest in digests.items():
                    value = parameter.detach().to("cpu", DIGEST_DTYPES[dtype]).contiguous()
                    digest.update(f"layers.{site.layer}.{name}:{tuple(value.shape)};".encode())
                    digest.update(value.view(_RAW[value.element_size()]).numpy().tobytes())
    return {name: digest.hexdigest() for name, digest in digests.items()}


def model_signature(model: nn.Module) -> dict:
    """What a plan must match: family, attention shapes per layer and the weight digests (see the module doc)."""
    family = family_of(model)
    shapes = [head_shape(s.module) for s in attention_sites(model)]
    config = model.config
    return {
        "family": family,
        "model_type": getattr(config, "model_type", None),
        "layers": len(shapes),
        "q_heads": [s.q_heads for s in shapes],
        "kv_heads": [s.kv_heads for s in shapes],
        "head_dim": [s.head_dim for s in shapes],
        "weights_sha256": weight_digests(model),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
    }


def dtype_name(model: nn.Module) -> str:
    """The dtype of ``model``'s attention weights as a name of :data:`DIGEST_DTYPES`."""
    dtype = _attention_parameters(model)[0][1].dtype
    for name, known in DIGEST_DTYPES.items():
        if dtype == known:
            return name
    raise ValueError(f"attention weights in {dtype}; load the model in one of {sorted(DIGEST_DTYPES)}")


def check_signature(expected: dict, model: nn.Module, what: str = "this plan") -> None:
    """Raise ``ValueError`` naming the first difference when ``model`` is not the model of ``expected``."""
    family = family_of(model)
    shapes = [head_shape(s.module) for s in attention_sites(model)]
    actual = {
        "family": family,
        "layers": len(shapes),
        "q_heads": [s.q_heads for s in shapes],
        "kv_heads": [s.kv_heads for s in shapes],
        "head_dim": [s.head_dim for s in shapes],
    }
    names = f"({expected.get('name_or_path')} vs {getattr(model.config, '_name_or_path', None)})"
    for key, value in actual.items():
        if expected[key] != value:
            raise ValueError(
                f"{what} was made for another model: {key} is {expected[key]} there but {value} in this model "
                f"{names}; compress this model with its own calibration"
            )
    dtype = dtype_name(model)
    recorded = expected["weights_sha256"]
    if not isinstance(recorded, dict) or dtype not in recorded:
        kept = sorted(recorded) if isinstance(recorded, dict) else "a digest of an older format"
        raise ValueError(
            f"{what} holds weight digests for {kept}, not for this {dtype} model; load the model in the dtype "
            "it was calibrated in (or narrower), or recompute the plan"
        )
    if weight_digests(model, (dtype,))[dtype] != recorded[dtype]:
        raise ValueError(
            f"{what} was made for other attention weights: this model's {dtype} attention weights differ from "
            f"those it was calibrated on {names} (another checkpoint, a fine-tune, or an edited weight); "
            "compress this model with its own calibration"
        )
