"""Statistical top-k (Spark Transformer, You et al. 2025; Gemma 3n's activation sparsity),
and the training-free variants it should be compared with.

Reference: transformers' Gemma 3n, models/gemma3n/modeling_gemma3n.py,
``Gemma3nTextMLP._gaussian_topk`` (cutoff = mean + std·Φ⁻¹(s) of the gate projection
per token, std unbiased=False, returns relu(gate − cutoff)) and ``forward``
(act_fn of that: act(relu(z − t))).

Per token, a score over the d_ff neurons is thresholded at an estimate of its
s-quantile, so that about a fraction (1 − s) of the neurons is kept. Two config keys
choose the score and the estimate; the defaults are the Gemma 3n rule, so configs
written before these keys existed mean the same.

``rule`` — the score a neuron is ranked by:

- ``gate_preact`` (default; **the reference**, Spark / Gemma 3n): the signed gate
  pre-activation z = gate(x) (fc1(x) for plain MLPs); keep z_i > t. Large *negative*
  z_i are dropped even when |act(z_i)| is large: SiLU/GeLU's negative lobe is cut.
  Gemma 3n is trained with this rule; applied without training to a model whose
  activations are not skewed positive it removes half of the signal (a random or
  untrained model, where z ≈ 0 and act(z) ≈ z/2, collapses).
- ``abs_act`` (**ours**, training-free): |act(z)|, the magnitude CATS thresholds
  (CATS uses one calibrated per-layer threshold; this is the per-token statistical
  stand-in for its quantile).

``threshold`` — how t is found per token:

- ``gaussian`` (default; the reference's estimator): t = mean + std · Φ⁻¹(s) of the
  score over the neurons (std without Bessel's correction); O(d_ff), no sort. It is
  exact when the score is Gaussian across neurons. That is Spark's premise for z, but
  |act(z)| is never Gaussian: it is ≥ 0, piles up below the negative lobe's peak
  (0.28 for SiLU, 0.17 for GeLU) and has a long right tail, so moment matching it
  misplaces the quantile. Measured on Gaussian z (achieved sparsity at s = 0.5 / 0.7
  / 0.9): z ~ N(0, 0.05²) (untrained): 0.58 / 0.74 / 0.89; z ~ N(0, 1), SiLU: 0.73 / 0.81 /
  0.89; z ~ N(−1, 1), SiLU: 0.49 / 0.94 / 0.95. Read ``abs_act`` + ``gaussian``
  at its *achieved* sparsity (the sparsity evaluator reports it), or use:
- ``gaussian_z`` (ours): the s-quantile of the score *implied by* a Gaussian fit of
  z (Spark's own premise, pushed through the activation): z_j = μ_z + σ_z·u_j on
  ``nodes`` fixed standard-normal quantile nodes u_j = Φ⁻¹((j + ½)/nodes), t = the
  s-quantile of |act(z_j)|. Cost O(nodes) per token, independent of d_ff; exact
  (up to 1/nodes) whenever z is Gaussian, whatever the activation. For
  ``gate_preact`` it is the same threshold as ``gaussian`` (z is its own score).
- ``exact`` (ablation): the exact per-token top-k, k = round((1 − s)·d_ff), by the
  same score (a full top-k over d_ff). ``rule=R threshold=exact`` beside
  ``threshold=gaussian`` measures the approximation alone, not a change of rule.

``mode`` — what is done with the kept set:

- ``hard`` (default; ours, training-free): mask act(z); kept values are untouched.
- ``soft`` (the reference's formula): Gemma 3n's act(relu(z − t)), which also shifts
  every kept value by t (it is trained that way); only with ``rule: gate_preact``.
  The shifted activation is installed through ``MLPInput.replace_act``, so positions
  that the prefill policy keeps dense see the model's own activation.

Declared work (``MLPInput.computed``): every variant evaluates the gate densely, so
the mask also computes act(gate(x)) (an elementwise op over the gate output it
already has) and declares "act", as CATS does; sparse backends then compute only
up/down for the kept neurons and the decode evaluator does not count the gate as
saved. No calibration.
"""
from __future__ import annotations

import functools

import torch

from ..core.errors import ConfigError
from . import SPARSIFIERS
from .base import Sparsifier
from .base import topk_mask


@functools.lru_cache(maxsize=64)
def _normal_quantile(sparsity: float) -> float:
    """Φ⁻¹(s) rounded to float32, as a Python float: computed once on the CPU (a host
    constant, so the per-call threshold needs no tensor of its own on the device)."""
    return float(torch.special.ndtri(torch.tensor(sparsity, dtype=torch.float32, device="cpu")))


def gaussian_threshold(z: torch.Tensor, sparsity: float) -> torch.Tensor:
    """mean + std·Φ⁻¹(s) over the last dimension (std with Bessel's correction off), in
    float32 on z's device."""
    zf = z.float()
    return zf.mean(-1, keepdim=True) + zf.std(-1, keepdim=True, correction=0) * _normal_quantile(float(sparsity))


