"""SVD predictor: a training-free low-rank guess of the gate, so the MLP neuron mask is
known *before* the MLP runs (for SiLU/GeLU gated models; ReLU OPT works too).

Per layer the gate projection W_gate [I, H] (fc1 for OPT) is truncated to rank r by its
SVD, W_gate ≈ U_r S_r V_rᵀ, stored as two factors A = S_r V_rᵀ [r, H] and B = U_r [I, r]
(computed once per layer at calibration, in float64, stored in float32). At run time
ĝ = B (A x) (+ the gate bias, if any) approximates gate(x) and scores the neurons:

- ``score: act`` (default): |act(ĝ)|, the approximate gate activation (CATS's quantity);
- ``score: pre``: the signed ĝ itself (for SiLU/GeLU a large positive pre-activation means
  a large activation, a negative one a small one; ranking the signed value avoids the
  small bump of |act| below zero, which a rank-r ĝ places badly);
- ``use_up: true`` (``score: act`` only): W_up is truncated the same way and the score is
  |act(ĝ) · û| ≈ |h| (with the dReLU up-activation applied to û where the model has one).

A neuron is kept iff its score > t_l, with t_l the ``sparsity``-quantile of the scores
over the calibration tokens (an exact order statistic, ``cats.quantile_threshold``), so
the predicted masks hit the target sparsity on calibration text. Layers are calibrated in
order with the layers below already sparse (``calibrate_on: sparse_upstream``, as CATS);
``dense`` takes every layer's quantile from the dense model. The mask reads ``x`` only,
so ``MLPInput.computed`` stays "x" and sparse backends skip the gate, up and down rows
of every dropped neuron.

``rank``: a float in (0, 1] is a fraction of the hidden size (1.0 = full rank), an int
≥ 1 an absolute rank; both are capped at min(H, I). At full rank ĝ = gate(x) up to
rounding, so the masks are CATS's masks at the same threshold.

Cost: the factors read per token per layer are r·(H + I) weights (×2 with ``use_up``)
whatever the mask; ``summary()``/``describe()`` report them in bytes (model dtype) and as
a fraction of the MLP's weights (3·H·I gated, 2·H·I plain).

The oracle this predictor imitates (``oracle_mask``, for the ``mask_quality`` evaluator)
is the same score computed from the exact gate (and up) with its own exact quantile
threshold, fit on the same calibration inputs: for ``score: act`` that is CATS's mask.
"""
from __future__ import annotations

import torch

from ..core.errors import ConfigError
from . import SPARSIFIERS
from .base import Sparsifier, calibrate_layerwise, collect_per_layer
from .cats import quantile_threshold


def resolve_rank(rank, hidden: int, limit: int) -> int:
    """The rank a ``rank`` setting means: a float in (0, 1] is a fraction of ``hidden``,
    an int ≥ 1 is absolute; at least 1, at most ``limit`` (min of the matrix sides)."""
    r = int(round(rank * hidden)) if isinstance(rank, float) else int(rank)
    return max(1, min(r, limit))


