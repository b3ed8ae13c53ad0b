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


@torch.no_grad()
def calibrate_layerwise(controller, model, batches, fn, fit) -> None:
    """Calibrate layer by layer on exactly the tensor each layer sees at inference.

    For l = 0, 1, …: record ``fn(inp)`` for layer l's MLP on the hidden states produced by
    layers < l *with their masks applied*, call ``fit(l, values)`` (which must make
    ``sparsifier.mask`` work for layer l), then advance the hidden states through layer l
    with its mask on. Each decoder layer is re-run from its captured inputs (hidden
    states plus the keyword arguments the model passed it: masks, rotary embeddings),
    so the cost is about two full forwards, with no architecture-specific code.
    """
    layers = [site.layer for site in controller.sites]
    captured: list[dict[int, tuple]] = []

    def capture(i):
        def hook(_mod, args, kwargs):
            captured[-1][i] = (args, kwargs)
        return hook

    hooks = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with controller.recording(None):
            for batch in batches:
                captured.append({})
                model(input_ids=batch, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()

    def run_layer(i, hidden, b):
        args, kwargs = captured[b][i]
        if args:
            out = layers[i](hidden, *args[1:], **kwargs)
        else:
            out = layers[i](**{**kwargs, "hidden_states": hidden})
        return out[0] if isinstance(out, tuple) else out

    hidden = [c[0][0][0] if c[0][0] else c[0][1]["hidden_states"] for c in captured]
    from tqdm.auto import tqdm

    for i in tqdm(range(len(layers)), desc="calibration (layer by layer)", leave=False):
        values = []
        with controller.recording(lambda inp: values.append(fn(inp)) if inp.layer_idx == i else None):
            for b, h in enumerate(hidden):
                run_layer(i, h, b)
        fit(i, values)
        with controller.recording(None, sparse_layers={i}):
            hidden = [run_layer(i, h, b) for b, h in enumerate(hidden)]


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
