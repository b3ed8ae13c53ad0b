"""Statistical top-k (Spark Transformer, You et al. 2025; Gemma 3n's activation sparsity).

Per token, the gate pre-activation z ∈ R^{d_ff} is treated as Gaussian across neurons:
keeping the top (1−s) fraction is approximated without a sort by the threshold

    t = mean(z) + std(z) · Φ⁻¹(s)

and neuron i is kept iff z_i > t. No calibration; cost O(d_ff) per token instead of a
top-k. Achieved sparsity equals s only as far as z is Gaussian; the sparsity evaluator
reports what it really is.

Deviation: Spark/Gemma 3n *train* with the soft form act(relu(z − t)), which shifts the
kept values; applied to a pretrained model without training that changes every kept
activation, so this training-free version uses the threshold as a hard mask on
act(z) (``mode: hard``). ``mode: soft`` reproduces the Gemma 3n formula (values shifted)
for comparison.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from . import SPARSIFIERS
from .base import Sparsifier


def gaussian_threshold(z: torch.Tensor, sparsity: float) -> torch.Tensor:
    """mean + std·Φ⁻¹(s) over the last dimension (std with Bessel's correction off)."""
    zf = z.float()
    q = torch.special.ndtri(torch.tensor(sparsity, dtype=torch.float32))
    return zf.mean(-1, keepdim=True) + zf.std(-1, keepdim=True, correction=0) * q


@SPARSIFIERS.register("stat_topk")
class StatTopK(Sparsifier):
    MODES = ("hard", "soft")

    def validate(self):
        super().validate()
        if self.cfg.get("mode", "hard") not in self.MODES:
            raise ConfigError(f"sparsifier.mode={self.cfg.mode} is unknown; use one of: {', '.join(self.MODES)}")

    def mask(self, inp):
        if self.sparsity == 0.0:
            return None
        z = inp.pre
        t = gaussian_threshold(z, self.sparsity)
        if self.cfg.get("mode", "hard") == "soft":
            # Gemma 3n: act(relu(z - t)); install the shifted activation so backends see it.
            inp._act = inp.site.act(torch.relu(z.float() - t).to(z.dtype))
            inp._h = None
        return z.float() > t
