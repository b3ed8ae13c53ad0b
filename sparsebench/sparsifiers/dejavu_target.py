"""Deja Vu predictors trained on the mask you want, with over-provisioning.

The ``dejavu`` predictor (a rank-r B(A x) per layer, see ``dejavu.py``) learns the
top-k of |h|. Here the labels are a chosen oracle's masks, so the predictor imitates
the method it stands in for, *before* the MLP runs:

- ``labels: cats``: |act(gate x)_i| > t_l (CATS's rule), t_l the ``sparsity``-quantile of
  |act| over the calibration tokens of layer l (``cats.quantile_threshold``);
- ``labels: cett``: |h_i| ≥ ε_l / ‖W_down[:, i]‖ (CETT's rule at a target sparsity, i.e.
  ``cett`` with ``budget: null``), ε_l the ``sparsity``-quantile of |h_i|·‖W_down[:, i]‖;
- ``labels: topk_h``: Deja Vu's own labels, the per-token top-k of |h| (with
  ``overprovision: 0`` this is exactly ``dejavu``: same labels, seeds and training).

Thresholds are fit on the same calibration inputs the predictor trains on: layers are
calibrated in order, layer l on the hidden states the layers below produce with their
*predicted* masks (as ``dejavu`` trains), so the labels are the oracle's masks on
exactly the tensors the predictor sees at inference. For layer 0 (dense input) the
thresholds equal what ``cats`` and ``cett`` (``budget: null``) fit on the same text.
The CATS/CETT label masks keep about (1 − s)·d_ff neurons per token on average (the
count varies per token); the predictor keeps exactly k = round((1 − s)·d_ff).

**Over-provisioning** (``overprovision: δ``, default 0): at inference the predicted
top round((1 + δ)·k) neurons are kept (capped at d_ff), a superset of the top-k, so
recall of the oracle rises at a known cost in density: (1 + δ)(1 − s) instead of 1 − s
(``summary()`` reports the kept fraction). Calibration advances the hidden states with
the same over-provisioned masks. ``selection: threshold`` (sigmoid ≥ 0.5) has no k and
refuses δ > 0.

``oracle: true`` runs the label masks themselves (the upper bound the predictor is
measured against; for cats/cett this still calibrates the thresholds, with the layers
below running on oracle masks). ``oracle_mask`` serves the ``mask_quality`` evaluator:
it reports recall / precision / F1 of the predicted masks against these labels.

Training is ``dejavu.train_predictor`` (weighted BCE, AdamW, seeded by the layer index:
deterministic, independent of the global RNG). Cost: r·(H + I) predictor weights read per
token per layer, reported by ``summary()``/``describe()`` in bytes and as a fraction of
the MLP's weights.
"""
from __future__ import annotations

import math

import torch

from ..core.device import model_device
from ..core.errors import ConfigError
from . import SPARSIFIERS
from .base import calibrate_layerwise
from .cats import quantile_threshold
from .dejavu import DejaVu, oracle_topk, train_predictor
from .svd_predictor import predictor_cost
from .base import topk_mask

LABELS = ("cats", "cett", "topk_h")


def down_column_norms(site) -> torch.Tensor:
    """‖W_down[:, i]‖ per neuron (float32, on the weight's device), as CETT computes them."""
    return site.down.weight.detach().float().norm(dim=0)


def cats_rule(act: torch.Tensor, t) -> torch.Tensor:
    """CATS: keep |act_i| > t (``cats.CATS.mask``)."""
    t = torch.as_tensor(t, device=act.device)
    return act.abs() > t.to(dtype=act.dtype)


def cett_rule(h: torch.Tensor, eps, col_norm: torch.Tensor) -> torch.Tensor:
    """CETT: keep |h_i| ≥ ε / ‖W_down[:, i]‖ (``cett.CETT.mask``). ``eps`` may be a
    device tensor: (1 / ‖·‖)·ε is the same float32 product as ``float(eps) / ‖·‖`` (what
    CETT computes) without reading ε back to the host on every call."""
    if isinstance(eps, torch.Tensor):
        t = col_norm.clamp_min(1e-30).reciprocal() * eps.to(device=col_norm.device, dtype=col_norm.dtype)
    else:
        t = float(eps) / col_norm.clamp_min(1e-30)
    return h.abs() >= t.to(device=h.device, dtype=h.dtype)


