"""Route every MLP of a model through sparsifier → backend.

``SparsityController.attach(model)`` swaps each decoder layer's MLP for a
``SparseMLP`` that asks the sparsifier for a mask and has the backend execute it.
With the controller disabled (or sparsifier ``none``) the computation is the same
sequence of torch ops as transformers' own MLP, so dense results are bit-identical.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .models.adapters import MLPSite, mlp_sites


class MLPInput:
    """What a sparsifier may look at for one MLP call; the activation is computed lazily
    so predictor-style sparsifiers that only need ``x`` don't pay for a dense gate."""

    def __init__(self, site: MLPSite, x: torch.Tensor):
        self.site = site
        self.x = x
        self._act: torch.Tensor | None = None

    @property
    def layer_idx(self) -> int:
        return self.site.layer_idx

    @property
    def act(self) -> torch.Tensor:
        """act(gate(x)) for gated MLPs, act(fc1(x)) for plain ones (shape [..., intermediate])."""
        if self._act is None:
            self._act = self.site.act(self.site.activation_input(self.x))
        return self._act

    @property
    def act_is_computed(self) -> bool:
        return self._act is not None


@dataclass
class LayerStats:
    """Running counts for one layer: tokens seen, tokens a mask was applied to, zeroed neurons."""

    tokens: int = 0
    masked_tokens: int = 0
    zeroed: int = 0
    neurons: int = 0

    @property
    def sparsity(self) -> float:
        return self.zeroed / self.neurons if self.neurons else 0.0


@dataclass
class SparsityController:
    sparsifier: object
    backend: object
    enabled: bool = True
    collect_stats: bool = False
    stats: dict[int, LayerStats] = field(default_factory=dict)
    recorder: Callable[[MLPInput], None] | None = None
    sites: list[MLPSite] = field(default_factory=list)
    sparse_layers: frozenset[int] = frozenset()  # masked even while recording

    # -------------------------------------------------------------- model surgery
    def attach(self, model: nn.Module) -> "SparsityController":
        self.sites = mlp_sites(model)
        for site in self.sites:
            site.install(SparseMLP(site, self))
        return self

    def detach(self) -> None:
        for site in self.sites:
            site.restore()
        self.sites = []

    # -------------------------------------------------------------- modes
    @contextlib.contextmanager
    def dense(self):
        """Temporarily run every MLP densely (the baseline in the same process)."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    @contextlib.contextmanager
    def counting(self):
        """Collect per-layer token/zero counts for the duration of the block."""
        prev, self.collect_stats = self.collect_stats, True
        self.stats = {}
        try:
            yield self.stats
        finally:
            self.collect_stats = prev

    @contextlib.contextmanager
    def recording(self, recorder: Callable[[MLPInput], None], sparse_layers=()):
        """Hand each MLP call's inputs to ``recorder`` (calibration). MLPs run densely,
        except the layers in ``sparse_layers``, which apply the sparsifier's mask."""
        prev = (self.recorder, self.enabled, self.sparse_layers)
        self.recorder, self.enabled, self.sparse_layers = recorder, False, frozenset(sparse_layers)
        try:
            yield
        finally:
            self.recorder, self.enabled, self.sparse_layers = prev

    # -------------------------------------------------------------- the hot path
    def run_mlp(self, site: MLPSite, x: torch.Tensor) -> torch.Tensor:
        inp = MLPInput(site, x)
        if self.recorder is not None:
            self.recorder(inp)
        sparse = self.enabled or site.layer_idx in self.sparse_layers
        mask = self.sparsifier.mask(inp) if sparse else None
        out = self.backend.mlp(site, inp, mask)
        if self.collect_stats:
            self._count(site, inp, mask)
        return out

    def _count(self, site: MLPSite, inp: MLPInput, mask: torch.Tensor | None) -> None:
        # A neuron is zeroed when the mask drops it or its activation is exactly zero
        # (ReLU-family models); for a gated MLP up(x) == 0 exactly has measure zero.
        zero = inp.act == 0
        if mask is not None:
            zero = zero | ~mask
        s = self.stats.setdefault(site.layer_idx, LayerStats())
        n_tokens = zero.numel() // zero.shape[-1]
        s.tokens += n_tokens
        s.masked_tokens += n_tokens if mask is not None else 0
        s.zeroed += int(zero.sum())
        s.neurons += zero.numel()


class SparseMLP(nn.Module):
    """Stands in for a decoder layer's MLP; keeps the original projections as children
    so ``state_dict`` and ``.to()`` keep working."""

    def __init__(self, site: MLPSite, controller: SparsityController):
        super().__init__()
        self.site = site
        self.up, self.down = site.up, site.down
        if site.gate is not None:
            self.gate = site.gate
        self._controller = [controller]  # a list so nn.Module doesn't register it as a child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._controller[0].run_mlp(self.site, x)

    def extra_repr(self) -> str:
        return f"layer={self.site.layer_idx}, kind={self.site.kind}"
