"""The attention-method interface and the hook that applies a method to a model.

How a method reaches the model: ``AttentionSparsity.attach`` registers one attention
function with transformers' ``AttentionInterface`` under the name ``sparsebench`` (its mask
function is sdpa's, so the model builds exactly the masks it builds for sdpa) and a forward
pre-hook on every decoder layer's attention module. The hook hands the layer's handle to
that function through the keyword arguments every supported attention module forwards to
its attention interface, so no modeling file is copied and nothing is written into the
modules; ``detach`` restores the model's own implementation.

For each call the method returns a ``Selection``: a boolean mask of the keys each query may
attend to (``keep``), optionally the same keys as indices for the one-query decode step
(``index``: the gather path then reads only those rows of the KV cache), and/or a mask of
the heads that run (``heads``). Attention is then dense attention restricted to the kept
keys; a dropped head contributes zero. A selection that keeps every key the model's own
mask allows, and every head, runs the model's sdpa attention itself, so a full budget
reproduces the dense model bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError

ATTN_IMPLEMENTATION = "sparsebench"
HANDLE_KWARG = "sparsebench_attention"


@dataclass
class AttentionCall:
    """One call of one layer's attention, as the method sees it."""

    layer: int
    query: torch.Tensor  # [batch, q_heads, q_len, head_dim] (rotary applied)
    key: torch.Tensor  # [batch, kv_heads, n_keys, head_dim]: the whole cache, this step included
    value: torch.Tensor
    hidden: torch.Tensor | None  # [batch, q_len, hidden]: the attention block's input
    attention_mask: torch.Tensor | None  # the model's mask for this call (None: plain causal)
    scaling: float
    state: dict  # this layer's state across the steps of one sequence (reset per sequence)

    @functools.cached_property
    def allowed(self) -> torch.Tensor:
        """bool [batch, 1, q_len, n_keys]: the keys the dense model's mask allows."""
        return allowed_keys(self.attention_mask, self.query.shape[0], self.q_len, self.n_keys, self.query.device)

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def n_keys(self) -> int:
        return self.key.shape[2]

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    @property
    def positions(self) -> torch.Tensor:
        """Cache index of each query (the cache holds the keys before it and itself)."""
        return torch.arange(self.n_keys - self.q_len, self.n_keys, device=self.query.device)


@dataclass
class Selection:
    """What attention reads. ``keep``: bool, broadcastable to [batch, heads, q_len, n_keys]
    with heads 1, kv_heads or q_heads (True = attend). ``index``: for a one-query step, the
    kept keys as cache indices [batch, heads, k] (heads kv_heads or q_heads; -1 pads),
    used instead of ``keep`` to read only those rows. ``heads``: bool [batch, q_len, q_heads]
    (True = the head runs)."""

    keep: torch.Tensor | None = None
    index: torch.Tensor | None = None
    heads: torch.Tensor | None = None


class AttentionMethod:
    """Select keys (or heads) per query. Subclasses implement ``select``; trained methods
    set ``needs_calibration`` and implement ``calibrate``/``load_state``."""

    name: str = "base"
    needs_calibration: bool = False
    calibration_params: tuple[str, ...] = ()
    calibration_version: int = 1

    def __init__(self, cfg):
        self.cfg = cfg
        self.validate()

    def validate(self) -> None:
        layers = _plain(self.cfg.get("dense_layers", []))
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                    for i in layers):
            raise ConfigError(f"attention.dense_layers={layers!r} must be a list of layer indices, "
                              "e.g. attention.dense_layers=[0,1]")
        if self.prefill not in ("dense", "sparse"):
            raise ConfigError(f"attention.prefill={self.prefill!r} must be dense or sparse, e.g. attention.prefill=dense")

    @property
    def prefill(self) -> str:
        """dense: multi-query forwards (prefill, scoring) attend densely, only decode steps
        are sparse; sparse: every query selects as it would in decode (teacher forcing)."""
        return str(self.cfg.get("prefill", "dense"))

    def applies(self, layer: int, layer_type: str | None) -> bool:
        """Layers the method sparsifies: all but ``dense_layers`` and sliding-window layers
        (those already read a bounded window, and their caches are truncated)."""
        return layer not in self.cfg.get("dense_layers", []) and layer_type in (None, "full_attention")

    def observe(self, call: AttentionCall) -> None:
        """Called on every call of a layer the method applies to, dense ones included (a
        dense prefill, the dense baseline), before any selection: a method that keeps its
        own per-token cache (an indexer's keys) extends it here, in ``call.state``."""

    def select(self, call: AttentionCall) -> Selection | None:
        """What this call attends to; None = every key and head (dense)."""
        raise NotImplementedError

    # -- trained methods -------------------------------------------------------------------
    def calibration_key(self) -> dict[str, Any]:
        return {"method": self.name, "version": self.calibration_version,
                **{k: _plain(self.cfg.get(k)) for k in self.calibration_params}}

    def calibrate(self, model, session: AttentionSparsity, batches: list[torch.Tensor]) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    # -- reporting --------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return {}

    def selection_bytes(self, n_keys: int, kv_heads: int, head_dim: int, elem_bytes: int) -> int:
        """Bytes one decode step of one layer reads to decide what to attend to (page
        metadata, indexer keys), besides the K/V rows it then reads."""
        return 0


