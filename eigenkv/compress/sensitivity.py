"""How much a layer's attention output, and the model's loss, change when its bases are truncated or its
cache is quantized.

The allotments (``allot.py`` for ranks, ``budget.py`` for ranks and bits together) spend bytes where this
measurement says they cost least: the paper's relative output error, or an empirical-Fisher estimate of the
next-token loss increase.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from eigenkv.compress.allot import truncate
from eigenkv.compress.calibrate import Calibration
from eigenkv.compress.families import build_eigen_attention
from eigenkv.quant.cache import QuantizedKV, QuantizedKVCache
from eigenkv.quant.config import KVQuantConfig, LayerwiseKVQuantConfig


class OutputChange:
    """How much one layer's attention output changes on the kept calibration windows at reduced ranks,
    quantized keys or values, or both.

    The reference outputs (the original module, nothing quantized) are computed once per layer; each
    measurement folds the truncated bases into a twin of the layer (or keeps the original module, at full
    rank without Eigen Attention) and runs it on the same inputs, through a fresh quantized cache that holds
    the layer's keys and values as a real cache would (causally: query ``p`` reads what the cache holds after
    ``p + 1`` tokens) when a quantizer is given.
    """

    def __init__(self, model: nn.Module, sites: list, calib: Calibration, bases: list, mode: str):
        self.model, self.sites, self.calib, self.bases, self.mode = model, sites, calib, bases, mode
        self._references: dict[int, list[torch.Tensor]] = {}
        self._twin: tuple[tuple[int, int, int], nn.Module] | None = None

    def _module(self, layer: int, r_k: int | None, r_v: int | None) -> nn.Module:
        """The twin of ``layer`` at ranks ``(r_k, r_v)``; the original module when both are None."""
        if r_k is None and r_v is None:
            return self.sites[layer].module
        key = (layer, r_k, r_v)
        if self._twin is None or self._twin[0] != key:  # consecutive measurements share ranks: fold once
            site = self.sites[layer]
            self._twin = (
                key,
                build_eigen_attention(self.model, site.module, truncate(self.bases[layer], r_k, r_v), self.mode),
            )
        return self._twin[1]

    @torch.no_grad()
    def _pairs(self, layer: int, r_k: int | None, r_v: int | None, keys=None, values=None):
        site, inputs = self.sites[layer], self.calib.layers[layer].inputs
        if layer not in self._references:
            self._references[layer] = [site.module(*a, **kw)[0] for a, kw in inputs]
        module = self._module(layer, r_k, r_v)
        if keys is None and values is None:
            for (a, kw), y in zip(inputs, self._references[layer], strict=True):
                yield y, module(*a, **kw)[0]
            return
        config = _one_layer(len(self.sites), layer, keys, values)
        with QuantizedKV(self.model, config):
            for (a, kw), y in zip(inputs, self._references[layer], strict=True):
                cache = QuantizedKVCache(config, self.model.config)
                yield y, module(*a, **_causal(kw, y), past_key_values=cache)[0]

    def relative_error(self, layer: int, r_k: int, r_v: int) -> float:
        """``||Y^ - Y||_F / ||Y||_F`` (the paper's criterion)."""
        num = den = 0.0
        for y, y_hat in self._pairs(layer, r_k, r_v):
            num += float((y_hat - y).double().pow(2).sum())
            den += float(y.double().pow(2).sum())
        return math.sqrt(num / max(den, 1e-300))

    def predicted_loss(
        self,
        layer: int,
        r_k: int | None,
        r_v: int | None,
        keys: KVQuantConfig | None = None,
        values: KVQuantConfig | None = None,
    ) -> float:
        """Empirical-Fisher estimate of the mean next-token loss increase: ``1/2 sum_t (g_t . dy_t)^2 / tokens``.

        Args:
            r_k, r_v: ranks of the twin; both None: the original module (the model without Eigen Attention).
            keys, values: quantizers of the layer's cached keys and values (None: unquantized).
        """
        total = tokens = 0.0
        gradients = self.calib.layers[layer].gradients
        if not gradients:
            raise ValueError("predicted losses need loss gradients: calibrate(model, windows, gradients=True)")
        for (y, y_hat), g in zip(self._pairs(layer, r_k, r_v, keys, values), gradients, strict=True):
            projected = ((y_hat - y).double() * g.to(y.device, torch.float64)).sum(-1)  # (1, T)
            total += 0.5 * float(projected.pow(2).sum())
            tokens += projected.numel()
        return total / max(tokens, 1.0)


def _causal(kwargs: dict, like: torch.Tensor) -> dict:
    """``kwargs`` with an explicit additive causal mask ``(1, 1, T, T)`` where the kept one is None (SDPA's
    implicit causal mask): the quantized cache's attention reads a missing mask as "nothing masked", as it is
    never missing in a model's forward through it (transformers materialises the mask it registers)."""
    if kwargs.get("attention_mask") is not None:
        return kwargs
    length = like.shape[-2]
    future = torch.ones(length, length, dtype=torch.bool, device=like.device).triu(1)
    mask = torch.zeros(length, length, dtype=like.dtype, device=like.device).masked_fill(
        future, torch.finfo(like.dtype).min
    )
    return {**kwargs, "attention_mask": mask[None, None]}


def _one_layer(layers: int, layer: int, keys: KVQuantConfig | None, values: KVQuantConfig | None):
    """A cache config quantizing only ``layer``'s keys and values (the other layers are not run)."""
    key_configs, value_configs = [None] * layers, [None] * layers
    key_configs[layer], value_configs[layer] = keys, values
    return LayerwiseKVQuantConfig(keys=tuple(key_configs), values=tuple(value_configs))
