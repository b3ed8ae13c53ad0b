"""Relufied models: the activation's own zeros are the mask.

For ReLU / FATReLU / dReLU checkpoints (see models.activations) neuron i is inactive
for a token exactly when h_i = 0, so the mask costs nothing to compute and drops
nothing the model would have used. Two options:

- ``sparsity`` (default null = natural zeros only): a target above the natural
  sparsity is met with a FATReLU threshold t ≥ 0 on the gate pre-activation z (keep
  z > t, calibrated per layer as the quantile of z over the neurons that are not
  naturally zero), i.e. ProSparse's FATReLU fitted without training.
- ``swap: true`` replaces SiLU/GeLU by ReLU on the sparse path, without training, to
  measure what relufication by fine-tuning would have to recover (the dense
  baseline keeps the model's own activation, and so do the positions the prefill
  policy keeps dense: the swap goes through ``MLPInput.replace_act``, which the
  controller undoes there).

Refuses to run on a model whose activation is not ReLU-like unless ``swap`` is set:
there would be no zeros to use.
"""
from __future__ import annotations

import torch

from ..core.device import model_device
from ..core.errors import ConfigError
from . import SPARSIFIERS
from .base import Sparsifier, calibrate_layerwise
from .cats import quantile_threshold


def is_relu_like(act) -> bool:
    """True if the activation maps negative inputs to exactly zero."""
    # a CPU probe of a parameter-free elementwise function, checked once at attach
    probe = torch.tensor([-3.0, -1.0, -0.1], device="cpu")
    return bool((act(probe) == 0).all())


@SPARSIFIERS.register("relu")
class ReLUMask(Sparsifier):
    calibration_params = ("sparsity", "swap")

    @property
    def needs_calibration(self) -> bool:
        return self.cfg.get("sparsity") is not None

    def validate(self):
        if self.cfg.get("sparsity") is not None:
            super().validate()

    @property
    def sparsity(self) -> float:
        s = self.cfg.get("sparsity")
        return 0.0 if s is None else float(s)

    @property
    def requested_sparsity(self):
        return self.cfg.get("sparsity")

    def attach(self, controller, model):
        self.thresholds = None
        if not self.cfg.get("swap", False) and not all(is_relu_like(s.act) for s in controller.sites):
            act = type(controller.sites[0].act).__name__
            raise ConfigError(f"sparsifier=relu needs a ReLU-family model (this one uses {act}); "
                              "pass sparsifier.swap=true to replace it by ReLU without training")

    def _swap(self, inp) -> None:
        # replace_act: positions the prefill policy keeps dense get the model's own
        # activation back (patching.SparsityController._unalter), so they see the
        # unaltered model; only sparsified positions run with ReLU.
        if self.cfg.get("swap", False) and not inp.act_is_altered:
            inp.replace_act(torch.relu(inp.pre))

    def calibrate(self, controller, model, batches):
        self.thresholds = torch.zeros(len(controller.sites), device=model_device(model))
        self._cut_of, self._cut = self.thresholds, [False] * len(controller.sites)

        def scores(inp):
            self._swap(inp)
            z = inp.pre.detach().float().reshape(-1)
            return torch.where(inp.h.detach().reshape(-1) != 0, z, z.new_full((), float("-inf")))

        def fit(i, values):
            t = quantile_threshold(torch.cat(values), self.sparsity)
            self.thresholds[i] = max(0.0, float(t)) if torch.isfinite(t) else 0.0
            self._cut[i] = float(self.thresholds[i]) > 0

        calibrate_layerwise(controller, model, batches, scores, fit)
        return {"thresholds": self.thresholds.clone()}

    def load_state(self, state):
        self.thresholds = state.get("thresholds")

    def _cuts(self) -> list[bool]:
        """Per layer, whether a FATReLU threshold (> 0) applies: read from ``thresholds``
        once per tensor, not per MLP call (a per-call read would sync the device)."""
        if getattr(self, "_cut_of", None) is not self.thresholds:
            self._cut_of, self._cut = self.thresholds, [t > 0 for t in self.thresholds.tolist()]
        return self._cut

    def mask(self, inp):
        self._swap(inp)
        keep = inp.h != 0
        i = inp.layer_idx
        if self.thresholds is not None and self._cuts()[i]:
            keep = keep & (inp.pre > self.thresholds[i].to(inp.pre.dtype))
        return keep

    def describe(self):
        return {"fatrelu_threshold": self.thresholds.tolist()} if self.thresholds is not None else {}