def _plain(v):
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
    except ImportError:  # pragma: no cover
        return v


def budget_tokens(cfg, context: int) -> int:
    """Keys one query may attend to: ``budget_fraction`` of the context when set, else
    ``budget`` tokens."""
    frac = cfg.get("budget_fraction")
    return int(math.ceil(float(frac) * context)) if frac is not None else int(cfg.budget)


def check_budget(cfg) -> None:
    b, frac = cfg.get("budget"), cfg.get("budget_fraction")
    if not isinstance(b, int) or isinstance(b, bool) or b < 1:
        raise ConfigError(f"attention.budget={b!r} must be a positive number of tokens, e.g. attention.budget=1024")
    if frac is not None and (not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 < frac <= 1):
        raise ConfigError(f"attention.budget_fraction={frac!r} must be in (0, 1] or null, "
                          "e.g. attention.budget_fraction=0.25")


# -- the computation ------------------------------------------------------------------------

def allowed_keys(attention_mask, batch: int, q_len: int, n_keys: int, device) -> torch.Tensor:
    """The dense model's mask as bool [batch, 1, q_len, n_keys]. sdpa's mask builder returns
    None when plain causal attention suffices; then query i sees keys up to n - q + i."""
    if attention_mask is None:
        pos = torch.arange(n_keys - q_len, n_keys, device=device)
        causal = torch.arange(n_keys, device=device)[None, :] <= pos[:, None]
        return causal[None, None].expand(batch, 1, q_len, n_keys)
    m = attention_mask[..., :n_keys]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    return m.expand(batch, 1, q_len, n_keys) if m.shape[1] == 1 else m


