"""Cached gather: keep the active neurons' weight rows in a compact cache and copy only
the rows that changed since the last token (Cython/OpenMP kernel in ``ext/cached_gather.pyx``).

Per layer (and per batch row, see below) a :class:`RowCache` holds, for the active
neurons in slots ``0..k-1``:

- ``inputs``: ``[capacity, n_in, hidden]`` — the rows of the projections still to be
  computed, **interleaved** per neuron (gate row then up row), so one ``mv`` over
  ``inputs[:k].view(k * n_in, hidden)`` computes both without a concatenation;
- ``down``: ``[capacity, hidden]`` — down stored transposed, one contiguous row per neuron;
- biases of those rows (OPT's fc1), when the model has them.

On each token the kernel diffs the new mask against the cached set, reuses the freed
slots for the neurons that entered and moves kept rows down only when the set shrinks:
the copies are O(changed rows), not O(active rows). The MLP then runs on the compact
cache. What the sparsifier already computed densely (``inp.computed``) is reused: CATS's
gate (only up and down rows are cached) or CETT's gate and up (only down rows).

Batches: by default every batch row has its own cache (per-row masks, e.g. one cache per
sequence during batched decoding); ``union: true`` keeps one cache per layer holding the
union of the rows' masks and multiplies each row by its own mask (``stats()`` reports the
union density). Rows of a multi-token forward (prefill) go through the cache one token
at a time, so every token really uses its own mask.

Dtypes: rows are copied as raw bytes, so fp32 and bf16 caches are bit-exact copies of the
weights. ``threads`` (null = torch's thread count) is passed explicitly to the OpenMP copy
loop, since torch and the extension share one libgomp.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.errors import ConfigError
from . import BACKENDS
from .base import Backend
from .index_select import UnionStats, flat_call, flat_rows
from .weights import finish_hidden, linear_weight_t, mlp_weights

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel():
    try:
        from .._ext import cached_gather
    except ImportError as e:  # pragma: no cover - the build always compiles it
        raise ConfigError(
            "backend=cached needs the compiled extension sparsebench._ext.cached_gather; "
            "reinstall with `pip install -e .` (needs a C compiler with OpenMP)"
        ) from e
    return cached_gather


class RowCache:
    """Compact cache of the rows of ``sources`` (each ``[num_neurons, width]``) for the
    active neurons. ``groups`` lists which sources are interleaved into one buffer."""

    def __init__(self, groups: list[list[torch.Tensor]], num_neurons: int, threads: int):
        self.kernel = kernel()
        self.num_neurons, self.threads = num_neurons, threads
        self.k = 0
        self.slot_of = torch.full((num_neurons,), -1, dtype=torch.int32)
        self.neuron_of = torch.zeros(num_neurons, dtype=torch.int32)
        self._jobs = torch.empty(2 * num_neurons, dtype=torch.int32)
        self._holes = torch.empty(num_neurons, dtype=torch.int32)
        self.buffers: list[torch.Tensor] = []
        planes = []
        for group in groups:
            first = group[0]
            width, es = first.shape[1] if first.dim() == 2 else 1, first.element_size()
            buf = torch.zeros(num_neurons, len(group), width, dtype=first.dtype)
            for j, src in enumerate(group):
                if src.dtype != first.dtype or not src.is_contiguous() or src.shape[0] != num_neurons:
                    raise ValueError("cache sources must be contiguous, of one dtype, one row per neuron")
                planes.append([src.data_ptr(), width * es, buf.data_ptr() + j * width * es,
                               len(group) * width * es, width * es])
            self.buffers.append(buf)
        self._sources = [s for g in groups for s in g]  # keep the pointers alive
        self._planes = np.asarray(planes, dtype=np.int64).reshape(-1, 5)
        self.updates = 0
        self.rows_copied = 0
        self.active = 0

    def update(self, mask_row: torch.Tensor) -> int:
        """Make slots 0..k-1 hold the neurons of ``mask_row`` (bool [num_neurons]);
        returns the number of rows copied."""
        m = mask_row if mask_row.is_contiguous() else mask_row.contiguous()
        m = m.view(torch.uint8)
        self.k, copied = self.kernel.update(
            m.data_ptr(), self.num_neurons, self.k, self.slot_of.data_ptr(), self.neuron_of.data_ptr(),
            self._jobs.data_ptr(), self._holes.data_ptr(), self._planes, self.threads)
        self.updates += 1
        self.rows_copied += copied
        self.active += self.k
        return copied

    def rows(self, i: int) -> torch.Tensor:
        """Buffer ``i`` restricted to the active slots."""
        return self.buffers[i][: self.k]

    @property
    def neurons(self) -> torch.Tensor:
        """Neuron id of each active slot (int64, for index_select)."""
        return self.neuron_of[: self.k].long()


def tokens_per_sequence(x: torch.Tensor, rows: int) -> int:
    """Rows of the flattened call that belong to one sequence (batch row), which owns a cache."""
    return max(rows // (x.shape[0] if x.dim() == 3 else 1), 1)


@BACKENDS.register("cached")
class CachedBackend(Backend):
    device_types = ("cpu",)  # a Cython/OpenMP kernel on host memory
    def __init__(self, cfg=None):
        super().__init__(cfg)
        get = (lambda k, d: cfg.get(k, d)) if cfg is not None else (lambda k, d: d)
        self.union = bool(get("union", False))
        threads = get("threads", None)
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ConfigError(f"backend.threads={threads} must be a positive integer or null")
        self.threads = threads
        kernel()  # fail at build time, not at the first token
        self._weights: dict = {}
        self._linear_weights: dict = {}
        self._caches: dict = {}
        self._union_stats = UnionStats()

    def _threads(self) -> int:
        return self.threads or torch.get_num_threads()

    def reset(self) -> None:
        self._caches = {}
        self._union_stats = UnionStats()

    def stats(self) -> dict:
        per_layer: dict = {}
        for key, c in self._caches.items():
            s = per_layer.setdefault(key[0], {"updates": 0, "rows_copied": 0, "active": 0})
            s["updates"] += c.updates
            s["rows_copied"] += c.rows_copied
            s["active"] += c.active
        out = {"per_layer": per_layer}
        if self.union:
            out |= self._union_stats.as_dict()
        return out

    def _cache(self, key, w, computed) -> RowCache:
        cache = self._caches.get(key)
        if cache is None or cache.signature != (w.source, computed):
            inputs = w.inputs_for(computed)
            groups = []
            if inputs:
                groups.append([wt for wt, _ in inputs])
                if any(b is not None for _, b in inputs):
                    groups.append([b if b is not None else torch.zeros_like(inputs[0][0][:, 0]) for _, b in inputs])
            groups.append([w.down_t])
            if w.up.dtype not in SUPPORTED_DTYPES:
                raise ConfigError(f"backend=cached supports {', '.join(map(str, SUPPORTED_DTYPES))}, not {w.up.dtype}")
            if w.up.device.type != "cpu":
                raise ConfigError(f"backend=cached runs on CPU; the model is on {w.up.device}: use backend=index_select")
            cache = RowCache(groups, w.num_neurons, self._threads())
            cache.signature = (w.source, computed)
            cache.n_in = len(inputs)
            cache.has_bias = len(groups) == 3
            self._caches[key] = cache
        return cache

    # ------------------------------------------------------------------ MLP
    def mlp(self, site, inp, mask):
        if mask is None:
            return site.down(inp.h)
        w = mlp_weights(site, self._weights)
        computed, x2, m2, act2, h2 = flat_call(w, inp, mask)
        if x2.shape[0] == 1 and not self.union:  # one token (decode at batch 1): the hot path
            cache = self._cache((site.layer_idx, 0), w, computed)
            cache.update(m2[0])
            return self._on_cache(cache, w, computed, x2, act2, h2, None).reshape(inp.x.shape)
        if self.union:
            union = m2.any(0)
            self._union_stats.add(union, m2)
            cache = self._cache((site.layer_idx, "union"), w, computed)
            cache.update(union)
            y = self._on_cache(cache, w, computed, x2, act2, h2, m2)
            return y.reshape(inp.x.shape)
        # one cache per batch row; the tokens of a row go through it in order
        per_seq = tokens_per_sequence(inp.x, x2.shape[0])
        out = torch.empty_like(x2)
        for n in range(x2.shape[0]):
            cache = self._cache((site.layer_idx, n // per_seq), w, computed)
            cache.update(m2[n])
            out[n] = self._on_cache(cache, w, computed, x2[n:n + 1],
                                    None if act2 is None else act2[n:n + 1],
                                    None if h2 is None else h2[n:n + 1], None)[0]
        return out.reshape(inp.x.shape)

    @staticmethod
    def _on_cache(cache, w, computed, x2, act2, h2, keep):
        k, neurons = cache.k, None
        pre = []
        if cache.n_in:
            rows = cache.rows(0).view(k * cache.n_in, w.hidden)  # interleaved: [g0, u0, g1, u1, ...]
            z = (x2 @ rows.t()).view(x2.shape[0], k, cache.n_in)
            if cache.has_bias:
                z = z + cache.rows(1).view(k, cache.n_in)
            pre = [z[..., j] for j in range(cache.n_in)]
        if act2 is not None or h2 is not None or keep is not None:
            neurons = cache.neurons
        sel = (lambda t: None if t is None else t.index_select(1, neurons))
        h = finish_hidden(w, computed, pre, sel(act2), sel(h2))
        if keep is not None:
            h = h * sel(keep).to(h.dtype)
        y = h @ cache.rows(len(cache.buffers) - 1).view(k, w.hidden)
        return y if w.down_bias is None else y + w.down_bias

    # ------------------------------------------------------------------ linear inputs
    def _linear_cache(self, key, wt, sig) -> RowCache:
        """A cache of rows of the transposed weight (one per input channel)."""
        cache = self._caches.get(key)
        if cache is None or cache.signature != sig:
            cache = RowCache([[wt]], wt.shape[0], self._threads())
            cache.signature = sig
            self._caches[key] = cache
        return cache

    def linear(self, inp, linear, mask):
        wt, bias = linear_weight_t(linear, (inp.layer_idx, inp.proj), self._linear_weights)
        sig = self._linear_weights[(inp.layer_idx, inp.proj)][2]
        x2, m2 = flat_rows(inp.x, mask)
        if self.union:
            union = m2.any(0)
            self._union_stats.add(union, m2)
            rows = [(union, x2 * m2.to(x2.dtype), "union")]
        else:
            per_seq = tokens_per_sequence(inp.x, x2.shape[0])
            rows = [(m2[n], x2[n:n + 1], n // per_seq) for n in range(x2.shape[0])]
        out = []
        for m, xs, row in rows:
            cache = self._linear_cache((inp.layer_idx, inp.proj, row), wt, sig)
            cache.update(m)
            out.append(xs.index_select(1, cache.neurons) @ cache.rows(0).view(cache.k, wt.shape[1]))
        y = out[0] if len(out) == 1 else torch.cat(out)  # one row: decode, no copy
        if bias is not None:
            y = y + bias
        return y.reshape(*inp.x.shape[:-1], wt.shape[1])