def normal_nodes(n: int, device=None) -> torch.Tensor:
    """Φ⁻¹((j + ½)/n), j = 0..n−1: n equal-probability nodes of the standard normal
    (float32; computed on the CPU, so the same numbers on every device, then moved)."""
    nodes = torch.special.ndtri((torch.arange(n, dtype=torch.float64, device="cpu") + 0.5) / n).float()
    return nodes if device is None else nodes.to(device)


_NODES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _cached_nodes(n: int, device: torch.device) -> torch.Tensor:
    """``normal_nodes(n)`` on ``device``, built once per (n, device) (not per MLP call)."""
    hit = _NODES.get((n, device))
    if hit is None:
        hit = _NODES[(n, device)] = normal_nodes(n, device)
    return hit


def gaussian_z_threshold(z: torch.Tensor, sparsity: float, score_fn, nodes: int = 1024) -> torch.Tensor:
    """The s-quantile of ``score_fn(Z)`` for Z ~ N(mean(z), std(z)²) per row (last dim),
    from ``nodes`` equal-probability nodes of that Gaussian: [..., 1]."""
    zf = z.float()
    mu, sd = zf.mean(-1, keepdim=True), zf.std(-1, keepdim=True, correction=0)
    u = _cached_nodes(nodes, zf.device)
    vals = score_fn(mu + sd * u).float()  # [..., nodes]
    k = min(max(int(round(sparsity * nodes)), 1), nodes)
    return vals.kthvalue(k, dim=-1, keepdim=True).values


def exact_threshold(score: torch.Tensor, keep: int) -> torch.Tensor:
    """The largest score *not* among the ``keep`` largest per row ([..., 1]); −inf when
    every neuron is kept (the boundary the soft shift uses with ``threshold: exact``)."""
    n = score.shape[-1]
    if keep >= n:
        return torch.full((*score.shape[:-1], 1), float("-inf"), device=score.device)
    return score.float().kthvalue(n - keep, dim=-1, keepdim=True).values


@SPARSIFIERS.register("stat_topk")
class StatTopK(Sparsifier):
    MODES = ("hard", "soft")
    RULES = ("gate_preact", "abs_act")
    THRESHOLDS = ("gaussian", "gaussian_z", "exact")

    def validate(self):
        super().validate()
        for key, allowed, default in (("mode", self.MODES, "hard"), ("rule", self.RULES, "gate_preact"),
                                      ("threshold", self.THRESHOLDS, "gaussian")):
            if self.cfg.get(key, default) not in allowed:
                raise ConfigError(f"sparsifier.{key}={self.cfg.get(key)} is unknown; use one of: {', '.join(allowed)}")
        if self.mode == "soft" and self.rule != "gate_preact":
            raise ConfigError("sparsifier.mode=soft is Gemma 3n's act(relu(z − t)) on the gate pre-activation; "
                              "it needs sparsifier.rule=gate_preact")
        n = self.cfg.get("nodes", 1024)
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ConfigError(f"sparsifier.nodes={n} must be an integer ≥ 2 (Gaussian quantile nodes for threshold=gaussian_z)")

    @property
    def mode(self) -> str:
        return self.cfg.get("mode", "hard")

    @property
    def rule(self) -> str:
        return self.cfg.get("rule", "gate_preact")

    @property
    def threshold_kind(self) -> str:
        return self.cfg.get("threshold", "gaussian")

    def keep(self, d_ff: int) -> int:
        return int(round((1.0 - self.sparsity) * d_ff))

    def mask(self, inp):
        if self.sparsity == 0.0:
            return None
        z = inp.pre
        act = inp.act  # the gate is evaluated densely either way: declare act as computed (as CATS)
        if self.rule == "gate_preact":
            score, score_fn = z.float(), (lambda v: v)
        else:
            score, score_fn = act.abs().float(), (lambda v: inp.site.act(v).abs())
        kind = self.threshold_kind
        if kind == "exact":
            k = self.keep(score.shape[-1])
            if k >= score.shape[-1]:
                return None  # s below half a neuron: nothing to drop
            keep = topk_mask(score, k)
            t = exact_threshold(score, k) if self.mode == "soft" else None
        else:
            if kind == "gaussian" or self.rule == "gate_preact":
                t = gaussian_threshold(score, self.sparsity)
            else:
                t = gaussian_z_threshold(z, self.sparsity, score_fn, int(self.cfg.get("nodes", 1024)))
            keep = score > t
        if self.mode == "soft":
            # Gemma 3n: act(relu(z - t)); positions the prefill policy keeps dense get act(z) back
            inp.replace_act(inp.site.act(torch.relu(z.float() - t).to(z.dtype)))
        return keep
