"""Per-step overhead: how much of a decode step the framework spends outside the kernels.

A sparse decode step pays, per layer, for things a dense step does not: building the
sparsifier's input object, the mask, the prefill-policy bookkeeping, Python dispatch into
the backend, the kernel's argument checks. Those costs are fixed per call, so on a small
model they can eat the whole saving. This evaluator measures them directly:

1. one greedy decode records the sparsifier's masks;
2. the same decode is replayed ``repeats`` times with those masks returned instantly (the
   method's own mask work — CATS's gate, a predictor — is not overhead and is removed),
   timing (a) the decode step without instrumentation and (b) with a clock around the
   ``forward`` of every sparse MLP/linear module (``ModuleClock``): the wall time inside them,
   minus the time the backend reports inside its kernels (``stats()["kernel_s"]``) and minus
   the time of the torch linears inside them (clocked the same way; they run where a projection
   is left dense, e.g. TEAL's dense levels, and do the projection's own work, as in the dense
   model: ``overhead/dense_linears_ms_per_token``), is the overhead;
3. reported per decode token: ``overhead/ms_per_token``, its share of the step
   (``overhead/fraction_of_step``) and of the MLP calls (``overhead/fraction_of_mlp``).

A method whose mask is a rule the backend applies in its kernel (CATS, TEAL on ``fused``:
``Sparsifier.mask_rule``) makes no mask on decode steps, so there is nothing to record or
replay there: those steps run the rule path as the real decode does, and the rule's work is
kernel time. Only the masks the sparsifier does make (the prefill's, other methods' decode
steps) are recorded and replayed.

The clock's own cost inside the window it times (a clock read and a call of the wrapped
forward) is counted in ``overhead/ms_per_token``, so that figure is an upper bound. That
cost is measured directly, not as a difference of two noisy decodes: the clock is put on a
module whose forward does nothing and called ``floor_calls`` times; what it records per
call, less the bare forward call, is ``overhead/clock_floor_us``. Times the timed calls per
decode token (``overhead/timed_calls_per_token``, the dense linears' included) it is ``overhead/hooks_ms_per_token`` (a
name from when the clock was forward hooks), and ``overhead/net_ms_per_token`` /
``overhead/net_fraction_of_step`` are the overhead with it subtracted — the estimate of what
an uninstrumented step spends outside kernels in those modules' forward. (A hot loop of one
module is the clock's best case, so the subtraction errs small and the net figure high.)
nn.Module's call machinery around each forward is outside the window: the dense model's
modules pay it too. ``overhead/instrumented_minus_plain_ms_per_token`` is the whole-decode
slowdown the clock causes, kept for reference (noise-dominated at this size). Needs a
backend that times its kernels (fused), so it runs on the CPU only (``device=cpu``); a CUDA
model is refused.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..data.corpus import heldout_windows
from ..core.errors import ConfigError
from ..core.device import model_device, refuse_cuda
from . import EVALUATORS
from .base import EvalResult, Evaluator
from .decode import ModuleClock, greedy_decode, recording_masks, replaying_masks


def sparse_modules(controller) -> list[torch.nn.Module]:
    """The modules the controller installed: one per MLP, plus the masked-linear wrappers
    that are not inside an MLP already timed (TEAL's q/k/v/o)."""
    mods = [site.installed for site in controller.sites]
    for _, proj, wrapper in controller.input_masked_linears():
        if proj not in ("gate", "up", "down"):
            mods.append(wrapper)
    return mods


def dense_linears(modules) -> list[torch.nn.Linear]:
    """The torch linears inside ``modules`` (the sparse modules). They run only where a
    projection is left dense — a method's dense level (TEAL's t < 0 on some layers' v), a
    position or layer the policy keeps dense, a backend's torch fallback — and their time is
    the projection's own compute, as in the dense model: not overhead."""
    found = {}
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, torch.nn.Linear):
                found.setdefault(id(sub), sub)
    return list(found.values())


class _Passthrough(torch.nn.Module):
    def forward(self, x):
        return x


def clock_floor_s(calls: int, repeats: int = 5) -> float:
    """Seconds a ModuleClock records per single-token call of a module that does nothing,
    less the bare forward call: what the clock itself adds to a timed module call (CPU)."""
    m, x = _Passthrough(), torch.zeros(1, 1, 8, device="cpu")  # the evaluator runs on the CPU only

    def per_call(body) -> float:
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            body()
            samples.append((time.perf_counter() - t0) / calls)
        return statistics.median(samples)

    def empty():
        for _ in range(calls):
            pass

    def bare():
        for _ in range(calls):
            m.forward(x)

    forward_s = max(0.0, per_call(bare) - per_call(empty))
    wall = ModuleClock({0: m})
    try:
        recorded = []
        for _ in range(repeats):
            wall.seconds[0] = 0.0
            for _ in range(calls):
                m(x)
            recorded.append(wall.seconds[0] / calls)
    finally:
        wall.remove()
    return max(0.0, statistics.median(recorded) - forward_s)


