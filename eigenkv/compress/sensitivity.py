"""How much a layer's attention output, and the model's loss, change when its bases are truncated.

The allotment (``allot.py``) spends ranks where this measurement says they
cost least: the paper's relative output error, or an empirical-Fisher
estimate of the next-token loss increase.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from eigenkv.compress.allot import truncate
from eigenkv.compress.calibrate import Calibration
from eigenkv.compress.families import build_eigen_attention


class OutputChange:
    """How much one layer's attention output changes on the kept calibration windows at reduced ranks.

    The reference outputs are computed once per layer; each measurement folds
    the truncated bases into a twin of the layer and runs it on the same inputs.
    """

    def __init__(self, model: nn.Module, sites: list, calib: Calibration, bases: list, mode: str):
        self.model, self.sites, self.calib, self.bases, self.mode = model, sites, calib, bases, mode
        self._references: dict[int, list[torch.Tensor]] = {}

    @torch.no_grad()
    def _pairs(self, layer: int, r_k: int, r_v: int):
        site, inputs = self.sites[layer], self.calib.layers[layer].inputs
        if layer not in self._references:
            self._references[layer] = [site.module(*a, **kw)[0] for a, kw in inputs]
        twin = build_eigen_attention(self.model, site.module, truncate(self.bases[layer], r_k, r_v), self.mode)
        for (a, kw), y in zip(inputs, self._references[layer], strict=True):
            yield y, twin(*a, **kw)[0]

    def relative_error(self, layer: int, r_k: int, r_v: int) -> float:
        """``||Y^ - Y||_F / ||Y||_F`` (the paper's criterion)."""
        num = den = 0.0
        for y, y_hat in self._pairs(layer, r_k, r_v):
            num += float((y_hat - y).double().pow(2).sum())
            den += float(y.double().pow(2).sum())
        return math.sqrt(num / max(den, 1e-300))

    def predicted_loss(self, layer: int, r_k: int, r_v: int) -> float:
        """Empirical-Fisher estimate of the mean next-token loss increase: ``1/2 sum_t (g_t . dy_t)^2 / tokens``."""
        total = tokens = 0.0
        gradients = self.calib.layers[layer].gradients
        for (y, y_hat), g in zip(self._pairs(layer, r_k, r_v), gradients, strict=True):
            projected = ((y_hat - y).double() * g.to(y.device, torch.float64)).sum(-1)  # (1, T)
            total += 0.5 * float(projected.pow(2).sum())
            tokens += projected.numel()
        return total / max(tokens, 1.0)
