"""Quest (Tang et al., 2024): query-aware selection of KV-cache pages, training-free.

Keys are grouped in pages of ``page_size`` consecutive cache positions; each page keeps the
per-channel min and max of its keys. For the current query q the page's criticality is the
upper bound of q·k over the page, sum_d max(q_d·min_d, q_d·max_d); attention then reads only
the top pages.

As the reference runs it (mit-han-lab/Quest, evaluation/quest_attention.py), the defaults:
- decode steps only (``prefill: dense``); the first two layers stay dense (``dense_layers: 2``);
- pages of 16; ``max(3, budget // page_size)`` pages per query (``min_pages: 3``); a budget
  in tokens; no forced sink or recent tokens; the last, partial page is scored like the rest;
- selection per query head (``group: query``: on a GQA model each query head of a group may
  pick different pages, and the kv rows read are the union over the group).
Named deviations: ``group: kv`` scores a page by the max bound over the group's query heads
and reads one set of pages per kv head (what a GQA serving kernel needs to save bytes);
``sink_tokens``/``recent_tokens`` force the first/last tokens in; ``budget_fraction`` sets the budget
as a fraction of the context; ``prefill: sparse`` applies the decode rule at every position of a
multi-token forward, each query scoring pages from the keys up to itself only, so long-window
perplexity measures what a token-by-token decode would see. Page bounds (min and max, exact
in any dtype) are kept in the cache's dtype on its device; page scores are computed in
float32 whatever the model's dtype (the reference scores in the model's fp16), so bf16
rounding does not create ties the decode and teacher-forced paths would break differently.
"""
from __future__ import annotations

import torch

from ..core.errors import ConfigError
from . import ATTENTION_METHODS
from .base import AttentionCall, AttentionMethod, Selection, budget_tokens, check_budget