def truncated_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` truncation of ``weight`` [out, in] by its SVD W = U S Vᵀ:
    (A = S_r V_rᵀ [r, in], B = U_r [out, r], energy = Σ_{i<r} S_i² / Σ S_i²), so W ≈ B A."""
    U, S, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    A = S[:rank, None] * Vh[:rank]
    B = U[:, :rank]
    energy = float((S[:rank] ** 2).sum() / (S ** 2).sum().clamp_min(1e-300))
    return A.float(), B.float().contiguous(), energy


def mlp_weight_count(site) -> int:
    """Weights of one MLP (gate, up, down; fc1 and fc2 for OPT)."""
    projs = ("gate", "up", "down") if site.kind == "gated" else ("up", "down")
    return sum(site.projection(p).weight.numel() for p in projs)


def predictor_cost(params: int, site, element_size: int) -> dict[str, float]:
    """A predictor reading ``params`` weights per token per layer, next to that layer's MLP."""
    mlp = mlp_weight_count(site)
    return {"predictor_params_per_layer": params, "predictor_bytes_per_token_per_layer": params * element_size,
            "predictor_mlp_fraction": params / mlp}


@SPARSIFIERS.register("svd_predictor")
class SVDPredictor(Sparsifier):
    needs_calibration = True
    calibration_params = ("sparsity", "rank", "score", "use_up", "calibrate_on")
    SCORES = ("act", "pre")
    CALIBRATE_ON = ("sparse_upstream", "dense")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.A: torch.Tensor | None = None  # [layers, r, H]
        self.B: torch.Tensor | None = None  # [layers, I, r]
        self.A_up: torch.Tensor | None = None
        self.B_up: torch.Tensor | None = None
        self.thresholds: torch.Tensor | None = None  # on the predicted score, per layer
        self.oracle_thresholds: torch.Tensor | None = None  # on the exact score, per layer
        self.energy: torch.Tensor | None = None  # share of ‖W_gate‖_F² the rank-r truncation keeps
        self._cast: dict = {}
        self._sites: list = []
        self._element_size: int | None = None

    # ---------------------------------------------------------------- settings
    def validate(self):
        super().validate()
        r = self.cfg.get("rank", 0.25)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or (isinstance(r, float) and not 0 < r <= 1) \
                or (isinstance(r, int) and r < 1):
            raise ConfigError(f"sparsifier.rank={r} is out of range; use a fraction of the hidden size in (0, 1] "
                              f"(1.0 = full rank) or an integer rank ≥ 1, e.g. sparsifier.rank=0.25")
        if self.cfg.get("score", "act") not in self.SCORES:
            raise ConfigError(f"sparsifier.score={self.cfg.get('score')} is unknown; use one of: {', '.join(self.SCORES)}")
        up = self.cfg.get("use_up", False)
        if not isinstance(up, bool):
            raise ConfigError(f"sparsifier.use_up={up!r} must be true or false")
        if up and self.cfg.get("score", "act") == "pre":
            raise ConfigError("sparsifier.use_up=true needs sparsifier.score=act (the score |act(ĝ)·û| is a product "
                              "of magnitudes; a signed pre-activation has none)")
        if self.cfg.get("calibrate_on", "sparse_upstream") not in self.CALIBRATE_ON:
            raise ConfigError(f"sparsifier.calibrate_on={self.cfg.get('calibrate_on')} is unknown; "
                              f"use one of: {', '.join(self.CALIBRATE_ON)}")

    @property
    def use_up(self) -> bool:
        return bool(self.cfg.get("use_up", False))

    def attach(self, controller, model):
        self._sites = list(controller.sites)
        if self._sites:
            self._element_size = self._sites[0].down.weight.element_size()
        if self.use_up and any(s.kind != "gated" for s in self._sites):
            raise ConfigError("sparsifier.use_up=true needs a gated MLP (gate and up projections); this model's MLP "
                              "is act(fc1 x): use sparsifier.use_up=false")

    # ---------------------------------------------------------------- calibration
    def calibrate(self, controller, model, batches):
        sites = controller.sites
        H, I = sites[0].up.in_features, sites[0].intermediate_size
        r = resolve_rank(self.cfg.get("rank", 0.25), H, min(H, I))
        L = len(sites)
        dev = sites[0].activation_input.weight.device  # the factors come from the weights, on theirs
        self.A, self.B = torch.zeros(L, r, H, device=dev), torch.zeros(L, I, r, device=dev)
        self.energy = torch.zeros(L, device="cpu")  # one Python float per layer: CPU bookkeeping
        if self.use_up:
            self.A_up, self.B_up = torch.zeros(L, r, H, device=dev), torch.zeros(L, I, r, device=dev)
        for i, site in enumerate(sites):
            self.A[i], self.B[i], self.energy[i] = truncated_factors(site.activation_input.weight, r)
            if self.use_up:
                self.A_up[i], self.B_up[i], _ = truncated_factors(site.up.weight, r)
        self._cast = {}

        def record(inp):
            return (self.scores(inp.site, inp.x).detach().float().reshape(-1),
                    self.exact_scores(inp).detach().float().reshape(-1))

        s = self.sparsity
        if self.cfg.get("calibrate_on", "sparse_upstream") == "dense":
            vals = collect_per_layer(controller, model, batches, record)
            self.thresholds = torch.stack([quantile_threshold(torch.cat([p for p, _ in vals[i]]), s) for i in sorted(vals)])
            self.oracle_thresholds = torch.stack([quantile_threshold(torch.cat([e for _, e in vals[i]]), s)
                                                  for i in sorted(vals)])
        else:
            self.thresholds = torch.full((L,), float("-inf"), device=dev)
            self.oracle_thresholds = torch.full((L,), float("-inf"), device=dev)

            def fit(i, values):
                self.thresholds[i] = quantile_threshold(torch.cat([p for p, _ in values]), s)
                self.oracle_thresholds[i] = quantile_threshold(torch.cat([e for _, e in values]), s)

            calibrate_layerwise(controller, model, batches, record, fit)
        state = {"A": self.A.clone(), "B": self.B.clone(), "energy": self.energy.clone(),
                 "thresholds": self.thresholds.clone(), "oracle_thresholds": self.oracle_thresholds.clone()}
        if self.use_up:
            state.update(A_up=self.A_up.clone(), B_up=self.B_up.clone())
        return state

    def load_state(self, state):
        self.A, self.B, self.energy = state["A"], state["B"], state["energy"]
        self.A_up, self.B_up = state.get("A_up"), state.get("B_up")
        self.thresholds, self.oracle_thresholds = state["thresholds"], state["oracle_thresholds"]
        self._cast = {}

    # ---------------------------------------------------------------- inference
    def _factors(self, i: int, like: torch.Tensor, up: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's factors in ``like``'s dtype and device (cast once, then cached)."""
        key = (i, up, like.device, like.dtype)
        hit = self._cast.get(key)
        if hit is None:
            A, B = (self.A_up, self.B_up) if up else (self.A, self.B)
            hit = (A[i].to(device=like.device, dtype=like.dtype), B[i].to(device=like.device, dtype=like.dtype))
            self._cast[key] = hit
        return hit

    @staticmethod
    def _low_rank(x, A, B, bias):
        y = (x @ A.T) @ B.T
        return y + bias.to(y.dtype) if bias is not None else y

    def scores(self, site, x: torch.Tensor) -> torch.Tensor:
        """The predicted score of every neuron, from ``x`` alone ([..., I])."""
        A, B = self._factors(site.layer_idx, x)
        g = self._low_rank(x, A, B, site.activation_input.bias)
        if self.cfg.get("score", "act") == "pre":
            return g
        a = site.act(g)
        if self.use_up:
            Au, Bu = self._factors(site.layer_idx, x, up=True)
            u = self._low_rank(x, Au, Bu, site.up.bias)
            if site.up_act is not None:  # dReLU: site.up(x) applies it; the factors hold the bare linear
                u = site.up_act(u)
            a = a * u
        return a.abs()

    def exact_scores(self, inp) -> torch.Tensor:
        """The score the predictor approximates, from the exact gate (and up)."""
        if self.cfg.get("score", "act") == "pre":
            return inp.pre
        return (inp.h if self.use_up else inp.act).abs()

    def mask(self, inp):
        if self.sparsity == 0.0:
            return None
        s = self.scores(inp.site, inp.x)
        return s > self.thresholds[inp.layer_idx].to(device=s.device, dtype=s.dtype)

    def oracle_mask(self, inp) -> torch.Tensor:
        """The same rule on the exact score with its own calibrated threshold (``score:
        act``: CATS's mask); used by the ``mask_quality`` evaluator."""
        e = self.exact_scores(inp)
        return e > self.oracle_thresholds[inp.layer_idx].to(device=e.device, dtype=e.dtype)

    # ---------------------------------------------------------------- reporting
    @property
    def rank(self) -> int | None:
        return None if self.A is None else int(self.A.shape[1])

    def predictor_params(self) -> int:
        """Weights the predictor reads per token per layer: r·(H + I), twice with use_up."""
        if self.A is None:
            return 0
        _, r, H = self.A.shape
        return r * (H + self.B.shape[1]) * (2 if self.A_up is not None else 1)

    def cost(self) -> dict[str, float]:
        if self.A is None or not self._sites:
            return {}
        return predictor_cost(self.predictor_params(), self._sites[0], self._element_size)

    def summary(self):
        out = {"predictor_rank": self.rank, **self.cost()}
        if self.energy is not None:
            out["gate_energy_mean"] = float(self.energy.mean())
        return out

    def describe(self):
        if self.thresholds is None:
            return {}
        L = len(self.thresholds)
        out = {"svd_predictor/threshold": self.thresholds.tolist(),
               "svd_predictor/oracle_threshold": self.oracle_thresholds.tolist(),
               "svd_predictor/gate_energy": self.energy.tolist()}
        cost = self.cost()
        if cost:
            out["svd_predictor/bytes_per_token"] = [cost["predictor_bytes_per_token_per_layer"]] * L
            out["svd_predictor/mlp_fraction"] = [cost["predictor_mlp_fraction"]] * L
        return out