def expand_heads(mask: torch.Tensor, q_heads: int) -> torch.Tensor:
    """A [batch, h, ...] mask with h in {1, kv_heads, q_heads} as one row per query head
    (query head j uses kv head j // groups, the layout of transformers' repeat_kv)."""
    h = mask.shape[1]
    if h in (1, q_heads):
        return mask
    return mask.repeat_interleave(q_heads // h, dim=1)


def masked_attention(query, key, value, keep, scaling, softcap=None) -> torch.Tensor:
    """Dense attention over the keys ``keep`` allows ([batch, q_heads, q_len, n_keys]);
    output [batch, q_len, q_heads, head_dim] as transformers' attention functions return it.
    The reference every faster path is tested against."""
    g = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(g, dim=1) if g > 1 else key
    v = value.repeat_interleave(g, dim=1) if g > 1 else value
    scores = torch.matmul(query, k.transpose(-1, -2)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0).to(query.dtype)  # a query with no key left reads nothing
    return torch.matmul(probs, v).transpose(1, 2).contiguous()


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, h, index[b, h, k]]`` for x [batch, heads, n, d] and index [batch, heads, k]: one
    ``index_select`` of whole rows of the flattened cache (several times faster on CPU than
    ``gather`` with an index expanded over d)."""
    b, h, n, d = x.shape
    s0, s1, s2, s3 = x.stride()
    if s3 == 1 and s2 == d and s1 % d == 0 and s0 % d == 0:
        # rows of the storage x views (a preallocated cache hands attention a view of its buffer)
        rows = x.as_strided(((b - 1) * (s0 // d) + (h - 1) * (s1 // d) + n, d), (d, 1))
        offsets = (torch.arange(b, device=x.device)[:, None] * (s0 // d)
                   + torch.arange(h, device=x.device)[None, :] * (s1 // d))[..., None]
    else:
        rows = x.reshape(b * h * n, d)
        offsets = (torch.arange(b * h, device=x.device) * n).view(b, h, 1)
    return rows.index_select(0, (index + offsets).flatten()).view(b, h, -1, d)


def gathered_attention(query, key, value, index, scaling) -> torch.Tensor:
    """One-query attention that reads only the rows ``index`` names ([batch, h, k], h the
    kv heads or the query heads; -1 pads). Output [batch, 1, q_heads, head_dim]."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    valid = index >= 0
    if bool(valid.all()):  # no padding: no mask (sdpa's fast path)
        valid = None
    idx = index.clamp(min=0) if valid is not None else index
    if idx.shape[1] == hq and g > 1:  # per query head: each group's rows from its kv head
        k_sel = idx.shape[-1]
        flat = idx.reshape(b, hkv, g * k_sel)
        ks = gather_rows(key, flat).view(b, hq, k_sel, d)
        vs = gather_rows(value, flat).view(b, hq, k_sel, d)
        mask = None if valid is None else valid[:, :, None, :]
        out = F.scaled_dot_product_attention(query, ks, vs, attn_mask=mask, scale=scaling)
    else:
        ks, vs = gather_rows(key, idx), gather_rows(value, idx)
        mask = None if valid is None else expand_heads(valid, hq)[:, :, None, :]
        out = F.scaled_dot_product_attention(query, ks, vs, attn_mask=mask, scale=scaling, enable_gqa=g > 1)
    return out.transpose(1, 2).contiguous()


def headwise_attention(query, key, value, heads, scaling) -> torch.Tensor:
    """One-query attention of the heads ``heads`` keeps ([batch, 1, q_heads]; the others
    output zero) that reads the K/V rows of a KV group only when one of its query heads runs.
    ``masked_attention`` with every key allowed, times ``heads``, is its reference: that
    path expands K/V to every query head, a copy of the whole cache per step."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    run = heads[:, 0].view(b, hkv, g)
    out = query.new_zeros(b, 1, hq, d)
    for i, j in run.any(-1).nonzero().tolist():  # (batch row, KV group) pairs with a head to run
        rows = slice(j * g, (j + 1) * g)
        o = F.scaled_dot_product_attention(query[i:i + 1, rows], key[i:i + 1, j:j + 1],
                                           value[i:i + 1, j:j + 1], scale=scaling, enable_gqa=g > 1)
        out[i, 0, rows] = o[0, :, 0] * run[i, j, :, None].to(o.dtype)
    return out


def index_to_keep(index: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[batch, h, k] indices (-1 pads) as a bool [batch, h, 1, n_keys] mask."""
    keep = torch.zeros(*index.shape[:2], n_keys + 1, dtype=torch.bool, device=index.device)
    keep.scatter_(-1, torch.where(index < 0, n_keys, index), True)
    return keep[..., :n_keys].unsqueeze(2)


# -- the hook ---------------------------------------------------------------------------------

@dataclass
class LayerStats:
    """Per layer, summed over the calls since ``reset_stats``: sparse calls, queries, and
    (query, kv head) key reads allowed vs attended; heads run vs available."""

    calls: int = 0
    queries: int = 0
    keys_allowed: int = 0
    keys_attended: int = 0
    heads_total: int = 0
    heads_run: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class RowVariant:
    """One batch row of ``AttentionSparsity.per_row``: the context it attends in (made and
    entered around each of its calls), its per-layer state and its statistics."""

    enter: Callable[[], contextlib.AbstractContextManager]
    states: dict
    stats: list[LayerStats]


@dataclass
class _Handle:
    session: AttentionSparsity
    layer: int
    layer_type: str | None
    hidden: torch.Tensor | None


