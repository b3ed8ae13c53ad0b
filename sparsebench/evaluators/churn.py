"""Mask churn on real text: how many neurons enter the active set from one token to the next.

This is what a cached-gather backend pays per token: each neuron that enters is one row
copy per cached matrix (the "index swaps" of the seed blog's neuron-concentration plot).
Masks come from one forward over each held-out window; under the default prefill policy
(``all``) the mask at position t is the one KV-cached decoding computes at step t.

``churn/union_density_batchB``: the density of the union of B sequences' masks at the same
position (B = 1, 2, 4, ... up to ``batch_size``), i.e. what one union mask for a batch costs.

For methods that mask linear inputs (TEAL, WINA, R-Sparse) the down projection's input
mask is the MLP neuron mask and is used; without one the run is refused.
"""
from __future__ import annotations

import torch

from ..data.corpus import heldout_windows
from ..core.errors import ConfigError
from ..core.device import model_device
from . import EVALUATORS
from .base import EvalResult, Evaluator


class ChurnCounter:
    def __init__(self):
        self.tokens: dict[int, int] = {}
        self.entered: dict[int, float] = {}
        self.active: dict[int, float] = {}
        self.width: dict[int, int] = {}
        self.union_sum: dict[tuple[int, int], float] = {}
        self.union_n: dict[tuple[int, int], int] = {}

    def add(self, layer: int, mask: torch.Tensor) -> None:
        m = mask.reshape(-1, mask.shape[-2], mask.shape[-1]) if mask.dim() >= 2 else mask.view(1, 1, -1)
        if m.shape[1] < 2:
            return
        enter = (m[:, 1:] & ~m[:, :-1]).sum(-1)  # [B, T-1] neurons entering at each step
        self.tokens[layer] = self.tokens.get(layer, 0) + enter.numel()
        self.entered[layer] = self.entered.get(layer, 0.0) + float(enter.sum())
        self.active[layer] = self.active.get(layer, 0.0) + float(m[:, 1:].sum())
        self.width[layer] = m.shape[-1]
        # union over the first b sequences at each position: what a batch of b independent
        # sequences shares through one union mask (backend ``union: true``)
        b = 1
        while b <= m.shape[0]:
            u = m[:b].any(0).float().mean()
            key = (layer, b)
            self.union_sum[key] = self.union_sum.get(key, 0.0) + float(u)
            self.union_n[key] = self.union_n.get(key, 0) + 1
            b *= 2


@EVALUATORS.register("churn")
class Churn(Evaluator):
    compare_dense = False  # needs masks

    @torch.no_grad()
    def evaluate(self, ctx):
        ctl = ctx.controller
        counter = ChurnCounter()
        observers = (ctl.mask_observer, ctl.linear_mask_observer)

        def on_mlp(inp, mask):
            if mask is not None:
                counter.add(inp.layer_idx, mask)

        def on_linear(inp, mask):
            if mask is not None and inp.proj == "down":
                counter.add(inp.layer_idx, mask)

        ctl.mask_observer, ctl.linear_mask_observer = on_mlp, on_linear
        try:
            windows = heldout_windows(ctx.tokenizer, ctx.splits, int(self.cfg.num_windows), int(self.cfg.seq_len)).ids
            device = model_device(ctx.model)  # held-out windows come on the CPU
            for batch in windows.split(int(self.cfg.batch_size)):
                ctx.model(input_ids=batch.to(device), logits_to_keep=1)
        finally:
            ctl.mask_observer, ctl.linear_mask_observer = observers
        if not counter.tokens:
            raise ConfigError(f"sparsifier={ctl.sparsifier.name} produced no MLP neuron masks; churn needs one")
        n = len(ctl.sites)
        swaps = [counter.entered.get(i, 0.0) / max(counter.tokens.get(i, 0), 1) for i in range(n)]
        active = [counter.active.get(i, 0.0) / max(counter.tokens.get(i, 0), 1) for i in range(n)]
        frac = [s / a if a else 0.0 for s, a in zip(swaps, active)]
        width = max(counter.width.values())
        union = {}
        for (layer, b), total in counter.union_sum.items():
            union.setdefault(b, []).append(total / counter.union_n[(layer, b)])
        metrics = {f"churn/union_density_batch{b}": sum(v) / len(v) for b, v in sorted(union.items())}
        return EvalResult(
            metrics={"churn/swaps_per_token": sum(swaps) / n, "churn/active_per_token": sum(active) / n,
                     "churn/fraction": sum(swaps) / max(sum(active), 1e-12), "churn/density": sum(active) / n / width,
                     **metrics},
            per_layer={"churn/swaps_per_token": swaps, "churn/active_per_token": active, "churn/fraction": frac},
        )
