"""End-to-end greedy decoding with the KV cache: tokens/s and token identity.

For one prompt from the held-out text (``batch_size`` of them for batched decoding), the
model generates exactly ``new_tokens`` tokens greedily (argmax, no early stop), one
KV-cached forward per token. Three runs, timed in turn ``repeats`` times after ``warmup``
(interleaved, so a drift in the machine's speed moves all three alike;
``decode/speedup_vs_hf`` is the median of the per-repeat ratios):

1. the configured backend with the sparsifier's masks (what the run is about);
2. the ``dense`` mask-multiply backend: once with the masks the sparse run produced,
   recorded and replayed, whose tokens the sparse backend must reproduce exactly
   (``decode/identical``), and once computing its own masks (timed;
   ``decode/identical_free_running`` and ``decode/first_divergence``: a threshold method's
   masks can flip on float summation-order differences, and a flip changes the tokens
   from there on — a property of the method's sensitivity, not a backend error);
3. the unpatched transformers model (``decode/tokens_per_s_hf``), the speedup baseline.

Only the decode steps are timed (the prefill is reported apart). Two ceilings:

- ``decode/bytes_limit``: the ratio of weight bytes a decode token reads, dense over
  sparse — all linears plus the LM head for dense; for the sparse run, the MLP (or masked
  linears) scaled by the density measured during this decode, with the projections the
  method evaluates densely to find its mask (CATS's gate, CETT's gate and up) counted in
  full, plus the weights of a learned predictor (Deja Vu's low-rank A and B, the SVD
  predictors), which every token reads. It is the speedup only if the whole step were
  weight reads; on a small model attention, norms and dispatch are a large share of it.
- ``decode/amdahl_limit``: Amdahl's law on the measured dense step. In every repeat, right
  after the unpatched decode, one more unpatched decode with a clock around every decoder linear
  gives each linear's time per step; a
  masked linear's saved time is its dense time × the fraction of its bytes skipped (the
  same byte counts as above), a predictor's reads are charged at the dense linears' mean
  time per byte, and everything else keeps its measured time. ``decode/fraction_of_limit``
  is the speedup over this limit; ``decode/linear_time_share`` is the decoder linears'
  share of the dense step. Both are medians of the per-repeat values, each from one repeat's
  own dense step (an earlier version timed the linears once, apart from the timed repeats,
  and the limit moved with the machine's speed between the two moments).
"""
from __future__ import annotations

import collections
import contextlib
import statistics

import torch
from torch import nn

from ..backends.weights import projections_to_compute
from ..data.corpus import heldout_windows
from ..core.device import model_device, timer
from . import EVALUATORS
from .base import EvalResult, Evaluator


@torch.no_grad()
def greedy_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """(generated ids [B, new_tokens] on the model's device, prefill seconds, decode seconds
    for the rest). ``prompt`` is moved to the model's device (untimed); on CUDA the clock is
    read after synchronizing."""
    from transformers import DynamicCache

    device = model_device(model)
    prompt = prompt.to(device)
    clock = timer(device)
    t0 = clock()
    out = model(input_ids=prompt, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [nxt]
    t1 = clock()
    past = out.past_key_values
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
    t2 = clock()
    return torch.cat(tokens, dim=1), t1 - t0, t2 - t1


def _linear_bytes(mod: nn.Module) -> int:
    w = getattr(mod, "weight", None)
    return w.numel() * w.element_size() if w is not None else 0


def weight_bytes(model, controller) -> dict[str, float]:
    """Bytes of weights a decode token reads densely: every linear of the decoder plus the
    LM head (embeddings are one row per token, norms are negligible), and the MLP's share."""
    total = 0
    seen = set()
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear) and id(w) not in seen:
            seen.add(id(w))
            total += _linear_bytes(mod)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) not in seen:  # tied: the embedding matrix is read as the head
        total += _linear_bytes(head)
    mlp = 0
    for site in controller.sites:
        mlp += sum(_linear_bytes(site.projection(p)) for p in ("gate", "up", "down") if p in site.slots)
    return {"total": float(total), "mlp": float(mlp)}


def sparse_saved_bytes(controller, computed: str | None) -> dict[tuple[int, str], float]:
    """Per masked linear (layer, projection): the weight bytes the sparse run skips per
    token, given the densities measured while decoding (controller.stats / linear_stats),
    net of what it reads densely for that linear (R-Sparse's low-rank factors)."""
    saved: dict[tuple[int, str], float] = collections.defaultdict(float)
    for site in controller.sites:
        st = controller.stats.get(site.layer_idx)
        if st is not None and st.masked_tokens and controller.sparsifier.sparsity_unit == "mlp_neurons":
            for p in projections_to_compute(site.kind, computed or "x") + ("down",):
                saved[(site.layer_idx, p)] += _linear_bytes(site.projection(p)) * st.sparsity
    for (layer, proj), st in controller.linear_stats.items():
        lin = controller.sites[layer].projection(proj)
        es = lin.weight.element_size()
        saved[(layer, proj)] += _linear_bytes(getattr(lin, "linear", lin)) * st.sparsity \
            - es * controller.sparsifier.dense_cost(layer, proj)
    return dict(saved)