def _layer_types(model) -> list[str | None]:
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    types = getattr(cfg, "layer_types", None)
    n = cfg.num_hidden_layers
    return list(types) if types else [None] * n


def attention_modules(model) -> list[nn.Module]:
    from ..models.adapters import adapter_for_config

    return [layer.self_attn for layer in adapter_for_config(model.config).decoder_layers(model)]


def _sparse_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    handle = kwargs.pop(HANDLE_KWARG, None)
    if handle is not None:
        session = handle.session
        if session.rows is not None and query.shape[0] > 1 and session.method.applies(handle.layer, handle.layer_type):
            outs = []
            for r, q, k, v, mask, hidden in _rows(query, key, value, attention_mask, handle.hidden):
                with session.as_row(r):
                    out = session.attend(_Handle(session, handle.layer, handle.layer_type, hidden), module, q, k, v,
                                         mask, scaling)
                if out is None:
                    out = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)[0]
                outs.append(out)
            return torch.cat(outs, dim=0), None
        out = session.attend(handle, module, query, key, value, attention_mask, scaling)
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _rows(query, key, value, attention_mask, hidden):
    """Each batch row of one attention call as a batch of one (a mask or hidden state
    shared by the batch is passed whole)."""
    b = query.shape[0]
    for r in range(b):
        sl = slice(r, r + 1)
        mask = attention_mask[sl] if attention_mask is not None and attention_mask.shape[0] == b else attention_mask
        yield r, query[sl], key[sl], value[sl], mask, (hidden[sl] if hidden is not None else None)


