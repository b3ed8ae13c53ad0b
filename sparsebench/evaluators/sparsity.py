"""Per-layer sparsity on held-out text.

``sparsity/mean`` is measured in the unit the method's ``sparsity`` parameter targets
(``Sparsifier.sparsity_unit``), so requested and achieved values are comparable:

- ``mlp_neurons``: the fraction of intermediate neurons that are zeroed (dropped by the
  mask, or exactly zero after the activation);
- ``linear_inputs``: the fraction of input channels dropped over the masked linears,
  weighted by each linear's parameter count (TEAL's "effective sparsity"), minus the
  weights read regardless of the mask (R-Sparse's low-rank factors).

Both are reported when they differ, plus one column per masked projection.
"""
from __future__ import annotations

import torch

from ..data.corpus import heldout_windows
from ..core.device import model_device
from . import EVALUATORS
from .base import EvalResult, Evaluator


def linear_input_sparsity(controller) -> tuple[dict[str, list[float]], list[float], float]:
    """From ``controller.linear_stats``: per-projection per-layer sparsity, the
    parameter-weighted per-layer sparsity, and the weighted overall value."""
    sites = {s.layer_idx: s for s in controller.sites}
    per_proj: dict[str, list[float]] = {}
    num = {i: 0.0 for i in sites}
    den = {i: 0.0 for i in sites}
    for (layer, proj), st in sorted(controller.linear_stats.items()):
        lin = sites[layer].projection(proj)
        params = lin.in_features * lin.out_features
        per_proj.setdefault(proj, [0.0] * len(sites))[layer] = st.sparsity
        # weights read whatever the mask (R-Sparse's low-rank factors) count against it
        num[layer] += params * st.sparsity - controller.sparsifier.dense_cost(layer, proj)
        den[layer] += params
    per_layer = [num[i] / den[i] if den[i] else 0.0 for i in sorted(sites)]
    overall = sum(num.values()) / max(sum(den.values()), 1e-12)
    return per_proj, per_layer, overall


@EVALUATORS.register("sparsity")
class Sparsity(Evaluator):
    @torch.no_grad()
    def evaluate(self, ctx):
        windows = heldout_windows(ctx.tokenizer, ctx.splits, int(self.cfg.num_windows), int(self.cfg.seq_len)).ids
        device = model_device(ctx.model)  # held-out windows come on the CPU
        with ctx.controller.counting() as stats:
            for batch in windows.split(int(self.cfg.batch_size)):
                ctx.model(input_ids=batch.to(device), logits_to_keep=1)  # the MLPs are what we count
        layers = sorted(stats)
        neuron_layer = [stats[i].sparsity for i in layers]
        neuron_mean = sum(stats[i].zeroed for i in layers) / sum(stats[i].neurons for i in layers)
        metrics = {"sparsity/tokens": stats[layers[0]].tokens}
        per_layer = {}
        unit = getattr(ctx.controller.sparsifier, "sparsity_unit", "mlp_neurons")
        if unit == "linear_inputs" and ctx.controller.linear_stats:
            per_proj, headline_layer, headline = linear_input_sparsity(ctx.controller)
            per_layer.update({f"sparsity/{p}": v for p, v in per_proj.items()})
            if "down" in per_proj:  # the down projection's input *is* the MLP neuron vector
                neuron_layer = per_proj["down"]
                neuron_mean = sum(neuron_layer) / len(neuron_layer)
            metrics["sparsity/mlp_neurons"] = neuron_mean
            per_layer["sparsity/mlp_neurons"] = neuron_layer
        else:
            headline_layer, headline = neuron_layer, neuron_mean
        metrics.update({"sparsity/mean": headline, "sparsity/min_layer": min(headline_layer),
                        "sparsity/max_layer": max(headline_layer)})
        per_layer["sparsity"] = headline_layer
        return EvalResult(metrics=metrics, per_layer=per_layer)
