"""COUNTDOWN (Cheon & Kang, EMNLP 2025, "COUNTDOWN: Contextually Sparse Activation
Filtering Out Unnecessary Weights in Down Projection"), predictor-free: M-COUNTDOWN.

The FFN output is a linear combination of the down projection's columns,
y = Σ_i s_i · W_down[:, i] with s = act(gate x) ⊙ up(x). A column whose coefficient is
small can be skipped. D-COUNTDOWN ranks neurons by the *direct* coefficient |s_i| (with a
trained predictor in practice); M-COUNTDOWN ranks them by an *indirect* one that the
model computes anyway, |up(x)_i|, and needs no predictor: up is evaluated densely, then
gate and down only for the kept neurons.

What the reference does (the authors' code, ``forward_mlp_monkey_patch``,
``whitening_by_ratio``, ``load_predictor``, ``m_countdown_gemv_gemv_triton``):
- ``method='m-countdown'``, state ``ideal`` (the paper's SP_ideal): per token, zero the
  ``max(1, int(d_ff·s))`` smallest |up(x)_i| (``torch.kthvalue`` of |up(x)| along the
  neurons; keep |up(x)_i| > that value), h = act(gate x) · masked up(x). Each forward
  logs, per layer, the mean over its tokens of that per-token k-th value.
- State ``prac`` (SP_prac, the deployable one): one threshold per layer, the mean
  (``threshold_aggregate`` 'mean'; 'median' optional) of those logged values over the
  calibration forwards of an ``ideal`` run (every layer at per-token top-k), plus
  ``adjust_threshold`` (0 by default); keep |up(x)_i| > threshold. The decode kernel
  (``llama_mc_up`` + ``llama_down``) computes up densely, then gate and down rows only for
  the kept neurons.
- ``method='d-countdown'``: the same with the direct coefficient |s| (SP_ideal) or a
  trained low-rank/BitLinear predictor of it (SP_prac).
- In generation the reference keeps multi-token (prefill) calls dense.

What we do (defaults in conf/sparsifier/countdown.yaml = the authors' M-COUNTDOWN setting):
- ``coefficient: up`` (default, M-COUNTDOWN): |up(x)|. ``coefficient: h`` (named option):
  D-COUNTDOWN's direct coefficient |act(gate x)·up x| without a predictor (its SP_ideal
  oracle as a rule; with a threshold it is CETT's rule without the column norms). Plain
  MLPs (OPT) have no up factor apart from the activation: both options rank |act(fc1 x)|.
- ``selection: threshold`` (default, SP_prac): one threshold per layer;
  ``selection: topk`` (SP_ideal): the exact per-token rule above, no calibration.
- ``calibration: reference`` (default): the threshold is the mean over calibration tokens
  of each token's ``max(1, int(d_ff·s))``-th smallest |coefficient|, on the model running
  per-token top-k (SP_ideal) in every layer below, as the reference's ``ideal`` run.
  The mean of per-token quantiles is not the quantile of the pooled values, so the held-out
  sparsity differs from ``s`` (the sparsity evaluator reports it; SmolLM2-135M at s = 0.5,
  8 calibration sequences, 4 held-out windows: 0.512, layers 0.50–0.54; with
  ``quantile`` 0.505). ``calibration: quantile``
  (named option, this project's CATS/CETT convention): the exact s-quantile of the pooled
  |coefficient| over calibration tokens, calibrated layer by layer on the *thresholded*
  model (what each layer sees at inference), so the requested sparsity is met.

Declared work (``MLPInput.computed``): the mask needs gate and up densely ("h"), so sparse
backends compute only the down rows of the kept neurons, as for CETT. For ``coefficient:
up`` this is conservative: the reference kernel evaluates the gate only for kept neurons,
and a cost model counting that would need a ``computed`` state "up" that the backends do
not have (for gated MLPs its bytes equal "act", with gate and up swapped). up(x) is
computed once and reused for h.

Other deviations: sparsity 0 is the dense model (the reference's ``max(1, ·)`` drops one
neuron per token even there); ``adjust_threshold`` is 0 (the reference's default); the
calibration text is ours; which positions are sparse is ``prefill.policy``, one setting for
every method (the reference's generation path = ``decode_only``).
"""
from __future__ import annotations

