"""Triton: batch-1 decode on the GPU, reading only the active weight rows, with no host sync.

Two kernels, built on first use (``triton`` is imported there, never at module import,
so CPU installs do not need it):

- **Neuron rows** (``neuron_rows``): each program takes a block of neurons and walks the
  hidden dimension; the rows of gate and up ([I, H], the model's own tensors) are read
  through masked loads, so an inactive neuron's row is never fetched. The activation is
  applied in-kernel (SiLU, GELU, GELU-tanh, ReLU, FATReLU; dReLU's ReLU on up; OPT's fc1
  bias) and h is written in fp32, zero at inactive neurons. What the sparsifier already
  computed (``inp.computed``) is reused: CATS's act (only up rows are read), CETT's h or a
  plain MLP's act (this kernel is skipped).
- **Input-sparse GEMV** (``input_sparse_gemv``): y = Σ_{j active, x_j ≠ 0} x_j · Wᵀ[j] over
  a weight stored transposed ([in, out], one contiguous row per input channel). Split-K:
  each program takes a block of input channels and a block of outputs, loads only the
  active rows of its tile and atomically adds its fp32 partial sums into y. It is the
  down projection of the MLP (over ``down_t``) and the masked-input ``linear`` (TEAL,
  WINA, R-Sparse) over the transposed linear weight.

Masks are consumed on the device as they are: no ``nonzero()``, so no host sync per
call. Accumulation is fp32; the result is returned in the input's dtype.

Only one-row calls (decode at batch 1) run the kernels. Calls with more rows (prefill,
perplexity, scoring, batched decode) run the dense mask-multiply, exactly what
``backends/dense.py`` computes: the kernels are GEMVs, and a masked GEMM is dense work.

Needs CUDA tensors; with ``TRITON_INTERPRET=1`` Triton's interpreter runs the same
kernels on CPU tensors (slowly; for tests).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import ConfigError
from . import BACKENDS
from .base import Backend
from .fused import activation_code
from .index_select import flat_call, flat_rows
from .weights import MLPWeights, linear_weight_t, mlp_weights

# The kernels are plain functions here and jitted in place by ``kernels()`` on first use:
# Triton (compiler and interpreter alike) resolves ``tl`` and the helper ``activate`` through
# this module's globals, and importing triton has to wait until a kernel is needed.
triton = tl = None  # the triton modules, bound by kernels()


def activate(z, ACT: tl.constexpr, param):
    # names as in fused.activation_code; z is fp32
    if ACT == "relu":
        z = tl.maximum(z, 0.0)
    elif ACT == "silu":
        z = z * tl.sigmoid(z)
    elif ACT == "gelu":
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = z * tl.sigmoid(2.0 * u)  # 0.5·(1 + tanh(u)) = sigmoid(2u)
    elif ACT == "fatrelu":
        z = tl.where(z >= param, z, 0.0)
    return z


def neuron_rows(x_ptr, mask_ptr, gate_ptr, gate_bias_ptr, act_ptr, up_ptr, up_bias_ptr, h_ptr,
                n_neurons, hidden, gate_act_param, up_act_param,
                GATE: tl.constexpr, GATE_ACT: tl.constexpr, UP_ACT: tl.constexpr,
                GATE_BIAS: tl.constexpr, UP_BIAS: tl.constexpr,
                BLOCK_NEURONS: tl.constexpr, BLOCK_HIDDEN: tl.constexpr):
    # h = [act(gate·x + b) | given act | 1] · up_act(up·x + b) for the active neurons;
    # GATE is "rows" (gated, from x), "given" (gated, act already computed) or "none" (plain)
    neurons = tl.program_id(0) * BLOCK_NEURONS + tl.arange(0, BLOCK_NEURONS)
    in_range = neurons < n_neurons
    active = tl.load(mask_ptr + neurons, mask=in_range, other=0) != 0
    row_start = neurons.to(tl.int64) * hidden
    acc_up = tl.zeros([BLOCK_NEURONS], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_NEURONS], dtype=tl.float32)
    for start in range(0, hidden, BLOCK_HIDDEN):
        cols = start + tl.arange(0, BLOCK_HIDDEN)
        col_ok = cols < hidden
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        offsets = row_start[:, None] + cols[None, :]
        tile = active[:, None] & col_ok[None, :]  # inactive rows: no memory traffic
        up = tl.load(up_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
        acc_up += tl.sum(up * x[None, :], axis=1)
        if GATE == "rows":
            gate = tl.load(gate_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
            acc_gate += tl.sum(gate * x[None, :], axis=1)
    if UP_BIAS:
        acc_up += tl.load(up_bias_ptr + neurons, mask=active, other=0.0).to(tl.float32)
    h = activate(acc_up, UP_ACT, up_act_param)
    if GATE == "rows":
        if GATE_BIAS:
            acc_gate += tl.load(gate_bias_ptr + neurons, mask=active, other=0.0).to(tl.float32)
        h = h * activate(acc_gate, GATE_ACT, gate_act_param)
    elif GATE == "given":
        h = h * tl.load(act_ptr + neurons, mask=active, other=0.0).to(tl.float32)
    # zero at inactive neurons: every operand was loaded as 0 there, and act(0) = 0 for all of them
    tl.store(h_ptr + neurons, h, mask=in_range)


def input_sparse_gemv(x_ptr, mask_ptr, wt_ptr, bias_ptr, y_ptr, n_in, n_out,
                      HAS_BIAS: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr):
    # y (fp32, zeroed by the caller) += Σ over this program's live input rows of x_j · wt[j, cols]
    rows = tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)
    cols = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    row_ok, col_ok = rows < n_in, cols < n_out
    keep = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
    x = tl.load(x_ptr + rows, mask=keep, other=0.0).to(tl.float32)
    live = keep & (x != 0.0)  # a zero input contributes nothing: skip its row too
    offsets = rows.to(tl.int64)[:, None] * n_out + cols[None, :]
    w = tl.load(wt_ptr + offsets, mask=live[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    acc = tl.sum(w * x[:, None], axis=0)
    if HAS_BIAS:
        if tl.program_id(1) == 0:  # added once, by the first block of input rows
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.atomic_add(y_ptr + cols, acc, mask=col_ok, sem="relaxed")  # only the sum matters: no ordering


@functools.cache
def kernels() -> None:
    """Import triton and jit the kernels in place (once per process)."""
    global triton, tl, activate, neuron_rows, input_sparse_gemv
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        raise ConfigError("backend=triton needs the triton package (it comes with CUDA builds of torch): "
                          "pip install triton, or use backend=index_select") from e
    activate = triton.jit(activate)
    neuron_rows = triton.jit(neuron_rows)
    input_sparse_gemv = triton.jit(input_sparse_gemv)


@dataclass(frozen=True)
class Blocks:
    """Tile sizes (powers of two) and warps per program; see conf/backend/triton.yaml."""

    block_neurons: int = 16
    block_hidden: int = 256
    block_in: int = 64
    block_out: int = 128
    num_warps: int = 4

    LIMITS: ClassVar[dict[str, int]] = {"block_neurons": 1024, "block_hidden": 1024, "block_in": 1024,
                                        "block_out": 1024, "num_warps": 32}

    @classmethod
    def from_cfg(cls, cfg) -> Blocks:
        values = {}
        for key, limit in cls.LIMITS.items():
            default = getattr(cls, key)
            value = cfg.get(key, default) if cfg is not None else default
            ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit
            if not ok or value & (value - 1):  # tl.arange needs powers of two
                raise ConfigError(f"backend.{key}={value!r} must be a power of two from 1 to {limit}, "
                                  f"e.g. backend.{key}={default}")
            values[key] = value
        return cls(**values)


def _as_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 (same memory): loaded as bytes in the kernels."""
    return mask.contiguous().view(torch.uint8)


