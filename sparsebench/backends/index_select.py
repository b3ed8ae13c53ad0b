"""Naive sparse execution: gather the active rows with ``torch.index_select`` every call.

Per token: ``idx = mask.nonzero()``; gather the active rows of gate and up and of the
transposed down (see ``backends.weights``), then small dense matmuls. Work the
sparsifier already did densely (``inp.computed``: CATS's gate, CETT's gate and up) is
reused, not recomputed, so only the remaining projections are gathered.

``union: true`` gathers the union of the rows' masks once per call and multiplies each
row by its own mask afterwards (exactly the per-row result; it reads more rows as the
batch grows; ``stats()`` reports the union density).
"""
from __future__ import annotations

import torch

from . import BACKENDS
from .base import Backend
from .weights import finish_hidden, linear_weight_t, mlp_weights


class UnionStats:
    def __init__(self):
        self.calls = 0
        self.density_sum = 0.0
        self.row_density_sum = 0.0

    def add(self, union: torch.Tensor, rows: torch.Tensor) -> None:
        self.calls += 1
        self.density_sum += float(union.float().mean())
        self.row_density_sum += float(rows.float().mean())

    def as_dict(self) -> dict:
        n = max(self.calls, 1)
        return {"union_calls": self.calls, "union_density": self.density_sum / n,
                "row_density": self.row_density_sum / n}


def flat_rows(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x as [N, H] and the mask as [N, I] (a mask shared by every row is broadcast)."""
    x2 = x.reshape(-1, x.shape[-1])
    m2 = mask.expand(*x.shape[:-1], mask.shape[-1]).reshape(x2.shape[0], -1)
    return x2, m2


def flat_call(w, inp, mask):
    """One MLP call as rows: (computed, x [N, H], mask [N, I], act [N, I] or None, h [N, I]
    or None), where act/h are what the sparsifier already computed and the backend reuses."""
    computed = inp.computed
    x2, m2 = flat_rows(inp.x, mask)
    n = x2.shape[0]
    act2 = inp.act.reshape(n, -1) if computed == "act" else None
    h_ready = computed == "h" or (w.kind == "plain" and computed == "act")  # plain MLPs: h is act
    return computed, x2, m2, act2, inp.h.reshape(n, -1) if h_ready else None


@BACKENDS.register("index_select")
class IndexSelectBackend(Backend):
    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.union = bool(cfg.get("union", False)) if cfg is not None else False
        self._weights: dict = {}
        self._linear_weights: dict = {}
        self._union_stats = UnionStats()

    def reset(self) -> None:
        self._union_stats = UnionStats()

    def stats(self) -> dict:
        return self._union_stats.as_dict() if self.union else {}

    # ------------------------------------------------------------------ MLP
    def mlp(self, site, inp, mask):
        if mask is None:
            return site.down(inp.h)
        w = mlp_weights(site, self._weights)
        computed, x2, m2, act2, h2 = flat_call(w, inp, mask)
        if x2.shape[0] == 1 and not self.union:  # one token: the decode hot path
            return self._rows(w, computed, m2[0].nonzero().squeeze(1), x2, act2, h2).reshape(inp.x.shape)
        if self.union:
            union = m2.any(0)
            self._union_stats.add(union, m2)
            idx = union.nonzero().squeeze(1)
            y = self._rows(w, computed, idx, x2, act2, h2, keep=m2.index_select(1, idx))
        else:
            y = torch.stack([
                self._rows(w, computed, m2[n].nonzero().squeeze(1), x2[n:n + 1],
                           None if act2 is None else act2[n:n + 1], None if h2 is None else h2[n:n + 1])[0]
                for n in range(x2.shape[0])
            ])
        return y.reshape(inp.x.shape)

    @staticmethod
    def _rows(w, computed, idx, x2, act2, h2, keep=None):
        pre = []
        for weight, bias in w.inputs_for(computed):
            z = x2 @ weight.index_select(0, idx).t()
            pre.append(z if bias is None else z + bias.index_select(0, idx))
        sel = (lambda t: None if t is None else t.index_select(1, idx))
        h = finish_hidden(w, computed, pre, sel(act2), sel(h2))
        if keep is not None:
            h = h * keep.to(h.dtype)
        y = h @ w.down_t.index_select(0, idx)
        return y if w.down_bias is None else y + w.down_bias

    # ------------------------------------------------------------------ linear inputs
    def linear(self, inp, linear, mask):
        wt, bias = linear_weight_t(linear, (inp.layer_idx, inp.proj), self._linear_weights)
        x2, m2 = flat_rows(inp.x, mask)
        if self.union:
            union = m2.any(0)
            self._union_stats.add(union, m2)
            idx = union.nonzero().squeeze(1)
            y = (x2.index_select(1, idx) * m2.index_select(1, idx).to(x2.dtype)) @ wt.index_select(0, idx)
        else:
            rows = [x2[n:n + 1].index_select(1, idx) @ wt.index_select(0, idx)
                    for n in range(x2.shape[0]) for idx in [m2[n].nonzero().squeeze(1)]]
            y = rows[0] if len(rows) == 1 else torch.cat(rows)  # one row: decode, no copy
        if bias is not None:
            y = y + bias
        return y.reshape(*inp.x.shape[:-1], wt.shape[1])
