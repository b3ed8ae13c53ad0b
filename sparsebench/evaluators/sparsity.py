"""Per-layer MLP sparsity on held-out text: the fraction of intermediate neurons that
are zeroed (dropped by the mask, or exactly zero after the activation)."""
from __future__ import annotations

import torch

from ..data.corpus import heldout_windows
from . import EVALUATORS
from .base import EvalResult, Evaluator


@EVALUATORS.register("sparsity")
class Sparsity(Evaluator):
    @torch.no_grad()
    def evaluate(self, ctx):
        windows = heldout_windows(ctx.tokenizer, ctx.splits, int(self.cfg.num_windows), int(self.cfg.seq_len))
        with ctx.controller.counting() as stats:
            for batch in windows.split(int(self.cfg.batch_size)):
                ctx.model(input_ids=batch, logits_to_keep=1)  # the MLPs are what we count
        layers = sorted(stats)
        per_layer = [stats[i].sparsity for i in layers]
        zeroed = sum(stats[i].zeroed for i in layers)
        neurons = sum(stats[i].neurons for i in layers)
        return EvalResult(
            metrics={"sparsity/mean": zeroed / neurons, "sparsity/min_layer": min(per_layer),
                     "sparsity/max_layer": max(per_layer), "sparsity/tokens": stats[layers[0]].tokens},
            per_layer={"sparsity": per_layer},
        )
