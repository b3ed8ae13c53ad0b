"""R-Sparse (Zhang et al., ICLR 2025, "R-Sparse: Rank-Aware Activation Sparsity for
Efficient LLM Inference").

Every linear y = W x of the block (q, k, v, o, gate, up, down) is replaced by

    y = W (x ⊙ m) + U_r S_r V_rᵀ (x ⊙ (1 − m))

with W = U S Vᵀ the SVD of the raw weight (offline) and m keeping channels whose score
exceeds a static per-linear threshold. The sparse channels and the low-rank term
share one budget per linear, the cost of the dense layer times (1 − s):

    kept channels c = (1 − s)·α·d_in,   rank r = ⌊((1 − s)·d_in·d_out − c·d_out) / (d_in + d_out)⌋

so α (the "sparse ratio") splits the budget between channels (α = 1: pure activation
sparsity) and rank (α = 0: pure low rank). The threshold is the (1 − (1−s)·α)
quantile of the score over calibration tokens and channels.

The score (``criterion``):

- ``reference`` (default; **the reference**, VITA-Group/R-Sparse): it depends on α.
  α = 1 runs the layer in the reference's ``sparse`` mode, which thresholds |x_i|
  alone (no low-rank term); 0 < α < 1 runs ``r_sparse`` mode, which thresholds
  |x_i|·‖W[:, i]‖₂ (the ``scale`` buffer: row norms of V·S, i.e. the column norms of
  W); α = 0 runs ``low_rank`` mode: no channel goes through W, all of x through the
  rank-r term. (utils/setup.py ``set_threshold_r_sparse`` picks the mode from α;
  models/modeling_llama.py ``R_Sparse_Linear._getting_threshold`` / ``forward`` score
  |x| when ``sparse_ratio == 1`` and |x·scale| otherwise.)
- ``weighted`` (ours, the earlier default): |x_i|·‖W[:, i]‖₂ at every α, so α = 1 is a
  static-threshold WINA rather than R-Sparse's plain magnitude threshold.

Other deviations from the reference: thresholds are exact quantiles over our
calibration tokens (the reference takes one 512-token WikiText-2 sample on the dense
model); the reference evaluates with ``prefill_ratio`` = 0.1, i.e. the first 90% of
each prompt dense and only the last 10% sparse, where this project applies its
prefill policy (``prefill.policy``) to every method alike.

Search: one α for every linear, chosen on a grid (``alphas``) by perplexity on a
validation part of the calibration text (the paper runs an evolutionary search over
per-linear α; a shared α is the simple search). The quantile tables used in the
search come from the dense model; the final thresholds are calibrated layer by layer
with the layers below sparse, at the chosen α, and refitted three times inside each
block on the inputs the sparse block gives o, gate/up and down (q/k/v → o → gate/up →
down), so held-out sparsity matches the request (fitting on the dense block
overshoots it at high sparsity).

Sparsity is counted in the budget's unit: the fraction of the linears' weights *not*
read per token, (dropped channels·d_out − r·(d_in + d_out)) / (d_in·d_out), weighted by
parameter count; by construction it equals s when the measured channel sparsity
matches the calibration.
"""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from ..core.errors import ConfigError
from . import SPARSIFIERS
from .base import BLOCK_INPUT_STAGES, Sparsifier, calibrate_layerwise, calibration_perplexity, capture_layer_inputs, dense_linear_inputs
from .teal import interp_threshold, quantile_table
from .wina import PROJECTIONS


def split_budget(d_in: int, d_out: int, sparsity: float, alpha: float) -> tuple[int, int]:
    """(kept channels, rank) for one linear at budget (1−s)·d_in·d_out and sparse ratio α."""
    channels = int((1.0 - sparsity) * alpha * d_in)
    rank = int(((1.0 - sparsity) * d_in * d_out - channels * d_out) / (d_in + d_out))
    return channels, max(0, min(rank, min(d_in, d_out)))


