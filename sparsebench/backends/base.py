"""The backend interface."""
from __future__ import annotations

import torch


class Backend:
    """Executes the sparse computation for a mask.

    ``mlp(site, inp, mask)`` runs one MLP call: ``site`` holds the layer's modules,
    ``inp`` the call's input (``inp.x``, plus ``inp.act``/``inp.h`` when the sparsifier
    already computed them; ``inp.computed`` says which) and ``mask`` is a boolean neuron
    mask of shape ``[..., intermediate]`` (True = keep), or ``None`` for dense.

    ``linear(inp, linear, mask)`` runs one wrapped linear whose *input channels* are
    masked (TEAL, WINA, R-Sparse): ``mask`` has the shape of ``inp.x``.

    ``mlp_by_rule`` / ``linear_by_rule`` optionally apply a sparsifier's threshold rule
    (``sparsifiers.base.ThresholdRule``, ``TopKRule``) inside the kernel instead of taking a
    mask; for a single-token call they return ``(output, idx, k)`` — the kept indices are
    ``idx[:k]``, sliced only by the callers that look at them — or None where the backend
    cannot (the controller then makes the mask and calls ``mlp``/``linear``).

    Every backend must return what the dense mask-multiply returns for the same mask.
    """

    name: str = "base"
    # Device types it runs on (run.py refuses the others before loading the model).
    device_types: tuple[str, ...] = ("cpu", "cuda")

    def __init__(self, cfg=None):
        self.cfg = cfg

    def mlp(self, site, inp, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, inp, linear, mask: torch.Tensor) -> torch.Tensor:
        return linear(inp.x * mask.to(inp.x.dtype))

    def mlp_by_rule(self, site, inp, rule) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        return None

    def linear_by_rule(self, inp, linear, rule) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        return None

    def mlp_by_input_rules(self, site, inp, rules) -> tuple[torch.Tensor, torch.Tensor, tuple] | None:
        """The MLP on one token with its linears' input rules applied
        (``sparsifiers.base.MLPInputRules``): ``(output, h, kept)`` — h is down's input and
        ``kept`` per linear (gate, up, down) ``(idx, k)``, its kept input channels ``idx[:k]``
        (views of scratch are fine: they are read before the next call). None where the
        backend cannot: the MLP then runs through its masked linears, one ``linear_by_rule`` each."""
        return None

    def reset(self) -> None:
        """Forget per-sequence state (caches); called between independent generations."""

    def new_sequence(self) -> None:
        """A forward from position 0 begins (the controller calls it, before any layer runs).
        State prepared from the model's weights may be trusted for the rest of the sequence
        and checked again here: weights edited between two sequences are seen, weights edited
        between two decode steps of one sequence need not be."""

    def stats(self) -> dict:
        """Counters worth reporting (e.g. rows copied per update)."""
        return {}
