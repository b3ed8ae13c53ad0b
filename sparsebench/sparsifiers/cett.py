"""CETT: thresholds from the Cumulative Error of Tail Truncation
(Zhang et al. 2024, "ReLU² Wins"; Luo et al. 2024, "Sparsing Law").

Neuron i's output for one token is n_i = h_i · W_down[:, i] with h = act(gate(x)) · up(x)
(act(fc1(x)) for OPT). Dropping every neuron with ‖n_i‖ < ε leaves the relative error

    CETT(ε) = ‖Σ_{i: ‖n_i‖<ε} n_i‖ / ‖Σ_i n_i‖            (bias excluded)

and since ‖n_i‖ = |h_i|·‖W_down[:, i]‖ the rule is a per-neuron threshold on |h_i|:
t_i = ε / ‖W_down[:, i]‖ (keep iff |h_i| ≥ t_i).

Two ways to pick ε per layer:
- ``budget`` set (the papers' setting, e.g. 0.2): bisection on ε until the mean over
  calibration tokens of CETT(ε) equals the budget. Sparsity is then whatever it is.
- ``budget: null``: ε is the ``sparsity``-quantile of ‖n_i‖ over calibration tokens
  and neurons, so the requested sparsity is met; the resulting CETT is reported.
``ppl_increase: p`` adds the outer search CETT-PPL-p%: bisection on the budget until
the perplexity of the sparse model on a validation part of the calibration text is
(1+p)× the dense one (held-out text is never used for calibration).

Layers are calibrated in order on the activations they see at inference (layers
below already sparsified), as for CATS. The CETT denominators use all neurons (the
dense FFN output of that token).
"""
from __future__ import annotations

import torch

from ..core.device import model_device
from ..core.errors import ConfigError
from . import SPARSIFIERS
from .base import Sparsifier, ThresholdRule, calibrate_layerwise, calibration_perplexity
from .cats import quantile_threshold

MAX_TOKENS = 4096  # tokens per layer used in the bisection (a [tokens × intermediate] matmul per step)


def mean_cett(h: torch.Tensor, w_down: torch.Tensor, col_norm: torch.Tensor, eps: float,
              full: torch.Tensor | None = None) -> float:
    """Mean over tokens (rows of ``h``) of ‖W_down (h ⊙ [|h|·c < ε])‖ / ‖W_down h‖."""
    if full is None:
        full = h @ w_down.T
    dropped = h * ((h.abs() * col_norm) < eps).to(h.dtype)
    err = (dropped @ w_down.T).norm(dim=-1)
    return float((err / full.norm(dim=-1).clamp_min(1e-30)).mean())


def bisect_epsilon(h: torch.Tensor, w_down: torch.Tensor, budget: float, iters: int = 50, tol: float = 1e-4) -> float:
    """ε with mean CETT(ε) ≈ budget. CETT is 0 at ε=0 and 1 once every neuron is dropped;
    between, it is monotone in practice (not guaranteed: dropped outputs can cancel), and
    bisection returns a crossing point."""
    col_norm = w_down.norm(dim=0)
    full = h @ w_down.T
    lo, hi = 0.0, float((h.abs() * col_norm).max()) * (1 + 1e-6) + 1e-30
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        val = mean_cett(h, w_down, col_norm, mid, full)
        if abs(val - budget) < tol:
            return mid
        if val < budget:
            lo = mid
        else:
            hi = mid
    return lo