@SPARSIFIERS.register("rsparse")
class RSparse(Sparsifier):
    needs_calibration = True
    calibration_params = ("sparsity", "alphas", "criterion")
    input_projections = PROJECTIONS
    sparsity_unit = "linear_inputs"
    # 2: final thresholds fitted on the sparse block's own inputs; 3: ``criterion``
    # (reference: |x| alone at α = 1)
    calibration_version = 3
    CRITERIA = ("reference", "weighted")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.alpha: float | None = None
        self.thresholds: dict[tuple[int, str], float] = {}
        self.factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._norms: dict[tuple[int, str], torch.Tensor] = {}
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # factors in an activation dtype
        self._sites = []

    def validate(self):
        super().validate()
        raw = self.cfg.get("alphas", [1.0])
        alphas = list(raw) if OmegaConf.is_list(raw) or isinstance(raw, (list, tuple)) else [raw]
        if not OmegaConf.is_list(raw) and not isinstance(raw, (list, tuple)) or not alphas or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in alphas):
            raise ConfigError(f"sparsifier.alphas={raw} must be a non-empty list of numbers in [0, 1], "
                              "e.g. sparsifier.alphas=[0.8,0.9,1.0]")
        if self.cfg.get("criterion", "reference") not in self.CRITERIA:
            raise ConfigError(f"sparsifier.criterion={self.cfg.get('criterion')} is unknown; use one of: {', '.join(self.CRITERIA)}")

    def weighted(self, alpha: float) -> bool:
        """Whether the channel score at sparse ratio ``alpha`` is |x|·‖W[:, i]‖ (else |x|)."""
        return self.cfg.get("criterion", "reference") == "weighted" or alpha < 1.0

    def attach(self, controller, model):
        self._sites = controller.sites
        self._norms, self.factors, self._cast = {}, {}, {}

    # ------------------------------------------------------------ budget and factors
    def _linear(self, layer: int, proj: str):
        return self._sites[layer].projection(proj)

    def column_norm(self, layer, proj) -> torch.Tensor:
        key = (layer, proj)
        if key not in self._norms:
            self._norms[key] = self._linear(layer, proj).weight.detach().float().norm(dim=0)
        return self._norms[key]

    def rank(self, layer, proj) -> int:
        lin = self._linear(layer, proj)
        return split_budget(lin.in_features, lin.out_features, self.sparsity, self.alpha)[1]

    def _factors(self, layer, proj):
        """(V_r S_r as [d_in, r], U_rᵀ as [r, d_out]) from the SVD of W (cached)."""
        key = (layer, proj, self.rank(layer, proj))
        if key not in self.factors:
            r = key[2]
            w = self._linear(layer, proj).weight.detach().double()
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            self.factors[key] = ((Vh[:r].T * S[:r]).float(), U[:, :r].T.float().contiguous())
        return self.factors[key]

    def dense_cost(self, layer, proj) -> int:
        """Weights read per token regardless of the mask: the low-rank factors."""
        lin = self._linear(layer, proj)
        return self.rank(layer, proj) * (lin.in_features + lin.out_features)

    # ------------------------------------------------------------ calibration
    def _tables(self, controller, model, batches, sparse_upstream: bool, alphas, thresholds_for=None):
        """Quantile tables of the channel scores per (layer, projection, weighted), for
        each score the sparse ratios ``alphas`` use (|x| and/or |x|·‖W[:, i]‖)."""
        gen = torch.Generator().manual_seed(0)  # CPU: the same subsample on every device
        tables = {}
        kinds = sorted({self.weighted(a) for a in alphas})

        def linear_fn(inp):
            return inp.x.detach().abs().float().reshape(-1, inp.x.shape[-1])

        def fit(i, _values, linear_values, _probe):
            for proj, vals in linear_values.items():
                x = torch.cat(vals)
                for w in kinds:
                    # on the CPU: interp_threshold reads a few entries as Python floats
                    tables[(i, proj, w)] = quantile_table(x * self.column_norm(i, proj) if w else x, gen).cpu()
            if thresholds_for is not None:
                self._set_thresholds(i, tables, thresholds_for)

        if sparse_upstream:
            calibrate_layerwise(controller, model, batches, None, fit, linear_fn=linear_fn,
                                block_refits=BLOCK_INPUT_STAGES - 1)
        else:  # dense model: every layer from its captured dense input
            run_layer, _ = capture_layer_inputs(controller, model, batches)
            for i in range(len(controller.sites)):
                fit(i, None, dense_linear_inputs(controller, run_layer, i, linear_fn), None)
        return tables

    def _set_thresholds(self, layer, tables, alpha):
        self.alpha = alpha
        w = self.weighted(alpha)
        for (i, proj, kind), table in tables.items():
            if i == layer and kind == w:
                self.thresholds[(i, proj)] = interp_threshold(table, 1.0 - (1.0 - self.sparsity) * alpha)

    def calibrate(self, controller, model, batches):
        from tqdm.auto import tqdm

        self.attach(controller, model)
        batches = list(batches)
        alphas = sorted({float(a) for a in self.cfg.get("alphas", [1.0])})
        search = {}
        if len(alphas) > 1:
            if len(batches) < 2:
                raise ConfigError("the R-Sparse α search needs ≥ 2 calibration batches (data.calibration.num_sequences ≥ 2·batch_size)")
            cut = max(1, (3 * len(batches)) // 4)
            fit_b, val_b = batches[:cut], batches[cut:]
            tables = self._tables(controller, model, fit_b, sparse_upstream=False, alphas=alphas)
            for alpha in tqdm(alphas, desc="R-Sparse α search", leave=False):
                for layer in range(len(controller.sites)):
                    self._set_thresholds(layer, tables, alpha)
                search[alpha] = calibration_perplexity(model, val_b)
            best = min(search, key=search.get)
        else:
            best = alphas[0]
        self.alpha = best
        self._tables(controller, model, batches, sparse_upstream=True, alphas=[best], thresholds_for=best)
        keys = sorted(self.thresholds)
        cpu = "cpu"  # the state holds Python numbers (read back as such by load_state)
        return {"alpha": torch.tensor(best, device=cpu),
                "threshold": torch.tensor([self.thresholds[k] for k in keys], device=cpu),
                "threshold_layer": torch.tensor([k[0] for k in keys], device=cpu),
                "threshold_proj": torch.tensor([PROJECTIONS.index(k[1]) for k in keys], device=cpu),
                "search_alpha": torch.tensor(list(search), device=cpu),
                "search_ppl": torch.tensor(list(search.values()), device=cpu)}

    def load_state(self, state):
        self.alpha = float(state["alpha"])
        self.thresholds = {(int(layer), PROJECTIONS[int(p)]): float(t) for layer, p, t in
                           zip(state["threshold_layer"].tolist(), state["threshold_proj"].tolist(),
                               state["threshold"].tolist())}
        self.search = dict(zip(state["search_alpha"].tolist(), state["search_ppl"].tolist()))
        self.factors, self._cast = {}, {}

    # ------------------------------------------------------------ inference
    def channel_score(self, inp) -> torch.Tensor:
        """|x| (reference criterion at α = 1) or |x|·‖W[:, i]‖ (α < 1, or ``weighted``)."""
        if self.weighted(self.alpha):
            return inp.x.abs() * self.column_norm(inp.layer_idx, inp.proj).to(inp.x.dtype)
        return inp.x.abs()

    def input_mask(self, inp):
        if self.sparsity == 0.0:
            return None
        if self.alpha == 0.0:  # pure low rank (the reference's ``low_rank`` mode): no channel kept
            return torch.zeros_like(inp.x, dtype=torch.bool)
        return self.channel_score(inp) > self.thresholds[(inp.layer_idx, inp.proj)]

    def masked_linear(self, inp, linear, mask, backend):
        x = inp.x
        y = backend.linear(inp, linear, mask)
        if self.rank(inp.layer_idx, inp.proj) > 0:
            vs, ut = self._factors_as(inp.layer_idx, inp.proj, x)
            y = y + ((x * (~mask).to(x.dtype)) @ vs) @ ut
        return y

    def _factors_as(self, layer, proj, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors (``_factors``, float32) in ``like``'s dtype and device, cast once per
        (linear, rank, dtype, device) rather than on every call."""
        key = (layer, proj, self.rank(layer, proj), like.dtype, like.device)
        hit = self._cast.get(key)
        if hit is None:
            vs, ut = self._factors(layer, proj)
            hit = self._cast[key] = (vs.to(device=like.device, dtype=like.dtype),
                                     ut.to(device=like.device, dtype=like.dtype))
        return hit

    def summary(self):
        out = {"alpha": self.alpha}
        if getattr(self, "search", None):
            out["alpha_search_ppl"] = {f"{a:g}": p for a, p in self.search.items()}
        return out