def sparse_gemv(x: torch.Tensor, keep: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None,
                blocks: Blocks) -> torch.Tensor:
    """y = Σ_{j: keep_j} x_j · wt[j] (+ bias), fp32 [out], for one row ``x`` [in] and a bool
    ``keep`` [in]; ``wt`` is [in, out] contiguous."""
    kernels()
    n_in, n_out = wt.shape
    y = torch.zeros(n_out, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n_out, blocks.block_out), triton.cdiv(n_in, blocks.block_in))
    # a pointer slot the kernel does not read (no bias) gets x: any tensor will do
    input_sparse_gemv[grid](x.contiguous(), _as_bytes(keep), wt, x if bias is None else bias, y, n_in, n_out,
                            HAS_BIAS=bias is not None, BLOCK_IN=blocks.block_in, BLOCK_OUT=blocks.block_out,
                            num_warps=blocks.num_warps)
    return y


@dataclass(frozen=True)
class Activations:
    """The kernel's activation names (``fused.activation_code``) for one MLP."""

    gate: str
    gate_param: float
    up: str
    up_param: float


def kernel_activation(fn) -> tuple[str, float]:
    try:
        return activation_code(fn)
    except ConfigError:
        raise ConfigError(f"backend=triton has no in-kernel version of the activation {type(fn).__name__}; "
                          f"use backend=index_select for this model") from None


def kernel_activations(w: MLPWeights) -> Activations:
    """Gated: act on gate, up_act on up; plain: act on fc1 (the kernel's "up" operand)."""
    if w.kind == "plain":
        return Activations("identity", 0.0, *kernel_activation(w.act))
    return Activations(*kernel_activation(w.act), *kernel_activation(w.up_act))


