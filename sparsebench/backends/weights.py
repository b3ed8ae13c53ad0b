"""Weights laid out for row gathers, shared by the sparse backends.

Every sparse backend reads one row per active neuron from each MLP matrix: gate and
up rows are already rows of ``[intermediate, hidden]`` weights; down is stored
transposed once (``down_t``, ``[intermediate, hidden]``, contiguous) so each neuron is
one contiguous row there too. The naive ``index_select`` baseline gets the same layout,
so benchmarks compare caching against gathering, not a strided gather against a
contiguous one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class MLPWeights:
    kind: str  # "gated" | "plain"
    gate: torch.Tensor | None  # [I, H]
    up: torch.Tensor  # [I, H] (OPT: fc1)
    down_t: torch.Tensor  # [I, H]
    gate_bias: torch.Tensor | None  # [I]
    up_bias: torch.Tensor | None  # [I]
    down_bias: torch.Tensor | None  # [H]
    act: Callable
    up_act: Callable | None
    source: tuple  # identities of the source tensors, to notice replaced weights

    @property
    def num_neurons(self) -> int:
        return self.up.shape[0]

    @property
    def hidden(self) -> int:
        return self.up.shape[1]

    def inputs_for(self, computed: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of the projections still to compute per active neuron, given what
        the sparsifier already computed ("x", "act" or "h"; see ``MLPInput.computed``)."""
        by_name = {"gate": (self.gate, self.gate_bias), "up": (self.up, self.up_bias)}
        return [by_name[p] for p in projections_to_compute(self.kind, computed)]


def projections_to_compute(kind: str, computed: str) -> tuple[str, ...]:
    """The input projections ("gate", "up") a sparse backend still evaluates per active
    neuron, given the MLP kind and what the sparsifier already computed; down always follows."""
    if computed == "h" or (computed == "act" and kind == "plain"):
        return ()
    if computed == "act":
        return ("up",)
    return ("gate", "up") if kind == "gated" else ("up",)


def _source_key(*tensors) -> tuple:
    return tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().contiguous()


def mlp_weights(site, cached: dict) -> MLPWeights:
    """The site's weights in gather layout, prepared once per layer and again only if a
    weight tensor was replaced or modified in place (e.g. WINA's transform at attach)."""
    gate = site.gate.weight if site.kind == "gated" else None
    key = _source_key(gate, site.up.weight, site.down.weight)
    w = cached.get(site.layer_idx)
    if w is not None and w.source == key:
        return w
    w = MLPWeights(
        kind=site.kind,
        gate=_plain(gate),
        up=_plain(site.up.weight),
        down_t=site.down.weight.detach().t().contiguous(),
        gate_bias=_plain(site.gate.bias) if site.kind == "gated" else None,
        up_bias=_plain(site.up.bias),
        down_bias=_plain(site.down.bias),
        act=site.act,
        up_act=site.up_act,
        source=key,
    )
    cached[site.layer_idx] = w
    return w


def linear_weight_t(linear, key, cached: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``linear.weight`` transposed ([in, out], contiguous: one row per input channel)."""
    src = _source_key(linear.weight)
    hit = cached.get(key)
    if hit is not None and hit[2] == src:
        return hit[0], hit[1]
    wt = linear.weight.detach().t().contiguous()
    bias = _plain(linear.bias)
    cached[key] = (wt, bias, src)
    return wt, bias


def finish_hidden(w: MLPWeights, computed: str, pre: list[torch.Tensor], act_sel, h_sel) -> torch.Tensor:
    """h for the active neurons from the projections computed here (``pre``, in the order
    of ``inputs_for``) and whatever the sparsifier computed (``act_sel``/``h_sel``, already
    restricted to the active neurons)."""
    if computed == "h":
        return h_sel
    if w.kind == "plain":
        return h_sel if computed != "x" else w.act(pre[0])
    if computed == "act":
        a, u = act_sel, pre[0]
    else:
        a, u = w.act(pre[0]), pre[1]
    if w.up_act is not None:
        u = w.up_act(u)
    return a * u
