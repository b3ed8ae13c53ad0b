"""The sparsifier interface and shared calibration helpers."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..core.errors import ConfigError


class NoArtifactCache:
    def get(self, name, extra_key, compute):
        from ..core.device import move_to

        return move_to(compute(), "cpu")  # as the on-disk cache returns it


@dataclass(frozen=True, eq=False)
class ThresholdRule:
    """A mask that is exactly a threshold (compared in float32) on a value a kernel computes
    anyway: ``on="act"`` — ``|act(gate·x)| > threshold`` for every MLP neuron (CATS);
    ``on="x"`` — ``|x_j| > threshold`` on the input channels of one linear (TEAL);
    ``on="h"`` — ``|h_i| >= threshold[i]`` with h = act(gate·x)·up(x) (act(fc1·x) for plain
    MLPs) and ``threshold`` a float32 tensor [intermediate], one per neuron (CETT). A backend
    that can apply it in its kernel needs no mask tensor and no separate pass
    (``Backend.mlp_by_rule`` / ``linear_by_rule``)."""

    on: Literal["act", "x", "h"]
    threshold: float | torch.Tensor


@dataclass(frozen=True, eq=False)
class TopKRule:
    """A mask that keeps the ``keep`` input channels of one linear with the largest score
    ``|x_j|·weights[j]`` (``weights`` None: ``|x_j|``), ties to the lower index — exactly
    ``topk_mask`` of that score (WINA). ``weights`` is a float32 tensor [in_features]."""

    keep: int
    weights: torch.Tensor | None
    on: Literal["x"] = "x"


@dataclass(frozen=True, eq=False)
class MLPInputRules:
    """The input rules of one MLP's linears at once (TEAL, WINA): ``gate``, ``up`` and
    ``down`` each the ``ThresholdRule``/``TopKRule`` that ``input_mask_rule`` gives that
    linear, or None where it is dense (``gate`` None for plain MLPs, where ``up`` is fc1 and
    ``down`` fc2). A backend that applies them runs the whole MLP in one kernel call:
    down's input h is computed there, so its rule needs no pass of its own
    (``Backend.mlp_by_input_rules``)."""

    gate: ThresholdRule | TopKRule | None
    up: ThresholdRule | TopKRule | None
    down: ThresholdRule | TopKRule | None


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest entries along the last dimension; among equal
    scores the lower index is kept (a stable descending sort's first ``keep``), so the set
    is defined exactly — a kernel applying ``TopKRule`` reproduces it."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep > 0:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
        mask.scatter_(-1, order, True)
    return mask


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
    # Bump when the calibration algorithm changes, so cached states are not reused.
    calibration_version: int = 1
    # Linears whose *input* this method masks ("q", "k", "v", "o", "gate", "up", "down");
    # empty for methods that only mask MLP neurons through ``mask``.
    input_projections: tuple[str, ...] = ()
    # What ``sparsity`` counts: "mlp_neurons" (fraction of intermediate neurons dropped) or
    # "linear_inputs" (fraction of input channels dropped over ``input_projections``,
    # weighted by each projection's parameter count).
    sparsity_unit: str = "mlp_neurons"

    def __init__(self, cfg):
        self.cfg = cfg
        self.artifacts = NoArtifactCache()  # load_or_calibrate installs the on-disk one
        self.validate()

    def validate(self) -> None:
        s = self.cfg.get("sparsity", 0.0)
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.0 <= float(s) < 1.0:
            raise ConfigError(f"sparsifier.sparsity={s} is out of range; use a number in [0, 1), e.g. sparsifier.sparsity=0.5")

    @property
    def sparsity(self) -> float:
        # read from the config once: it is consulted on every masked call, and a DictConfig
        # lookup costs tens of microseconds, a visible share of a small model's decode step
        s = self.__dict__.get("_sparsity")
        if s is None:
            s = self._sparsity = float(self.cfg.get("sparsity", 0.0))
        return s

    @property
    def requested_sparsity(self) -> float | None:
        """The sparsity the user asked for (None when the method targets something else,
        e.g. a CETT error budget); results report achieved sparsity beside it."""
        return self.sparsity

    def summary(self) -> dict[str, Any]:
        """Scalars worth recording with the run (e.g. a searched budget)."""
        return {}

    def calibration_key(self) -> dict[str, Any]:
        from omegaconf import Container, OmegaConf

        def plain(v):
            return OmegaConf.to_container(v) if isinstance(v, Container) else v

        return {"method": self.name, "version": self.calibration_version,
                **{k: plain(self.cfg.get(k)) for k in self.calibration_params}}

    def calibrate(self, controller, model, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def attach(self, controller, model) -> None:
        """Called once the controller has patched ``model`` (e.g. WINA's weight transform)."""

    def dense_cost(self, layer: int, proj: str) -> int:
        """Weights of a masked linear read per token whatever the mask (R-Sparse's factors)."""
        return 0

    def mask(self, inp) -> torch.Tensor | None:
        """MLP neuron mask for one MLP call (``inp``: patching.MLPInput); None = dense."""
        return None

    @property
    def masks_neurons(self) -> bool:
        """False when the class never overrides ``mask``: it never masks a neuron (TEAL, WINA)."""
        return type(self).mask is not Sparsifier.mask

    def input_mask(self, inp) -> torch.Tensor | None:
        """Input-channel mask for one wrapped linear (``inp``: patching.LinearInput)."""
        return None

    def mask_rule(self, inp) -> ThresholdRule | None:
        """The rule ``mask(inp)`` applies, when it is a threshold a kernel can apply itself
        (must agree with ``mask``: tests compare the two); None: only ``mask`` is known."""
        return None

    def input_mask_rule(self, inp) -> ThresholdRule | TopKRule | None:
        """As ``mask_rule``, for ``input_mask`` (and only when ``masked_linear`` is plain)."""
        return None

    def mlp_input_rules(self, site, x: torch.Tensor) -> MLPInputRules | None:
        """The rules ``input_mask_rule`` gives the MLP's gate, up and down on a decode token
        ``x`` (the MLP's input), as one object; None unless every one of them is a rule or
        dense (a method that masks linear inputs overrides it with ``input_mask_rule``)."""
        return None

    def masked_linear(self, inp, linear, mask: torch.Tensor, backend) -> torch.Tensor:
        """Apply ``linear`` to the masked input through the backend (R-Sparse adds a
        low-rank term)."""
        return backend.linear(inp, linear, mask)

    def describe(self) -> dict[str, Any]:
        """Per-layer parameters worth reporting (e.g. thresholds)."""
        return {}


def _batch_slice(obj, full: int, n: int):
    """Cut every tensor with a leading batch dimension of ``full`` to its first ``n`` rows
    (attention masks, per-sequence position tensors), through tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return obj[:n] if obj.dim() > 0 and obj.shape[0] == full else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_batch_slice(v, full, n) for v in obj)
    if isinstance(obj, dict):
        return {k: _batch_slice(v, full, n) for k, v in obj.items()}
    return obj


class _DenseInputs:
    """The dense model's input to layer i for every batch, streamed: only the current
    layer's hidden states are held, and asking for layer i advances them through the
    layers in between (densely, with the arguments the model passed each layer). Callers
    go through the layers in order, so each layer runs once; going back restarts from
    layer 0."""

    def __init__(self, controller, first: list[torch.Tensor], run_layer):
        self.controller, self.first, self.run_layer = controller, first, run_layer
        self.layer, self.hidden = 0, list(first)

    @torch.no_grad()
    def __call__(self, i: int, b: int) -> torch.Tensor:
        if i < self.layer:
            self.layer, self.hidden = 0, list(self.first)
        with self.controller.recording(None):
            while self.layer < i:
                self.hidden = [self.run_layer(self.layer, h, n) for n, h in enumerate(self.hidden)]
                self.layer += 1
        return self.hidden[b]


@torch.no_grad()
def capture_layer_inputs(controller, model, batches):
    """One dense forward per batch that captures the arguments of every decoder layer.

    Returns ``run_layer(i, hidden, b)`` — run layer i on ``hidden`` with the other
    arguments the model passed it for batch b (attention mask, rotary embeddings) — and
    the list of layer-0 inputs per batch. ``run_layer.dense_input(i, b)`` gives the
    dense model's input to layer i.

    Memory is bounded by one layer: the hidden states the model passed layers > 0 are
    dropped at capture (their other arguments are tensors shared by all layers, or one
    per attention type), and ``dense_input`` recomputes them layer by layer. At once
    the calibration holds, per calibration token, the layer-0 input, the dense input of
    the current layer and the sparse-upstream input of the current layer (3 × hidden
    size values), besides the model and what the sparsifier records.
    """
    layers = [site.layer for site in controller.sites]
    captured: list[dict[int, tuple]] = []

    def capture(i):
        def hook(_mod, args, kwargs):
            if i > 0:  # the hidden states are recomputed when asked for: keep one layer's worth
                args, kwargs = ((None, *args[1:]) if args else ()), {k: v for k, v in kwargs.items() if k != "hidden_states"}
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

    def layer0_input(b):
        args, kwargs = captured[b][0]
        return args[0] if args else kwargs["hidden_states"]

    first = [layer0_input(b) for b in range(len(captured))]

    def run_layer(i, hidden, b):
        args, kwargs = captured[b][i]
        full = first[b].shape[0]
        if hidden.shape[0] != full:  # a probe on the first sequences of a batch
            args, kwargs = _batch_slice(args, full, hidden.shape[0]), _batch_slice(kwargs, full, hidden.shape[0])
        if args:
            out = layers[i](hidden, *args[1:], **kwargs)
        else:
            out = layers[i](**{**kwargs, "hidden_states": hidden})
        return out[0] if isinstance(out, tuple) else out

    run_layer.dense_input = _DenseInputs(controller, first, run_layer)
    run_layer.num_batches = len(captured)
    return run_layer, first


@torch.no_grad()
def dense_linear_inputs(controller, run_layer, i, fn) -> dict[str, list]:
    """Run layer i on the dense model's inputs to it (every captured batch) and return
    ``fn(inp)`` per wrapped projection: the dense within-block input distributions."""
    out: dict[str, list] = {}

    def record(inp):
        if inp.layer_idx == i:
            out.setdefault(inp.proj, []).append(fn(inp))

    with controller.recording(None, linear_recorder=record):
        for b in range(run_layer.num_batches):
            run_layer(i, run_layer.dense_input(i, b), b)
    return out


class LayerProbe:
    """Re-runs one decoder layer on its captured calibration inputs (for methods that
    search per-layer parameters against the layer's output, e.g. TEAL's greedy)."""

    def __init__(self, controller, layer_idx, run_layer, hidden):
        self.controller, self.layer_idx = controller, layer_idx
        self._run_layer, self._hidden = run_layer, hidden

    @torch.no_grad()
    def outputs(self, sparse: bool, batches: int | None = None) -> list[torch.Tensor]:
        n = len(self._hidden) if batches is None else min(batches, len(self._hidden))
        with self.controller.recording(None, sparse_layers={self.layer_idx} if sparse else ()):
            return [self._run_layer(self.layer_idx, self._hidden[b], b) for b in range(n)]


# Stages of a decoder block whose linear inputs depend on the ones before: q/k/v → o →
# gate/up → down (refits needed to fit each stage on the sparse block: stages − 1).
BLOCK_INPUT_STAGES = 4


@torch.no_grad()
def calibrate_layerwise(controller, model, batches, fn, fit, linear_fn=None, probe: bool = False,
                        block_refits: int = 0) -> None:
    """Calibrate layer by layer on exactly the tensor each layer sees at inference.

    For l = 0, 1, …: record ``fn(inp)`` for layer l's MLP on the hidden states produced by
    layers < l *with their masks applied*, call ``fit(l, values)`` (which must make the
    sparsifier's masks work for layer l), then advance the hidden states through layer l
    with its masks on. Each decoder layer is re-run from its captured inputs (hidden
    states plus the keyword arguments the model passed it: masks, rotary embeddings),
    so the cost is about two full forwards, with no architecture-specific code.

    With ``linear_fn`` the inputs of the wrapped linears of layer l are recorded too
    (layer l itself dense) and ``fit(l, values, linear_values, probe)`` is called, where
    ``linear_values`` maps projection → list and ``probe`` (a LayerProbe, if requested)
    re-runs layer l on its inputs, dense or with the masks being fitted.

    ``block_refits`` (methods that mask the inputs of several linears of one block):
    after the first fit, record layer l's linear inputs again *with layer l sparse* and
    fit again, that many times. Inside a block the o-projection's input depends on the
    sparse q/k/v, the gate/up input on the sparse attention output and the down input on
    the sparse gate/up, so fitting on the dense block overshoots the later linears'
    sparsity (by points at high sparsity); each refit makes one more stage of that
    chain exact, so ``BLOCK_INPUT_STAGES − 1`` refits reproduce inference exactly.
    """
    run_layer, hidden = capture_layer_inputs(controller, model, batches)
    layers = controller.sites
    from tqdm.auto import tqdm

    for i in tqdm(range(len(layers)), desc="calibration (layer by layer)", leave=False):
        def record(inp, i=i):
            if fn is not None and inp.layer_idx == i:
                values.append(fn(inp))

        def record_linear(inp, i=i):
            if inp.layer_idx == i:
                linear_values.setdefault(inp.proj, []).append(linear_fn(inp))

        for refit in range(1 + (block_refits if linear_fn is not None else 0)):
            values, linear_values = [], {}  # fresh lists per pass (the recorders read these names)
            with controller.recording(record, sparse_layers={i} if refit else (),
                                      linear_recorder=record_linear if linear_fn else None):
                for b, h in enumerate(hidden):
                    run_layer(i, h, b)
            if linear_fn is None and not probe:
                fit(i, values)
            else:
                fit(i, values, linear_values, LayerProbe(controller, i, run_layer, hidden) if probe else None)
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


@torch.no_grad()
def calibration_perplexity(model, batches) -> float:
    """Perplexity over token batches (for searches on a validation part of the
    calibration text; held-out text is never used to fit anything)."""
    import math

    import torch.nn.functional as F

    nll, n = 0.0, 0
    for b in batches:
        logits = model(input_ids=b).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
        n += b[:, 1:].numel()
    return math.exp(nll / n)