def neuron_hidden(w: MLPWeights, acts: Activations, x: torch.Tensor, keep: torch.Tensor,
                  given_act: torch.Tensor | None, blocks: Blocks) -> torch.Tensor:
    """h (fp32 [I], zero at inactive neurons) for one row ``x`` [H] and a bool ``keep`` [I].
    ``given_act`` [I]: a gated MLP's act(gate x), already computed (then gate rows are not read)."""
    kernels()
    n, hidden = w.up.shape
    h = torch.empty(n, dtype=torch.float32, device=x.device)
    gate = "none" if w.kind == "plain" else ("rows" if given_act is None else "given")
    x = x.contiguous()
    # pointer slots the kernel does not read (no gate rows, no biases, no given act) get x
    neuron_rows[(triton.cdiv(n, blocks.block_neurons),)](
        x, _as_bytes(keep), w.gate if gate == "rows" else x, x if w.gate_bias is None else w.gate_bias,
        x if given_act is None else given_act.contiguous(), w.up, x if w.up_bias is None else w.up_bias, h,
        n, hidden, acts.gate_param, acts.up_param,
        GATE=gate, GATE_ACT=acts.gate, UP_ACT=acts.up,
        GATE_BIAS=gate == "rows" and w.gate_bias is not None, UP_BIAS=w.up_bias is not None,
        BLOCK_NEURONS=blocks.block_neurons, BLOCK_HIDDEN=blocks.block_hidden, num_warps=blocks.num_warps)
    return h


INTERPRET_VALUES = ("1", "true", "on", "yes")


def check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "").lower() not in INTERPRET_VALUES:
        raise ConfigError(f"backend=triton needs CUDA; the model is on {x.device}: use backend=fused or "
                          f"index_select on CPU (or TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)")


@BACKENDS.register("triton")
class TritonBackend(Backend):
    device_types = ("cuda",)  # CUDA kernels (the interpreter runs them on CPU tensors in tests)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.blocks = Blocks.from_cfg(cfg)
        self._weights: dict = {}
        self._linear_weights: dict = {}
        self._activations: dict = {}
        self.calls = {"kernel": 0, "dense": 0}

    def stats(self) -> dict:
        return dict(self.calls)

    @staticmethod
    def _on_device(x: torch.Tensor):
        """Launch on the tensor's own GPU (Triton launches on the current device)."""
        return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()

    # ------------------------------------------------------------------ MLP
    def mlp(self, site, inp, mask):
        check_device(inp.x)
        if mask is None:
            self.calls["dense"] += 1
            return site.down(inp.h)
        if inp.x.numel() != inp.x.shape[-1]:  # more than one row: masked dense GEMMs
            self.calls["dense"] += 1
            return site.down(inp.h * mask.to(inp.h.dtype))
        w = mlp_weights(site, self._weights)
        _, x2, m2, act2, h2 = flat_call(w, inp, mask)
        keep = m2[0]
        with self._on_device(inp.x):
            if h2 is None:
                h = neuron_hidden(w, self._kernel_activations(site.layer_idx, w), x2[0], keep,
                                  None if act2 is None else act2[0], self.blocks)
            else:  # the sparsifier already computed h (CETT), or a plain MLP's act
                h = h2[0]
            y = sparse_gemv(h, keep, w.down_t, w.down_bias, self.blocks)
        self.calls["kernel"] += 1
        return y.to(inp.x.dtype).reshape(inp.x.shape)

    def _kernel_activations(self, layer_idx: int, w: MLPWeights) -> Activations:
        """Resolved once per prepared weights (again when ``mlp_weights`` re-prepares them)."""
        hit = self._activations.get(layer_idx)
        if hit is None or hit[0] is not w:
            hit = self._activations[layer_idx] = (w, kernel_activations(w))
        return hit[1]

    # ------------------------------------------------------------------ linear inputs
    def linear(self, inp, linear, mask):
        check_device(inp.x)
        if inp.x.numel() != inp.x.shape[-1]:  # more than one row: a masked dense GEMM
            self.calls["dense"] += 1
            return linear(inp.x * mask.to(inp.x.dtype))
        wt, bias = linear_weight_t(linear, (inp.layer_idx, inp.proj), self._linear_weights)
        x2, m2 = flat_rows(inp.x, mask)
        with self._on_device(inp.x):
            y = sparse_gemv(x2[0], m2[0], wt, bias, self.blocks)
        self.calls["kernel"] += 1
        return y.to(inp.x.dtype).reshape(*inp.x.shape[:-1], wt.shape[1])

