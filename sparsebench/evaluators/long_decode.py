"""Decode at long context: tokens/s and bytes read, dense attention vs the run's method.

For each context length, a held-out window of that many tokens is prefilled once (dense,
untimed); the KV cache and the method's per-sequence state are copied and decoding
continues ``new_tokens`` steps from each copy, feeding the window's next tokens (so every
variant processes identical inputs). Each variant is timed ``repeats`` times after
``warmup``, the variants taking turns within each repeat; a step's time is the median over its repeats, a variant's tokens/s is one over
the median step time, and the speedup is the same-run ratio to dense attention. Weights
are cold as in any real decode (the model is read front to back every step).

The KV cache appends in place (``sparsebench.attention._kv_cache``), as a serving engine's does:
transformers' ``DynamicCache`` would copy the whole cache every step in both arms.

Beside the speed: the fraction of decode steps whose argmax equals dense attention's, the
bytes one step reads (all weights, plus per layer the K/V rows attended and what the
method reads to select them, ``selection_bytes``), and their ratio — the bytes-bound limit
of the speedup. An untimed pass with hooks gives each layer's attention latency (median
over steps) at the longest context. On CUDA the clock is read after synchronizing the device
(the token ids are on the model's device before the timed steps).
"""
from __future__ import annotations

import contextlib
import copy
import statistics

import torch

from ..attention._kv_cache import preallocated_cache
from ..attention._runtime import attached_attention, attention_variant, attention_variants
from ..attention.base import attention_modules
from ..data.corpus import heldout_windows
from ..core.errors import ConfigError
from ..core.device import model_device, timer
from . import EVALUATORS
from .base import EvalResult, Evaluator
from .decode import weight_bytes
from .passkey import max_context, variant_name


def kv_bytes(cache, layer: int) -> int:
    keys = cache.layers[layer].keys
    return 2 * keys.numel() * keys.element_size()  # K and V


@torch.no_grad()
def timed_steps(model, cache, tokens: torch.Tensor) -> tuple[list[float], list[int]]:
    """Seconds of each decode step feeding ``tokens`` one at a time, and each step's argmax.
    The tokens go to the model's device before the first step (each step's input is a view
    of them: no host-to-device copy is timed)."""
    device = model_device(model)
    clock = timer(device)
    steps = tokens.to(device).reshape(-1, 1)
    times, argmax = [], []
    for i in range(steps.shape[0]):
        t0 = clock()
        logits = model(input_ids=steps[i:i + 1], past_key_values=cache, use_cache=True).logits
        times.append(clock() - t0)
        argmax.append(int(logits[0, -1].argmax()))
    return times, argmax


@contextlib.contextmanager
def attention_timer(model):
    """Per-layer seconds spent in the attention module, appended per call."""
    clock = timer(model_device(model))
    spent: list[list[float]] = []
    handles = []
    for i, mod in enumerate(attention_modules(model)):
        spent.append([])
        start = {}

        def pre(module, args, kwargs, start=start):
            start["t"] = clock()

        def post(module, args, kwargs, output, start=start, i=i):
            spent[i].append(clock() - start["t"])

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        yield spent
    finally:
        for h in handles:
            h.remove()


