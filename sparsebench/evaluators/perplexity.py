"""Perplexity on held-out text: exp(mean token NLL) over non-overlapping windows.

Windows are drawn evenly from every source of every held-out corpus (see
``sparsebench.data.corpus``); each starts with the tokenizer's own special prefix (BOS
where it adds one), which is context only, never scored. ``perplexity`` is the primary
held-out corpus (the data config's works); each extra corpus adds ``perplexity/<name>``.
The NLL of every window is kept as an item, so a sparse run and its dense baseline can
be compared window by window (paired CI of the log-perplexity ratio).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.corpus import heldout_windows
from ..core.device import model_device
from . import EVALUATORS
from .base import EvalResult, Evaluator


@torch.no_grad()
def window_nll(model, windows, batch_size: int) -> list[float]:
    """Summed NLL of the scored tokens of each window (float32 whatever the model's dtype;
    the windows come on the CPU and go to the model's device)."""
    c = windows.context
    device = model_device(model)
    out: list[float] = []
    for batch in windows.ids.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, c - 1 : -1].float()
        target = batch[:, c:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        out += nll.view(target.shape).sum(1).tolist()
    return out


@EVALUATORS.register("perplexity")
class Perplexity(Evaluator):
    def evaluate(self, ctx):
        metrics, items, tokens = {}, {}, {}
        for corpus in ctx.splits.heldout_corpora():
            windows = heldout_windows(ctx.tokenizer, ctx.splits, int(self.cfg.num_windows), int(self.cfg.seq_len), corpus)
            nll = window_nll(ctx.model, windows, int(self.cfg.batch_size))
            key = "perplexity" if corpus == ctx.splits.name else f"perplexity/{corpus}"
            count = windows.scored_per_window * len(nll)
            metrics[key] = math.exp(sum(nll) / count)
            metrics[f"{key}/tokens" if key != "perplexity" else "perplexity/tokens"] = count
            items[key] = {"nll": nll, "tokens": [windows.scored_per_window] * len(nll), "source": windows.sources}
            tokens[corpus] = windows.tokens_per_source()
        return EvalResult(metrics=metrics, items=items, info={"heldout_tokens": tokens})
