"""The sparsifier interface and shared calibration helpers."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ..errors import ConfigError


class Sparsifier:
    """Calibrate on text once (→ a state of tensors), then mask neurons per token.

    Subclasses set ``needs_calibration`` and implement ``calibrate`` (return the state)
    and ``mask`` (boolean ``[..., intermediate]``, True = keep; ``None`` = dense).
    ``calibration_params`` lists the config keys the state depends on, so the on-disk
    cache is keyed by exactly what changes it.
    """

    name: str = "base"
    needs_calibration: bool = False
    calibration_params: tuple[str, ...] = ()

    def __init__(self, cfg):
        self.cfg = cfg
        self.validate()

    def validate(self) -> None:
        s = self.cfg.get("sparsity", 0.0)
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.0 <= float(s) < 1.0:
            raise ConfigError(f"sparsifier.sparsity={s} is out of range; use a number in [0, 1), e.g. sparsifier.sparsity=0.5")

    @property
    def sparsity(self) -> float:
        return float(self.cfg.get("sparsity", 0.0))

    def calibration_key(self) -> dict[str, Any]:
        return {"method": self.name, **{k: self.cfg.get(k) for k in self.calibration_params}}

    def calibrate(self, controller, model, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def mask(self, inp) -> torch.Tensor | None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Per-layer parameters worth reporting (e.g. thresholds)."""
        return {}


class _StopForward(Exception):
    """Raised by a recorder once it has what it needs, to skip the rest of the forward."""


@torch.no_grad()
def collect_layer(controller, model, batches, layer_idx: int, fn) -> list[torch.Tensor]:
    """``fn(inp)`` for every call of layer ``layer_idx``'s MLP, with every layer below it
    already sparsified by the sparsifier's current state — i.e. exactly the tensor
    the layer will see at inference. The forward stops after that layer."""
    out: list[torch.Tensor] = []

    def record(inp):
        if inp.layer_idx == layer_idx:
            out.append(fn(inp))
            raise _StopForward

    with controller.recording(record, sparse_layers=range(layer_idx)):
        for batch in batches:
            try:
                model(input_ids=batch, logits_to_keep=1)
            except _StopForward:
                pass
    return out


@torch.no_grad()
def collect_per_layer(controller, model, batches, fn) -> dict[int, list[torch.Tensor]]:
    """Run ``model`` densely over ``batches``; for each MLP call store ``fn(inp)`` per layer."""
    out: dict[int, list[torch.Tensor]] = {}

    def record(inp):
        out.setdefault(inp.layer_idx, []).append(fn(inp))

    with controller.recording(record):
        for batch in batches:
            model(input_ids=batch, logits_to_keep=1)  # only MLP inputs matter: skip the vocab projection
    return out
