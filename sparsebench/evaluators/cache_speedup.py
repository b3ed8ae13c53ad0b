"""Cached gather vs naive ``index_select`` on the model's own MLP weights and decode masks.

This is the measurement behind figures 2 and 3 (the seed blog's "MLP speedup vs index
swaps per cache update" and its cached-vs-index_select weight-selection claim), done on
what a deployment would see rather than on random masks:

* **Masks**: greedy KV-cached decoding of ``new_tokens`` tokens after a held-out prompt,
  recording every layer's MLP neuron mask at every step (for linear-input methods the down
  projection's input mask), i.e. exactly the sequence a cached backend receives.
* **Per layer, over that sequence** (medians over the steps, all in this run):
  weight selection — naive ``nonzero`` + ``index_select`` of the gate, up and transposed
  down rows into preallocated buffers, vs ``RowCache.update`` copying only the rows of
  neurons that entered; and one MLP step — dense matmuls vs the gathered rows vs the
  cache (update included). Both sparse paths gather all three matrices, as a predictor
  backend (Deja Vu) does when the mask is known before the MLP.
* **Synthetic curve**: on one layer's weights, masks at the run's measured density in which
  a fixed fraction ``c`` of the active set is replaced every step, for each ``c`` in
  ``churns``; the curve the measured points should sit on.

The activation is SiLU for every model: it costs the same as GELU-tanh and does not
change which rows are read. The row cache is the ``cached`` backend's Cython/OpenMP kernel
on host memory, so the evaluator runs on the CPU only (``device=cpu``).
"""
from __future__ import annotations

import statistics

import torch

from ..backends.bench import mask_sequence, time_layer
from ..data.corpus import heldout_windows
from ..core.errors import ConfigError
from ..core.device import model_device, refuse_cuda
from . import EVALUATORS
from .base import EvalResult, Evaluator
from .decode import greedy_decode


def record_decode_masks(ctx, prompt: torch.Tensor, new_tokens: int) -> dict[int, list[torch.Tensor]]:
    """Per layer, the MLP neuron mask of every decode step (batch row 0), in order."""
    ctl = ctx.controller
    per_layer: dict[int, list[torch.Tensor]] = {}
    observers = (ctl.mask_observer, ctl.linear_mask_observer)

    def keep(layer, mask):
        per_layer.setdefault(layer, []).append(mask.reshape(-1, mask.shape[-1])[-1].clone())

    def on_mlp(inp, mask):
        if mask is not None:
            keep(inp.layer_idx, mask)

    def on_linear(inp, mask):
        if mask is not None and inp.proj == "down":
            keep(inp.layer_idx, mask)

    ctl.mask_observer, ctl.linear_mask_observer = on_mlp, on_linear
    try:
        greedy_decode(ctx.model, prompt, new_tokens)
    finally:
        ctl.mask_observer, ctl.linear_mask_observer = observers
    # drop the prefill's masks: only single-token decode steps reach a row cache
    return {layer: masks[-(new_tokens - 1):] for layer, masks in per_layer.items()}


@EVALUATORS.register("cache_speedup")
class CacheSpeedup(Evaluator):
    compare_dense = False  # needs masks
    timing = True
    device_types = ("cpu",)  # the cached backend's row cache (Cython/OpenMP on host memory)

    @torch.no_grad()
    def evaluate(self, ctx):
        from ..backends.weights import mlp_weights

        cfg, ctl = self.cfg, ctx.controller
        refuse_cuda(model_device(ctx.model), "evaluator cache_speedup (the cached backend's row cache)")
        threads = int(cfg.threads)
        torch.set_num_threads(threads)
        prompt = heldout_windows(ctx.tokenizer, ctx.splits, 1, int(cfg.prompt_tokens)).ids
        masks = record_decode_masks(ctx, prompt, int(cfg.new_tokens))
        if not masks:
            raise ConfigError(f"sparsifier={ctl.sparsifier.name} produced no MLP neuron masks; cache_speedup needs one")
        layers = sorted(masks)
        weights = {}
        per_layer: dict[str, list[float]] = {}
        for layer in layers:
            w = mlp_weights(ctl.sites[layer], weights)
            if w.kind != "gated":
                raise ConfigError("cache_speedup times gated MLPs (gate, up, down); this model's MLP is not gated")
            seq = masks[layer]
            entered = [float((b & ~a).sum()) for a, b in zip(seq[:-1], seq[1:])]
            active = [float(m.sum()) for m in seq[1:]]
            row = time_layer(w.gate, w.up, w.down_t, seq, threads)
            row |= {"swaps_per_update": statistics.mean(entered), "active": statistics.mean(active),
                    "churn": sum(entered) / max(sum(active), 1.0)}
            for key, value in row.items():
                per_layer.setdefault(key, []).append(value)

        def total(key):
            return sum(per_layer[key])

        n = len(layers)
        width = ctl.sites[layers[0]].intermediate_size
        density = total("active") / n / width
        metrics = {
            "cache/layers": n, "cache/threads": threads, "cache/timed_updates": len(masks[layers[0]]) - 1,
            "cache/density": density, "cache/swaps_per_update": total("swaps_per_update") / n,
            "cache/churn": total("swaps_per_update") / max(total("active"), 1.0),
            "cache/naive_select_ms": total("naive_select_ms"), "cache/cached_select_ms": total("cached_select_ms"),
            "cache/select_speedup": total("naive_select_ms") / total("cached_select_ms"),
            "cache/copy_bound_limit": total("active") / max(total("swaps_per_update"), 1e-9),
            "cache/dense_step_ms": total("dense_step_ms"), "cache/index_select_step_ms": total("index_select_step_ms"),
            "cache/cached_step_ms": total("cached_step_ms"),
            "cache/mlp_speedup_cached": total("dense_step_ms") / total("cached_step_ms"),
            "cache/mlp_speedup_index_select": total("dense_step_ms") / total("index_select_step_ms"),
        }
        # the synthetic curve on one layer, at this run's density
        grid_layer = layers[len(layers) // 2] if cfg.get("grid_layer") is None else int(cfg.grid_layer)
        w = mlp_weights(ctl.sites[grid_layer], weights)
        steps = int(cfg.grid_steps)
        for c in cfg.churns:
            seq = mask_sequence(width, density, float(c), steps, seed=int(1e4 * float(c)))
            row = time_layer(w.gate, w.up, w.down_t, seq, threads)
            tag = f"cache/grid/churn={float(c):g}"
            metrics |= {f"{tag}/swaps_per_update": row["rows_copied_per_step"],
                        f"{tag}/select_speedup": row["naive_select_ms"] / row["cached_select_ms"],
                        f"{tag}/mlp_speedup_cached": row["dense_step_ms"] / row["cached_step_ms"],
                        f"{tag}/mlp_speedup_index_select": row["dense_step_ms"] / row["index_select_step_ms"]}
        metrics["cache/grid_layer"] = grid_layer
        if n != len(ctl.sites):  # per-layer rows must cover every layer; pad the unmasked ones
            per_layer = {k: [v[layers.index(i)] if i in layers else float("nan") for i in range(len(ctl.sites))]
                         for k, v in per_layer.items()}
        return EvalResult(metrics=metrics, per_layer={f"cache/{k}": v for k, v in per_layer.items()})
