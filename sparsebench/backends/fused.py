"""Fused: read the active weight rows in place, one C/OpenMP kernel per decode step.

Every other sparse backend copies rows (``index_select`` gathers them, ``cached`` keeps a
compact copy) before it multiplies. At batch-1 decode the weights already sit in memory,
so a kernel can read exactly the active rows where they lie (``ext/fused_mlp.pyx``):

- **MLP** (one token): threads split the active neurons and compute
  h_j = act(gate_j·x) · up_act(up_j·x) (the activation in-kernel: SiLU, GeLU-tanh, GeLU,
  ReLU, FATReLU, dReLU's ReLU on up, OPT's fc1/fc2 biases), then threads split the output
  columns and each accumulates its slice of y = Σ_j h_j · down_t[j] — race-free, no
  reduction. What the sparsifier already computed is reused (CATS's act: only up and down
  rows are read; CETT's h: only down rows).
- **Input-sparse linear** (TEAL, WINA, R-Sparse's sparse part): y = Σ_{j active} x_j · Wᵀ[j],
  Wᵀ stored once, threads split the output columns.
- **Input-sparse MLP** (TEAL, WINA on a decode token, ``mlp_inputs_token``): gate and up on the
  channels of x their rules keep, h in-kernel, down on the channels of h its rule keeps — one
  call per MLP, with the transposed weights of the input-sparse linears.
- **Dense path through the same kernel** (``dense_path: kernel``): a call without a mask
  runs every neuron through the kernel, so "dense vs sparse" can be measured with the
  same code and weight format (e.g. bf16 dense vs bf16 sparse).

Weights: ``weights: model`` reads the model's own gate/up rows in place (fp32, or bf16
when ``model.dtype=bfloat16``); ``weights: bfloat16`` keeps bf16 copies of an fp32 model's
MLP weights (fp32 accumulation in-kernel: the "fp32 HF vs bf16 sparse" comparison). Down
(and each masked linear's weight) is stored transposed once, in the kernel's dtype.

More than one row per call: single-token calls of a batch (batched decode, ``[B, 1, H]``)
run the kernel once per row with that row's own mask; multi-token calls (prefill,
perplexity, lm-eval scoring) take ``prefill: dense_mask`` — one dense GEMM and the mask
multiplied in, exactly what the dense-mask backend computes — or ``prefill: per_token``
(every token through the kernel, for equivalence tests and for measuring it).

The kernel also computes the mask itself when the sparsifier's mask is a rule on what the
kernel computes anyway (``sparsifiers.base.ThresholdRule`` / ``TopKRule``): CATS's
|act(gate)| > t (``mlp_token`` with ``RULE_ACT``: the gate of every neuron, then up and down
of the kept), CETT's |h_i| >= t_i (``RULE_H``: gate and up of every neuron, then down of the
kept), TEAL's |x_j| > t (``linear_token`` with a threshold; q/k/v and gate/up as one call per
group, ``linear_group_token``) and WINA's top-k of |x_j|·‖W[:, j]‖ (``linear_topk_token``:
quickselect, ties to the lower index; grouped like TEAL's thresholds). In a model run the controller hands such a rule
(``Sparsifier.mask_rule`` / ``input_mask_rule``) to ``mlp_by_rule`` / ``linear_by_rule`` on
single-token calls: no mask tensor, no ``nonzero()``, no separate pass. A rule on a value
the kernel computes (gate, h) uses the kernel's own float32 dot products, so a neuron within
rounding of the threshold may differ from the torch-computed mask; rules on x are exact.
The kept indices come back for observers.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError
from ..sparsifiers.base import ThresholdRule, TopKRule
from . import BACKENDS
from .base import Backend
from .index_select import flat_rows
from .weights import _source_key


def kernel():
    try:
        from .._ext import fused_mlp
    except ImportError as e:  # pragma: no cover - the build always compiles it
        raise ConfigError(
            "backend=fused needs the compiled extension sparsebench._ext.fused_mlp; "
            "reinstall with `pip install -e .` (needs a C compiler with OpenMP)"
        ) from e
    return fused_mlp


KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def activation_code(fn) -> tuple[str, float]:
    """The kernel's name for an activation module/function, and its parameter; refuses
    anything the kernel does not compute exactly (a silent mismatch would be wrong numbers)."""
    if fn is None:
        return "identity", 0.0
    name = type(fn).__name__
    if fn is torch.relu or fn is torch.nn.functional.relu or name == "ReLU":
        return "relu", 0.0
    if name in ("SiLU", "SiLUActivation") or fn is torch.nn.functional.silu:
        return "silu", 0.0
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh"):
        return "gelu_tanh", 0.0
    if name == "GELU":
        return ("gelu_tanh" if getattr(fn, "approximate", "none") == "tanh" else "gelu"), 0.0
    if name == "GELUActivation" and not getattr(fn, "use_gelu_python", False):
        return "gelu", 0.0
    if name == "FATReLU":
        return "fatrelu", float(fn.threshold)
    raise ConfigError(f"backend=fused has no in-kernel version of the activation {name}; "
                      f"use backend=index_select or cached for this model")


@dataclass
class FusedMLPWeights:
    gated: bool
    gate: torch.Tensor | None  # [I, H] kernel dtype (the model's own tensor when it already is)
    up: torch.Tensor  # [I, H]
    down_t: torch.Tensor  # [I, H]
    gate_bias: torch.Tensor | None  # fp32
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    act: int
    act_param: float
    up_act: int
    dtype_code: int
    source: tuple

    @property
    def inter(self) -> int:
        return self.up.shape[0]

    @property
    def hidden(self) -> int:
        return self.up.shape[1]


def _fp32_flat(x: torch.Tensor) -> torch.Tensor:
    """One token's values as the contiguous fp32 vector the kernels read (no copy if it is one)."""
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()


