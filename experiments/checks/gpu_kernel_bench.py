"""Batch-1 decode on one GPU at Llama-3-8B MLP shapes: dense cuBLAS vs index_select vs backend=triton.

    python -m sparsebench.experiments.checks.gpu_kernel_bench            # bf16, ρ = 0.1 … 0.5
    python -m sparsebench.experiments.checks.gpu_kernel_bench --densities 0.5 0.6 --block-in 32

Cases (hidden 4096, intermediate 14336, one token):

- ``linear 4096→14336`` and ``linear 14336→4096``: input-sparse linear (TEAL, WINA), a
  fraction ρ of the input channels kept. Dense: ``x @ W.T`` (cuBLAS, no mask).
- ``mlp``: neuron-sparse SwiGLU MLP, a fraction ρ of the 14336 neurons kept, mask given (a
  predictor's): gate/up rows and down columns of the active neurons only. Dense: the
  model's own ``down(silu(gate x) · up x)``.

index_select and triton are the backends themselves (``IndexSelectBackend``, ``TritonBackend``)
called on real ``MLPSite`` objects, so their Python overhead is included.

Cold weights: each call uses the next of N copies of the weights (and its own random
mask), N chosen so that the weight rows one rotation reads at the smallest ρ exceed twice
the L2 cache (H200: ~60 MB; read from the device when torch reports it): nothing a call
reads is still in L2 from its previous use. The header prints N and the bytes.

Timing: CUDA events around one pass over the N copies, after warm-up; the median of
``--repeats`` passes, divided by N. Two columns per method:

- ``eager``: what a decode step costs without CUDA graphs (launch overhead included;
  index_select also pays its host sync from ``nonzero()``);
- ``graph``: the same pass captured in one CUDA graph (GPU time only; dense and triton —
  index_select cannot be captured, its ``nonzero()`` syncs with the host).

GB/s counts the weight bytes the method must read: all of them for dense, the active rows
(ρ of them) for the sparse methods. Speedup is dense time / method time, same column.
TEAL's reference (1.53× end to end at 40% sparsity, 1.8× at 50%) counts sparsity, the
fraction *dropped*: ρ = 0.6 and 0.5 here (add ``--densities 0.6``).

``check`` is the largest |triton − index_select| relative to the largest |index_select| over
the first copy's output (bf16 output rounding: expect ≲ 1e-2).

Needs a CUDA device and triton; well under three minutes on one GPU (on an H200: 11 copies,
≈ 11 GiB of weights and their transposed copies).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn

from sparsebench.backends.index_select import IndexSelectBackend
from sparsebench.backends.triton import TritonBackend
from sparsebench.models.adapters import MLPSite
from sparsebench.models.patching import LinearInput, MLPInput

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BLOCK_KNOBS = ("block_neurons", "block_hidden", "block_in", "block_out", "num_warps")
MAX_COPIES = 64


@dataclass
class Case:
    name: str
    matrices: int  # weight matrices of [hidden, intermediate] elements that the dense call reads
    dense: Callable  # (site, x) -> y
    sparse: Callable  # (backend, site, x, mask) -> y
    in_features: Callable  # site -> width of x
    mask_width: Callable  # site -> width of the mask


def cases(hidden: int, inter: int) -> list[Case]:
    return [
        Case(f"linear {hidden}→{inter}", 1, lambda s, x: s.up(x),
             lambda be, s, x, m: be.linear(LinearInput(s, "up", x), s.up, m),
             lambda s: s.up.in_features, lambda s: s.up.in_features),
        Case(f"linear {inter}→{hidden}", 1, lambda s, x: s.down(x),
             lambda be, s, x, m: be.linear(LinearInput(s, "down", x), s.down, m),
             lambda s: s.down.in_features, lambda s: s.down.in_features),
        Case("mlp (SwiGLU)", 3, lambda s, x: s.down(s.act(s.gate(x)) * s.up(x)),
             lambda be, s, x, m: be.mlp(s, MLPInput(s, x), m),
             lambda s: s.up.in_features, lambda s: s.intermediate_size),
    ]


def make_sites(copies: int, hidden: int, inter: int, dtype) -> list[MLPSite]:
    sites = []
    for i in range(copies):
        lin = [nn.Linear(*shape, bias=False, device="cuda", dtype=dtype) for shape in
               ((hidden, inter), (hidden, inter), (inter, hidden))]
        for m in lin:
            nn.init.normal_(m.weight, std=0.02)
        sites.append(MLPSite(layer_idx=i, layer=None, kind="gated", gate=lin[0], up=lin[1], down=lin[2],
                             act=nn.SiLU()))
    return sites


def random_mask(width: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly round(density · width) True entries, at random positions."""
    mask = torch.zeros(width, dtype=torch.bool, device="cuda")
    mask[torch.randperm(width, generator=gen, device="cuda")[: round(density * width)]] = True
    return mask.view(1, 1, width)


