"""CHESS (He et al., EMNLP 2024, "CHESS: Optimizing LLM Inference via Channel-Wise
Thresholding and Selective Sparsification"), the FFN part.

Zeroing a_i = act(gate(x))_i changes the MLP output by a_i · u_i · W_down[:, i]
(u = up(x)). CHESS scores each neuron by an importance that pairs the token's |a_i|
with a per-channel statistic of u_i over calibration tokens; one threshold T per layer
is the s-quantile of the importance over calibration tokens × channels, stored as a
channel-wise threshold τ_i on |a_i| (importance_i > T ⇔ |a_i| > τ_i); at run time
neuron i is kept iff |a_i| > τ_i.

``up_stat`` picks the importance:

- ``mean_square`` (default; **the reference**, the paper's code, junhuihe-hjh/CHESS at
  49802b1, llama_3_8b/statistics.ipynb): importance a_i²·E[u_i²], so
  τ_i = √(T / E[u_i²]): the squared change of h_i = a_i·u_i when neuron i is dropped,
  with u_i² replaced by its calibration mean.
- ``mean_abs``: |a_i|·E|u_i|, τ_i = T / E|u_i| (the same repository's 2025 refactor,
  CHESS/notebooks/thresholds.py, and this project's earlier default).
- ``rms``: |a_i|·√E[u_i²], τ_i = T / √E[u_i²]: the square root of ``mean_square``'s
  importance, so the same ranking and the same kept set up to float rounding (kept
  for configs that name it).
- ``second_moment``: |a_i|·E[u_i²] (ours, an ablation; neither of the above).

Deviations: the reference averages per-batch quantiles and calibrates every layer on
the dense model; we take one quantile over all calibration tokens, computed layer by
layer with the layers below already sparse (as for CATS). CHESS+'s attention
thresholds (q and o inputs) are not included here; TEAL/WINA cover attention inputs.
"""
from __future__ import annotations

import torch

from ..core.device import model_device
from ..core.errors import ConfigError
from . import SPARSIFIERS
from .base import Sparsifier, calibrate_layerwise
from .cats import quantile_threshold


def up_statistic(up: torch.Tensor, kind: str) -> torch.Tensor:
    """The per-channel statistic of u = up(x) that multiplies |a|^p in the importance."""
    u = up.float().reshape(-1, up.shape[-1])
    if kind == "mean_abs":
        return u.abs().mean(0)
    if kind == "rms":
        return u.pow(2).mean(0).sqrt()
    return u.pow(2).mean(0)  # mean_square, second_moment


def act_power(kind: str) -> int:
    """p in importance = |a|^p · stat (2 for the reference's a²·E[u²], else 1)."""
    return 2 if kind == "mean_square" else 1


@SPARSIFIERS.register("chess")
class CHESS(Sparsifier):
    needs_calibration = True
    calibration_params = ("sparsity", "up_stat")
    calibration_version = 2  # 2: default up_stat is the reference's mean_square
    UP_STATS = ("mean_square", "mean_abs", "rms", "second_moment")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tau: torch.Tensor | None = None  # [layers, d_ff]

    def validate(self):
        super().validate()
        if self.cfg.get("up_stat", "mean_square") not in self.UP_STATS:
            raise ConfigError(f"sparsifier.up_stat={self.cfg.up_stat} is unknown; use one of: {', '.join(self.UP_STATS)}")

    def calibrate(self, controller, model, batches):
        site0 = controller.sites[0]
        if site0.kind != "gated":
            raise ConfigError("chess needs a gated MLP (act(gate(x)) * up(x)); for OPT-style MLPs use cats")
        self.tau = torch.zeros(len(controller.sites), site0.intermediate_size, device=model_device(model))
        kind = self.cfg.get("up_stat", "mean_square")
        p = act_power(kind)

        def rows(inp):
            up = inp.site.up(inp.x)
            return inp.act.detach().abs().float().reshape(-1, up.shape[-1]), up.detach()

        def fit(i, values):
            a = torch.cat([v[0] for v in values])
            stat = up_statistic(torch.cat([v[1].reshape(-1, v[1].shape[-1]) for v in values]), kind).clamp_min(1e-12)
            t = quantile_threshold(a.pow(p) * stat, self.sparsity) if self.sparsity > 0 else stat.new_tensor(-1.0)
            self.tau[i] = (float(t) / stat).pow(1.0 / p) if float(t) >= 0 else torch.full_like(stat, -1.0)

        calibrate_layerwise(controller, model, batches, rows, fit)
        return {"tau": self.tau.clone()}

    def load_state(self, state):
        self.tau = state["tau"]

    def mask(self, inp):
        if self.sparsity == 0.0:
            return None
        a = inp.act
        return a.abs() > self.tau[inp.layer_idx].to(a.dtype)