def page_bound(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of q·k over each page, sum_d max(q_d·min_d, q_d·max_d): query [..., q, d],
    kmin/kmax [..., p, d] → [..., q, p]. As two matmuls: the max picks max_d where q_d ≥ 0
    and min_d where q_d < 0."""
    pos = query.clamp(min=0)
    return pos @ kmax.transpose(-1, -2) + (query - pos) @ kmin.transpose(-1, -2)


def _repeat(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


@ATTENTION_METHODS.register("quest")
class Quest(AttentionMethod):
    def validate(self) -> None:
        super().validate()
        check_budget(self.cfg)
        for key in ("page_size", "min_pages"):
            v = self.cfg.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"attention.{key}={v!r} must be a positive integer, e.g. attention.{key}=16")
        for key in ("sink_tokens", "recent_tokens"):
            v = self.cfg.get(key, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"attention.{key}={v!r} must be a non-negative integer, e.g. attention.{key}=4")
        if self.group not in ("query", "kv"):
            raise ConfigError(f"attention.group={self.group!r} must be query or kv, e.g. attention.group=query")

    @property
    def group(self) -> str:
        return str(self.cfg.get("group", "query"))

    def pages_for(self, context: int) -> int:
        """Pages one query reads at this context: ``max(min_pages, budget // page_size)`` as
        the reference, except that a budget covering the whole context reads all of it (the
        reference's floor would drop a partial page even then)."""
        page = int(self.cfg.page_size)
        budget = budget_tokens(self.cfg, context)
        if budget >= context:
            return -(-context // page)
        return max(int(self.cfg.min_pages), budget // page)

    def selection_bytes(self, n_keys: int, kv_heads: int, head_dim: int, elem_bytes: int) -> int:
        pages = -(-n_keys // int(self.cfg.page_size))
        return 2 * pages * kv_heads * head_dim * elem_bytes  # min and max per page

    def summary(self) -> dict:
        return {"budget": int(self.cfg.budget), "budget_fraction": self.cfg.get("budget_fraction"),
                "page_size": int(self.cfg.page_size), "group": self.group}

    # --------------------------------------------------------------------------------------
    def select(self, call: AttentionCall) -> Selection | None:
        return self._decode(call) if call.q_len == 1 else self._teacher_forced(call)

    def _forced(self, positions: torch.Tensor, n_keys: int, device) -> torch.Tensor | None:
        """bool [q, n]: sink and recent tokens each query always reads."""
        sink, recent = int(self.cfg.get("sink_tokens", 0)), int(self.cfg.get("recent_tokens", 0))
        if not sink and not recent:
            return None
        j = torch.arange(n_keys, device=device)[None, :]
        t = positions[:, None]
        return (j < sink) | ((j > t - recent) & (j <= t))

    def _decode(self, call: AttentionCall) -> Selection | None:
        page = int(self.cfg.page_size)
        n = call.n_keys
        n_pages = -(-n // page)
        k_pages = min(self.pages_for(n), n_pages)
        if k_pages >= n_pages:
            return None
        kmin, kmax = self._page_bounds(call)  # [b, hkv, p, d]
        b, hkv, _, d = kmin.shape
        g = call.groups
        q = call.query.view(b, hkv, g, d)  # query head j = kv head j // g, as repeat_kv lays them out
        # [b, hkv, g, p]: no copy of the bounds per query head; float32 (a no-op for a float32 model)
        scores = page_bound(q.float(), kmin.float(), kmax.float())
        scores = scores.amax(2) if self.group == "kv" else scores.view(b, hkv * g, n_pages)
        top = scores.topk(k_pages, dim=-1, sorted=False).indices.sort(-1).values  # [b, h, k_pages]
        index = (top[..., None] * page + torch.arange(page, device=top.device)).flatten(-2)
        if n % page:  # only the last page can hang over the cache
            index = torch.where(index < n, index, -1)
        forced = self._forced(call.positions, n, q.device)
        if forced is not None:  # add the forced tokens the pages missed, padding the rest
            from .base import index_to_keep

            keep = index_to_keep(index, n)[:, :, 0] | forced[0]
            count = int(keep.sum(-1).max())
            index = torch.where(keep, torch.arange(n, device=q.device), n).sort(-1).values[..., :count]
            index = torch.where(index < n, index, -1)
        return Selection(index=index)

    def _page_bounds(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-page key min/max [b, hkv, pages, d], kept in the layer's state between steps:
        a decode step folds only its new key into the last page's bounds (in place, in a
        buffer grown by doubling), so it reads no bounds but the ones it scores with."""
        page = int(self.cfg.page_size)
        key, n = call.key, call.n_keys
        state = call.state
        seen = state.get("bounds_keys", 0)
        b, hkv, _, d = key.shape
        n_pages = -(-n // page)
        if seen > n or "kmin" not in state or (n - seen) > page:  # (re)compute from the whole cache
            cap = max(2 * n_pages, 16)
            kmin = key.new_empty(b, hkv, cap, d)
            kmax = key.new_empty(b, hkv, cap, d)
            full = n // page
            if full:
                blocks = key[:, :, :full * page].unflatten(2, (full, page))
                kmin[:, :, :full], kmax[:, :, :full] = blocks.amin(3), blocks.amax(3)
            if n % page:
                tail = key[:, :, full * page:n]
                kmin[:, :, full], kmax[:, :, full] = tail.amin(2), tail.amax(2)
            state.update(kmin=kmin, kmax=kmax)
        else:
            kmin, kmax = state["kmin"], state["kmax"]
            if n_pages > kmin.shape[2]:  # grow the buffers
                grown_min, grown_max = key.new_empty(b, hkv, 2 * n_pages, d), key.new_empty(b, hkv, 2 * n_pages, d)
                grown_min[:, :, :kmin.shape[2]], grown_max[:, :, :kmax.shape[2]] = kmin, kmax
                kmin, kmax = grown_min, grown_max
                state.update(kmin=kmin, kmax=kmax)
            for j in range(seen, n):  # a decode step: one new key
                p, k = j // page, key[:, :, j]
                if j % page == 0:
                    kmin[:, :, p], kmax[:, :, p] = k, k
                else:
                    kmin[:, :, p] = torch.minimum(kmin[:, :, p], k)
                    kmax[:, :, p] = torch.maximum(kmax[:, :, p], k)
        state["bounds_keys"] = n
        return kmin[:, :, :n_pages], kmax[:, :, :n_pages]

    def _teacher_forced(self, call: AttentionCall) -> Selection:
        """Every query selects as a decode step at its position would: pages before its own
        scored by their full bounds, its own page by the keys up to it (a running min/max),
        later pages never."""
        page = int(self.cfg.page_size)
        key, q = call.key, call.query
        b, hkv, n, d = key.shape
        n_pages = -(-n // page)
        padded = torch.nn.functional.pad(key, (0, 0, 0, n_pages * page - n))
        blocks = padded.unflatten(2, (n_pages, page))  # [b, hkv, p, page, d]
        run_max = blocks.cummax(3).values.flatten(2, 3)[:, :, :n].float()  # running bounds within each page
        run_min = blocks.cummin(3).values.flatten(2, 3)[:, :, :n].float()
        q = q.float()  # scores in float32, as the decode path's (no-ops for a float32 model)
        last = torch.clamp(torch.arange(1, n_pages + 1, device=key.device) * page, max=n) - 1
        full_min, full_max = run_min[:, :, last], run_max[:, :, last]
        g = call.groups
        pos = call.positions  # [q]
        own = pos // page
        scores = page_bound(q, _repeat(full_min, g), _repeat(full_max, g))  # [b, hq, q, p]
        own_score = torch.maximum(q * _repeat(run_min[:, :, pos], g), q * _repeat(run_max[:, :, pos], g)).sum(-1)
        scores.scatter_(-1, own.view(1, 1, -1, 1).expand(*scores.shape[:3], 1), own_score[..., None])
        later = torch.arange(n_pages, device=key.device)[None, :] > own[:, None]  # [q, p]
        scores = scores.masked_fill(later, float("-inf"))
        if self.group == "kv":
            scores = scores.view(b, hkv, g, len(pos), n_pages).amax(2)
        # pages per query: the decode rule at context pos + 1, at most the pages it can see
        k_each = torch.tensor([min(self.pages_for(int(t) + 1), int(o) + 1) for t, o in zip(pos, own)],
                              device=key.device)
        order = scores.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n_pages, device=key.device).expand_as(order))
        page_keep = rank < k_each[:, None]  # [b, h, q, p]
        keep = page_keep.repeat_interleave(page, dim=-1)[..., :n]
        forced = self._forced(pos, n, key.device)
        if forced is not None:
            keep = keep | forced
        return Selection(keep=keep)
