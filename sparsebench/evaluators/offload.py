"""Offload: replay a method's real decode masks against a modelled two-level memory.

A cache of MLP rows saves bytes only when the rows come from a tier slower than the one
the MLP computes from: flash → DRAM ("LLM in a Flash", Alizadeh et al. 2023) or host RAM
→ GPU over PCIe (PowerInfer, Song et al. 2023). This evaluator measures, for a method's
own masks on held-out text, how much a fast-tier row cache of a given size saves, under
an explicit cost model. Nothing is timed; every number is a count times a constant.

**Masks.** As in ``churn``: one forward per batch of held-out windows with the controller's
mask observers set; under the default prefill policy (``all``) the mask at position t is
the one KV-cached decoding computes at step t, so each window replays a decode of that
window token by token. For methods that mask linear inputs (TEAL, WINA, R-Sparse) the down
projection's input mask is the neuron mask. A layer (or a call) with no mask needs every
row. **Each window is an independent sequence: every cache starts empty at its first
token** (``lru``, ``window``); ``hot``'s pinned set is fixed, profiled offline.

**Rows.** Neuron i of a layer needs its gate, up and down rows (gated MLPs) or its up and
down rows (plain MLP, OPT), each ``hidden`` elements: ``row_bytes = n_matrices · hidden ·
dtype_bytes`` per neuron (biases and the non-MLP weights — attention, embeddings — are
assumed resident in the fast tier and are not counted). Storage is neuron-bundled (the
rows of neuron i adjacent, neurons in index order: LLM in a Flash's row-column bundling).

**Policies** (``Policy.access(active) -> misses``; one row of the state per (layer, window)
pair, each an independent cache of ``round(C · intermediate)`` neurons):

- ``lru``: least-recently-used set of neurons. At each token, hits = active ∩ resident;
  the missing active neurons are fetched; then, while over capacity, the least recently
  used resident is evicted. Within one token the active neurons count as used in index
  order (a higher index is more recent), so when the active set alone exceeds the
  capacity the lowest-index active neurons are the ones not kept. LRU is a stack
  algorithm (a cache of C rows holds exactly the C most recently used neurons), so one
  recency stack per row replays every capacity in a single pass.
- ``hot`` (PowerInfer-style): the ``round(C · intermediate)`` neurons most often active on
  the *calibration* windows (``data.calibration``, the very windows the sparsifier was
  calibrated on; never the held-out text replayed) are pinned (ties: lower index first);
  every other active neuron is read from the slow tier at every token and not kept.
- ``window`` (LLM in a Flash): every neuron active in the last ``k`` tokens is kept, the
  rest evicted. Its size is what the window needs, not a capacity: the honest choice
  (the paper keeps the window's union), reported as ``occupancy`` (mean fraction of the
  layer's neurons resident after each token); one row per ``k`` in ``window_tokens``.
  ``k = 1`` is the ``cached`` backend's cache (the previous token's active set): with
  ``warmup_tokens: 1`` its misses per layer and token are ``churn/swaps_per_token``.

**Cost model** (one token, summed over layers ℓ; ``A`` active neurons, ``M`` misses, ``O``
slow-tier read operations, ``b`` = row_bytes; GB = 1e9 bytes):

    t_token = Σ_ℓ [ M_ℓ·b_ℓ / (slow_gbps·1e9)  +  O_ℓ · latency_us·1e-6  +  A_ℓ·b_ℓ / (fast_gbps·1e9) ]

i.e. the missed rows cross the slow link, each read operation pays a fixed latency, and
the MLP then reads its active rows from the fast tier (memory-bound compute). ``O`` is
the number of maximal runs of adjacent missed neuron indices (one read per contiguous
extent; ``coalesce: false``: one read per missed neuron). Terms are serial: no overlap of
transfer with compute or of one layer's reads with another's (no prefetch), reads are
not issued in parallel (set ``latency_us`` to the *effective* per-read cost with your
queue depth). Baselines in the same model:

- ``none``: dense from the slow tier (no cache, no sparsity): every row read every token,
  one read per layer (``O = 1``), every row read from the fast tier;
- ``active_only``: no cache: each token reads its active rows from the slow tier
  (= any policy at capacity 0);
- ``in_memory``: every row already in the fast tier: only ``A·b/fast`` (the floor).

Metrics (per policy ``p``, capacity label ``cC`` or window ``kK``): ``offload/p/cC/hit_rate``
(hits / active-row accesses over every layer), ``bytes_per_token`` (slow-tier bytes per
token, all layers), ``bytes_per_layer_token`` (the same per layer), ``fetch_ops_per_token``,
``occupancy`` and ``ms_per_token`` (the model above, tier ``tier``); ``offload/none/…``,
``offload/active_only/…``, ``offload/in_memory/ms_per_token``; ``offload/active_bytes_per_token``
so any other tier can be costed from the counts. Statistics skip each window's first
``warmup_tokens`` positions (the caches still fill during them). Per layer: hit rates at
``per_layer_capacity`` (default: the middle of ``capacities``) and every window size.

**Devices.** The forwards run wherever the model is (the windows go to its device); each
batch's masks come back to the CPU as bool, and the replay is CPU bookkeeping (its tensors
are made with ``device="cpu"``, or on the device of the masks a policy is given).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data.corpus import calibration_windows, heldout_windows
from ..core.errors import ConfigError
from ..core.device import model_device
from . import EVALUATORS
from .base import EvalResult, Evaluator

POLICIES = ("lru", "hot", "window")
TIER_KEYS = ("slow_gbps", "latency_us", "fast_gbps")


def capacity_rows(fraction: float, width: int) -> int:
    """Neurons a fast tier holding ``fraction`` of a layer's ``width`` neurons keeps."""
    return max(0, min(width, int(round(float(fraction) * width))))


