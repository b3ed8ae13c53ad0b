"""Perplexity on held-out text: exp(mean token NLL) over non-overlapping windows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.corpus import heldout_windows
from . import EVALUATORS
from .base import EvalResult, Evaluator


@EVALUATORS.register("perplexity")
class Perplexity(Evaluator):
    @torch.no_grad()
    def evaluate(self, ctx):
        windows = heldout_windows(ctx.tokenizer, ctx.splits, int(self.cfg.num_windows), int(self.cfg.seq_len))
        nll, count = 0.0, 0
        for batch in windows.split(int(self.cfg.batch_size)):
            logits = ctx.model(input_ids=batch).logits[:, :-1].float()
            target = batch[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
            count += target.numel()
        return EvalResult(metrics={"perplexity": math.exp(nll / count), "perplexity/tokens": count})