def _buffers(cache: dict, key, make: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Scratch tensors per ``key`` (a width), made on first use: a decode step allocates none."""
    bufs = cache.get(key)
    if bufs is None:
        bufs = cache[key] = make()
    return bufs


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class FusedKernel:
    """The kernels with their scratch buffers, for callers outside a model (benchmarks)."""

    def __init__(self, threads: int, simd: bool = True):
        self.ext = kernel()
        self.threads, self.simd = int(threads), int(bool(simd))
        self._scratch: dict[int, tuple[torch.Tensor, ...]] = {}

    def scratch(self, n: int):
        """(kept indices int32, h, act of every neuron) for an MLP of ``n`` neurons."""
        return _buffers(self._scratch, n, lambda: (torch.empty(n, dtype=torch.int32), torch.empty(n), torch.empty(n)))

    def mlp(self, w: FusedMLPWeights, x: torch.Tensor, mask: torch.Tensor | None, *, mode: int = 0,
            given: torch.Tensor | None = None, threshold: float | None = None,
            h_thresholds: torch.Tensor | None = None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """y for one token ``x`` (H contiguous fp32 values, any shape); ``mask`` bool [I] or
        None (dense, or an in-kernel rule: |act(gate)| > ``threshold``, or |h_i| >=
        ``h_thresholds[i]``, fp32 [I] contiguous). Returns (y, active neurons)."""
        idx, h, act_all = self.scratch(w.inter)
        y = torch.empty(w.hidden) if out is None else out
        rule = self.ext.RULE_H if h_thresholds is not None else (self.ext.RULE_ACT if threshold is not None else 0)
        k = self.ext.mlp_token(
            x.data_ptr(), w.hidden, w.inter, _ptr(w.gate), w.up.data_ptr(), w.down_t.data_ptr(), w.dtype_code,
            _ptr(w.gate_bias), _ptr(w.up_bias), _ptr(w.down_bias), int(w.gated), mode, _ptr(given),
            _ptr(mask), rule, 0.0 if threshold is None else float(threshold), _ptr(h_thresholds),
            w.act, w.act_param, w.up_act, idx.data_ptr(), h.data_ptr(), act_all.data_ptr(), y.data_ptr(),
            self.threads, self.simd)
        return y, k

    def active_indices(self, n: int, k: int) -> torch.Tensor:
        """The ``k`` kept indices of the last call of width ``n`` (ascending int32; a view
        of scratch, valid until the next call of that width)."""
        return self.scratch(n)[0][:k]

    def linear(self, wt: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, mask: torch.Tensor | None,
               threshold: float | None = None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """y = Σ over active input channels of x_j · wt[j] (+ bias) for one token."""
        n_in, n_out = wt.shape
        idx, coef, _ = self.scratch(n_in)
        y = torch.empty(n_out) if out is None else out
        k = self.ext.linear_token(
            x.data_ptr(), n_in, n_out, wt.data_ptr(), KERNEL_DTYPES[wt.dtype], _ptr(bias), _ptr(mask),
            int(threshold is not None), 0.0 if threshold is None else float(threshold),
            idx.data_ptr(), coef.data_ptr(), y.data_ptr(), self.threads, self.simd)
        return y, k

    def mlp_inputs(self, gate_t: torch.Tensor | None, up_t: torch.Tensor, down_t: torch.Tensor, x: torch.Tensor,
                   rules, *, gate_bias=None, up_bias=None, down_bias=None, act: str = "identity",
                   act_param: float = 0.0, up_act: str = "identity", out: torch.Tensor | None = None):
        """A whole MLP for one token with its linears' inputs selected by ``rules``
        (``sparsifiers.base.MLPInputRules``): weights transposed (gate_t, up_t [H, I], down_t
        [I, H], one dtype), biases fp32. Returns (y, kept input channels of gate, up, down)."""
        H, I = up_t.shape
        idx = [torch.empty(n, dtype=torch.int32) for n in (H, H, I)]
        coef = [torch.empty(n) for n in (H, H, I)]
        g, u, h = (torch.empty(I) for _ in range(3))
        scores, work = torch.empty(max(H, I)), torch.empty(max(H, I))
        y = torch.empty(H) if out is None else out
        selections = tuple(kernel_selection(r) for r in (rules.gate, rules.up, rules.down))
        ks = self.ext.mlp_inputs_token(
            x.data_ptr(), H, I, KERNEL_DTYPES[up_t.dtype], int(gate_t is not None),
            (_ptr(gate_t), up_t.data_ptr(), down_t.data_ptr(), _ptr(gate_bias), _ptr(up_bias), _ptr(down_bias)),
            selections, self.ext.ACTIVATIONS[act], float(act_param), self.ext.ACTIVATIONS[up_act],
            tuple(t.data_ptr() for pair in zip(idx, coef) for t in pair) + tuple(t.data_ptr() for t in (g, u, h, scores, work)),
            y.data_ptr(), self.threads, self.simd)
        return y, tuple(i[:k].clone() for i, k in zip(idx, ks))


def kernel_selection(rule) -> tuple[float, int, int]:
    """A linear's input rule as the kernel's selection ``(threshold, keep, weights pointer)``:
    |x_j| > t for a ``ThresholdRule`` on x, the top ``keep`` of |x_j|·w_j for a ``TopKRule``,
    every channel for None (a dense linear). The rule must outlive the call (its weights)."""
    if rule is None:
        return (0.0, -2, 0)
    if rule.__class__ is TopKRule:
        return (0.0, rule.keep, _ptr(rule.weights))
    return (rule.threshold, -1, 0)


class _Plan:
    """A kernel call prepared once per layer (and projection): the weights in kernel layout,
    the extension's call plan (``args``: every argument that does not change between tokens,
    kept in C) and the source weights it was built from. A plan is checked against its sources
    once per sequence (``current``): each source must still be its module's weight (read from
    the module's parameter table: ``module.weight`` goes through ``nn.Module.__getattr__``), at
    the same address and version, or the plan is rebuilt (a replaced or in-place-modified
    weight, e.g. WINA's transform). Once per sequence, not per call: with the weights streaming
    through the caches, the check costs microseconds per call, about 1% of a small model's step."""

    __slots__ = ("checks", "weights", "args", "idx", "width", "n_out", "site", "rules", "sequence", "outs",
                 "member_keys")

    def __init__(self, owners: tuple, weights, args, idx: torch.Tensor, width: int, n_out: int):
        # per source module (None: absent, e.g. a plain MLP's gate): (parameters, weight, address, version)
        self.checks = tuple((m._parameters, m.weight, m.weight.data_ptr(), m.weight._version)
                            for m in owners if m is not None)
        self.weights, self.args, self.idx, self.width, self.n_out = weights, args, idx, width, n_out
        self.site = None  # a group's or MLP's plan: the site it was built from
        self.rules = None  # a group's or MLP's input rules, whose selections ``args`` holds
        self.member_keys = ()  # a group's: the stash keys of its members after the first
        self.sequence = -1  # the backend's sequence in which the sources were last seen unchanged
        # the outputs (a group: one per member), handed out again when no one holds them
        slot = kernel().OutputSlot
        self.outs = tuple(slot(n, torch.empty, torch._C._storage_Use_Count)
                          for n in (n_out if isinstance(n_out, list) else (n_out,)))

    def current(self, sequence: int) -> bool:
        """Whether the plan still matches its sources, checked once per ``sequence``."""
        if self.sequence == sequence:
            return True
        if self.fresh():
            self.sequence = sequence
            return True
        return False

    def fresh(self) -> bool:
        for params, t, ptr, ver in self.checks:
            if params.get("weight") is not t or t._version != ver or t.data_ptr() != ptr:
                return False
        return True


def fused_weights(gate, up, down, *, gate_bias=None, up_bias=None, down_bias=None, act=None, up_act=None,
                  dtype: torch.dtype | None = None, source: tuple = ()) -> FusedMLPWeights:
    """Kernel layout from nn.Linear-style weights (gate/up [I, H], down [H, I]). Tensors already
    in the kernel dtype and contiguous are used in place; down is transposed once."""
    ext = kernel()
    dtype = dtype or up.dtype
    if dtype not in KERNEL_DTYPES:
        raise ConfigError(f"backend=fused runs fp32 or bf16 weights, not {dtype}")

    def rows(t):
        t = t.detach()
        return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()

    def f32(t):
        return None if t is None else t.detach().float().contiguous()

    a, a_param = activation_code(act)
    ua, _ = activation_code(up_act)
    return FusedMLPWeights(
        gated=gate is not None, gate=None if gate is None else rows(gate), up=rows(up),
        down_t=down.detach().t().to(dtype).contiguous(), gate_bias=f32(gate_bias), up_bias=f32(up_bias),
        down_bias=f32(down_bias), act=ext.ACTIVATIONS[a], act_param=a_param, up_act=ext.ACTIVATIONS[ua],
        dtype_code=KERNEL_DTYPES[dtype], source=source)


# Linears that read one input tensor in a decoder layer: the first one's call computes the group.
SHARED_INPUT = {"q": ("q", "k", "v"), "gate": ("gate", "up")}
GROUP_LEADER = {p: group[0] for group in SHARED_INPUT.values() for p in group[1:]}


def _unwrapped(module):
    """The nn.Linear behind a masked-linear wrapper (patching.SparseLinear keeps it as ``.linear``)."""
    return getattr(module, "linear", module)


@BACKENDS.register("fused")
class FusedBackend(Backend):
    device_types = ("cpu",)  # a Cython/OpenMP kernel on host memory
    PREFILL = ("dense_mask", "per_token")
    DENSE_PATHS = ("torch", "kernel")
    WEIGHTS = ("model", "bfloat16")

    def __init__(self, cfg=None):
        super().__init__(cfg)
        get = (lambda k, d: cfg.get(k, d)) if cfg is not None else (lambda k, d: d)
        threads = get("threads", None)
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ConfigError(f"backend.threads={threads} must be a positive integer or null")
        self.threads = threads
        self.simd = get("simd", "auto")
        if self.simd not in ("auto", "portable"):
            raise ConfigError(f"backend.simd={self.simd} must be auto or portable")
        for key, allowed in (("prefill", self.PREFILL), ("dense_path", self.DENSE_PATHS), ("weights", self.WEIGHTS)):
            value = get(key, allowed[0])
            if value not in allowed:
                raise ConfigError(f"backend.{key}={value} must be one of: {', '.join(allowed)}")
            setattr(self, key, value)
        self.kernel = FusedKernel(1, simd=self.simd == "auto")  # fail at build time, not at the first token
        self._weights: dict = {}
        self._linear_weights: dict = {}
        # the single-token path's _Plans, one dict per kind with a key cheap to hash: layer (MLP),
        # (layer, proj) (masked linear), (layer, leading proj) (group), layer (MLP by input rules)
        self._plans: dict = {}
        self._group_plans: dict = {}
        self._inputs_plans: dict = {}
        # q/k/v and gate/up with in-kernel rules: one kernel call per group (``_group_by_rule``)
        self.group_linears = bool(get("group_linears", True))
        self._scratch: dict = {}  # shape → kernel scratch shared by every layer (made when a plan is built)
        self._stash: dict = {}  # (layer, proj) → a group member's result, waiting for its own call
        self._rules_seen: dict = {}  # (layer, proj) → the rule of its last rule call
        self._sequence = 0  # sequences begun (``new_sequence``): plans check their sources once in each
        # kernel: calls outside call plans (plans count on ``clock``); rule: calls that applied the mask rule
        self._calls = {"kernel": 0, "dense": 0, "rule": 0}
        # wall time and calls inside the kernels of single-token calls (step-overhead evaluator),
        # kept by the call plans in C
        self.clock = self.kernel.ext.KernelClock()

    @property
    def calls(self) -> dict:
        """Kernel calls (one per token through the kernels), dense fallbacks, and kernel calls
        that applied the mask rule."""
        return self._calls | {"kernel": self._calls["kernel"] + self.clock.calls}

    @property
    def kernel_s(self) -> float:
        return self.clock.seconds

    @kernel_s.setter
    def kernel_s(self, seconds: float) -> None:
        self.clock.seconds = seconds

    def _kernel(self) -> FusedKernel:
        self.kernel.threads = self.threads or torch.get_num_threads()
        return self.kernel

    def stats(self) -> dict:
        return self.calls | {"kernel_s": self.kernel_s}

    def reset(self) -> None:
        self.kernel_s = 0.0
        self.new_sequence()

    def new_sequence(self) -> None:
        # the call plans check their source weights again at their next call
        self._sequence += 1

    def _dtype(self, t: torch.Tensor) -> torch.dtype:
        return torch.bfloat16 if self.weights == "bfloat16" else t.dtype

    def mlp_weights(self, site) -> FusedMLPWeights:
        """The site's weights in kernel layout, prepared once per layer and again only when
        a weight tensor was replaced or modified in place (e.g. WINA's transform)."""
        gate = site.gate.weight if site.kind == "gated" else None
        key = _source_key(gate, site.up.weight, site.down.weight)
        w = self._weights.get(site.layer_idx)
        if w is not None and w.source == key:
            return w
        if site.up.weight.device.type != "cpu":
            raise ConfigError(f"backend=fused runs on CPU; the model is on {site.up.weight.device}: "
                              f"use backend=index_select")
        w = fused_weights(gate, site.up.weight, site.down.weight,
                          gate_bias=site.gate.bias if site.kind == "gated" else None, up_bias=site.up.bias,
                          down_bias=site.down.bias, act=site.act, up_act=site.up_act,
                          dtype=self._dtype(site.up.weight), source=key)
        self._weights[site.layer_idx] = w
        return w

    def plans(self) -> list[_Plan]:
        """Every call plan built so far."""
        return [*self._plans.values(), *self._group_plans.values(), *self._inputs_plans.values()]

    def forget_weights(self) -> None:
        """Drop every prepared weight layout and call plan (rebuilt at the next call)."""
        self._weights.clear()
        self._linear_weights.clear()
        self._plans.clear()
        self._group_plans.clear()
        self._inputs_plans.clear()
        self._stash.clear()

    def _mlp_plan(self, site) -> _Plan:
        plan = self._plans.get(site.layer_idx)
        if plan is not None and plan.site is site and plan.current(self._sequence):
            return plan
        w = self.mlp_weights(site)
        idx, h, act_all = self.kernel.scratch(w.inter)
        call = self.kernel.ext.MLPCall(
            self.clock, w.hidden, w.inter, _ptr(w.gate), w.up.data_ptr(), w.down_t.data_ptr(), w.dtype_code,
            _ptr(w.gate_bias), _ptr(w.up_bias), _ptr(w.down_bias), int(w.gated), w.act, w.act_param, w.up_act,
            idx.data_ptr(), h.data_ptr(), act_all.data_ptr())
        plan = _Plan((_unwrapped(site.gate) if w.gated else None, _unwrapped(site.up), _unwrapped(site.down)), w,
                     call, idx, w.inter, w.hidden)
        plan.site, plan.sequence = site, self._sequence
        self._plans[site.layer_idx] = plan
        return plan

    def _linear_plan(self, linear, key) -> _Plan:
        plan = self._plans.get(key)
        if plan is not None and plan.site is linear and plan.current(self._sequence):
            return plan
        wt, bias = self.linear_weight(linear, key)
        n_in, n_out = wt.shape
        idx, coef, _ = self.kernel.scratch(n_in)
        # the top-k rule's scores and quickselect copy
        select = _buffers(self._scratch, ("select", n_in), lambda: (torch.empty(n_in), torch.empty(n_in)))
        call = self.kernel.ext.LinearCall(self.clock, n_in, n_out, wt.data_ptr(), KERNEL_DTYPES[wt.dtype], _ptr(bias),
                                          idx.data_ptr(), coef.data_ptr(), *[t.data_ptr() for t in select])
        plan = _Plan((linear,), (wt, bias, select), call, idx, n_in, n_out)
        plan.site, plan.sequence = linear, self._sequence  # a linear's plan: the module it was built from
        call.slot = plan.outs[0]
        self._plans[key] = plan
        return plan

    def _mlp_token(self, plan: _Plan, x: torch.Tensor, mode: int, given, mask, out, rule: int = 0,
                   threshold: float = 0.0, h_thresholds: torch.Tensor | None = None) -> int:
        """The MLP kernel on one token through a plan (``x``, ``given``, ``mask`` contiguous
        and flat; ``rule`` 0 or the in-kernel rule's kind, with its threshold(s))."""
        return plan.args(x.data_ptr(), mode, _ptr(given), _ptr(mask), rule, threshold, _ptr(h_thresholds),
                         out.data_ptr(), self.threads or torch.get_num_threads(), self.kernel.simd)

    def _linear_token(self, plan: _Plan, x: torch.Tensor, mask, threshold, out) -> int:
        return plan.args.threshold(x.data_ptr(), _ptr(mask), int(threshold is not None),
                                   0.0 if threshold is None else threshold, out.data_ptr(),
                                   self.threads or torch.get_num_threads(), self.kernel.simd)

    # ------------------------------------------------------------------ MLP
    def mlp(self, site, inp, mask):
        tokens = inp.x.numel() // inp.x.shape[-1]
        one_token_rows = tokens == 1 or (inp.x.dim() == 3 and inp.x.shape[1] == 1)
        if mask is None and (self.dense_path == "torch" or not one_token_rows):
            self._calls["dense"] += 1
            return site.down(inp.h)
        if not one_token_rows and self.prefill == "dense_mask":
            self._calls["dense"] += 1
            return site.down(inp.h * mask.to(inp.h.dtype))
        if tokens == 1 and (mask is None or mask.numel() == site.intermediate_size):
            return self._mlp_one(site, inp, mask)
        w = self.mlp_weights(site)
        kern = self._kernel()
        x2 = inp.x.reshape(-1, w.hidden).float().contiguous()
        mode, given = self._given(w, inp)
        masks = None if mask is None else flat_rows(inp.x, mask)[1].contiguous()
        out = torch.empty(x2.shape[0], w.hidden)
        t0 = time.perf_counter()
        for n in range(x2.shape[0]):
            kern.mlp(w, x2[n], None if masks is None else masks[n], mode=mode,
                     given=None if given is None else given[n], out=out[n])
        if tokens == 1:
            self.kernel_s += time.perf_counter() - t0
        self._calls["kernel"] += x2.shape[0]
        return out.to(inp.x.dtype).reshape(inp.x.shape)

    def _mlp_one(self, site, inp, mask):
        """One token through the kernel with its plan (the decode step of a masked MLP)."""
        plan = self._mlp_plan(site)
        x = inp.x
        mode, given = self._given(plan.weights, inp)
        out = plan.outs[0].take(x.dim())
        self._mlp_token(plan, _fp32_flat(x), mode, given, None if mask is None else mask.reshape(-1).contiguous(), out)
        return _as_dtype(out, x.dtype)

    # The rule entries run once per layer (per linear for TEAL and WINA) and decode token, so
    # they skip conversions that would be no-ops on fp32 inputs, keep every per-layer argument
    # in a plan, and return the kept indices as (scratch, count) — slicing a tensor costs
    # microseconds, and only observers need it. Each microsecond of Python, times seven linears
    # and thirty layers, is a measurable share of a small model's step (step_overhead evaluator).
    def mlp_by_rule(self, site, inp, rule):
        x = inp.x
        if x.numel() != x.shape[-1] or rule.__class__ is not ThresholdRule:
            return None
        ext = self.kernel.ext
        if rule.on == "act" and site.kind == "gated":  # CATS: gate of every neuron, up/down of the kept
            kind, threshold, h_thresholds = ext.RULE_ACT, rule.threshold, None
        elif rule.on == "h" and rule.threshold.device.type == "cpu":  # CETT: h of every neuron, down of the kept
            kind, threshold, h_thresholds = ext.RULE_H, 0.0, rule.threshold
        else:
            return None
        plan = self._mlp_plan(site)
        out = plan.outs[0].take(x.dim())
        k = self._mlp_token(plan, _fp32_flat(x), ext.FROM_X, None, None, out, kind, threshold, h_thresholds)
        self._calls["rule"] += 1
        return (out if x.dtype == torch.float32 else out.to(x.dtype)), plan.idx, k

    def linear_by_rule(self, inp, linear, rule):
        x = inp.x
        key = (inp.site.layer_idx, inp.proj)
        done = self._stash.pop(key, None)
        # computed with its group, on this very single-token input: valid for it (at the same
        # version) and the same rule only (rules are frozen: the same object is the same
        # selection, already the one seen last)
        if done is not None and done[0] is x and done[2] is rule and done[1] == x._version:
            self._calls["rule"] += 1
            return done[3]
        if rule.on != "x" or x.numel() != x.shape[-1]:
            return None
        self._rules_seen[key] = rule
        if inp.proj in GROUP_LEADER:  # a group member computing on its own: its group reads the rules again
            leader = self._group_plans.get((key[0], GROUP_LEADER[inp.proj]))
            if leader is not None:
                leader.rules = None
        group = SHARED_INPUT.get(inp.proj)
        if group is not None and self.group_linears:
            done = self._group_by_rule(inp, rule, group)
            if done is not None:
                return done
        if rule.__class__ is TopKRule:
            return self._topk_by_rule(inp, linear, rule)
        plan = self._plans.get(key)  # _linear_plan's fast path inlined (a call less on a hot path)
        if plan is None or plan.site is not linear or not plan.current(self._sequence):
            plan = self._linear_plan(linear, key)
        xf = _fp32_flat(x)  # held until the kernel has read it (a converted copy would be freed)
        out, k = plan.args.run_threshold(xf, rule.threshold, x.dim(), self.threads or torch.get_num_threads(),
                                         self.kernel.simd)
        self._calls["rule"] += 1
        return (out if x.dtype == torch.float32 else out.to(x.dtype)), plan.idx, k

    def _topk_by_rule(self, inp, linear, rule):
        """WINA's top-k of |x_j|·w_j, selected in the kernel (quickselect, ties to the lower
        index) before the same input-sparse pass."""
        x = inp.x
        plan = self._linear_plan(linear, (inp.site.layer_idx, inp.proj))
        xf = _fp32_flat(x)  # held until the kernel has read it (a converted copy would be freed)
        out, k = plan.args.run_topk(xf, _ptr(rule.weights), rule.keep, x.dim(),
                                    self.threads or torch.get_num_threads(), self.kernel.simd)
        self._calls["rule"] += 1
        return (out if x.dtype == torch.float32 else out.to(x.dtype)), plan.idx, k

    def _group_by_rule(self, inp, rule, group: tuple[str, ...]):
        """The first linear of a group that reads one input (q of q/k/v, gate of gate/up)
        computes the others too, in one kernel call, with the rules (threshold or top-k) they
        had on the previous token; their results wait in ``_stash`` and are served only to a
        call with the same input tensor (same version) and the same rule — otherwise that call
        computes its own. None: a member's rule is not known yet (first token)."""
        site, x = inp.site, inp.x
        layer = site.layer_idx
        plan = self._group_plans.get((layer, group[0]))  # _group_plan's fast path inlined
        if plan is None or plan.site is not site or not plan.current(self._sequence):
            plan = self._group_plan(site, layer, group)
        rules = plan.rules
        if rules is None or rules[0] is not rule:
            # the members' rules as last seen (a member that computes on its own — a new rule,
            # or the first token — sets ``plan.rules`` back to None); rules compare by identity
            seen = self._rules_seen
            rules = [rule]
            for key in plan.member_keys:
                r = seen.get(key)
                if r is None:
                    return None
                rules.append(r)
            plan.rules = rules
            plan.args.select(tuple(kernel_selection(r) for r in rules))
        xf = _fp32_flat(x)  # held until the kernel has read it (a converted copy would be freed)
        # outputs from the plan's slots, the kernel, then the kept counts: one call into C
        done = plan.args.run(xf, x.dim(), self.threads or torch.get_num_threads(), self.kernel.simd)
        self._calls["rule"] += 1
        version, n = x._version, len(plan.outs)
        if x.dtype != torch.float32:
            done[:n] = [out.to(x.dtype) for out in done[:n]]
        stash, idx = self._stash, plan.idx
        for g, key in enumerate(plan.member_keys, 1):
            stash[key] = (x, version, rules[g], (done[g], idx[g], done[n + g]))
        return done[0], idx[0], done[n]

    def _group_plan(self, site, layer: int, group: tuple[str, ...]) -> _Plan:
        """The group's plan; it keeps the site and the members' modules it was built from, so a
        call checks identities and weight versions instead of walking the model's modules."""
        plan = self._group_plans.get((layer, group[0]))
        if plan is not None and plan.site is site and plan.current(self._sequence):
            return plan
        linears = tuple(_unwrapped(site.projection(p)) for p in group)
        heads, idxs, n_outs = [], [], []
        for proj, lin in zip(group, linears):
            wt, bias = self.linear_weight(lin, (layer, proj))
            n_in, n_out = wt.shape
            # own scratch per member: each one's kept indices outlive the call
            idx, coef = torch.empty(n_in, dtype=torch.int32), torch.empty(n_in)
            heads.append((wt.data_ptr(), n_out, _ptr(bias), idx.data_ptr(), coef.data_ptr()))
            idxs.append((idx, coef))
            n_outs.append(n_out)
        dtype = KERNEL_DTYPES[self.linear_weight(linears[0], (layer, group[0]))[0].dtype]
        select_scratch = (torch.empty(n_in), torch.empty(n_in))  # top-k scores and quickselect copy, shared
        call = self.kernel.ext.GroupCall(self.clock, n_in, dtype, tuple(heads), *[t.data_ptr() for t in select_scratch])
        plan = _Plan(linears, (idxs, select_scratch), call, [i for i, _ in idxs], n_in, n_outs)
        plan.site, plan.sequence = site, self._sequence
        plan.member_keys = tuple((layer, p) for p in group[1:])  # the others' keys in the stash
        call.slots = plan.outs
        self._group_plans[(layer, group[0])] = plan
        return plan

    def mlp_by_input_rules(self, site, inp, rules):
        """The MLP of a decode token with its linears' input rules (TEAL, WINA) in one kernel
        call: gate and up on their channels of x, h in-kernel, down on its channels of h
        (h and the kept channels are scratch views, valid until the next call)."""
        x = inp.x
        if x.numel() != x.shape[-1]:
            return None
        plan = self._inputs_plans.get(site.layer_idx)  # _inputs_plan's fast path inlined
        if plan is None or plan.site is not site or not plan.current(self._sequence):
            plan = self._inputs_plan(site)
        call = plan.args
        if plan.rules is not rules:  # once per layer and rules object (the sparsifier keeps them)
            plan.rules = rules
            call.select(tuple(kernel_selection(r) for r in (rules.gate, rules.up, rules.down)))
        xf = _fp32_flat(x)  # held until the kernel has read it (a converted copy would be freed)
        out, k_gate, k_up, k_down = call.run(xf, x.dim(), self.threads or torch.get_num_threads(), self.kernel.simd)
        self._calls["rule"] += 1
        idx_gate, idx_up, idx_down, h = plan.idx
        return ((out if x.dtype == torch.float32 else out.to(x.dtype)), h,
                ((idx_gate, k_gate), (idx_up, k_up), (idx_down, k_down)))

    def _inputs_plan(self, site) -> _Plan:
        """The plan of ``mlp_by_input_rules``: the linears' transposed weights (shared with the
        masked-linear path) and scratch (shared by every layer of one shape)."""
        layer = site.layer_idx
        plan = self._inputs_plans.get(layer)
        if plan is not None and plan.site is site and plan.current(self._sequence):
            return plan
        gated = site.kind == "gated"
        projs = ("gate", "up", "down") if gated else ("up", "down")
        linears = tuple(_unwrapped(site.projection(p)) for p in projs)
        prepared = dict(zip(projs, (self.linear_weight(lin, (layer, p)) for p, lin in zip(projs, linears))))
        (gate_t, gate_bias), (up_t, up_bias), (down_t, down_bias) = (prepared.get(p, (None, None))
                                                                     for p in ("gate", "up", "down"))
        H, I = up_t.shape
        scratch = _buffers(self._scratch, ("inputs", H, I), lambda: (
            torch.empty(H, dtype=torch.int32), torch.empty(H), torch.empty(H, dtype=torch.int32), torch.empty(H),
            torch.empty(I, dtype=torch.int32), torch.empty(I), torch.empty(I), torch.empty(I), torch.empty(I),
            torch.empty(max(H, I)), torch.empty(max(H, I))))
        act, act_param = activation_code(site.act)
        up_act, _ = activation_code(site.up_act)
        ext = self.kernel.ext
        call = ext.MLPInputsCall(
            self.clock, H, I, KERNEL_DTYPES[up_t.dtype], int(gated),
            (_ptr(gate_t), up_t.data_ptr(), down_t.data_ptr(), _ptr(gate_bias), _ptr(up_bias), _ptr(down_bias)),
            ext.ACTIVATIONS[act], act_param, ext.ACTIVATIONS[up_act], tuple(t.data_ptr() for t in scratch))
        plan = _Plan(linears, (prepared, scratch), call,
                     (scratch[0], scratch[2], scratch[4], scratch[8]), I, H)  # idx: kept of gate, up, down; h
        plan.site, plan.sequence = site, self._sequence
        call.slot = plan.outs[0]
        self._inputs_plans[layer] = plan
        return plan

    def _given(self, w: FusedMLPWeights, inp):
        """What the sparsifier already computed, as the kernel's mode and an fp32 [N, I] tensor."""
        ext = self.kernel.ext
        computed = inp.computed
        if computed == "x":
            return ext.FROM_X, None
        n = inp.x.numel() // inp.x.shape[-1]
        if computed == "act" and w.gated:
            return ext.GIVEN_ACT, inp.act.reshape(n, -1).float().contiguous()
        src = inp.h if computed == "h" else inp.act  # plain MLPs: h is act(fc1 x)
        return ext.GIVEN_H, src.reshape(n, -1).float().contiguous()

    # ------------------------------------------------------------------ linear inputs
    def linear_weight(self, linear, key):
        src = _source_key(linear.weight)
        hit = self._linear_weights.get(key)
        if hit is not None and hit[2] == src:
            return hit[0], hit[1]
        wt = linear.weight.detach().t().to(self._dtype(linear.weight)).contiguous()
        if wt.dtype not in KERNEL_DTYPES:
            raise ConfigError(f"backend=fused runs fp32 or bf16 weights, not {wt.dtype}")
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self._linear_weights[key] = (wt, bias, src)
        return wt, bias

    def linear(self, inp, linear, mask):
        tokens = inp.x.numel() // inp.x.shape[-1]
        one_token_rows = tokens == 1 or (inp.x.dim() == 3 and inp.x.shape[1] == 1)
        if not one_token_rows and self.prefill == "dense_mask":
            self._calls["dense"] += 1
            return linear(inp.x * mask.to(inp.x.dtype))
        if tokens == 1 and mask.numel() == inp.x.shape[-1]:
            plan = self._linear_plan(linear, (inp.layer_idx, inp.proj))
            out = plan.outs[0].take(inp.x.dim())
            self._linear_token(plan, _fp32_flat(inp.x), mask.reshape(-1).contiguous(), None, out)
            return _as_dtype(out, inp.x.dtype)
        wt, bias = self.linear_weight(linear, (inp.layer_idx, inp.proj))
        kern = self._kernel()
        x2, m2 = flat_rows(inp.x, mask)
        x2, m2 = x2.float().contiguous(), m2.contiguous()
        out = torch.empty(x2.shape[0], wt.shape[1])
        t0 = time.perf_counter()
        for n in range(x2.shape[0]):
            kern.linear(wt, bias, x2[n], m2[n], out=out[n])
        if tokens == 1:
            self.kernel_s += time.perf_counter() - t0
        self._calls["kernel"] += x2.shape[0]
        return out.to(inp.x.dtype).reshape(*inp.x.shape[:-1], wt.shape[1])