@SPARSIFIERS.register("cett")
class CETT(Sparsifier):
    needs_calibration = True
    calibration_params = ("sparsity", "budget", "ppl_increase")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.eps: torch.Tensor | None = None
        self.cett: torch.Tensor | None = None
        self._t: dict[int, torch.Tensor] = {}
        self._rules: dict[int, ThresholdRule] = {}  # layer → the rule on its current thresholds
        self._e: dict[int, float] = {}  # ε per layer as a Python float (read once per layer)

    def validate(self):
        super().validate()
        b = self.cfg.get("budget")
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1):
            raise ConfigError(f"sparsifier.budget={b} is out of range; use a number in (0, 1), e.g. sparsifier.budget=0.2, or null to target sparsifier.sparsity")
        p = self.cfg.get("ppl_increase")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or p <= 0):
            raise ConfigError(f"sparsifier.ppl_increase={p} must be a positive number (0.01 = CETT-PPL-1%) or null")

    # ---------------------------------------------------------------- calibration
    def _calibrate_at(self, controller, model, batches, budget):
        n_layers = len(controller.sites)
        device = model_device(model)
        self.eps = torch.zeros(n_layers, device=device)
        self.cett = torch.zeros(n_layers, device=device)
        self._t, self._e = {}, {}
        gen = torch.Generator().manual_seed(0)  # a CPU stream: the same subsample on every device

        def fit(i, values):
            h = torch.cat(values).float()
            if h.shape[0] > MAX_TOKENS:
                h = h[torch.randperm(h.shape[0], generator=gen, device="cpu")[:MAX_TOKENS].to(h.device)]
            w = controller.sites[i].down.weight.detach().float()
            c = w.norm(dim=0)
            if budget is None:
                eps = float(quantile_threshold(h.abs() * c, self.sparsity)) if self.sparsity > 0 else 0.0
                eps = max(eps, 0.0)
            else:
                eps = bisect_epsilon(h, w, budget)
            self.eps[i] = eps
            self.cett[i] = mean_cett(h, w, c, eps)
            self._t.pop(i, None)
            self._e.pop(i, None)

        rows = lambda inp: inp.h.detach().reshape(-1, inp.h.shape[-1]).float()
        calibrate_layerwise(controller, model, batches, rows, fit)
        return {"epsilon": self.eps.clone(), "cett": self.cett.clone()}

    def calibrate(self, controller, model, batches):
        batches = list(batches)
        p = self.cfg.get("ppl_increase")
        if p is None:
            return self._calibrate_at(controller, model, batches, self.cfg.get("budget"))
        return self._search_budget(controller, model, batches, float(p))

    def _search_budget(self, controller, model, batches, p):
        """CETT-PPL-p%: the largest budget whose perplexity ratio stays ≤ 1+p. Thresholds are
        fit on the first ¾ of the calibration batches, perplexity measured on the rest."""
        from tqdm.auto import tqdm

        if len(batches) < 2:
            raise ConfigError("CETT-PPL search needs at least 2 calibration batches (data.calibration.num_sequences ≥ 2·batch_size)")
        cut = max(1, (3 * len(batches)) // 4)
        fit_b, val_b = batches[:cut], batches[cut:]
        with controller.dense():
            dense_ppl = calibration_perplexity(model, val_b)
        lo, hi, best = 0.0, 1.0, None
        for _ in tqdm(range(7), desc="CETT-PPL budget search", leave=False):
            mid = 0.5 * (lo + hi)
            state = self._calibrate_at(controller, model, fit_b, mid)
            ratio = calibration_perplexity(model, val_b) / dense_ppl
            if ratio <= 1 + p:
                lo, best = mid, (mid, ratio, state)
            else:
                hi = mid
        if best is None:  # even a tiny budget overshoots: report the smallest tried
            state = self._calibrate_at(controller, model, fit_b, lo or 1e-3)
            best = (lo or 1e-3, calibration_perplexity(model, val_b) / dense_ppl, state)
        budget, ratio, state = best
        # two scalars of the saved state (read back with float() in load_state)
        return {**state, "budget": torch.tensor(budget, device="cpu"), "ppl_ratio": torch.tensor(ratio, device="cpu")}

    def load_state(self, state):
        self.eps, self.cett = state["epsilon"], state["cett"]
        self.found_budget = float(state["budget"]) if "budget" in state else None
        self.found_ratio = float(state["ppl_ratio"]) if "ppl_ratio" in state else None
        self._t, self._e = {}, {}

    # ---------------------------------------------------------------- inference
    def epsilon(self, layer: int) -> float:
        """ε of one layer as a Python float, read once per layer (not per MLP call: a
        per-call read of a device tensor would sync the device)."""
        e = self._e.get(layer)
        if e is None:
            e = self._e[layer] = float(self.eps[layer])
        return e

    def thresholds(self, site) -> torch.Tensor:
        """t_i = ε / ‖W_down[:, i]‖ for this layer (cached per layer, on the weight's device)."""
        t = self._t.get(site.layer_idx)
        if t is None:
            c = site.down.weight.detach().float().norm(dim=0)
            t = self.epsilon(site.layer_idx) / c.clamp_min(1e-30)
            self._t[site.layer_idx] = t
        return t

    def mask(self, inp):
        if self.epsilon(inp.layer_idx) <= 0.0:
            return None
        h = inp.h
        return h.abs() >= self.thresholds(inp.site).to(h.dtype)

    def mask_rule(self, inp):
        """``mask`` as a rule on h a kernel computes itself (fp32 inputs, where ``mask``
        compares in float32 too); thresholds are cached per layer, so the rule is made once."""
        if inp.x.dtype != torch.float32 or self.epsilon(inp.layer_idx) <= 0.0:
            return None
        t = self.thresholds(inp.site)
        rule = self._rules.get(inp.layer_idx)
        if rule is None or rule.threshold is not t:
            rule = self._rules[inp.layer_idx] = ThresholdRule("h", t)
        return rule

    @property
    def requested_sparsity(self):
        return None if self.cfg.get("budget") is not None or self.cfg.get("ppl_increase") is not None else self.sparsity

    def summary(self):
        out = {"budget": self.cfg.get("budget")}
        if getattr(self, "found_budget", None) is not None:
            out.update(searched_budget=self.found_budget, calibration_ppl_ratio=self.found_ratio)
        return out

    def describe(self):
        if self.eps is None:
            return {}
        out = {"cett_epsilon": self.eps.tolist(), "cett_calibration": self.cett.tolist()}
        return out