def sparse_read_bytes(controller, computed: str | None) -> float:
    """Weight bytes the sparse run reads per token that the dense run reads in full."""
    return sum(sparse_saved_bytes(controller, computed).values())


def decoder_linears(controller) -> dict[tuple[int, str], nn.Module]:
    """The model's own nn.Linear of every (layer, projection) a sparsifier may mask."""
    out = {}
    for site in controller.sites:
        for p in ("q", "k", "v", "o", "gate", "up", "down"):
            if p in site.slots:
                lin = site.projection(p)
                out[(site.layer_idx, p)] = getattr(lin, "linear", lin)
    return out


class ModuleClock:
    """Adds up the wall time spent in each of a set of modules' ``forward`` (``{key: module}`` →
    ``seconds[key]``, and ``calls[key]`` timed calls), on single-token calls only (decode
    steps; the prefill is not a decode step).

    It wraps each module's ``forward`` (an instance attribute, taken away again by ``remove``)
    instead of registering forward hooks: a hook moves every call of its module onto
    nn.Module's slow call path, which in a decode costs several times what the clock itself
    does, and that cost would land in the timed window. What the window holds is the forward
    body, not nn.Module's call machinery (which the dense model's modules pay as well)."""

    def __init__(self, modules: dict, device=None, counter=None):
        self.seconds = dict.fromkeys(modules, 0.0)
        self.calls = dict.fromkeys(modules, 0)
        # optional: a running total (e.g. a backend's kernel seconds) read outside the timed
        # window around each timed call; ``counted[key]`` adds up its change
        self.counter, self.counted = counter, dict.fromkeys(modules, 0.0)
        self.clock, self._wrapped = timer(device), []
        for key, m in modules.items():
            own = m.__dict__.get("forward")  # an instance-level forward already there (another clock)
            m.forward = self._timed(key, m.forward)
            self._wrapped.append((m, own))

    def _timed(self, key, forward):
        clock, seconds, calls, counter, counted = self.clock, self.seconds, self.calls, self.counter, self.counted

        def timed(*args, **kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if x.numel() != x.shape[-1]:
                return forward(*args, **kwargs)
            c0 = counter() if counter is not None else 0.0
            t0 = clock()
            out = forward(*args, **kwargs)
            seconds[key] += clock() - t0
            calls[key] += 1
            if counter is not None:
                counted[key] += counter() - c0
            return out

        return timed

    def remove(self):
        for m, own in reversed(self._wrapped):
            if own is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = own
        self._wrapped = []


def amdahl_limit(step_s: float, linear_s: dict, linear_bytes: dict, saved: dict, predictor_bytes: float) -> float:
    """Amdahl's law on the measured dense step: the speedup if every byte the masks skip
    cost nothing and everything else (attention, norms, the LM head, dispatch, the linears
    the method does not touch) took the time it took in the dense step. A linear's saved
    time is its dense time × the fraction of its bytes skipped; a predictor's own reads
    are charged at the dense linears' mean time per byte."""
    saved_s = sum(linear_s[k] * b / linear_bytes[k] for k, b in saved.items() if linear_bytes.get(k))
    per_byte = sum(linear_s.values()) / max(sum(linear_bytes.values()), 1.0)
    return step_s / (step_s - saved_s + predictor_bytes * per_byte)


# Predictor tensors a sparsifier reads every decode token, for those that do not report
# ``<name>/bytes_per_token`` themselves (Deja Vu: its low-rank A [L, r, d] and B [L, d_ff, r]).
PREDICTOR_TENSORS = {"dejavu": ("A", "B")}


def predictor_read_bytes(sparsifier) -> float:
    """Bytes of the sparsifier's own predictor read per decode token, all layers: what the
    masks cost to compute beyond the model's weights (0 for threshold methods)."""
    for key, values in sparsifier.describe().items():
        if key.endswith("/bytes_per_token"):
            return float(sum(values))
    total = 0
    for name in PREDICTOR_TENSORS.get(sparsifier.name, ()):
        t = getattr(sparsifier, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return float(total)


@contextlib.contextmanager
def _swapped_masks(sparsifier, mask_fn, input_mask_fn):
    """Temporarily replace the sparsifier's ``mask``/``input_mask`` (instance attributes
    shadow the methods; removing them restores the originals)."""
    saved = {k: sparsifier.__dict__[k] for k in ("mask", "input_mask") if k in sparsifier.__dict__}
    sparsifier.mask, sparsifier.input_mask = mask_fn, input_mask_fn
    try:
        yield
    finally:
        for k in ("mask", "input_mask"):
            sparsifier.__dict__.pop(k, None)
        sparsifier.__dict__.update(saved)


def recording_masks(sparsifier, mlp: list, linear: list):
    """Record every mask the sparsifier returns, in call order."""
    mask, input_mask = sparsifier.mask, sparsifier.input_mask
    return _swapped_masks(sparsifier, lambda inp: mlp.append(mask(inp)) or mlp[-1],
                          lambda inp: linear.append(input_mask(inp)) or linear[-1])


def replaying_masks(sparsifier, mlp: list, linear: list):
    """Return the recorded masks again, in the same order, instead of computing them."""
    mlp_q, linear_q = collections.deque(mlp), collections.deque(linear)
    return _swapped_masks(sparsifier, lambda inp: mlp_q.popleft(), lambda inp: linear_q.popleft())


@EVALUATORS.register("decode")
class Decode(Evaluator):
    timing = True
    compare_dense = False  # carries its own baselines

    def evaluate(self, ctx):
        cfg, controller = self.cfg, ctx.controller
        # held-out ids come on the CPU: moved once, so no timed run copies them
        prompt = heldout_windows(ctx.tokenizer, ctx.splits, int(cfg.batch_size), int(cfg.prompt_tokens)).ids
        prompt = prompt.to(model_device(ctx.model))
        n_new = int(cfg.new_tokens)
        if n_new < 2:
            from ..core.errors import ConfigError

            raise ConfigError(f"evaluator.decode.new_tokens={n_new} must be at least 2")

        from ..backends.dense import DenseBackend

        sparse_backend, mask_backend = controller.backend, DenseBackend()

        @contextlib.contextmanager
        def on_dense_mask():
            controller.backend = mask_backend
            try:
                yield
            finally:
                controller.backend = sparse_backend

        linears = decoder_linears(controller)
        linear_runs: list[dict] = []  # per timed repeat: each decoder linear's seconds in the unpatched decode

        @contextlib.contextmanager
        def hf_linears_clocked():
            with controller.unpatched():
                clock = ModuleClock(linears, model_device(ctx.model))
                try:
                    yield
                finally:
                    clock.remove()
                    linear_runs.append(clock.seconds)

        # the configured backend, the dense-mask backend, the unpatched model, and the unpatched
        # model with a clock around every decoder linear (for the Amdahl limit; untimed itself)
        modes = {"sparse": contextlib.nullcontext, "dense mask": on_dense_mask, "hf": controller.unpatched,
                 "hf linears": hf_linears_clocked}

        def decode(mode, n):
            with modes[mode]():
                if mode in ("sparse", "dense mask"):  # the unpatched model leaves the backend (and its counts) alone
                    controller.backend.reset()
                return greedy_decode(ctx.model, prompt, n)

        # Interleaved: every repeat times the three in turn, so a drift of the machine's speed
        # over the minutes this takes moves all three alike; speedups are medians of the
        # per-repeat (same-minute) ratios.
        for mode in modes:
            for _ in range(int(cfg.warmup)):
                decode(mode, min(n_new, 8))
        runs = {mode: [] for mode in modes}
        linear_runs.clear()  # the warm-up's
        for _ in range(int(cfg.repeats)):
            for mode in modes:
                runs[mode].append(decode(mode, n_new))
        for mode, rs in runs.items():
            if any(not torch.equal(r[0], rs[-1][0]) for r in rs):
                raise RuntimeError(f"decode ({mode}) is not deterministic across repeats")
        steps = n_new - 1

        def tokens_per_s(mode):
            return prompt.shape[0] * steps / statistics.median(r[2] for r in runs[mode])

        tokens, ref_tokens, hf_tokens = (runs[m][-1][0] for m in ("sparse", "dense mask", "hf"))
        tps, tps_mask, tps_hf = (tokens_per_s(m) for m in ("sparse", "dense mask", "hf"))
        prefill_s, prefill_hf = (statistics.median(r[1] for r in runs[m]) for m in ("sparse", "hf"))
        speedup = statistics.median(h[2] / s[2] for s, h in zip(runs["sparse"], runs["hf"]))
        stats = controller.backend.stats()
        # Densities and what the sparsifier computes densely, from one more (untimed) pass:
        # counting reads h, which must not happen inside the timed runs.
        # The masks are taken from the controller's observers, which also see the masks a
        # backend made in its kernel from the sparsifier's rule (fused: CATS, TEAL).
        computed, mlp_masks, linear_masks = [], [], []

        def on_mlp(inp, mask):
            if not computed:
                computed.append(inp.computed)
            mlp_masks.append(mask)

        observers = (controller.mask_observer, controller.linear_mask_observer)
        controller.mask_observer, controller.linear_mask_observer = on_mlp, lambda _, mask: linear_masks.append(mask)
        try:
            with controller.counting():
                decode("sparse", n_new)
        finally:
            controller.mask_observer, controller.linear_mask_observer = observers
        saved = sparse_saved_bytes(controller, computed[0] if computed else None)
        sparse_bytes = sum(saved.values())
        # The same masks on the dense backend: isolates the backend from threshold flips
        # caused by float summation order upstream.
        with on_dense_mask(), replaying_masks(controller.sparsifier, mlp_masks, linear_masks):
            replay_tokens, _, _ = greedy_decode(ctx.model, prompt, n_new)
        linear_bytes = {k: float(_linear_bytes(m)) for k, m in linears.items()}

        same = tokens == ref_tokens
        first_diff = int((~same).any(0).nonzero()[0]) if not bool(same.all()) else -1
        wb = weight_bytes(ctx.model, controller)
        share = wb["mlp"] / wb["total"]
        predictor = predictor_read_bytes(controller.sparsifier)
        bytes_limit = wb["total"] / (wb["total"] - sparse_bytes + predictor)
        # The limit per repeat, from that repeat's unpatched step and the instrumented decode timed
        # right after it (same minute: the machine's speed drifts between minutes), then the median.
        per_repeat = []
        for hf_run, seconds in zip(runs["hf"], linear_runs):
            step_hf = hf_run[2] / steps  # seconds per decode step of the unpatched model
            linear_s = {k: v / steps for k, v in seconds.items()}
            per_repeat.append((amdahl_limit(step_hf, linear_s, linear_bytes, saved, predictor),
                               sum(linear_s.values()) / step_hf))
        limit = statistics.median(lim for lim, _ in per_repeat)
        linear_share = statistics.median(share for _, share in per_repeat)
        metrics = {
            "decode/tokens_per_s": tps,
            "decode/tokens_per_s_dense_mask": tps_mask,
            "decode/tokens_per_s_hf": tps_hf,
            "decode/speedup_vs_hf": speedup,
            # same masks (recorded from the sparse run, replayed on dense): must be 1
            "decode/identical": float(torch.equal(tokens, replay_tokens)),
            # each backend computing its own masks: thresholds may flip on float-order noise
            "decode/identical_free_running": float(bool(same.all())),
            "decode/first_divergence": first_diff,
            "decode/identical_to_hf": float(torch.equal(tokens, hf_tokens)),
            "decode/prefill_s": prefill_s,
            "decode/prefill_s_hf": prefill_hf,
            "decode/new_tokens": n_new,
            "decode/batch_size": prompt.shape[0],
            "decode/mlp_byte_share": share,
            "decode/weight_bytes_saved_fraction": sparse_bytes / wb["total"],
            # a predictor's own weights, read every token (Deja Vu, SVD predictors), against the limit
            "decode/predictor_bytes_fraction": predictor / wb["total"],
            # the step as if it were nothing but weight reads: total / remaining bytes
            "decode/bytes_limit": bytes_limit,
            "decode/fraction_of_bytes_limit": speedup / bytes_limit,
            # share of the dense step spent in the decoder's linears (measured, clocked)
            "decode/linear_time_share": linear_share,
            "decode/amdahl_limit": limit,
            "decode/fraction_of_limit": speedup / limit,
            # the share of the attainable gain realised: (speedup - 1) / (limit - 1)
            "decode/gain_fraction": (speedup - 1) / (limit - 1) if limit > 1 + 1e-9 else float("nan"),
            "decode/threads": torch.get_num_threads(),
        }
        per_layer = {}
        layers = stats.get("per_layer", {})
        if layers:
            n = len(controller.sites)
            per_layer["decode/rows_copied_per_update"] = [
                layers[i]["rows_copied"] / max(layers[i]["updates"], 1) if i in layers else 0.0 for i in range(n)]
            per_layer["decode/active_rows"] = [
                layers[i]["active"] / max(layers[i]["updates"], 1) if i in layers else 0.0 for i in range(n)]
        if "union_density" in stats:
            metrics["decode/union_density"] = stats["union_density"]
        if "rule" in stats:  # whether the timed steps applied the sparsifier's mask rule in the kernel
            metrics["decode/mask_rule_in_kernel"] = float(stats["rule"] > 0)
        return EvalResult(metrics=metrics, per_layer=per_layer)
