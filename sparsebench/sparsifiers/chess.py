"""CHESS (He et al. 2024, "CHESS: Optimizing LLM Inference via Channel-Wise Thresholding
and Selective Sparsification"), the FFN part.

Zeroing a_i = act(gate(x))_i changes the MLP output by a_i · up_i · W_down[:, i]; CHESS
ranks neurons by importance_i = |a_i| · E[|up_i|], with E[|up_i|] the channel's mean
magnitude over calibration tokens. Per layer a single T is the s-quantile of the
importance over calibration tokens × channels, stored as a channel-wise threshold on
|a_i|: τ_i = T / E[|up_i|]; at run time neuron i is kept iff |a_i| > τ_i.

``up_stat`` picks the channel statistic: ``mean_abs`` (E|up_i|, the reference code),
``rms`` (√E[up_i²]) or ``second_moment`` (E[up_i²]). The reference code averages
per-sample quantiles; we take one quantile over all calibration tokens, computed layer
by layer with the layers below already sparse (as for CATS). CHESS+'s attention
thresholds (q and o inputs) are not included here; TEAL/WINA cover attention inputs.
"""
from __future__ import annotations

import torch

from . import SPARSIFIERS
from ..errors import ConfigError
from .base import Sparsifier, calibrate_layerwise
from .cats import quantile_threshold


def up_statistic(up: torch.Tensor, kind: str) -> torch.Tensor:
    u = up.float().reshape(-1, up.shape[-1])
    if kind == "mean_abs":
        return u.abs().mean(0)
    if kind == "rms":
        return u.pow(2).mean(0).sqrt()
    return u.pow(2).mean(0)


@SPARSIFIERS.register("chess")
class CHESS(Sparsifier):
    needs_calibration = True
    calibration_params = ("sparsity", "up_stat")
    UP_STATS = ("mean_abs", "rms", "second_moment")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tau: torch.Tensor | None = None  # [layers, d_ff]

    def validate(self):
        super().validate()
        if self.cfg.get("up_stat", "mean_abs") not in self.UP_STATS:
            raise ConfigError(f"sparsifier.up_stat={self.cfg.up_stat} is unknown; use one of: {', '.join(self.UP_STATS)}")

    def calibrate(self, controller, model, batches):
        site0 = controller.sites[0]
        if site0.kind != "gated":
            raise ConfigError("chess needs a gated MLP (act(gate(x)) * up(x)); for OPT-style MLPs use cats")
        self.tau = torch.zeros(len(controller.sites), site0.intermediate_size)
        kind = self.cfg.get("up_stat", "mean_abs")

        def rows(inp):
            up = inp.site.up(inp.x)
            return inp.act.detach().abs().float().reshape(-1, up.shape[-1]), up.detach()

        def fit(i, values):
            a = torch.cat([v[0] for v in values])
            stat = up_statistic(torch.cat([v[1].reshape(-1, v[1].shape[-1]) for v in values]), kind).clamp_min(1e-12)
            t = quantile_threshold(a * stat, self.sparsity) if self.sparsity > 0 else torch.tensor(-1.0)
            self.tau[i] = float(t) / stat if float(t) >= 0 else torch.full_like(stat, -1.0)

        calibrate_layerwise(controller, model, batches, rows, fit)
        return {"tau": self.tau.clone()}

    def load_state(self, state):
        self.tau = state["tau"]

    def mask(self, inp):
        if self.sparsity == 0.0:
            return None
        a = inp.act
        return a.abs() > self.tau[inp.layer_idx].to(a.dtype)
