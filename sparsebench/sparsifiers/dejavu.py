"""Deja Vu MLP predictors (Liu et al. 2023, "Deja Vu: Contextual Sparsity for Efficient
LLMs at Inference Time").

Per layer a low-rank predictor P(x) = B(A x) (no bias, no nonlinearity, as in Deja Vu;
rank r = ``rank`` × hidden size) scores every intermediate neuron; at inference the
top-k scores are kept (k = (1−s)·d_ff; ``selection: threshold`` keeps sigmoid ≥ 0.5
instead). Labels are the oracle mask: the top-k neurons by |h_i| for that token
(h = act(gate(x)) · up(x); for ReLU models the top-k of the nonzero ones), the same k.

**Which tensor the predictor sees.** ``lookahead: false``: layer l's predictor takes
the MLP's own input (the post-attention-norm hidden state x_l that the MLP receives).
``lookahead: true``: it takes layer l−1's MLP input x_{l−1} (available one layer early,
so prediction can overlap the previous layer; layer 0 uses its own input). Training
uses exactly that tensor as it is at inference: layers are trained in order and the
layers below already run with their *predicted* masks, so each predictor is fit on
the hidden states the sparse model really produces (the released Deja Vu code trains
on one tensor and, in its HF path, applies the predictor to an earlier one).

Training: weighted BCE, AdamW (weight decay 0.01, lr 5e-3: Deja Vu's 1e-3 assumes 400k
tokens × 20 epochs, we have ~8k tokens and a ``steps`` budget), mini-batches of 1024
tokens, seeded per layer. The class weighting (``loss_weight``):

- ``reference`` (default; **the reference**, FMInference/DejaVu
  sparse_predictor/trainer_mlp.py, ``train``): per mini-batch, p = the fraction of
  positive labels in the batch (tokens × neurons) and w = p + 0.005; positives weigh 1
  and negatives w (``loss_weight = y·(1 − w) + w``), mean over the batch's elements.
  Positives : negatives = 1/(p + 0.005) : 1, ≈ 1.98 : 1 at p = 0.5 (s = 0.5). (Deja Vu's
  labels are the natural ReLU activity of OPT, y > 0; ours are the top-k oracle below,
  so p = 1 − s here, minus exact zeros for ReLU models.)
- ``balanced`` (ours, the earlier default): ``pos_weight`` = (1 − p)/p with p the
  positive rate over all training tokens: positives : negatives = (1 − p)/p : 1, which
  is 1 (plain BCE) at p = 0.5 and close to the reference only for small p.
``oracle: true`` uses the oracle masks themselves (the upper bound the predictor is
compared with); the ``mask_quality`` evaluator reports per-layer recall / precision /
F1 of the predicted masks against the oracle on held-out text.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from . import SPARSIFIERS
from .base import Sparsifier, calibrate_layerwise
from ..core.device import model_device
from .base import topk_mask


def oracle_topk(h: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` neurons with the largest |h| per token (never a neuron with h = 0)."""
    return topk_mask(h.abs(), keep) & (h != 0)