def cap_label(fraction: float) -> str:
    return f"c{float(fraction):g}"


# ------------------------------------------------------------------------------- policies

class Policy:
    """One row of state per independent cache (a layer of one sequence). ``access`` takes
    the [R, I] bool active mask of one token and returns the [R, I] bool misses (active
    rows read from the slow tier); ``resident`` is the [R] number of neurons held after it."""

    name = "base"

    def access(self, active: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def resident(self) -> torch.Tensor:
        raise NotImplementedError


class LRU(Policy):
    """Per-row LRU of ``capacity[..., r]`` neurons, as a recency stack (LRU is a stack
    algorithm: a cache of C rows holds exactly the C most recently used neurons, so one
    stack answers every capacity at once). ``pos`` is each neuron's rank in the stack
    (0 = most recent), ``perm`` its inverse; ``capacity`` of shape [V, R] gives misses of
    shape [V, R, I], one per capacity."""

    name = "lru"

    def __init__(self, capacity: torch.Tensor, width: int):
        self.cap = torch.as_tensor(capacity, dtype=torch.long)  # its device is the state's
        rows, device = self.cap.shape[-1], self.cap.device
        self.ranks = torch.arange(width, device=device).expand(rows, width)
        self.pos = self.ranks.clone()
        self.perm = self.ranks.clone()
        self.used = torch.zeros(rows, width, dtype=torch.bool, device=device)

    def access(self, active):
        held = self.used & (self.pos < self.cap[..., None])
        miss = active & ~held
        # the token's neurons move to the top, used in index order (the highest index is the
        # most recent); the others keep their order below them
        n_active = active.sum(1, keepdim=True)
        active_above = active.gather(1, self.perm).cumsum(1)  # active neurons at ranks <= p
        pos = torch.empty_like(self.pos).scatter_(1, self.perm, n_active + self.ranks - active_above)
        self.pos = torch.where(active, n_active - active.cumsum(1), pos)
        self.perm = torch.empty_like(self.perm).scatter_(1, self.pos, self.ranks)
        self.used |= active
        return miss

    def resident(self):
        return torch.minimum(self.used.sum(1), self.cap)


def hot_set(counts: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """[R, I] bool: per row the ``capacity[r]`` neurons of highest count (ties: lower index)."""
    order = torch.sort(counts, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(counts.shape[1], device=counts.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    return rank < torch.as_tensor(capacity, dtype=torch.long, device=counts.device).reshape(-1, 1)


class Hot(Policy):
    """Pinned neurons (PowerInfer's hot set); everything else is read every token, not kept."""

    name = "hot"

    def __init__(self, pinned: torch.Tensor):
        self.pinned = pinned.bool()
        self.count = self.pinned.sum(1)

    def access(self, active):
        return active & ~self.pinned

    def resident(self):
        return self.count


class Window(Policy):
    """Every neuron active in the last ``k`` tokens (LLM in a Flash's sliding window)."""

    name = "window"

    def __init__(self, k: int, rows: int, width: int, device="cpu"):
        self.k = int(k)
        self.last = torch.full((rows, width), -(2 ** 40), dtype=torch.long, device=device)  # step last active
        self.t = 0

    def access(self, active):
        miss = active & (self.last < self.t - self.k)  # not active in steps t-k .. t-1
        self.last = torch.where(active, self.t, self.last)
        self.t += 1
        return miss

    def resident(self):
        return (self.last >= self.t - self.k).sum(1)  # active in the last k steps, this one included


# --------------------------------------------------------------------------------- replay

def fetch_ops(miss: torch.Tensor, coalesce: bool = True) -> torch.Tensor:
    """Slow-tier reads per row of ``miss`` [..., I]: runs of adjacent missed indices
    (neuron-bundled storage), or one per missed neuron without ``coalesce``."""
    if not coalesce:
        return miss.sum(-1)
    starts = miss.clone()
    starts[..., 1:] &= ~miss[..., :-1]
    return starts.sum(-1)


@dataclass
class Replay:
    """Totals per row over the counted steps."""

    accesses: torch.Tensor  # [R] active neurons
    misses: torch.Tensor  # [R] (or [V, R]) active neurons read from the slow tier
    ops: torch.Tensor  # [R] (or [V, R]) slow-tier read operations
    resident: torch.Tensor  # [R] (or [V, R]) neurons held after each step, summed
    steps: int


def replay(masks: torch.Tensor, policy: Policy, warmup: int = 0, coalesce: bool = True) -> Replay:
    """Run ``policy`` over ``masks`` [T, R, I] (token-major), counting steps >= ``warmup``.
    Policies answering several variants at once (LRU with capacities [V, R]) give
    misses, ops and resident of shape [V, R]."""
    zero = torch.zeros((), dtype=torch.long, device=masks.device)
    acc = mis = ops = res = zero
    for t in range(masks.shape[0]):
        active = masks[t]
        miss = policy.access(active)
        if t >= warmup:
            acc = acc + active.sum(-1)
            mis = mis + miss.sum(-1)
            ops = ops + fetch_ops(miss, coalesce)
            res = res + policy.resident()
    return Replay(acc, mis, ops, res, max(masks.shape[0] - warmup, 0))


# ----------------------------------------------------------------------------- cost model

@dataclass
class Tier:
    slow_gbps: float  # slow → fast link bandwidth, GB/s (1e9 bytes)
    latency_us: float  # fixed cost per slow-tier read operation, µs
    fast_gbps: float  # fast tier read bandwidth, GB/s

    def ms(self, slow_bytes: float, ops: float, fast_bytes: float) -> float:
        """Modelled milliseconds for one token's ``slow_bytes`` in ``ops`` reads, then
        ``fast_bytes`` read from the fast tier by the MLP."""
        return 1e3 * (slow_bytes / (self.slow_gbps * 1e9) + ops * self.latency_us * 1e-6
                      + fast_bytes / (self.fast_gbps * 1e9))


def row_bytes(site, dtype_bytes: int) -> int:
    """Bytes of one neuron's rows: (gate+)up+down rows of ``hidden`` elements."""
    return (3 if site.kind == "gated" else 2) * int(site.down.out_features) * int(dtype_bytes)


@contextlib.contextmanager
def one_thread():
    """The replay's tensors are small ([layers·windows, intermediate] per step): intra-op
    threads gain little and, on a machine with other work, oversubscription makes each
    op 10-50x slower. The thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -------------------------------------------------------------------------- mask capture

def _as_btw(mask: torch.Tensor, b: int, t: int) -> torch.Tensor:
    w = mask.shape[-1]
    m = mask.detach().to("cpu", torch.bool)
    return m.reshape(b, t, w) if m.numel() == b * t * w else torch.broadcast_to(m, (b, t, w))


def capture_masks(ctx, windows: torch.Tensor, batch_size: int,
                  consume: Callable[[int, torch.Tensor], None]) -> bool:
    """Forward ``windows`` [N, T] in batches; for each, call ``consume(first_row, masks)``
    with masks [L, B, T, W] bool (W the widest layer; padding False). A layer or call
    without a mask is all True (every row needed). Returns whether any real mask was seen."""
    ctl = ctx.controller
    widths = [s.intermediate_size for s in ctl.sites]
    width = max(widths)
    seen: dict[int, dict[str, torch.Tensor | None]] = {}
    found = False

    def on_mlp(inp, mask):
        seen.setdefault(inp.layer_idx, {})["mlp"] = mask

    def on_linear(inp, mask):
        if inp.proj == "down":
            seen.setdefault(inp.layer_idx, {})["down"] = mask

    observers = (ctl.mask_observer, ctl.linear_mask_observer)
    ctl.mask_observer, ctl.linear_mask_observer = on_mlp, on_linear
    device = model_device(ctx.model)  # the windows come on the CPU; the masks go back there
    try:
        row = 0
        for batch in windows.split(batch_size):
            seen.clear()
            ctx.model(input_ids=batch.to(device), logits_to_keep=1)
            b, t = batch.shape
            out = torch.zeros(len(widths), b, t, width, dtype=torch.bool, device="cpu")
            for layer, w in enumerate(widths):
                got = seen.get(layer, {})
                mask = got.get("down") if got.get("down") is not None else got.get("mlp")
                if mask is None:
                    out[layer, :, :, :w] = True
                else:
                    out[layer, :, :, :w] = _as_btw(mask, b, t)
                    found = True
            consume(row, out)
            row += b
    finally:
        ctl.mask_observer, ctl.linear_mask_observer = observers
    return found


# ------------------------------------------------------------------------------ evaluator

@EVALUATORS.register("offload")
class Offload(Evaluator):
    compare_dense = False  # needs masks

    def __init__(self, cfg):
        super().__init__(cfg)
        where = "evaluator.offload"
        policies = list(cfg.policies)
        bad = [p for p in policies if p not in POLICIES]
        if bad or not policies:
            raise ConfigError(f"{where}.policies={policies} must name some of {', '.join(POLICIES)}, "
                              f"e.g. {where}.policies=[lru,hot,window]")
        caps = [float(c) for c in cfg.capacities]
        if not caps or any(not 0.0 <= c <= 1.0 for c in caps):
            raise ConfigError(f"{where}.capacities={caps} must be fractions in [0, 1], e.g. {where}.capacities=[0.1,0.25,0.5]")
        ks = list(cfg.window_tokens)
        if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks) or ("window" in policies and not ks):
            raise ConfigError(f"{where}.window_tokens={ks} must be positive integers, e.g. {where}.window_tokens=[1,5]")
        if str(cfg.tier) not in cfg.tiers:
            raise ConfigError(f"{where}.tier={cfg.tier} is not one of the tiers: {', '.join(cfg.tiers)}")
        for name, tier in cfg.tiers.items():
            for key in TIER_KEYS:
                v = tier.get(key)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 \
                        or (v == 0 and key != "latency_us"):
                    raise ConfigError(f"{where}.tiers.{name}.{key}={v} must be a positive number")
        if int(cfg.warmup_tokens) < 0:
            raise ConfigError(f"{where}.warmup_tokens={cfg.warmup_tokens} must be >= 0")
        plc = cfg.get("per_layer_capacity")
        if plc is not None and (isinstance(plc, str) or float(plc) not in caps):
            raise ConfigError(f"{where}.per_layer_capacity={plc} must be one of capacities {caps} (or null)")
        self.policies, self.caps, self.ks = policies, caps, ks
        self.per_layer_cap = float(plc) if plc is not None else sorted(caps)[len(caps) // 2]
        self.tier = Tier(*(float(cfg.tiers[str(cfg.tier)][k]) for k in TIER_KEYS))

    @torch.no_grad()
    def evaluate(self, ctx):
        cfg, ctl = self.cfg, ctx.controller
        bs, warmup = int(cfg.batch_size), int(cfg.warmup_tokens)
        widths = torch.tensor([s.intermediate_size for s in ctl.sites], device="cpu")
        n_layers, width = len(ctl.sites), int(widths.max())

        # held-out masks, token-major: [T, L, N, W]
        windows = heldout_windows(ctx.tokenizer, ctx.splits, int(cfg.num_windows), int(cfg.seq_len)).ids
        n, seq = windows.shape
        if warmup >= seq:
            raise ConfigError(f"evaluator.offload.warmup_tokens={warmup} leaves no token of a {seq}-token window")
        held = torch.empty(seq, n_layers, n, width, dtype=torch.bool, device="cpu")

        def keep(row, m):
            held[:, :, row:row + m.shape[1]] = m.permute(2, 0, 1, 3)

        if not capture_masks(ctx, windows, bs, keep):
            raise ConfigError(f"sparsifier={ctl.sparsifier.name} produced no MLP neuron masks; offload needs one")
        info = {"offload_tokens": n * (seq - warmup)}

        # hot: activation counts of the method's own masks on the calibration windows
        counts = None
        if "hot" in self.policies:
            dcal = ctx.cfg.data.calibration
            calib = calibration_windows(ctx.tokenizer, ctx.splits, int(dcal.num_sequences), int(dcal.seq_len),
                                        int(ctx.cfg.seed))
            counts = torch.zeros(n_layers, width, dtype=torch.long, device="cpu")
            capture_masks(ctx, calib, bs, lambda row, m: counts.add_(m.sum((1, 2))))
            counts[torch.arange(width, device="cpu")[None, :] >= widths[:, None]] = -1  # padding is never hot
            info["offload_profile_tokens"] = int(calib.numel())
        rb = torch.tensor([row_bytes(s, int(cfg.dtype_bytes)) for s in ctl.sites], dtype=torch.float64, device="cpu")
        with one_thread():
            metrics, per_layer = self.measure(held.view(seq, n_layers * n, width), n, widths, rb, counts)
        return EvalResult(metrics=metrics, per_layer=per_layer, info=info)

    def measure(self, masks: torch.Tensor, n: int, widths: torch.Tensor, rb: torch.Tensor,
                counts: torch.Tensor | None) -> tuple[dict, dict]:
        """Metrics from ``masks`` [T, L·n, W] (row r: layer r // n, window r % n), the layers'
        widths and row bytes, and the calibration counts [L, W] (for ``hot``)."""
        warmup, coalesce = int(self.cfg.warmup_tokens), bool(self.cfg.coalesce)
        seq, rows, width = masks.shape
        n_layers = len(widths)
        per_row_width = widths.repeat_interleave(n)

        def by_layer(x: torch.Tensor) -> torch.Tensor:
            return x.view(n_layers, n).sum(1).double()

        tokens = n * (seq - warmup)  # counted tokens (per layer)
        acc = by_layer(sum(masks[t].sum(-1) for t in range(warmup, seq)))
        ao_ops = float(by_layer(sum(fetch_ops(masks[t], coalesce) for t in range(warmup, seq))).sum()) / tokens
        active_bytes = float((acc * rb).sum()) / tokens
        dense_bytes = float((widths * rb).sum())
        metrics = {
            "offload/tokens": float(tokens), "offload/density": float((acc / (tokens * widths)).mean()),
            "offload/row_bytes": float(rb.mean()), "offload/active_bytes_per_token": active_bytes,
            "offload/none/bytes_per_token": dense_bytes, "offload/none/fetch_ops_per_token": float(n_layers),
            "offload/none/ms_per_token": self.tier.ms(dense_bytes, n_layers, dense_bytes),
            "offload/active_only/bytes_per_token": active_bytes, "offload/active_only/fetch_ops_per_token": ao_ops,
            "offload/active_only/ms_per_token": self.tier.ms(active_bytes, ao_ops, active_bytes),
            "offload/in_memory/ms_per_token": self.tier.ms(0.0, 0.0, active_bytes),
        }
        per_layer = {"offload/active_fraction": (acc / (tokens * widths)).tolist()}

        def record(tag: str, misses: torch.Tensor, ops: torch.Tensor, resident: torch.Tensor, layer_rows: bool):
            mis, ops, res_n = by_layer(misses), by_layer(ops), by_layer(resident)
            slow = float((mis * rb).sum()) / tokens
            op = float(ops.sum()) / tokens
            hit = 1.0 - float(mis.sum()) / float(acc.sum()) if float(acc.sum()) else 1.0
            metrics.update({
                f"offload/{tag}/hit_rate": hit, f"offload/{tag}/bytes_per_token": slow,
                f"offload/{tag}/bytes_per_layer_token": slow / n_layers, f"offload/{tag}/fetch_ops_per_token": op,
                f"offload/{tag}/occupancy": float((res_n / (tokens * widths)).mean()),
                f"offload/{tag}/ms_per_token": self.tier.ms(slow, op, active_bytes)})
            if layer_rows:
                per_layer[f"offload/{tag}/hit_rate"] = [1.0 - float(m) / float(a) if float(a) else 1.0
                                                        for m, a in zip(mis, acc)]

        caps = torch.tensor([[capacity_rows(c, int(w)) for w in per_row_width] for c in self.caps],
                            device=masks.device)  # [V, R]
        for policy in self.policies:
            if policy == "lru":  # one pass answers every capacity
                res = replay(masks, LRU(caps, width), warmup, coalesce)
                for v, c in enumerate(self.caps):
                    record(f"lru/{cap_label(c)}", res.misses[v], res.ops[v], res.resident[v], c == self.per_layer_cap)
            elif policy == "hot":
                row_counts = counts.repeat_interleave(n, dim=0)
                for v, c in enumerate(self.caps):
                    res = replay(masks, Hot(hot_set(row_counts, caps[v])), warmup, coalesce)
                    record(f"hot/{cap_label(c)}", res.misses, res.ops, res.resident, c == self.per_layer_cap)
            else:
                for k in self.ks:
                    res = replay(masks, Window(k, rows, width, masks.device), warmup, coalesce)
                    record(f"window/k{k}", res.misses, res.ops, res.resident, True)
        return metrics, per_layer
