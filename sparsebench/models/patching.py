"""Route every MLP of a model through sparsifier → backend.

``SparsityController.attach(model)`` swaps each decoder layer's MLP for a
``SparseMLP`` that asks the sparsifier for a mask and has the backend execute it.
With the controller disabled (or sparsifier ``none``) the computation is the same
sequence of torch ops as transformers' own MLP, so dense results are bit-identical.

Sparsifiers that mask the *inputs* of linear layers (TEAL, WINA, R-Sparse) list the
projections they touch in ``input_projections``; those linears are wrapped in a
``SparseLinear`` that asks the sparsifier for an input mask.

Prefill policy (``PrefillPolicy``): which token positions the sparse path applies to,
the same for every method. ``all`` (default) sparsifies every position of every
forward, prompt tokens included, so lm-eval loglikelihoods and perplexity measure the
sparse model; ``dense_prefix`` keeps the first N positions of each sequence dense;
``decode_only`` runs every multi-token forward (prefill, loglikelihood scoring,
perplexity) dense and sparsifies only single-token decode steps. Calibration always
sees every position. A position the policy keeps dense sees the unaltered model, also
for sparsifiers that change the activation itself (stat_topk ``mode: soft``, relu
``swap``): they install the altered activation through ``MLPInput.replace_act`` and the
controller restores act(pre) on the dense positions.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import NonFiniteActivation
from .adapters import MLPSite, mlp_sites


class MLPInput:
    """What a sparsifier may look at for one MLP call. Everything beyond ``x`` is computed
    lazily and at most once, so predictor-style sparsifiers that only need ``x`` don't pay
    for a dense gate, and the backend reuses what the sparsifier already computed."""

    # slots: one of these is made per MLP call and decode token
    __slots__ = ("site", "x", "_pre", "_act", "_h", "_up", "_altered", "_kernel_computed")

    def __init__(self, site: MLPSite, x: torch.Tensor):
        self.site = site
        self.x = x
        self._pre: torch.Tensor | None = None
        self._act: torch.Tensor | None = None
        self._h: torch.Tensor | None = None
        self._up: torch.Tensor | None = None
        self._altered = False
        self._kernel_computed = "x"

    @property
    def layer_idx(self) -> int:
        return self.site.layer_idx

    @property
    def pre(self) -> torch.Tensor:
        """The activation's input: gate(x) for gated MLPs, fc1(x) for plain ones."""
        if self._pre is None:
            self._pre = self.site.activation_input(self.x)
        return self._pre

    @property
    def act(self) -> torch.Tensor:
        """act(gate(x)) for gated MLPs, act(fc1(x)) for plain ones (shape [..., intermediate])."""
        if self._act is None:
            self._act = self.site.act(self.pre)
        return self._act

    @property
    def up(self) -> torch.Tensor:
        """up(x) of every neuron (gated MLPs; with dReLU's activation on it)."""
        if self._up is None:
            self._up = self.site.up(self.x)
        return self._up

    @property
    def h(self) -> torch.Tensor:
        """The down projection's input: act(gate(x)) * up(x), or act(fc1(x))."""
        if self._h is None:
            self._h = self.act * self.up if self.site.kind == "gated" else self.act
        return self._h

    @property
    def act_is_computed(self) -> bool:
        return self._act is not None

    def replace_act(self, act: torch.Tensor) -> None:
        """Install an *altered* activation for the sparse path (stat_topk's soft shift
        act(relu(z − t)), relu's ReLU swap); ``h`` is recomputed from it. The controller
        puts the model's own act(pre) back at every position the prefill policy keeps
        dense (and everywhere in a call that ends up dense), so only sparsified positions
        see the change. Sparsifiers must use this instead of writing ``_act``."""
        self._act, self._h, self._altered = act, None, True

    @property
    def act_is_altered(self) -> bool:
        return self._altered

    def restore_act(self, rows: torch.Tensor | None = None) -> None:
        """Undo ``replace_act`` at the positions where ``rows`` ([T] bool, True = keep the
        altered value) is False; everywhere when ``rows`` is None."""
        if not self._altered:
            return
        dense = self.site.act(self.pre)
        if rows is None:
            self._act, self._altered = dense, False
        else:
            keep = rows.to(dense.device).unsqueeze(-1)
            self._act = torch.where(keep, self._act, dense)
        self._h = None

    @property
    def computed(self) -> str:
        """How far the sparsifier already computed the MLP for this call: "h" (gate and up
        were evaluated densely, e.g. CETT), "act" (the gate was, e.g. CATS) or "x"
        (nothing, e.g. a predictor). Sparse backends compute only the rest, so a
        method's measured speed includes the dense work its mask needed."""
        if self._h is not None:
            return "h"
        return "act" if self._act is not None else self._kernel_computed

    def note_kernel_computed(self, level: str) -> None:
        """The backend applied the mask rule in its kernel, computing ``level`` ("act": the
        gate of every neuron) on the way: ``computed`` reports it as if the sparsifier had."""
        self._kernel_computed = level