def fit_label_threshold(labels: str, values: torch.Tensor, sparsity: float, col_norm: torch.Tensor | None = None):
    """The per-layer threshold of a label rule at ``sparsity`` on calibration ``values``
    ([tokens, I]: act for cats, h for cett): CATS's t, CETT's ε (``budget: null``)."""
    if labels == "cats":
        return quantile_threshold(values.abs().float(), sparsity)
    if labels == "cett":
        eps = float(quantile_threshold(values.float().abs() * col_norm, sparsity)) if sparsity > 0 else 0.0
        return torch.tensor(max(eps, 0.0), device=values.device)
    return torch.tensor(0.0, device=values.device)  # topk_h: a per-token rank, no threshold


@SPARSIFIERS.register("dejavu_target")
class DejaVuTarget(DejaVu):
    calibration_params = DejaVu.calibration_params + ("labels", "overprovision", "selection", "oracle")
    calibration_version = 1
    LABELS = LABELS
    REPORT = ("train_recall", "train_precision", "positive_rate", "label_density",
              "train_recall_kept", "train_precision_kept")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.label_thresholds: torch.Tensor | None = None  # cats: t; cett: ε; per layer
        self._col_norm: dict[int, torch.Tensor] = {}
        self._sites: list = []
        self._element_size: int | None = None
        self.report: dict[str, torch.Tensor] = {}
        self._cast: dict = {}

    @property
    def labels(self) -> str:
        return self.cfg.get("labels", "cats")

    @property
    def overprovision(self) -> float:
        return float(self.cfg.get("overprovision", 0.0))

    @property
    def needs_calibration(self) -> bool:
        # the top-k oracle needs nothing fitted; the threshold oracles need their thresholds
        return not (self.cfg.get("oracle", False) and self.labels == "topk_h")

    def validate(self):
        super().validate()
        if self.labels not in LABELS:
            raise ConfigError(f"sparsifier.labels={self.labels} is unknown; use one of: {', '.join(LABELS)}")
        d = self.cfg.get("overprovision", 0.0)
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            raise ConfigError(f"sparsifier.overprovision={d!r} must be a number ≥ 0 (0.2 keeps the top 1.2·k "
                              "predicted neurons), e.g. sparsifier.overprovision=0.2")
        if d > 0 and self.cfg.get("selection", "topk") == "threshold":
            raise ConfigError("sparsifier.overprovision>0 needs sparsifier.selection=topk (selection=threshold "
                              "keeps sigmoid ≥ 0.5, which has no k to over-provision)")

    def attach(self, controller, model):
        self._sites = list(controller.sites)
        if self._sites:
            self._element_size = self._sites[0].down.weight.element_size()
        self._col_norm = {}

    # ---------------------------------------------------------------- selection
    def keep_predicted(self, d_ff: int) -> int:
        """Neurons kept per token: round((1 + δ)·k), at most d_ff."""
        return min(d_ff, int(round((1.0 + self.overprovision) * self.keep(d_ff))))

    def _select(self, scores, d_ff):
        if self.cfg.get("selection", "topk") == "threshold":
            return scores > 0
        return topk_mask(scores, self.keep_predicted(d_ff))

    def _scores(self, i, x):
        """B(A x) in the activation dtype (trained in float32; its reads are counted at the
        model's element size), with layer i's factors cast once per device and dtype."""
        key = (i, x.device, x.dtype)
        hit = self._cast.get(key)
        if hit is None:
            hit = self._cast[key] = (self.A[i].to(device=x.device, dtype=x.dtype),
                                     self.B[i].to(device=x.device, dtype=x.dtype))
        A, B = hit
        return (x @ A.T) @ B.T

    # ---------------------------------------------------------------- labels / oracle
    def col_norm(self, site) -> torch.Tensor:
        c = self._col_norm.get(site.layer_idx)
        if c is None:
            c = self._col_norm[site.layer_idx] = down_column_norms(site)
        return c

    def label_values(self, inp) -> torch.Tensor:
        """What the label rule reads: act for cats, h for cett and topk_h."""
        return inp.act if self.labels == "cats" else inp.h

    def label_mask(self, site, values: torch.Tensor) -> torch.Tensor:
        """The oracle's mask on ``values`` (``label_values``) of layer ``site``."""
        i = site.layer_idx
        if self.labels == "cats":
            return cats_rule(values, self.label_thresholds[i])
        if self.labels == "cett":
            return cett_rule(values, self.label_thresholds[i], self.col_norm(site))
        return oracle_topk(values, self.keep(site.intermediate_size))

    def oracle_mask(self, inp):
        return self.label_mask(inp.site, self.label_values(inp))

    # ---------------------------------------------------------------- training
    def calibrate(self, controller, model, batches):
        sites = controller.sites
        d, d_ff = sites[0].up.in_features, sites[0].intermediate_size
        r = max(1, int(round(float(self.cfg.get("rank", 0.1)) * d)))
        L = len(sites)
        oracle = bool(self.cfg.get("oracle", False))
        lookahead = bool(self.cfg.get("lookahead", False))
        device = model_device(model)
        self.A, self.B = torch.zeros(L, r, d, device=device), torch.zeros(L, d_ff, r, device=device)
        self.label_thresholds = torch.zeros(L, device=device)
        self._col_norm, self._cast = {}, {}
        # per-layer training statistics, written one float at a time: CPU bookkeeping
        report = {k: torch.zeros(L, device="cpu") for k in self.REPORT}
        prev = None  # layer l−1's MLP inputs per batch (look-ahead source)

        def rows(inp):
            return inp.x.detach().reshape(-1, d).float(), self.label_values(inp).detach().reshape(-1, d_ff)

        def fit(i, values):
            nonlocal prev
            xs = [x for x, _ in values]
            V = torch.cat([v for _, v in values])
            c = self.col_norm(sites[i]) if self.labels == "cett" else None
            self.label_thresholds[i] = fit_label_threshold(self.labels, V, self.sparsity, c)
            Y = self.label_mask(sites[i], V)  # the predictor trains on the model's device (as dejavu's)
            report["label_density"][i] = Y.float().mean()
            if not oracle:  # (oracle: the pass that advances the hidden states runs oracle_mask)
                src = prev if (lookahead and i > 0) else xs
                X = torch.cat(src)
                A, B, stats = train_predictor(X, Y, r, steps=int(self.cfg.get("steps", 400)),
                                              lr=float(self.cfg.get("lr", 5e-3)), seed=i,
                                              loss_weight=self.cfg.get("loss_weight", "reference"))
                self.A[i], self.B[i] = A, B
                self._cast = {}
                for k, v in stats.items():
                    report[k][i] = v
                kept = self._select(self._scores(i, X), d_ff)
                tp = float((kept & Y).sum())
                report["train_recall_kept"][i] = tp / max(float(Y.sum()), 1.0)
                report["train_precision_kept"][i] = tp / max(float(kept.sum()), 1.0)
                self._queued = [self._select(self._scores(i, s), d_ff) for s in src]
            prev = xs

        calibrate_layerwise(controller, model, batches, rows, fit)
        self._queued = []
        self.report = report
        return {"A": self.A.clone(), "B": self.B.clone(), "label_thresholds": self.label_thresholds.clone(),
                **{k: v.clone() for k, v in report.items()}}

    def load_state(self, state):
        self.A, self.B = state["A"], state["B"]
        self.label_thresholds = state["label_thresholds"]
        self.report = {k: state[k] for k in self.REPORT if k in state}
        self._queued, self._cast = [], {}

    # ---------------------------------------------------------------- reporting
    def predictor_params(self) -> int:
        """Weights read per token per layer: r·(H + I) (A and B)."""
        if self.A is None or self.cfg.get("oracle", False):
            return 0
        return int(self.A.shape[1] * (self.A.shape[2] + self.B.shape[1]))

    def cost(self) -> dict[str, float]:
        if not self._sites or self.A is None:
            return {}
        return predictor_cost(self.predictor_params(), self._sites[0], self._element_size)

    def summary(self):
        out = {"labels": self.labels, "overprovision": self.overprovision}
        if self._sites:
            d_ff = self._sites[0].intermediate_size
            out.update(kept_per_token=self.keep_predicted(d_ff), kept_fraction=self.keep_predicted(d_ff) / d_ff)
        if self.A is not None:
            out["predictor_rank"] = int(self.A.shape[1])
        return {**out, **self.cost()}

    def describe(self):
        out = {f"dejavu_target/{k}": v.tolist() for k, v in self.report.items()}
        if self.label_thresholds is not None and self.labels != "topk_h":
            out[f"dejavu_target/{self.labels}_threshold"] = self.label_thresholds.tolist()
        cost = self.cost()
        if cost and self.A is not None:
            L = self.A.shape[0]
            out["dejavu_target/bytes_per_token"] = [cost["predictor_bytes_per_token_per_layer"]] * L
            out["dejavu_target/mlp_fraction"] = [cost["predictor_mlp_fraction"]] * L
        return out
