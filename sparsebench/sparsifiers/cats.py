"""CATS (Lee et al., 2024, "CATS: Contextually-Aware Thresholding for Sparsity").

Per layer, a threshold t on |act(gate(x))| is the s-quantile of that quantity over
calibration tokens; at run time neuron i is kept iff |act(gate(x))_i| > t. The
threshold is an exact order statistic (``torch.kthvalue``), so the sparsity on the
calibration tokens is exactly s (up to ties). For OPT-style MLPs the activation is
act(fc1(x)).
"""
from __future__ import annotations

import torch

from . import SPARSIFIERS
from .base import Sparsifier, collect_per_layer


def quantile_threshold(values: torch.Tensor, q: float) -> torch.Tensor:
    """The k-th smallest value with k = round(q·n): keeping ``values > t`` drops exactly k."""
    flat = values.reshape(-1)
    k = int(round(q * flat.numel()))
    if k == 0:
        return torch.tensor(float("-inf"))
    return flat.kthvalue(k).values


@SPARSIFIERS.register("cats")
class CATS(Sparsifier):
    needs_calibration = True
    calibration_params = ("sparsity",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.thresholds: torch.Tensor | None = None

    def calibrate(self, controller, model, batches):
        acts = collect_per_layer(controller, model, batches, lambda inp: inp.act.detach().abs().float().reshape(-1))
        thresholds = torch.stack([quantile_threshold(torch.cat(acts[i]), self.sparsity) for i in sorted(acts)])
        return {"thresholds": thresholds}

    def load_state(self, state):
        self.thresholds = state["thresholds"]

    def mask(self, inp):
        if self.sparsity == 0.0:
            return None
        t = self.thresholds[inp.layer_idx]
        return inp.act.abs() > t.to(inp.act.dtype)

    def describe(self):
        return {"threshold": self.thresholds.tolist()} if self.thresholds is not None else {}
