"""Passkey retrieval at long context, dense attention vs the run's attention method.

Items come from ``sparsebench.data.passkey`` (seeded, generated locally). Each prompt is
prefilled once and continued once per variant: dense attention, then the method at each budget
in ``budgets`` (or at its configured budget). With ``batch_variants`` (the default) the
variants are the rows of one batch: the KV cache is repeated per row and each row attends as
its variant with its own copy of the method's per-sequence state
(``AttentionSparsity.per_row``), so a decode step reads the weights once for every variant;
otherwise the cache and state are copied and continued one variant at a time. Every variant
decodes the same question tokens and then ``answer_tokens`` greedy tokens; an item is correct
when the first integer of the answer equals the key. A method that also sparsifies multi-token forwards (``prefill: sparse``)
prefills once per variant instead.

The MLP sparsifier of the run is active in every variant, so the comparison isolates
attention. Per context and budget: accuracy, its paired difference from dense on the same
items (95% bootstrap CI, exact McNemar p), and the fraction of K/V rows the decode steps read.
"""
from __future__ import annotations

import copy

import torch

from ..attention._kv_cache import preallocated_cache
from ..attention._runtime import attached_attention, attention_variant, attention_variants
from ..data.passkey import answer_key, passkey_items
from ..core.errors import ConfigError
from ..core.stats import paired_accuracy
from ..core.device import model_device
from . import EVALUATORS
from .base import EvalResult, Evaluator


def max_context(model) -> int:
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    return int(getattr(cfg, "max_position_embeddings", 2048))


@torch.no_grad()
def continue_greedy(model, cache, decode_ids: torch.Tensor, new_tokens: int, rows: int = 1) -> list[list[int]]:
    """Feed ``decode_ids`` one token at a time to each of the cache's ``rows`` sequences,
    then greedily generate ``new_tokens`` per row (inputs made on the model's device; the
    answers come back as Python ints, one list per row)."""
    device = model_device(model)
    logits = None
    for tok in decode_ids.tolist():
        logits = model(input_ids=torch.full((rows, 1), tok, device=device), past_key_values=cache,
                       use_cache=True).logits
    out = [[] for _ in range(rows)]
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1)
        for r, t in enumerate(nxt.tolist()):
            out[r].append(t)
        logits = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True).logits
    return out


def _haystack(ctx, kind: str) -> str | None:
    if kind == "filler":
        return None
    if kind == "heldout":
        return "\n".join(ctx.splits.heldout_corpora()[ctx.splits.name].values())
    raise ConfigError(f"evaluator.passkey.haystack={kind!r} must be filler or heldout")


def _fraction(attended: int, allowed: int) -> float:
    return attended / allowed if allowed else 1.0


def variant_name(budget) -> str:
    return "dense" if budget == "dense" else ("method" if budget is None else f"budget={budget}")


