"""Per-layer latency inside a real forward: each decoder layer's MLP and attention.

Forward hooks around every layer's attention module and its (patched) MLP time each
call during greedy KV-cached decoding of ``new_tokens`` tokens after a prompt; the
per-layer value is the median over decode steps (the prefill forward is excluded).
Reported per layer (``latency/mlp_ms``, ``latency/attn_ms`` against the ``layer`` axis
in results.json and W&B) and summed over layers. Run with ``threads`` set: timings on a
shared machine are noisy, medians make them comparable within one run. On CUDA each hook
synchronizes the device before reading the clock, so a module's time is its kernels' time.
"""
from __future__ import annotations

import statistics

import torch

from ..data.corpus import heldout_windows
from ..core.device import model_device, timer as device_clock
from . import EVALUATORS
from .base import EvalResult, Evaluator
from .decode import greedy_decode


class _Timer:
    def __init__(self, device=None):
        self.samples: dict[tuple[str, int], list[float]] = {}
        self.active = False
        self.clock = device_clock(device)  # CUDA: synchronizes before reading the clock
        self._start: dict[tuple[str, int], float] = {}

    def hooks(self, module, key):
        def pre(_m, _args):
            if self.active:
                self._start[key] = self.clock()

        def post(_m, _args, _out):
            if self.active and key in self._start:
                self.samples.setdefault(key, []).append(self.clock() - self._start.pop(key))

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


@EVALUATORS.register("layer_latency")
class LayerLatency(Evaluator):
    timing = True
    @torch.no_grad()
    def evaluate(self, ctx):
        ctl = ctx.controller
        device = model_device(ctx.model)
        timer = _Timer(device)
        handles = []
        for site in ctl.sites:
            handles += timer.hooks(site.installed, ("mlp", site.layer_idx))
            handles += timer.hooks(site.layer.self_attn, ("attn", site.layer_idx))
        prompt = heldout_windows(ctx.tokenizer, ctx.splits, 1, int(self.cfg.prompt_tokens)).ids.to(device)
        try:
            greedy_decode(ctx.model, prompt, 4)  # warm-up
            ctl.backend.reset()
            # time decode steps only: the prompt's forward is the first call of each key
            timer.active = True
            greedy_decode(ctx.model, prompt, int(self.cfg.new_tokens))
        finally:
            timer.active = False
            for h in handles:
                h.remove()
        n = len(ctl.sites)
        per_layer = {}
        for part in ("mlp", "attn"):
            per_layer[f"latency/{part}_ms"] = [
                1e3 * statistics.median(timer.samples[(part, i)][1:]) for i in range(n)]
        metrics = {f"latency/{part}_ms_total": sum(per_layer[f"latency/{part}_ms"]) for part in ("mlp", "attn")}
        metrics["latency/mlp_share"] = metrics["latency/mlp_ms_total"] / (
            metrics["latency/mlp_ms_total"] + metrics["latency/attn_ms_total"])
        return EvalResult(metrics=metrics, per_layer=per_layer)
