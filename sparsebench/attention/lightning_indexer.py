"""Lightning indexer (DeepSeek-V3.2-Exp, DeepSeek Sparse Attention), warm-up stage.

Per layer a small scorer reads the attention block's input h: H_I query heads of dim d_I
(q_{t,j} = W_q h_t), one key of dim d_I shared by every indexer head
(k_s = LayerNorm(W_k h_s)), and one weight per head (w_{t,j} = W_w h_t / sqrt(H_I d_I)).
The index score of key s for query t is I_{t,s} = sum_j w_{t,j} ReLU(q_{t,j} . k_s); each
query attends to its top-k keys s <= t by that score, the same keys for every attention
head. The indexer keys are cached per token (``observe``), so a decode step scores every
past token with one [n, d_I] matrix product.

Training is the paper's warm-up stage: the model is frozen, and each layer's indexer is
fitted so that softmax_s I_{t,s} matches the dense attention distribution summed over all
attention heads and L1-normalised over s <= t, by KL(p_t || softmax(I_t)), with Adam.

As the reference runs it (deepseek-ai/DeepSeek-V3.2-Exp, inference/model.py, class
``Indexer``), kept here:
- scores: ReLU of the per-head dot products, weighted by a per-token, per-head weight
  projected from the hidden state, scaled by H_I^-1/2 and d_I^-1/2 (``weights_proj(x) *
  n_heads**-0.5 * softmax_scale``); one key per token shared by all indexer heads;
- the key is LayerNorm-ed (learned affine) before RoPE;
- RoPE on the first part of q and k (the reference: 64 of 128 dims, ``rope_fraction: 0.5``),
  in the non-interleaved (rotate-half) layout of the reference's corrected indexer (for
  projections trained here, which channel pairs rotate is immaterial);
- top-k over every key s <= t, the query's own token included, no forced sink or recent
  tokens; one selection shared by all attention heads; every layer has an indexer
  (``dense_layers: []``).
Named deviations:
- the reference's indexer query reads MLA's normalised low-rank query latent (``qr``); the
  models here have no such latent, so the query projection reads the attention input h
  (already normalised by the block's input norm), as the key does;
- no FP8 quantisation and no Hadamard rotation of q and k (``rotate_activation``): both are
  there for the FP8 kernel; the rotation is orthogonal, so in float32 it changes no score;
  all indexer arithmetic is float32 whatever the model's dtype;
- the rotary frequencies are the indexer's own (``rope_theta``, no YaRN scaling); the
  reference shares the model's YaRN-scaled ones; positions are KV-cache indices (a constant
  shift, e.g. left padding, leaves RoPE dot products unchanged);
- ties in I are broken towards the later key (deterministic, so the decode and the
  teacher-forced paths choose the same keys); the reference uses ``topk``'s unspecified order;
- only the warm-up stage: the main model is never trained with the sparse selection (the
  paper's second stage), and the indexer is trained on the calibration windows only: Adam,
  ``steps: 200`` at ``lr: 0.003``, one calibration batch per step (cycled), the KL averaged
  over queries (the paper: 1000 steps at 1e-3 of 16 x 128K tokens, the KL summed over t,
  which only rescales it); few calibration tokens overfit (held-out KL rises again), so
  give it the data's calibration windows, not a handful of sequences;
- ``prefill: dense`` by default (only decode steps select, as every attention method
  here); the reference selects in prefill too, which ``prefill: sparse`` reproduces
  (each query's own top-k among s <= t);
- ``budget`` defaults to 1024 tokens (the reference's ``index_topk`` is 2048), the same
  default as the other attention methods; a budget covering the context runs dense.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from . import ATTENTION_METHODS
from .base import AttentionCall, AttentionMethod, Selection, budget_tokens, check_budget

_PARAMS = ("wq", "wk", "k_norm_weight", "k_norm_bias", "ww")
LN_EPS = 1e-6


# -- the scorer (pure functions of one layer's weights) ------------------------------------

def rope(x: torch.Tensor, positions: torch.Tensor, rope_dim: int, theta: float) -> torch.Tensor:
    """Rotary embedding on the first ``rope_dim`` channels of x [..., T, (heads,) d] in the
    rotate-half layout; positions [T]. The rest of the channels pass unchanged."""
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    inv = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) * 2 / rope_dim)
    ang = positions.to(torch.float32)[:, None] * inv[None, :]  # [T, half]
    cos, sin = ang.cos(), ang.sin()
    if x.dim() == 4:  # [b, T, heads, d]
        cos, sin = cos[:, None], sin[:, None]
    a, b, rest = x[..., :half], x[..., half:rope_dim], x[..., rope_dim:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def append_in_place(state: dict, start: int, new: torch.Tensor) -> torch.Tensor:
    """The indexer keys of positions [0, start) in ``state`` followed by ``new`` [b, t, d_I], as
    a view of a buffer in ``state`` grown by doubling: a decode step writes its one key in place,
    as the KV cache does, instead of copying every cached key (a cost the method does not have).
    A state copied by ``copy.deepcopy`` (the session's snapshots) keeps the view on its buffer."""
    buf, keys = state.get("index_keys_buf"), state.get("index_keys")
    end = start + new.shape[1]
    reusable = (buf is not None and keys is not None and keys.data_ptr() == buf.data_ptr()
                and buf.shape[0] == new.shape[0] and buf.dtype == new.dtype and end <= buf.shape[1])
    if not reusable:
        cap = max(end, 2 * (buf.shape[1] if buf is not None else 0), 256)
        grown = new.new_empty(new.shape[0], cap, new.shape[2])
        if start:
            grown[:, :start] = keys[:, :start]
        buf = state["index_keys_buf"] = grown
    buf[:, start:end] = new
    return buf[:, :end]


def index_keys(w: dict, hidden: torch.Tensor, positions: torch.Tensor, rope_dim: int, theta: float) -> torch.Tensor:
    """Indexer keys [b, T, d_I] of hidden [b, T, D] at cache positions [T]."""
    k = F.linear(hidden.float(), w["wk"])
    k = F.layer_norm(k, (k.shape[-1],), w["k_norm_weight"], w["k_norm_bias"], LN_EPS)
    return rope(k, positions, rope_dim, theta)


def index_queries(w: dict, hidden: torch.Tensor, positions: torch.Tensor, rope_dim: int,
                  theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer queries [b, T, H_I, d_I] and head weights [b, T, H_I] (scaled by
    H_I^-1/2 d_I^-1/2, as the reference)."""
    heads, dim = w["ww"].shape[0], w["wk"].shape[0]
    h = hidden.float()
    q = F.linear(h, w["wq"]).unflatten(-1, (heads, dim))
    q = rope(q, positions, rope_dim, theta)
    weights = F.linear(h, w["ww"]) * (heads ** -0.5 * dim ** -0.5)
    return q, weights


def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """I [b, T, n] = sum_j weights[..., j] * ReLU(q[..., j, :] . k). One query (a decode step):
    all heads in one product; several (training, prefill): one head at a time, so at most one
    [b, T, n] product is alive besides the sum."""
    kt = keys.transpose(-1, -2)
    if q.shape[-3] == 1:  # [b, 1, H, d] @ [b, 1, d, n] -> [b, 1, H, n]
        return (weights[..., None, :] @ torch.matmul(q, kt[:, None]).relu()).squeeze(-2)
    out = None
    for j in range(q.shape[-2]):
        term = torch.matmul(q[..., j, :], kt).relu() * weights[..., j, None]
        out = term if out is None else out + term
    return out


def rank_keys(scores: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) of each key along the last axis: higher score first, ties to the later
    key. Disallowed keys should be -inf already (they rank last)."""
    n = scores.shape[-1]
    order = scores.flip(-1).argsort(dim=-1, descending=True, stable=True)
    order = n - 1 - order  # back to key indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(n, device=scores.device).expand_as(order))
    return ranks


def top_keys(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k best keys of scores [..., n] (rule of ``rank_keys``: ties to the later key) as
    ascending indices, -1 (at the end) where fewer than k keys are allowed (score -inf).
    Linear in n, no sort: every key above the k-th best score, then the latest keys equal
    to it until there are k."""
    n = scores.shape[-1]
    k = min(k, n)
    kth = scores.topk(k, dim=-1).values[..., -1:]  # the k-th best score of each row
    above = scores > kth
    tied = (scores == kth) & (kth > float("-inf"))
    tied_from_end = tied.flip(-1).cumsum(-1).flip(-1)  # tied keys at or after each position
    keep = above | (tied & (tied_from_end <= k - above.sum(-1, keepdim=True)))
    slot = torch.where(keep, keep.cumsum(-1) - 1, k)  # each kept key's place among the kept
    out = torch.full((*scores.shape[:-1], k + 1), -1, dtype=torch.long, device=scores.device)
    out.scatter_(-1, slot, torch.arange(n, device=scores.device).expand_as(slot))
    return out[..., :k]


def attention_target(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """p [b, q, n]: the dense attention probabilities summed over the query heads and
    normalised to 1 over the allowed keys (a row with none is 0)."""
    hq, hkv = query.shape[1], key.shape[1]
    g = hq // hkv
    mask = allowed[:, 0]
    total = None
    for j in range(hq):
        s = torch.matmul(query[:, j].float(), key[:, j // g].float().transpose(-1, -2)) * scaling
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        total = p if total is None else total + p
    total = torch.nan_to_num(total, nan=0.0)
    norm = total.sum(-1, keepdim=True)
    return torch.where(norm > 0, total / norm.clamp(min=1e-30), total)


def kl_loss(scores: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(target_t || softmax(scores_t)) over the allowed keys."""
    logq = torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).masked_fill(~allowed, 0.0)
    kl = torch.special.xlogy(target, target) - target * logq
    return kl.sum(-1).mean()


@ATTENTION_METHODS.register("lightning_indexer")
class LightningIndexer(AttentionMethod):
    needs_calibration = True
    calibration_params = ("index_heads", "index_dim", "rope_fraction", "rope_theta", "steps", "lr", "seed")

    def __init__(self, cfg):
        super().__init__(cfg)
        self._weights: dict[int, dict[str, torch.Tensor]] = {}  # layer -> its weights (CPU)
        self._on_device: dict[tuple[int, torch.device], dict[str, torch.Tensor]] = {}
        self._collect: dict | None = None  # during calibration: layer -> captured data
        self._report: dict = {}

    # -- configuration ------------------------------------------------------------------------
    def validate(self) -> None:
        super().validate()
        check_budget(self.cfg)
        for key in ("index_heads", "index_dim", "steps"):
            v = self.cfg.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"attention.{key}={v!r} must be a positive integer, e.g. attention.{key}=4")
        seed = self.cfg.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"attention.seed={seed!r} must be a non-negative integer, e.g. attention.seed=0")
        for key, example in (("lr", "0.003"), ("rope_theta", "10000.0")):
            v = self.cfg.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"attention.{key}={v!r} must be a positive number, e.g. attention.{key}={example}")
        frac = self.cfg.get("rope_fraction")
        if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 <= frac <= 1:
            raise ConfigError(f"attention.rope_fraction={frac!r} must be in [0, 1], e.g. attention.rope_fraction=0.5")
        channels = frac * self.cfg.index_dim
        if abs(channels - round(channels)) > 1e-6 or round(channels) % 2:
            raise ConfigError(f"attention.rope_fraction={frac} of attention.index_dim={self.cfg.index_dim} must be "
                              "an even number of channels, e.g. attention.rope_fraction=0.5")

    @property
    def rope_dim(self) -> int:
        return round(float(self.cfg.rope_fraction) * int(self.cfg.index_dim))

    @property
    def rope_theta(self) -> float:
        return float(self.cfg.rope_theta)

    def applies(self, layer: int, layer_type: str | None) -> bool:
        if self._collect is not None:  # calibration fits every full-attention layer
            return layer_type in (None, "full_attention")
        return super().applies(layer, layer_type)

    # -- state ----------------------------------------------------------------------------------
    def load_state(self, state: dict) -> None:
        layers = [int(i) for i in state["layers"].tolist()]
        self._weights = {layer: {p: state[p][i].detach().float().cpu() for p in _PARAMS}
                         for i, layer in enumerate(layers)}
        self._on_device.clear()
        self._report = {key: state[key].tolist() for key in ("loss_initial", "loss_final") if key in state}
        self._report["layers"] = layers

    def weights(self, layer: int, device) -> dict[str, torch.Tensor] | None:
        """One layer's indexer weights on ``device`` (None: no indexer for that layer)."""
        w = self._weights.get(layer)
        if w is None:
            return None
        device = torch.device(device)
        key = (layer, device)
        if key not in self._on_device:
            self._on_device[key] = {p: t.to(device) for p, t in w.items()}
        return self._on_device[key]

    # -- per call -------------------------------------------------------------------------------
    def observe(self, call: AttentionCall) -> None:
        if self._collect is not None:
            self._capture(call)
            return
        w = self.weights(call.layer, call.query.device)
        if w is None:
            return
        if call.hidden is None:
            raise RuntimeError(f"lightning_indexer: layer {call.layer} gave no hidden states to index")
        state = call.state
        start = call.n_keys - call.q_len
        keys = state.get("index_keys")
        done = 0 if keys is None else keys.shape[1]
        if done < start:
            raise RuntimeError(f"lightning_indexer: layer {call.layer} has indexer keys for {done} of the {start} "
                               "cached tokens; attach the session before the prefill, and restore() its snapshot "
                               "together with the KV cache")
        new = index_keys(w, call.hidden, call.positions, self.rope_dim, self.rope_theta)
        state["index_keys"] = append_in_place(state, start, new)

    def _scores(self, call: AttentionCall) -> torch.Tensor:
        """I [b, q_len, n_keys] of this call's queries over every cached key; -inf where the
        model's mask forbids the key."""
        w = self.weights(call.layer, call.query.device)
        if w is None or "index_keys" not in call.state:
            raise RuntimeError("lightning_indexer has no trained indexer for layer "
                               f"{call.layer}: run calibrate() or load_state() first")
        keys = call.state["index_keys"]
        if keys.shape[1] != call.n_keys:
            raise RuntimeError(f"lightning_indexer: layer {call.layer} has {keys.shape[1]} indexer keys "
                               f"for {call.n_keys} cached tokens")
        q, weights = index_queries(w, call.hidden, call.positions, self.rope_dim, self.rope_theta)
        return index_scores(q, weights, keys).masked_fill(~call.allowed[:, 0], float("-inf"))

    def select(self, call: AttentionCall) -> Selection | None:
        n = call.n_keys
        if budget_tokens(self.cfg, n) >= n:
            return None
        scores = self._scores(call)  # [b, q, n]
        if call.q_len == 1:
            index = top_keys(scores[:, 0], budget_tokens(self.cfg, n))  # [b, k]
            return Selection(index=index[:, None].expand(-1, call.key.shape[1], -1))
        # every query as its decode step would: its own top-k among the keys s <= t
        pos = call.positions
        k_each = torch.tensor([budget_tokens(self.cfg, int(t) + 1) for t in pos.tolist()], device=scores.device)
        keep = (rank_keys(scores) < k_each[:, None]) & call.allowed[:, 0]
        # one row per query head (a view): AttentionSparsity's statistics need the heads
        # axis to be kv_heads or q_heads, though masked attention would broadcast a 1
        return Selection(keep=keep[:, None].expand(-1, call.query.shape[1], -1, -1))

    # -- calibration ----------------------------------------------------------------------------
    def _capture(self, call: AttentionCall) -> None:
        if call.q_len != call.n_keys or call.hidden is None:  # only whole-sequence forwards
            return
        allowed = call.allowed
        target = attention_target(call.query, call.key, allowed, call.scaling)
        self._collect.setdefault(call.layer, []).append(
            (call.hidden.detach().float().clone(), target.clone(), allowed[:, 0].clone()))

    def calibrate(self, model, session, batches: list[torch.Tensor]) -> dict:
        """Fit every full-attention layer's indexer to the dense attention of ``batches``
        (the model is frozen). Returns the state: per trained layer (``layers``) the stacked
        weights, the per-step training losses (``losses`` [layers, steps], step i on batch
        i mod len(batches)) and the KL over all batches before and after (``loss_initial``,
        ``loss_final``). ``session`` (attached or not, or None) carries the post-RoPE queries
        and keys of a dense forward to ``observe``; the targets kept meanwhile take
        4 * tokens * seq_len bytes per full-attention layer (16 x 512 tokens: 16 MiB)."""
        if not batches:
            raise ConfigError("lightning_indexer needs calibration batches")
        if session is None:
            from .base import AttentionSparsity

            session = AttentionSparsity(self, record_stats=False)
        attached_here = session is None or not session.attached  # the queries and keys come through it
        if attached_here:
            session.attach(model)
        device = next(model.parameters()).device
        self._collect = {}
        try:
            with torch.no_grad(), session.dense():
                for ids in batches:
                    session.reset()
                    model(ids.to(device), use_cache=False)
            data, self._collect = self._collect, None
        finally:
            self._collect = None
            session.reset()
            if attached_here:
                session.detach()
        if not data:
            raise ConfigError("lightning_indexer: the model has no full-attention layer to index "
                              "(sliding-window layers stay dense)")
        gen = torch.Generator().manual_seed(int(self.cfg.seed))
        layers = sorted(data)
        per_layer = [self._fit(data[layer], gen) for layer in layers]
        state = {"layers": torch.tensor(layers, dtype=torch.long, device="cpu")}  # states live on the CPU
        for key in (*_PARAMS, "losses", "loss_initial", "loss_final"):
            state[key] = torch.stack([r[key] for r in per_layer])
        return state

    def _fit(self, samples: list, gen: torch.Generator) -> dict[str, torch.Tensor]:
        # ordinary tensors with autograd on, also when called under inference_mode / no_grad
        with torch.inference_mode(False), torch.enable_grad():
            return self._fit_layer([tuple(t.clone() for t in s) for s in samples], gen)

    def _fit_layer(self, samples: list, gen: torch.Generator) -> dict[str, torch.Tensor]:
        heads, dim = int(self.cfg.index_heads), int(self.cfg.index_dim)
        hidden = samples[0][0].shape[-1]
        device = samples[0][0].device
        std = hidden ** -0.5
        # drawn on the CPU (the same initial weights on every device), trained on the samples'
        # device in float32 (the samples are float32 whatever the model's dtype)
        init = {
            "wq": torch.randn(heads * dim, hidden, generator=gen, device="cpu") * std,
            "wk": torch.randn(dim, hidden, generator=gen, device="cpu") * std,
            "k_norm_weight": torch.ones(dim, device="cpu"),
            "k_norm_bias": torch.zeros(dim, device="cpu"),
            "ww": torch.randn(heads, hidden, generator=gen, device="cpu") * std,
        }
        rope_dim, theta = self.rope_dim, self.rope_theta

        def loss_of(w, sample):
            h, target, allowed = sample
            pos = torch.arange(h.shape[1], device=h.device)
            q, weights = index_queries(w, h, pos, rope_dim, theta)
            scores = index_scores(q, weights, index_keys(w, h, pos, rope_dim, theta))
            return kl_loss(scores, target, allowed)

        def full_loss(w) -> float:
            with torch.no_grad():
                tokens = [s[0].shape[0] * s[0].shape[1] for s in samples]
                return sum(float(loss_of(w, s)) * t for s, t in zip(samples, tokens, strict=True)) / sum(tokens)

        params = {p: t.to(device).requires_grad_(True) for p, t in init.items()}
        before = full_loss(params)
        opt = torch.optim.Adam(params.values(), lr=float(self.cfg.lr))
        losses = []
        for step in range(int(self.cfg.steps)):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(params, samples[step % len(samples)])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        after = full_loss(params)
        out = {p: t.detach().cpu() for p, t in params.items()}
        out["losses"] = torch.tensor(losses, dtype=torch.float32, device="cpu")
        out["loss_initial"] = torch.tensor(before, dtype=torch.float32, device="cpu")
        out["loss_final"] = torch.tensor(after, dtype=torch.float32, device="cpu")
        return out

    # -- reporting ----------------------------------------------------------------------------
    def selection_bytes(self, n_keys: int, kv_heads: int, head_dim: int, elem_bytes: int) -> int:
        """The cached indexer keys (n_keys x d_I) plus the indexer's weights, read once per
        decode step; counted at ``elem_bytes`` (the reference keeps FP8 keys: pass 1)."""
        heads, dim = int(self.cfg.index_heads), int(self.cfg.index_dim)
        w = next(iter(self._weights.values()), None)
        hidden = w["wk"].shape[1] if w is not None else 0
        weights = (heads * dim + dim + heads) * hidden + 2 * dim
        return (n_keys * dim + weights) * elem_bytes

    def summary(self) -> dict:
        out = {"budget": int(self.cfg.budget), "budget_fraction": self.cfg.get("budget_fraction"),
               "index_heads": int(self.cfg.index_heads), "index_dim": int(self.cfg.index_dim),
               "rope_fraction": float(self.cfg.rope_fraction), "steps": int(self.cfg.steps), "lr": float(self.cfg.lr)}
        if self._report:
            out["trained_layers"] = self._report.get("layers")
            out["kl_initial"] = self._report.get("loss_initial")
            out["kl_final"] = self._report.get("loss_final")
        return out