import torch

from ..core.device import model_device
from ..core.errors import ConfigError
from . import SPARSIFIERS
from .base import Sparsifier, calibrate_layerwise
from .cats import quantile_threshold

COEFFICIENTS = ("up", "h")
SELECTIONS = ("threshold", "topk")
CALIBRATIONS = ("reference", "quantile")


def coefficient(inp, kind: str) -> torch.Tensor:
    """|up(x)| (``kind='up'``, gated MLPs) or |h| for one MLP call. Leaves h computed on
    ``inp`` (``inp.computed == 'h'``): gate and up are evaluated densely either way, once
    (``inp.h`` reuses ``inp.up``)."""
    if kind == "h" or inp.site.kind != "gated":
        return inp.h.abs()
    inp.h  # noqa: B018 - evaluate h now: the backend reuses it (computed == "h")
    return inp.up.abs()


def drop_count(d_ff: int, sparsity: float) -> int:
    """Neurons zeroed per token by the reference's top-k: max(1, int(d_ff·s))."""
    return max(1, int(d_ff * sparsity))


def per_token_kth(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k-th smallest score (float32), shape [..., 1]."""
    return scores.float().kthvalue(k, dim=-1, keepdim=True).values


@SPARSIFIERS.register("countdown")
class Countdown(Sparsifier):
    calibration_params = ("sparsity", "coefficient", "selection", "calibration")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kind = cfg.get("coefficient", "up")
        self.selection = cfg.get("selection", "threshold")
        self.calibration_rule = cfg.get("calibration", "reference")
        self.needs_calibration = self.selection == "threshold"
        self.thresholds: torch.Tensor | None = None
        self._ideal = False  # calibration stream: per-token top-k in every layer

    def validate(self):
        super().validate()
        for key, allowed, default in (("coefficient", COEFFICIENTS, "up"), ("selection", SELECTIONS, "threshold"),
                                      ("calibration", CALIBRATIONS, "reference")):
            if self.cfg.get(key, default) not in allowed:
                raise ConfigError(f"sparsifier.{key}={self.cfg.get(key)} is unknown; use one of: {', '.join(allowed)}")

    # ------------------------------------------------------------ calibration
    def calibrate(self, controller, model, batches):
        n = len(controller.sites)
        self.thresholds = torch.full((n,), float("-inf"), device=model_device(model))
        s = self.sparsity
        if s == 0.0:
            return {"thresholds": self.thresholds.clone()}
        reference = self.calibration_rule == "reference"

        def fit(i, values):
            scores = torch.cat(values)
            if reference:
                t = per_token_kth(scores, drop_count(scores.shape[-1], s)).double().mean()
            else:
                t = quantile_threshold(scores, s)
            self.thresholds[i] = float(t)

        rows = lambda inp: coefficient(inp, self.kind).detach().float().reshape(-1, inp.site.intermediate_size)
        self._ideal = reference
        try:
            calibrate_layerwise(controller, model, list(batches), rows, fit)
        finally:
            self._ideal = False
        return {"thresholds": self.thresholds.clone()}

    def load_state(self, state):
        self.thresholds = state["thresholds"]

    # ------------------------------------------------------------ inference
    def mask(self, inp):
        s = self.sparsity
        if s == 0.0:
            return None
        c = coefficient(inp, self.kind)
        if self.selection == "topk" or self._ideal:
            return c.float() > per_token_kth(c, drop_count(c.shape[-1], s))
        return c > self.thresholds[inp.layer_idx].to(c.dtype)

    def describe(self):
        return {"countdown_threshold": self.thresholds.tolist()} if self.thresholds is not None else {}