def register_attention_function() -> None:
    """Make ``sparsebench`` a known attention implementation (idempotent; done on attach,
    never at import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _sparse_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


class AttentionSparsity:
    """Applies one attention method to one model; per-layer state and statistics live here."""

    def __init__(self, method: AttentionMethod, record_stats: bool = True):
        self.method = method
        self.enabled = True
        self.record_stats = record_stats
        self.calibration_info: dict | None = None  # a trained method's: computed or cached, tokens
        self.stats: list[LayerStats] = []
        self._states: dict[int, dict] = {}
        self.rows: list[RowVariant] | None = None  # set by ``per_row``
        self._hooks: list = []
        self._model = None
        self._previous_impl = None

    # attach / detach
    @property
    def attached(self) -> bool:
        return self._model is not None

    def attach(self, model) -> AttentionSparsity:
        if self._model is not None:
            raise RuntimeError("already attached")
        register_attention_function()
        self._model = model
        self._previous_impl = model.config._attn_implementation
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        types = _layer_types(model)
        modules = attention_modules(model)
        self.stats = [LayerStats() for _ in modules]
        for i, mod in enumerate(modules):
            def hook(module, args, kwargs, i=i, layer_type=types[i]):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                kwargs[HANDLE_KWARG] = _Handle(self, i, layer_type, hidden)
                return args, kwargs

            self._hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._model is not None:
            self._model.set_attn_implementation(self._previous_impl)
        self._model = None

    def __enter__(self) -> AttentionSparsity:
        """``with AttentionSparsity(method).attach(model) as session:`` detaches on exit."""
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    @contextlib.contextmanager
    def dense(self):
        """Every layer attends densely inside (the same-process baseline)."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def reset(self) -> None:
        """Forget per-sequence state (a new sequence also resets it by itself)."""
        self._states.clear()

    def snapshot(self) -> dict:
        """A copy of the per-layer state, to continue one prefilled sequence several ways
        (with a copy of its KV cache): ``restore(snapshot)`` before each continuation."""
        return copy.deepcopy(self._states)

    def restore(self, snapshot: dict) -> None:
        self._states = copy.deepcopy(snapshot)

    def reset_stats(self) -> None:
        self.stats = [LayerStats() for _ in self.stats]

    @contextlib.contextmanager
    def per_row(self, variants: list[Callable[[], contextlib.AbstractContextManager]], snapshot: dict):
        """Inside, batch row r of every call attends as inside ``variants[r]()`` (a context
        such as ``dense()`` or a budget, entered around each of the row's calls), with its
        own per-sequence state (a copy of ``snapshot``) and its own statistics: one batched
        forward continues one prefilled sequence several ways, reading the weights once for
        all of them. Yields the ``RowVariant`` list (``.stats`` per row)."""
        rows = [RowVariant(variant, copy.deepcopy(snapshot), [LayerStats() for _ in self.stats])
                for variant in variants]
        was = self.rows
        self.rows = rows
        try:
            yield rows
        finally:
            self.rows = was

    @contextlib.contextmanager
    def as_row(self, r: int):
        """This session as batch row r of ``per_row``: its variant, state and statistics."""
        row = self.rows[r]
        states, stats, self._states, self.stats = self._states, self.stats, row.states, row.stats
        try:
            with row.enter():
                yield
        finally:
            self._states, self.stats = states, stats

    def layer_state(self, layer: int) -> dict:
        return self._states.setdefault(layer, {})

    # the call
    def attend(self, handle: _Handle, module, query, key, value, attention_mask, scaling):
        """Attention output for this call, or None to let the model's sdpa run."""
        b, hq, q_len, _ = query.shape
        n = key.shape[2]
        state = self._states.get(handle.layer)
        if state is None or n == q_len or n < state.get("n_keys", 0):  # a new sequence
            state = self._states[handle.layer] = {}
        state["n_keys"] = n
        method = self.method
        if not method.applies(handle.layer, handle.layer_type):
            return None
        scaling = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
        call = AttentionCall(handle.layer, query, key, value, handle.hidden, attention_mask, scaling, state)
        method.observe(call)
        if not self.enabled or (q_len > 1 and method.prefill == "dense"):
            return None
        sel = method.select(call)
        if sel is None:
            return None
        softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
        if q_len == 1 and not softcap and not self.record_stats and attention_mask is None:
            if sel.index is not None and sel.heads is None:
                # the decode fast path: a method returns indices only when it drops keys
                return gathered_attention(query, key, value, sel.index, scaling)
            if sel.heads is not None and sel.index is None and (sel.keep is None or sel.keep.shape[-1] == 1):
                return headwise_attention(query, key, value, sel.heads, scaling)
        allowed = call.allowed
        keep = sel.keep if sel.keep is not None or sel.index is None else index_to_keep(sel.index, n)
        full_keep = allowed if keep is None else expand_heads(keep, hq) & allowed
        if self.record_stats:
            self._record(handle.layer, allowed, full_keep, sel.heads, key.shape[1], hq)
        all_keys = keep is None or not bool((allowed & ~full_keep).any())
        if all_keys and (sel.heads is None or bool(sel.heads.all())):
            return None
        if q_len == 1 and sel.index is not None and not softcap:
            seen = allowed[:, 0, 0][:, None, :].expand(b, sel.index.shape[1], n).gather(-1, sel.index.clamp(min=0))
            out = gathered_attention(query, key, value, torch.where(seen & (sel.index >= 0), sel.index, -1), scaling)
        else:
            out = masked_attention(query, key, value, full_keep, scaling, softcap)
        if sel.heads is not None:
            out = out * sel.heads[..., None].to(out.dtype)
        return out

    def _record(self, layer, allowed, keep, heads, kv_heads, hq) -> None:
        s = self.stats[layer]
        b, _, q_len, n = keep.shape
        keep = keep.expand(b, hq, q_len, n) if keep.shape[1] == 1 else expand_heads(keep, hq)
        if heads is not None:  # a dropped head reads no K/V rows
            keep = keep & heads.transpose(1, 2)[..., None]
        # a kv row is read once per kv head when any query head of its group attends to it
        reads = keep.view(b, kv_heads, hq // kv_heads, q_len, n).any(2)
        s.calls += 1
        s.queries += b * q_len
        s.keys_allowed += int(allowed.sum()) * kv_heads
        s.keys_attended += int(reads.sum())
        s.heads_total += b * q_len * hq
        s.heads_run += int(heads.sum()) if heads is not None else b * q_len * hq

    def density(self) -> list[float]:
        """Per layer: attended / allowed key reads (1.0 for a dense layer)."""
        return [s.keys_attended / s.keys_allowed if s.keys_allowed else 1.0 for s in self.stats]

