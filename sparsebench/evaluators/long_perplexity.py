"""Long-window perplexity, dense attention vs the run's attention method, window by window.

Windows of each ``seq_lens`` length are drawn evenly from every source of every held-out
corpus (as ``perplexity`` draws them, the tokenizer's prefix included and never scored).
Each window is scored twice in one process: with dense attention and with the method
applying its decode-time rule at every position (``prefill: sparse`` for the duration:
each query selects from the keys up to itself only, as a token-by-token decode would), so
the perplexity measures what decoding that text would see. The MLP sparsifier of the run
is active in both. Per length and corpus: both perplexities, the paired ratio with its 95%
CI over windows, and the fraction of K/V rows read.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..attention._runtime import _writable, attached_attention
from ..data.corpus import heldout_windows
from ..core.errors import ConfigError
from ..core.stats import paired_perplexity
from ..core.device import model_device
from . import EVALUATORS
from .base import EvalResult, Evaluator
from .passkey import max_context


@torch.no_grad()
def window_nll(model, windows, batch_size: int, chunk: int = 512) -> list[float]:
    """Summed NLL of the scored tokens of each window; the LM head runs on ``chunk``
    positions at a time (4k positions of Gemma's 262k-entry vocabulary would be 4 GB). The
    windows (CPU) go to the model's device; logits are float32, sums float64."""
    c = windows.context
    device = model_device(model)
    head = model.get_output_embeddings()
    text_cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    softcap = getattr(text_cfg, "final_logit_softcapping", None)
    out: list[float] = []
    for batch in windows.ids.split(batch_size):
        batch = batch.to(device)
        hidden = model.get_decoder()(input_ids=batch).last_hidden_state[:, c - 1:-1]
        target = batch[:, c:]
        total = torch.zeros(batch.shape[0], dtype=torch.float64, device=hidden.device)
        for i in range(0, hidden.shape[1], chunk):
            logits = head(hidden[:, i:i + chunk]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            nll = F.cross_entropy(logits.flatten(0, 1), target[:, i:i + chunk].flatten(), reduction="none")
            total += nll.view(batch.shape[0], -1).sum(1).double()
        out += total.tolist()
    return out


@contextlib.contextmanager
def every_position_sparse(session):
    cfg = session.method.cfg
    old = cfg.get("prefill", "dense")
    with _writable(cfg):
        cfg.prefill = "sparse"
    try:
        yield
    finally:
        with _writable(cfg):
            cfg.prefill = old


@EVALUATORS.register("long_perplexity")
class LongPerplexity(Evaluator):
    applies_attention = True  # installs cfg.attention itself (sparsebench.attention._runtime)
    compare_dense = False  # dense attention on the same windows is computed inside

    def evaluate(self, ctx):
        limit = max_context(ctx.model)
        lengths = [int(n) for n in self.cfg.seq_lens if int(n) <= limit]
        if not lengths:
            raise ConfigError(f"evaluator.long_perplexity.seq_lens={list(self.cfg.seq_lens)} all exceed the "
                              f"model's context window ({limit} tokens)")
        metrics, items, paired, tokens = {}, {}, {}, {}
        with attached_attention(ctx) as session:
            for n in lengths:
                for corpus in ctx.splits.heldout_corpora():
                    windows = heldout_windows(ctx.tokenizer, ctx.splits, int(self.cfg.num_windows), n, corpus)
                    key = f"long_perplexity/{corpus}/len={n}"
                    count = windows.scored_per_window * windows.ids.shape[0]
                    tokens[f"{corpus}/len={n}"] = windows.tokens_per_source()
                    if session is None:
                        nll = window_nll(ctx.model, windows, int(self.cfg.batch_size))
                        metrics[f"{key}/dense"] = math.exp(sum(nll) / count)
                        items[f"{key}/dense"] = nll
                        continue
                    with session.dense():
                        dense = window_nll(ctx.model, windows, int(self.cfg.batch_size))
                    session.reset_stats()
                    with every_position_sparse(session):
                        sparse = window_nll(ctx.model, windows, int(self.cfg.batch_size))
                    metrics[f"{key}/dense"] = math.exp(sum(dense) / count)
                    metrics[key] = math.exp(sum(sparse) / count)
                    attended = sum(s.keys_attended for s in session.stats)
                    allowed = sum(s.keys_allowed for s in session.stats)
                    metrics[f"{key}/kv_read_fraction"] = attended / allowed if allowed else 1.0
                    items[f"{key}/dense"], items[key] = dense, sparse
                    paired[key] = paired_perplexity(dense, sparse, [windows.scored_per_window] * len(dense))
            summary = session.method.summary() if session is not None else {}
        return EvalResult(metrics=metrics, items=items,
                          info={"long_perplexity": {"tokens": tokens, "paired_vs_dense": paired,
                                                    "attention": summary, "positions": "every position sparse"}})