@EVALUATORS.register("long_decode")
class LongDecode(Evaluator):
    applies_attention = True  # installs cfg.attention itself (sparsebench.attention._runtime)
    compare_dense = False  # dense attention is timed inside, in the same process
    timing = True

    def evaluate(self, ctx):
        cfg = self.cfg
        new = int(cfg.new_tokens)
        limit = max_context(ctx.model)
        # a context at the window's edge is shortened to leave room for the new tokens (8192 → 8176)
        contexts = sorted({min(int(c), limit - new) for c in cfg.contexts})
        if contexts[0] < 1:
            raise ConfigError(f"evaluator.long_decode.new_tokens={new} leaves no room for a context in the "
                              f"model's context window ({limit})")
        metrics, per_layer, info = {}, {}, {"contexts": contexts}
        w_bytes = weight_bytes(ctx.model, ctx.controller)["total"]
        device = model_device(ctx.model)
        clock = timer(device)
        with attached_attention(ctx, record_stats=False) as session:
            variants = attention_variants(session, cfg.budgets)
            for c in contexts:
                window = heldout_windows(ctx.tokenizer, ctx.splits, 1, c + new)
                ids = window.ids[0].to(device)  # held-out ids come on the CPU
                info[f"ctx={c}/source"] = window.sources[0]
                cache = preallocated_cache(ctx.model)
                if session is not None:
                    session.reset()
                t0 = clock()
                with torch.no_grad(), attention_variant(session, "dense"):
                    ctx.model(input_ids=ids[None, :c], past_key_values=cache, use_cache=True, logits_to_keep=1)
                metrics[f"long_decode/ctx={c}/prefill_s"] = clock() - t0
                state = session.snapshot() if session is not None else None
                n_layers = len(cache.layers)
                dense_kv = sum(kv_bytes(cache, i) for i in range(n_layers))
                step_med, argmaxes, runs = {}, {}, {v: [] for v in variants}
                # variants interleaved within each repeat, so a drift of the machine's speed
                # reaches every variant alike and the same-run ratios stay fair
                for r in range(int(cfg.warmup) + int(cfg.repeats)):
                    for v in variants:
                        run_cache = copy.deepcopy(cache)
                        if session is not None:
                            session.restore(state)
                        with attention_variant(session, v):
                            times, am = timed_steps(ctx.model, run_cache, ids[c:c + new])
                        if r >= int(cfg.warmup):
                            runs[v].append(times)
                        argmaxes[v] = am
                for v in variants:
                    step_med[v] = statistics.median(statistics.median(col) for col in zip(*runs[v]))
                    name = variant_name(v)
                    metrics[f"long_decode/ctx={c}/{name}/tokens_per_s"] = 1.0 / step_med[v]
                for v in variants[1:]:
                    name = variant_name(v)
                    metrics[f"long_decode/ctx={c}/{name}/speedup"] = step_med["dense"] / step_med[v]
                    agree = [a == b for a, b in zip(argmaxes["dense"], argmaxes[v])]
                    metrics[f"long_decode/ctx={c}/{name}/argmax_agreement"] = sum(agree) / len(agree)
                    kv = self._sparse_kv_bytes(ctx, session, cache, state, ids[c:c + new], v, n_layers)
                    metrics[f"long_decode/ctx={c}/{name}/kv_bytes_per_token"] = kv
                    metrics[f"long_decode/ctx={c}/{name}/bytes_limit_speedup"] = (w_bytes + dense_kv) / (w_bytes + kv)
                metrics[f"long_decode/ctx={c}/dense/kv_bytes_per_token"] = dense_kv
                if c == contexts[-1]:
                    for v in variants:
                        per_layer[f"attn_ms/{variant_name(v)}"] = self._attention_ms(ctx, session, cache, state,
                                                                                      ids[c:c + new], v)
            summary = session.method.summary() if session is not None else {}
        info |= {"weight_bytes": w_bytes, "attention": summary}
        return EvalResult(metrics=metrics, per_layer=per_layer, info={"long_decode": info})

    def _sparse_kv_bytes(self, ctx, session, cache, state, tokens, variant, n_layers) -> float:
        """Bytes of K/V (and selection metadata) one sparse step reads, averaged over the
        steps of an untimed pass with statistics on."""
        run_cache = copy.deepcopy(cache)
        session.restore(state)
        session.reset_stats()
        session.record_stats = True
        try:
            with attention_variant(session, variant):
                timed_steps(ctx.model, run_cache, tokens)
        finally:
            session.record_stats = False
        steps = len(tokens)
        total = 0.0
        for i in range(n_layers):
            keys = run_cache.layers[i].keys
            b, hkv, n_end, d = keys.shape
            elem = keys.element_size()
            s = session.stats[i]
            if s.calls:
                total += s.keys_attended * 2 * d * elem / steps
                n_mid = n_end - steps // 2  # the cache length at a middle step
                total += session.method.selection_bytes(n_mid, hkv, d, elem) * s.calls / steps
                total += (steps - s.calls) * 2 * n_mid * hkv * d * elem / steps  # dense steps, if any
            else:  # a dense layer reads its whole cache (a sliding layer: its window)
                total += kv_bytes(cache, i)
        return total

    def _attention_ms(self, ctx, session, cache, state, tokens, variant) -> list[float]:
        run_cache = copy.deepcopy(cache)
        if session is not None:
            session.restore(state)
        with attention_timer(ctx.model) as spent, attention_variant(session, variant):
            timed_steps(ctx.model, run_cache, tokens)
        return [1e3 * statistics.median(s) for s in spent]