@SPARSIFIERS.register("dejavu")
class DejaVu(Sparsifier):
    calibration_params = ("sparsity", "rank", "lookahead", "steps", "lr", "loss_weight")
    calibration_version = 2  # 2: loss_weight (reference weighting by default)
    SELECTIONS = ("topk", "threshold")
    LOSS_WEIGHTS = ("reference", "balanced")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.A: torch.Tensor | None = None  # [layers, r, d]
        self.B: torch.Tensor | None = None  # [layers, d_ff, r]
        self._prev_x: torch.Tensor | None = None
        self._queued: list[torch.Tensor] = []
        # per-call switches read once (a DictConfig lookup per decode step and layer adds up)
        self._lookahead, self._oracle = bool(cfg.get("lookahead", False)), bool(cfg.get("oracle", False))
        self._by_threshold = cfg.get("selection", "topk") == "threshold"

    @property
    def needs_calibration(self) -> bool:
        return not self.cfg.get("oracle", False)

    def validate(self):
        super().validate()
        r = self.cfg.get("rank", 0.1)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ConfigError(f"sparsifier.rank={r} is out of range; it is a fraction of the hidden size in (0, 1], e.g. sparsifier.rank=0.1")
        if self.cfg.get("selection", "topk") not in self.SELECTIONS:
            raise ConfigError(f"sparsifier.selection={self.cfg.selection} is unknown; use one of: {', '.join(self.SELECTIONS)}")
        if self.cfg.get("loss_weight", "reference") not in self.LOSS_WEIGHTS:
            raise ConfigError(f"sparsifier.loss_weight={self.cfg.get('loss_weight')} is unknown; use one of: {', '.join(self.LOSS_WEIGHTS)}")
        e = self.cfg.get("steps", 400)
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ConfigError(f"sparsifier.steps={e} must be a positive integer")

    def keep(self, d_ff: int) -> int:
        return int(round((1.0 - self.sparsity) * d_ff))

    # ---------------------------------------------------------------- training
    def calibrate(self, controller, model, batches):
        sites = controller.sites
        d, d_ff = sites[0].up.in_features, sites[0].intermediate_size
        r = max(1, int(round(float(self.cfg.get("rank", 0.1)) * d)))
        L = len(sites)
        device = model_device(model)
        self.A, self.B = torch.zeros(L, r, d, device=device), torch.zeros(L, d_ff, r, device=device)
        # per-layer training statistics, written as Python floats: CPU bookkeeping
        report = {k: torch.zeros(L, device="cpu") for k in ("train_recall", "train_precision", "positive_rate")}
        prev = None  # layer l−1's MLP inputs per batch (look-ahead source)
        keep = self.keep(d_ff)

        def rows(inp):
            x = inp.x.detach().reshape(-1, inp.x.shape[-1]).float()
            return x, oracle_topk(inp.h.detach().reshape(-1, d_ff), keep)

        def fit(i, values):
            nonlocal prev
            xs = [x for x, _ in values]
            src = prev if (self.cfg.get("lookahead", False) and i > 0) else xs
            X, Y = torch.cat(src), torch.cat([y for _, y in values])
            A, B, stats = train_predictor(X, Y, r, steps=int(self.cfg.get("steps", 400)),
                                          lr=float(self.cfg.get("lr", 5e-3)), seed=i,
                                          loss_weight=self.cfg.get("loss_weight", "reference"))
            self.A[i], self.B[i] = A, B
            for k, v in stats.items():
                report[k][i] = v
            # the layer's masks for the pass that advances the hidden states (calibration
            # runs one layer at a time, so look-ahead inputs are handed over explicitly)
            self._queued = [self._select(self._scores(i, s), d_ff) for s in src]
            prev = xs

        calibrate_layerwise(controller, model, batches, rows, fit)
        self._queued = []
        return {"A": self.A.clone(), "B": self.B.clone(), **report}

    def load_state(self, state):
        self.A, self.B = state["A"], state["B"]
        self.report = {k: state[k] for k in ("train_recall", "train_precision", "positive_rate") if k in state}

    # ---------------------------------------------------------------- inference
    def _scores(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """B(A x) in the activation dtype, as the reference runs its predictor (trained in
        float32; its reads are counted at the model's element size)."""
        A, B = self.A[i].to(x.dtype), self.B[i].to(x.dtype)
        return (x @ A.T) @ B.T

    def _select(self, scores: torch.Tensor, d_ff: int) -> torch.Tensor:
        if self._by_threshold:
            return scores > 0  # sigmoid(s) ≥ 0.5
        return topk_mask(scores, self.keep(d_ff))

    def oracle_mask(self, inp) -> torch.Tensor:
        return oracle_topk(inp.h, self.keep(inp.site.intermediate_size))

    def mask(self, inp):
        if self._queued:  # calibration: the pass that advances layer l's hidden states
            m = self._queued.pop(0)
            return m.reshape(*inp.x.shape[:-1], -1)
        src = inp.x
        if self._lookahead and inp.layer_idx > 0 and self._prev_x is not None \
                and self._prev_x.shape == inp.x.shape:
            src = self._prev_x
        self._prev_x = inp.x
        if self.sparsity == 0.0:
            return None
        if self._oracle:
            return self.oracle_mask(inp)
        return self._select(self._scores(inp.layer_idx, src), inp.site.intermediate_size)

    def describe(self):
        return {f"dejavu/{k}": v.tolist() for k, v in getattr(self, "report", {}).items()}


def predictor_loss(logits: torch.Tensor, y: torch.Tensor, loss_weight: str = "reference",
                   p: float | None = None) -> torch.Tensor:
    """Weighted BCE of predictor logits against float 0/1 labels ``y`` (one mini-batch).

    ``reference`` (Deja Vu, sparse_predictor/trainer_mlp.py): w = mean(y) + 0.005 of this
    batch; element weight 1 for positives, w for negatives; mean over elements.
    ``balanced``: ``pos_weight`` = (1 − p)/p, p the positive rate of the whole training
    set (passed in; this batch's if None)."""
    if loss_weight == "reference":
        w = y.mean() + 0.005
        return F.binary_cross_entropy_with_logits(logits, y, weight=y * (1 - w) + w)
    if p is None:
        p = float(y.mean())
    p = min(max(p, 1e-4), 1 - 1e-4)
    return F.binary_cross_entropy_with_logits(logits, y, pos_weight=torch.tensor((1 - p) / p, device=logits.device))


def train_predictor(X: torch.Tensor, Y: torch.Tensor, rank: int, steps: int, lr: float, seed: int,
                    batch_size: int = 1024, loss_weight: str = "reference", loss=None):
    """Fit P(x) = B(A x) to boolean labels Y with weighted BCE (``predictor_loss``, or
    ``loss(logits, y)`` when given: the head predictor's attention-trainer weighting);
    returns A, B (float32, on X's device), stats. Trains in float32 on X's device; the
    seeded draws (initialisation, shuffles) come from a CPU generator and are moved, so
    they are the same numbers on every device."""
    gen = torch.Generator().manual_seed(seed)
    X, dev = X.float(), X.device
    d, d_ff = X.shape[1], Y.shape[1]
    A = (torch.randn(rank, d, generator=gen, device="cpu").to(dev) / d ** 0.5).requires_grad_()
    B = (torch.randn(d_ff, rank, generator=gen, device="cpu").to(dev) / rank ** 0.5).requires_grad_()
    Y = Y.to(dev)
    Yf = Y.float()
    p = float(Yf.mean().clamp(1e-4, 1 - 1e-4))
    opt = torch.optim.AdamW([A, B], lr=lr, weight_decay=0.01)
    done = 0
    with torch.enable_grad():
        while done < steps:  # epochs over shuffled tokens until the step budget is spent
            for idx in torch.randperm(X.shape[0], generator=gen, device="cpu").to(dev).split(batch_size):
                logits = (X[idx] @ A.T) @ B.T
                value = predictor_loss(logits, Yf[idx], loss_weight, p) if loss is None else loss(logits, Yf[idx])
                opt.zero_grad()
                value.backward()
                opt.step()
                done += 1
                if done >= steps:
                    break
    A, B = A.detach(), B.detach()
    with torch.no_grad():
        keep = int(Y.sum(1).float().mean().round())
        pred = topk_mask((X @ A.T) @ B.T, keep)
        tp = float((pred & Y).sum())
        stats = {"train_recall": tp / max(float(Y.sum()), 1), "train_precision": tp / max(float(pred.sum()), 1),
                 "positive_rate": p}
    return A, B, stats
