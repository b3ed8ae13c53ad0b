"""CATS (Lee et al., 2024, "CATS: Contextually-Aware Thresholding for Sparsity").

Per layer, a threshold t on |act(gate(x))| is the s-quantile of that quantity over
calibration tokens; at run time neuron i is kept iff |act(gate(x))_i| > t. The
threshold is an exact order statistic (``torch.kthvalue``), so the sparsity on the
calibration tokens is exactly s (up to ties). For OPT-style MLPs the activation is
act(fc1(x)).

Deviation from the paper (``calibrate_on``): the paper takes every layer's quantile
from the dense model. By default we calibrate *sequentially* (``sparse_upstream``):
layer l's threshold is computed with layers < l already sparsified, i.e. on the
activations layer l really receives at inference. With dense calibration the error
compounds with depth (held-out sparsity overshoots the request in the deep layers;
measure it with the sparsity evaluator); ``calibrate_on=dense`` restores the paper's
procedure.
"""
from __future__ import annotations

import torch

from ..core.device import model_device
from ..core.errors import ConfigError
from . import SPARSIFIERS
from .base import Sparsifier, ThresholdRule, calibrate_layerwise, collect_per_layer


def quantile_threshold(values: torch.Tensor, q: float) -> torch.Tensor:
    """The k-th smallest value with k = round(q·n): keeping ``values > t`` drops exactly k.
    On ``values``' device; half-precision values are ranked in float32 (a bf16/fp16
    ``kthvalue`` is unsupported or slow on some backends), wider dtypes as they are."""
    flat = values.reshape(-1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    k = int(round(q * flat.numel()))
    if k == 0:
        return torch.tensor(float("-inf"), device=flat.device)
    return flat.kthvalue(k).values


@SPARSIFIERS.register("cats")
class CATS(Sparsifier):
    needs_calibration = True
    calibration_params = ("sparsity", "calibrate_on")
    CALIBRATE_ON = ("sparse_upstream", "dense")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.thresholds: torch.Tensor | None = None
        self._rules: tuple = (None, [])  # (thresholds tensor, one ThresholdRule per layer)

    def validate(self):
        super().validate()
        if self.cfg.get("calibrate_on", "sparse_upstream") not in self.CALIBRATE_ON:
            raise ConfigError(f"sparsifier.calibrate_on={self.cfg.calibrate_on} is unknown; use one of: {', '.join(self.CALIBRATE_ON)}")

    def calibrate(self, controller, model, batches):
        abs_act = lambda inp: inp.act.detach().abs().float().reshape(-1)
        if self.cfg.get("calibrate_on", "sparse_upstream") == "dense":
            acts = collect_per_layer(controller, model, batches, abs_act)
            return {"thresholds": torch.stack([quantile_threshold(torch.cat(acts[i]), self.sparsity) for i in sorted(acts)])}
        self.thresholds = torch.full((len(controller.sites),), float("-inf"), device=model_device(model))

        def fit(i, values):
            self.thresholds[i] = quantile_threshold(torch.cat(values), self.sparsity)

        calibrate_layerwise(controller, model, batches, abs_act, fit)
        return {"thresholds": self.thresholds.clone()}

    def load_state(self, state):
        self.thresholds = state["thresholds"]

    def mask(self, inp):
        if self.sparsity == 0.0:
            return None
        t = self.thresholds[inp.layer_idx]
        return inp.act.abs() > t.to(inp.act.dtype)

    def mask_rule(self, inp):
        if self.sparsity == 0.0:
            return None
        # rules built once per thresholds tensor, not per call (reading a device tensor would sync)
        if self._rules[0] is not self.thresholds:
            rules = [ThresholdRule("act", t) for t in self.thresholds.float().tolist()]
            self._rules = (self.thresholds, rules)
        return self._rules[1][inp.layer_idx]

    def describe(self):
        return {"threshold": self.thresholds.tolist()} if self.thresholds is not None else {}