def eager_ms(calls, warmup: int, repeats: int) -> float:
    """Median ms per call of one pass over ``calls`` (one per weight copy)."""
    for _ in range(warmup):
        for call in calls:
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def graph_ms(calls, warmup: int, repeats: int) -> float:
    """Like ``eager_ms``, with the pass captured in one CUDA graph (GPU time, no launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # first calls outside the capture: weights prepared, kernels compiled
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return eager_ms([graph.replay], warmup, repeats) / len(calls)


def l2_bytes(fallback_mb: float) -> int:
    reported = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
    return reported or int(fallback_mb * 2 ** 20)


def row(case: str, rho, method: str, t: dict, dense: dict, nbytes: float, check, no_graphs: bool) -> None:
    """One table line: time, GB/s and speedup vs dense, eager (and graph) columns, then the check."""
    def cols(kind):
        if kind not in t:
            return f" {'—':>9} {'—':>6} {'—':>5}"
        ms = t[kind]
        return f" {ms * 1e3:>9.1f} {nbytes / (ms * 1e-3) / 1e9:>6.0f} {dense[kind] / ms:>5.2f}"

    line = f"{case:<20} {'' if rho is None else f'{rho:.1f}':>4} {method:<13}" + cols("eager")
    if not no_graphs:
        line += cols("graph")
    print(line + f" {'' if check is None else f'{check:.1e}':>8}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5],
                   help="fraction of neurons / input channels kept (ρ)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--copies", type=int, default=None,
                   help="weight copies rotated through (default: enough to beat L2)")
    p.add_argument("--l2-mb", type=float, default=60.0, help="L2 size when torch does not report it (H200: ~60)")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph column")
    for knob in BLOCK_KNOBS:
        p.add_argument("--" + knob.replace("_", "-"), type=int, default=None, help="backend=triton knob (see its yaml)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_kernel_bench: no CUDA device found; this benchmark times GPU kernels (run it on a GPU machine)")

    dtype = DTYPES[a.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    matrix_bytes = a.hidden * a.intermediate * elem
    l2 = l2_bytes(a.l2_mb)
    # smallest pass: one matrix at the smallest ρ; its rotation must read ≥ 2× L2 (capped for tiny shapes)
    copies = a.copies or min(MAX_COPIES, max(2, math.ceil(2 * l2 / (min(a.densities) * matrix_bytes))))
    torch.manual_seed(0)
    sites = make_sites(copies, a.hidden, a.intermediate, dtype)
    triton_cfg = {k: getattr(a, k) for k in BLOCK_KNOBS if getattr(a, k) is not None}
    backends = {"index_select": IndexSelectBackend(None),
                "triton": TritonBackend(OmegaConf.create({"name": "triton", **triton_cfg}))}
    gen = torch.Generator(device="cuda").manual_seed(0)

    print(f"# {torch.cuda.get_device_name(0)}, {a.dtype}, hidden {a.hidden}, intermediate {a.intermediate}, batch 1, "
          f"triton blocks {backends['triton'].blocks}")
    rho_min = min(a.densities)
    print(f"# cold weights: {copies} copies rotated (one matrix {matrix_bytes / 2**20:.0f} MiB; at ρ={rho_min} "
          f"one rotation of one matrix reads {copies * rho_min * matrix_bytes / 2**20:.0f} MiB "
          f"vs L2 {l2 / 2**20:.0f} MiB)")
    print(f"# median of {a.repeats} passes; GB/s = weight bytes the method must read / time; speedup vs dense")
    header = f"{'case':<20} {'rho':>4} {'method':<13} {'eager us':>9} {'GB/s':>6} {'x':>5}"
    if not a.no_graphs:
        header += f" {'graph us':>9} {'GB/s':>6} {'x':>5}"
    print(header + f" {'check':>8}")

    with torch.no_grad():
        for case in cases(a.hidden, a.intermediate):
            xs = [torch.randn(1, 1, case.in_features(s), device="cuda", dtype=dtype) for s in sites]
            dense_calls = [lambda s=s, x=x: case.dense(s, x) for s, x in zip(sites, xs)]
            dense_bytes = case.matrices * matrix_bytes
            dense = {"eager": eager_ms(dense_calls, a.warmup, a.repeats)}
            if not a.no_graphs:
                dense["graph"] = graph_ms(dense_calls, a.warmup, a.repeats)
            row(case.name, None, "dense", dense, dense, dense_bytes, None, a.no_graphs)
            for rho in a.densities:
                masks = [random_mask(case.mask_width(s), rho, gen) for s in sites]
                y = {}
                for name, be in backends.items():
                    calls = [lambda s=s, x=x, m=m, be=be: case.sparse(be, s, x, m) for s, x, m in zip(sites, xs, masks)]
                    y[name] = calls[0]().float()
                    t = {"eager": eager_ms(calls, a.warmup, a.repeats)}
                    if not a.no_graphs and name == "triton":
                        t["graph"] = graph_ms(calls, a.warmup, a.repeats)
                    check = None
                    if name == "triton":
                        ref = y["index_select"]
                        check = ((y["triton"] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                    row(case.name, rho, name, t, dense, rho * dense_bytes, check, a.no_graphs)


if __name__ == "__main__":
    main()