@EVALUATORS.register("step_overhead")
class StepOverhead(Evaluator):
    timing = True
    compare_dense = False
    device_types = ("cpu",)  # the fused backend's kernels (Cython/OpenMP on host memory)

    @torch.no_grad()
    def evaluate(self, ctx):
        cfg, ctl = self.cfg, ctx.controller
        device = model_device(ctx.model)
        refuse_cuda(device, "evaluator step_overhead (it times the fused backend's kernels)")
        if "kernel_s" not in ctl.backend.stats():
            raise ConfigError(f"evaluator step_overhead needs a backend that times its kernels (backend=fused), "
                              f"not backend={ctl.backend.name}")
        prompt = heldout_windows(ctx.tokenizer, ctx.splits, 1, int(cfg.prompt_tokens)).ids.to(device)
        n_new = int(cfg.new_tokens)
        mlp_masks, linear_masks = [], []
        with recording_masks(ctl.sparsifier, mlp_masks, linear_masks):
            greedy_decode(ctx.model, prompt, n_new)

        modules = sparse_modules(ctl)
        linears = dense_linears(modules)

        def replay(instrument: bool):
            # the sparse modules' forward, and inside it the torch linears of dense projections
            wall = ModuleClock(dict(enumerate(modules)), device) if instrument else None
            dense = ModuleClock(dict(enumerate(linears)), device) if instrument else None
            ctl.backend.reset()
            try:
                with replaying_masks(ctl.sparsifier, list(mlp_masks), list(linear_masks)):
                    _, prefill_s, decode_s = greedy_decode(ctx.model, prompt, n_new)
            finally:
                for clock in (dense, wall):
                    if clock is not None:
                        clock.remove()
            return decode_s, prefill_s, wall, dense, ctl.backend.stats()["kernel_s"]

        replay(False)  # warm-up
        steps, instrumented, inside, kernel, dense_s, calls, dense_calls = [], [], [], [], [], [], []
        for _ in range(int(cfg.repeats)):
            steps.append(replay(False)[0])
            decode_s, _, wall, dense, kernel_s = replay(True)
            instrumented.append(decode_s)
            inside.append(sum(wall.seconds.values()))
            dense_s.append(sum(dense.seconds.values()))
            calls.append(sum(wall.calls.values()) + sum(dense.calls.values()))
            dense_calls.append(sum(dense.calls.values()))
            kernel.append(kernel_s)
        tokens = n_new - 1
        step_s = statistics.median(steps) / tokens
        overhead_s = statistics.median(i - k - d for i, k, d in zip(inside, kernel, dense_s)) / tokens
        calls_per_token = statistics.median(calls) / tokens
        floor_s = clock_floor_s(int(cfg.floor_calls))
        hooks_s = floor_s * calls_per_token
        net_s = max(0.0, overhead_s - hooks_s)
        mlp_s = statistics.median(inside) / tokens
        return EvalResult(metrics={
            "overhead/ms_per_token": 1e3 * overhead_s,
            "overhead/step_ms": 1e3 * step_s,
            "overhead/mlp_ms_per_token": 1e3 * mlp_s,
            "overhead/kernel_ms_per_token": 1e3 * statistics.median(kernel) / tokens,
            "overhead/dense_linears_ms_per_token": 1e3 * statistics.median(dense_s) / tokens,
            "overhead/dense_linear_calls_per_token": statistics.median(dense_calls) / tokens,
            "overhead/fraction_of_step": overhead_s / step_s,
            "overhead/fraction_of_mlp": overhead_s / mlp_s,
            "overhead/clock_floor_us": 1e6 * floor_s,
            "overhead/timed_calls_per_token": calls_per_token,
            "overhead/hooks_ms_per_token": 1e3 * hooks_s,
            "overhead/instrumented_minus_plain_ms_per_token":
                1e3 * (statistics.median(instrumented) - statistics.median(steps)) / tokens,
            "overhead/net_ms_per_token": 1e3 * net_s,
            "overhead/net_fraction_of_step": net_s / step_s,
            "overhead/new_tokens": n_new,
        })