class LinearInput:
    """One call of a wrapped linear: which layer and projection, and its input."""

    __slots__ = ("site", "proj", "x")

    def __init__(self, site: MLPSite, proj: str, x: torch.Tensor):
        self.site, self.proj, self.x = site, proj, x

    @property
    def layer_idx(self) -> int:
        return self.site.layer_idx


PREFILL_POLICIES = ("all", "dense_prefix", "decode_only")


@dataclass
class PrefillPolicy:
    policy: str = "all"
    dense_prefix: int = 0

    def __post_init__(self):
        if self.policy not in PREFILL_POLICIES:
            from ..core.errors import ConfigError

            raise ConfigError(f"prefill.policy={self.policy} is unknown; use one of: {', '.join(PREFILL_POLICIES)}")

    def sparse_positions(self, positions: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean [T] (True = sparsify) for a forward over ``positions``; None = all."""
        if self.policy == "all" or positions is None:
            return None
        if self.policy == "decode_only":
            return torch.full_like(positions, positions.numel() == 1, dtype=torch.bool)
        return positions >= self.dense_prefix


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
    linear_recorder: Callable[[LinearInput], None] | None = None
    sites: list[MLPSite] = field(default_factory=list)
    sparse_layers: frozenset[int] = frozenset()  # masked even while recording
    prefill: PrefillPolicy = field(default_factory=PrefillPolicy)
    # called as observer(inp, mask) for every sparse MLP call (e.g. predictor quality)
    mask_observer: Callable[[MLPInput, torch.Tensor | None], None] | None = None
    # called as observer(inp, mask) for every masked linear call (LinearInput)
    linear_mask_observer: Callable[[LinearInput, torch.Tensor | None], None] | None = None
    # (layer, projection) -> counts, for sparsifiers that mask linear inputs
    linear_stats: dict[tuple[int, str], LayerStats] = field(default_factory=dict)
    # stop at the first MLP output holding NaN/inf, naming the layer (off while timing:
    # the unpatched baseline pays no such check)
    check_finite: bool = True

    # -------------------------------------------------------------- model surgery
    def attach(self, model: nn.Module) -> SparsityController:
        self.sites = mlp_sites(model)
        self._wrapped: list[tuple[MLPSite, str, nn.Module, SparseLinear]] = []
        projections = tuple(getattr(self.sparsifier, "input_projections", ()))
        for site in self.sites:
            for proj in projections:
                if proj in site.slots:  # OPT has no gate
                    original = site.projection(proj)
                    wrapper = SparseLinear(original, site, proj, self)
                    site.replace_projection(proj, wrapper)
                    self._wrapped.append((site, proj, original, wrapper))
            site.installed = SparseMLP(site, self)
            site.install(site.installed)
        # layers whose MLP linears are input-masked: a neuron-dense call runs through them
        self._wrapped_mlp_layers = frozenset(
            site.layer_idx for site in self.sites if any(p in site.slots for p in ("gate", "up", "down")
                                                       if p in projections))
        self._masks_neurons = getattr(self.sparsifier, "masks_neurons", True)
        self._positions: torch.Tensor | None = None
        self._hook = model.register_forward_pre_hook(self._note_positions, with_kwargs=True)
        self.sparsifier.attach(self, model)
        return self

    def detach(self) -> None:
        self._remove_patches()
        self._hook.remove()
        self.sites, self._wrapped = [], []

    def input_masked_linears(self) -> list[tuple[MLPSite, str, SparseLinear]]:
        """(site, projection name, wrapper) of every linear whose input the sparsifier masks."""
        return [(site, proj, wrapper) for site, proj, _, wrapper in self._wrapped]

    def _remove_patches(self) -> None:
        for site, proj, original, _ in reversed(self._wrapped):
            site.replace_projection(proj, original)
        for site in self.sites:
            site.restore()

    @contextlib.contextmanager
    def unpatched(self):
        """Temporarily put the model's own modules back (stock transformers forward, e.g.
        the "dense HF" decode baseline); the same patches return afterwards."""
        self._remove_patches()
        try:
            yield
        finally:
            for site, proj, _, wrapper in self._wrapped:
                site.replace_projection(proj, wrapper)
            for site in self.sites:
                site.install(site.installed)

    def _note_positions(self, _model, args, kwargs):
        """Record the token positions of this forward (for the prefill policy), and tell the
        backend when a sequence begins (position 0, or positions unknown)."""
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            self._positions = None
            self.backend.new_sequence()
            return
        past = 0
        cache_position = kwargs.get("cache_position")
        pkv = kwargs.get("past_key_values")
        if cache_position is not None:
            past = int(cache_position[0])
        elif pkv is not None and hasattr(pkv, "get_seq_length"):
            past = int(pkv.get_seq_length())
        self._positions = torch.arange(past, past + ids.shape[1], device=ids.device)
        if past == 0:
            self.backend.new_sequence()

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
    def uncounted(self):
        """Forwards inside are left out of the counts of an enclosing ``counting()`` (e.g.
        lm-eval's batch-size detection, whose dummy forwards are not lm-eval tokens)."""
        prev, self.collect_stats = self.collect_stats, False
        try:
            yield
        finally:
            self.collect_stats = prev

    @contextlib.contextmanager
    def counting(self):
        """Collect per-layer token/zero counts for the duration of the block
        (``stats``: MLP neurons per layer; ``linear_stats``: inputs per (layer, projection))."""
        prev, self.collect_stats = self.collect_stats, True
        self.stats, self.linear_stats = {}, {}
        try:
            yield self.stats
        finally:
            self.collect_stats = prev

    @contextlib.contextmanager
    def recording(self, recorder: Callable[[MLPInput], None] | None, sparse_layers=(),
                  linear_recorder: Callable[[LinearInput], None] | None = None):
        """Hand each MLP call's inputs to ``recorder`` and each wrapped linear's input to
        ``linear_recorder`` (calibration). Everything runs densely, except the layers in
        ``sparse_layers``, which apply the sparsifier's masks."""
        prev = (self.recorder, self.linear_recorder, self.enabled, self.sparse_layers)
        self.recorder, self.linear_recorder = recorder, linear_recorder
        self.enabled, self.sparse_layers = False, frozenset(sparse_layers)
        try:
            yield
        finally:
            self.recorder, self.linear_recorder, self.enabled, self.sparse_layers = prev

    def _sparse_here(self, site: MLPSite) -> bool:
        return self.enabled or site.layer_idx in self.sparse_layers

    def _policy_rows(self) -> torch.Tensor | None:
        """[T] bool of positions to sparsify under the prefill policy (None = all);
        calibration (sparse_layers while recording) always sparsifies every position."""
        if not self.enabled:
            return None
        return self.prefill.sparse_positions(self._positions)

    @staticmethod
    def _restrict(mask: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
        """Keep everything at the positions the policy leaves dense."""
        if mask is None or rows is None:
            return mask
        if not bool(rows.any()):
            return None
        if mask.dim() < 2 or mask.shape[-2] != rows.numel():
            return mask
        return mask | ~rows.to(mask.device).unsqueeze(-1)

    @staticmethod
    def _unalter(inp: MLPInput, mask: torch.Tensor | None, rows: torch.Tensor | None) -> None:
        """Give the positions that run dense the model's own activation back, when the
        sparsifier altered it (``MLPInput.replace_act``): the whole call when it is dense
        (layer not sparsified, or the prefill policy leaves every position dense), else
        the rows the policy keeps dense. The mask is already all-True on those rows
        (``_restrict``), so their output is the dense model's exactly."""
        if not inp.act_is_altered:
            return
        if mask is None:
            inp.restore_act()
        elif rows is not None and mask.dim() >= 2 and mask.shape[-2] == rows.numel():
            inp.restore_act(rows)

    # -------------------------------------------------------------- the hot path
    def _rule_applies(self, x: torch.Tensor) -> bool:
        """Whether a single-token call may go through the backend's in-kernel mask rule:
        the model is sparse as a whole (not calibration) and the prefill policy sparsifies
        this position."""
        if not self.enabled or x.numel() != x.shape[-1]:
            return False
        if self.prefill.policy == "all":
            return True
        rows = self._policy_rows()
        return rows is None or bool(rows.all())

    @staticmethod
    def _mask_from(kept: torch.Tensor, width: int, like: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(width, dtype=torch.bool, device=like.device)
        mask[kept.long()] = True
        return mask.view(*like.shape[:-1], width)

    def run_mlp(self, site: MLPSite, x: torch.Tensor) -> torch.Tensor:
        inp = MLPInput(site, x)
        if self.recorder is not None:
            self.recorder(inp)
        elif self._rule_applies(x):
            rule = self.sparsifier.mask_rule(inp)
            done = None if rule is None else self.backend.mlp_by_rule(site, inp, rule)
            if done is not None:
                return self._finish_mlp_by_rule(site, inp, rule, *done)
            if not self._masks_neurons and site.layer_idx in self._wrapped_mlp_layers:
                # an input-sparse method (TEAL, WINA) on a decode token: no neuron mask to make.
                # A backend that applies the linears' rules runs the whole MLP in one call
                # (observed and counted as its linears would be); otherwise, unless a neuron
                # observer or counter needs the general path, the MLP runs through its masked
                # linears as transformers' would.
                rules = self.sparsifier.mlp_input_rules(site, x)
                done = None if rules is None else self.backend.mlp_by_input_rules(site, inp, rules)
                if done is not None:
                    observed = (self.mask_observer is not None or self.linear_mask_observer is not None
                                or self.collect_stats)
                    out = self._finish_mlp_by_input_rules(site, inp, *done) if observed else done[0]
                elif self.mask_observer is None and not self.collect_stats:
                    out = site.down(inp.h)
                else:
                    out = None
                if out is not None:
                    if self.check_finite and not bool(torch.isfinite(out).all()):
                        raise NonFiniteActivation(self._non_finite_message(site, x, None))
                    return out
        mask = self.sparsifier.mask(inp) if self._sparse_here(site) else None
        rows = self._policy_rows()
        mask = self._restrict(mask, rows)
        self._unalter(inp, mask, rows)
        if self.mask_observer is not None and self._sparse_here(site):
            self.mask_observer(inp, mask)
        if self.collect_stats:
            self._count(site, inp, mask)  # before the backend: the act it sees is unmodified
        if mask is None and site.layer_idx in self._wrapped_mlp_layers:
            out = site.down(inp.h)  # through the masked linears, never a backend's dense MLP kernel
        else:
            out = self.backend.mlp(site, inp, mask)
        if self.check_finite and not bool(torch.isfinite(out).all()):
            raise NonFiniteActivation(self._non_finite_message(site, x, mask))
        return out

    def _finish_mlp_by_rule(self, site: MLPSite, inp: MLPInput, rule, out: torch.Tensor, idx: torch.Tensor,
                            k: int) -> torch.Tensor:
        """Observers and counts for a call whose mask the kernel made (``idx[:k]``: the kept
        neuron indices). Kept neurons have |act| > t ≥ 0, so none of them is an exact zero."""
        inp.note_kernel_computed(rule.on)
        width = site.intermediate_size
        if self.mask_observer is not None:
            self.mask_observer(inp, self._mask_from(idx[:k], width, inp.x))
        if self.collect_stats:
            self._add_counts(site, tokens=1, masked=True, zeroed=width - k, neurons=width)
        if self.check_finite and not bool(torch.isfinite(out).all()):
            raise NonFiniteActivation(self._non_finite_message(site, inp.x, idx[:k]))
        return out

    def _finish_mlp_by_input_rules(self, site: MLPSite, inp: MLPInput, out: torch.Tensor, h: torch.Tensor,
                                   kept: tuple) -> torch.Tensor:
        """Observers and counts for an MLP a backend ran by its linears' input rules: each of
        gate, up and down as if called on its own (``kept``: per linear, (indices, count) of
        its kept input channels; ``h``: down's input), the MLP as the general path sees it."""
        if self.mask_observer is not None:
            self.mask_observer(inp, None)
        if self.collect_stats:
            self._add_counts(site, tokens=1, masked=False, zeroed=int((h == 0).sum()), neurons=h.numel())
        for proj, v, (idx, k) in zip(("gate", "up", "down"), (inp.x, inp.x, h), kept):
            if proj not in site.slots:  # plain MLPs have no gate
                continue
            if self.linear_mask_observer is not None:
                self.linear_mask_observer(LinearInput(site, proj, v), self._mask_from(idx[:k], v.shape[-1], v))
            if self.collect_stats:
                self._count_linear(site, proj, v, v.shape[-1] - k)
        return out

    def _non_finite_message(self, site: MLPSite, x: torch.Tensor, mask) -> str:
        where = "its input was already non-finite" if not bool(torch.isfinite(x).all()) else "its input was finite"
        masked = "with the sparse mask applied" if mask is not None else "with no mask (dense)"
        return (f"NaN/inf in the MLP output of layer {site.layer_idx} under sparsifier={self.sparsifier.name} "
                f"({masked}; {where}); the run is stopped and writes no results: check the model weights "
                f"(sparsifier=none reproduces a model fault) or rerun in fp32 (model.dtype=float32)")

    def run_linear(self, site: MLPSite, proj: str, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        inp = LinearInput(site, proj, x)
        if self.linear_recorder is not None:
            self.linear_recorder(inp)
        elif self._rule_applies(x):
            # the decode step's path: run this call as short as it can be (a small model
            # makes seven of these per layer and token)
            rule = self.sparsifier.input_mask_rule(inp)
            done = None if rule is None else self.backend.linear_by_rule(inp, linear, rule)
            if done is not None:
                out, idx, k = done
                if self.linear_mask_observer is not None:
                    self.linear_mask_observer(inp, self._mask_from(idx[:k], x.shape[-1], x))
                if self.collect_stats:
                    self._count_linear(site, proj, x, x.shape[-1] - k)
                return out
        if not self._sparse_here(site):
            return linear(x)
        mask = self._restrict(self.sparsifier.input_mask(inp), self._policy_rows())
        if self.linear_mask_observer is not None:
            self.linear_mask_observer(inp, mask)
        if self.collect_stats:
            self._count_linear(site, proj, x, None if mask is None else int((~mask).sum()))
        if mask is None:
            return linear(x)
        return self.sparsifier.masked_linear(inp, linear, mask, self.backend)

    def _count_linear(self, site: MLPSite, proj: str, x: torch.Tensor, zeroed: int | None) -> None:
        """Count one wrapped linear's call: ``zeroed`` masked input channels (None: unmasked)."""
        s = self.linear_stats.setdefault((site.layer_idx, proj), LayerStats())
        n_tokens = x.numel() // x.shape[-1]
        s.tokens += n_tokens
        s.neurons += x.numel()
        if zeroed is not None:
            s.masked_tokens += n_tokens
            s.zeroed += zeroed

    def _count(self, site: MLPSite, inp: MLPInput, mask: torch.Tensor | None) -> None:
        # A neuron is zeroed when the mask drops it or its value h_i is exactly zero
        # (ReLU-family and dReLU models); for SiLU/GeLU MLPs h_i == 0 has measure zero.
        zero = inp.h == 0
        if mask is not None:
            zero = zero | ~mask
        self._add_counts(site, tokens=zero.numel() // zero.shape[-1], masked=mask is not None,
                         zeroed=int(zero.sum()), neurons=zero.numel())

    def _add_counts(self, site: MLPSite, tokens: int, masked: bool, zeroed: int, neurons: int) -> None:
        """Add one MLP call to its layer's counts (``masked``: a mask applied to its tokens)."""
        s = self.stats.setdefault(site.layer_idx, LayerStats())
        s.tokens += tokens
        s.masked_tokens += tokens if masked else 0
        s.zeroed += zeroed
        s.neurons += neurons


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


class SparseLinear(nn.Module):
    """Stands in for one projection whose *input* a sparsifier masks (TEAL, WINA, R-Sparse).
    The wrapped linear stays a child (``.linear``); ``weight``/``bias`` are exposed for
    code that reads them."""

    def __init__(self, linear: nn.Linear, site: MLPSite, proj: str, controller: SparsityController):
        super().__init__()
        self.linear, self.site, self.proj = linear, site, proj
        self._controller = [controller]

    @property
    def weight(self):
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    @property
    def in_features(self):
        return self.linear.in_features

    @property
    def out_features(self):
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the child read from the module table: ``self.linear`` goes through nn.Module.__getattr__
        return self._controller[0].run_linear(self.site, self.proj, self._modules["linear"], x)

    def extra_repr(self) -> str:
        return f"layer={self.site.layer_idx}, proj={self.proj}"