@EVALUATORS.register("passkey")
class Passkey(Evaluator):
    applies_attention = True  # installs cfg.attention itself (sparsebench.attention._runtime)
    compare_dense = False  # its baseline (dense attention, same items) is computed inside

    @torch.no_grad()
    def evaluate(self, ctx):
        cfg = self.cfg
        limit = max_context(ctx.model)
        contexts = [int(c) for c in cfg.contexts if int(c) <= limit]
        skipped = [int(c) for c in cfg.contexts if int(c) > limit]
        if not contexts:
            raise ConfigError(f"evaluator.passkey.contexts={list(cfg.contexts)} all exceed the model's "
                              f"context window ({limit} tokens)")
        items = passkey_items(ctx.tokenizer, contexts, int(cfg.per_context), int(cfg.seed), int(cfg.question_chars),
                              int(cfg.answer_tokens), _haystack(ctx, str(cfg.haystack)))
        with attached_attention(ctx) as session:
            variants = attention_variants(session, cfg.budgets)
            correct = {v: {c: [] for c in contexts} for v in variants}
            reads = {v: {c: [0, 0] for c in contexts} for v in variants}  # K/V rows attended, allowed
            share_prefill = session is None or session.method.prefill == "dense"
            batched = share_prefill and session is not None and bool(cfg.get("batch_variants", True))
            for item in items:
                continue_variants = self._continue_batched if batched else self._continue_each
                for v, answer, stats in continue_variants(ctx, session, variants, item, share_prefill):
                    correct[v][item.context].append(int(answer_key(ctx.tokenizer.decode(answer)) == item.key))
                    reads[v][item.context][0] += sum(s.keys_attended for s in stats)
                    reads[v][item.context][1] += sum(s.keys_allowed for s in stats)
            summary = session.method.summary() if session is not None else {}
            calib = session.calibration_info if session is not None else None
        return self._result(contexts, skipped, variants, correct, reads, summary, calib)

    def _continue_each(self, ctx, session, variants, item, share_prefill):
        """Each variant continued on its own, one after another. The prefill is shared (copied
        from a snapshot) unless the method also sparsifies it. Yields (variant, answer ids,
        attention statistics of the continuation), each consumed before the next variant runs."""
        device = model_device(ctx.model)  # the items' ids are CPU tensors
        snapshot = None
        for i, v in enumerate(variants):
            if snapshot is None or not share_prefill:
                cache = preallocated_cache(ctx.model)
                if session is not None:
                    session.reset()
                with attention_variant(session, v):
                    ctx.model(input_ids=item.prefill[None].to(device), past_key_values=cache, use_cache=True,
                              logits_to_keep=1)
                if share_prefill and i < len(variants) - 1:
                    snapshot = (copy.deepcopy(cache), session.snapshot() if session else None)
            else:
                cache = copy.deepcopy(snapshot[0]) if i < len(variants) - 1 else snapshot[0]
                session.restore(snapshot[1])
            if session is not None:
                session.reset_stats()
            with attention_variant(session, v):
                answer = continue_greedy(ctx.model, cache, item.decode, int(self.cfg.answer_tokens))[0]
            yield v, answer, (session.stats if session is not None else [])

    def _continue_batched(self, ctx, session, variants, item, share_prefill):
        """One prefill, then every variant continued as one row of a batch: each decode step
        reads the weights once for all variants; each row attends as its variant, with its
        own copy of the prefill's attention state (``AttentionSparsity.per_row``)."""
        device = model_device(ctx.model)
        cache = preallocated_cache(ctx.model)
        session.reset()
        with attention_variant(session, "dense"):
            ctx.model(input_ids=item.prefill[None].to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(len(variants))
        with session.per_row([lambda v=v: attention_variant(session, v) for v in variants], session.snapshot()) as rows:
            answers = continue_greedy(ctx.model, cache, item.decode, int(self.cfg.answer_tokens), rows=len(variants))
        for v, row, answer in zip(variants, rows, answers):
            yield v, answer, row.stats

    def _result(self, contexts, skipped, variants, correct, reads, summary, calib) -> EvalResult:
        metrics, items, paired = {}, {}, {}
        for v in variants:
            name = variant_name(v)
            every = []
            for c in contexts:
                acc = correct[v][c]
                every += acc
                metrics[f"passkey/{name}/ctx={c}"] = sum(acc) / len(acc)
                items[f"passkey/{name}/ctx={c}"] = acc
                if v != "dense":
                    paired[f"{name}/ctx={c}"] = paired_accuracy(correct["dense"][c], acc)
                    metrics[f"passkey/{name}/ctx={c}/kv_read_fraction"] = _fraction(*reads[v][c])
            metrics[f"passkey/{name}"] = sum(every) / len(every)
            if v != "dense":
                metrics[f"passkey/{name}/kv_read_fraction"] = _fraction(sum(reads[v][c][0] for c in contexts),
                                                                        sum(reads[v][c][1] for c in contexts))
                dense_all = [x for c in contexts for x in correct["dense"][c]]
                paired[name] = paired_accuracy(dense_all, every)
        info = {"passkey": {"contexts": contexts, "skipped_contexts": skipped, "per_context": int(self.cfg.per_context),
                            "haystack": str(self.cfg.haystack), "paired_vs_dense": paired,
                            "attention": summary, **({"calibration": calib} if calib else {})}}
        return EvalResult(metrics=metrics, items=items, info=info)
