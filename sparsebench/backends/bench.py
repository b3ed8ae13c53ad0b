"""Kernel benchmarks of the sparse backends (issue: execution backends).

    sparsebench-bench weight-selection   # 1. cache update vs naive index_select, over churn and density
    sparsebench-bench mlp-step           # 2. one MLP step: dense vs index_select vs cached (update included)
    sparsebench-bench mlp-step-cold      # 3. the same with weights cold, plus the fused kernels (fp32, bf16)

Synthetic masks: ``k = density · intermediate`` neurons active; each step a fraction
``churn`` of them leaves and as many random inactive neurons enter (the cache copies
exactly those rows). Every point reports the **median** over ``--steps`` steps and the
ratio of medians measured in the same run, never a pass/fail timing. Results are printed
and written as CSV + JSON to ``--out``.

The naive baseline gathers from the same layout as the cache (gate and up rows, down
transposed) into preallocated outputs (``index_select(out=)``), so the comparison
isolates "copy only what changed" from layout and allocation effects.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(576, 1536), (2048, 8192), (3072, 8192)]


def mask_sequence(n: int, density: float, churn: float, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """``steps + 1`` boolean masks with exactly ``round(density·n)`` active neurons, of
    which ``round(churn·k)`` are swapped for inactive ones at every step."""
    gen = torch.Generator().manual_seed(seed)
    k = max(1, round(density * n))
    swaps = min(round(churn * k), n - k)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[:k]] = True
    out = [mask]
    for _ in range(steps):
        mask = mask.clone()
        on, off = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
        mask[on[torch.randperm(on.numel(), generator=gen)[:swaps]]] = False
        mask[off[torch.randperm(off.numel(), generator=gen)[:swaps]]] = True
        out.append(mask)
    return out


def random_mlp(hidden: int, inter: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    scale = hidden ** -0.5
    gate = (torch.randn(inter, hidden, generator=gen) * scale).to(dtype)
    up = (torch.randn(inter, hidden, generator=gen) * scale).to(dtype)
    down_t = (torch.randn(inter, hidden, generator=gen) * inter ** -0.5).to(dtype)
    return gate, up, down_t


def _median_ms(fn, masks) -> float:
    return _interleaved_median_ms({"fn": fn}, masks)["fn"]


class NaiveGather:
    """Per step: nonzero → index_select of gate, up and down_t rows into fixed buffers."""

    def __init__(self, gate, up, down_t, k):
        self.w = (gate, up, down_t)
        self.bufs = tuple(torch.empty(k, gate.shape[1], dtype=gate.dtype) for _ in range(3))

    def __call__(self, mask):
        idx = mask.nonzero().squeeze(1)
        for w, b in zip(self.w, self.bufs):
            torch.index_select(w, 0, idx, out=b)
        return idx


def cache_for(gate, up, down_t, threads):
    from .cached import RowCache

    return RowCache([[gate, up], [down_t]], gate.shape[0], threads)


def weight_selection(shapes, densities, churns, threads, steps, out: Path, points=None) -> list[dict]:
    """``points``: explicit (density, churn) pairs (e.g. measured on a real model) instead
    of the grid ``densities × churns``."""
    rows = []
    pairs = points or [(d, c) for d in densities for c in churns]
    for hidden, inter in shapes:
        gate, up, down_t = random_mlp(hidden, inter)
        row_bytes = 3 * hidden * gate.element_size()
        for density, churn in pairs:
            k = max(1, round(density * inter))
            masks = mask_sequence(inter, density, churn, steps + 2, seed=int(1e3 * density + 1e5 * churn))
            torch.set_num_threads(threads)
            naive = NaiveGather(gate, up, down_t, k)
            naive(masks[0])
            naive_ms = _median_ms(naive, masks[1:])
            cache = cache_for(gate, up, down_t, threads)
            cache.update(masks[0])
            copied0 = cache.rows_copied
            cache_ms = _median_ms(cache.update, masks[1:])
            copies = (cache.rows_copied - copied0) / (len(masks) - 1)
            # breakdown: the same update with nothing to copy (bookkeeping only), and the
            # naive path's index computation alone
            same = [masks[-1]] * len(masks[1:])
            bookkeeping_ms = _median_ms(cache.update, same)
            nonzero_ms = _median_ms(lambda m: m.nonzero(), masks[1:])
            rows.append({
                "hidden": hidden, "intermediate": inter, "density": density, "churn": churn,
                "threads": threads, "active_rows": k, "rows_copied_per_step": copies,
                "naive_ms": naive_ms, "cached_ms": cache_ms, "speedup": naive_ms / cache_ms,
                "copy_bound_limit": 1.0 / churn if churn > 0 else float("inf"),
                "cached_bookkeeping_ms": bookkeeping_ms, "naive_nonzero_ms": nonzero_ms,
                "naive_GBps": k * row_bytes / naive_ms / 1e6,
                "cached_GBps": copies * row_bytes / max(cache_ms - bookkeeping_ms, 1e-9) / 1e6,
            })
            _print_row(rows[-1], ["hidden", "intermediate", "density", "churn", "threads",
                                  "naive_ms", "cached_ms", "speedup", "copy_bound_limit"])
    _write(out, "weight_selection", rows)
    return rows


def time_layer(gate, up, down_t, masks: list[torch.Tensor], threads: int) -> dict[str, float]:
    """Median times (ms) of weight selection and of one MLP step over ``masks`` (the first
    mask fills the cache and is not timed), plus the rows the cache copied per step.
    The variants compared alternate step by step (``_interleaved_median_ms``)."""
    hidden = gate.shape[1]
    down = down_t.t().contiguous()
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(0)).to(gate.dtype)
    k_max = max(int(m.sum()) for m in masks)
    naive = NaiveGather(gate, up, down_t, k_max)

    def naive_select(m):
        idx = m.nonzero().squeeze(1)
        k = idx.numel()
        for w, b in zip(naive.w, naive.bufs):
            torch.index_select(w, 0, idx, out=b[:k])
        return k

    def naive_step(m):
        k = naive_select(m)
        g, u, d = (b[:k] for b in naive.bufs)
        return (F.silu(x @ g.t()) * (x @ u.t())) @ d

    cache = cache_for(gate, up, down_t, threads)
    cache.update(masks[0])

    def cached_step(m):
        cache.update(m)
        z = (x @ cache.rows(0).view(cache.k * 2, hidden).t()).view(cache.k, 2)
        return (F.silu(z[:, 0]) * z[:, 1]) @ cache.rows(1).view(cache.k, hidden)

    def dense_step(_):
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    steps = masks[1:]
    copied0 = cache.rows_copied
    out = _interleaved_median_ms({"naive_select_ms": naive_select, "cached_select_ms": cache.update}, steps)
    out["rows_copied_per_step"] = (cache.rows_copied - copied0) / len(steps)
    cache.update(masks[0])  # restart the sequence for the step timing
    out |= _interleaved_median_ms({"dense_step_ms": dense_step, "index_select_step_ms": naive_step,
                                   "cached_step_ms": cached_step}, steps)
    return out


def _interleaved_median_ms(fns: dict, items) -> dict[str, float]:
    """Median ms of each function over ``items``, the functions taking turns on every item,
    so a slow spell of the machine hits all of them alike (their ratios stay fair)."""
    times = {name: [] for name in fns}
    for item in items:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(item)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}



def mlp_step(shapes, densities, churn, threads_list, steps, out: Path) -> list[dict]:
    rows = []
    for hidden, inter in shapes:
        gate, up, down_t = random_mlp(hidden, inter)
        for threads in threads_list:
            torch.set_num_threads(threads)
            for density in densities:
                masks = mask_sequence(inter, density, churn, steps + 1, seed=int(1e3 * density))
                t = time_layer(gate, up, down_t, masks, threads)
                rows.append({
                    "hidden": hidden, "intermediate": inter, "density": density, "churn": churn,
                    "threads": threads, "dense_ms": t["dense_step_ms"], "index_select_ms": t["index_select_step_ms"],
                    "cached_ms": t["cached_step_ms"], "cached_speedup": t["dense_step_ms"] / t["cached_step_ms"],
                    "index_select_speedup": t["dense_step_ms"] / t["index_select_step_ms"],
                    "target_speedup": 0.8 / density,
                })
                _print_row(rows[-1], ["hidden", "intermediate", "density", "threads", "dense_ms",
                                      "index_select_ms", "cached_ms", "cached_speedup", "target_speedup"])
    _write(out, "mlp_step", rows)
    return rows


def llc_bytes() -> int:
    """Size of the last-level cache (sysfs), 32 MiB when it cannot be read."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=32 << 20)


def cold_layer_count(hidden: int, inter: int, llc: int, factor: float = 3.0) -> int:
    """Copies of one layer whose fp32 MLP weights together exceed ``factor`` × the LLC, so
    cycling through them reads every weight from DRAM, as a decode through many layers does."""
    per_layer = 3 * hidden * inter * 4
    return max(2, -(-int(factor * llc) // per_layer))


class ColdLayer:
    """One layer's weights in every layout the compared paths read (each its own memory)."""

    def __init__(self, hidden, inter, seed, threads):
        from .fused import fused_weights

        gate, up, down_t = random_mlp(hidden, inter, seed=seed)
        self.gate, self.up, self.down_t = gate, up, down_t
        self.down = down_t.t().contiguous()
        self.fused = fused_weights(gate, up, self.down, act=torch.nn.SiLU())
        self.fused_bf16 = fused_weights(gate, up, self.down, act=torch.nn.SiLU(), dtype=torch.bfloat16)
        self.cache = cache_for(gate, up, down_t, threads)


def mlp_step_cold(shapes, densities, churn, threads_list, steps, out: Path, llc: int | None = None,
                  factor: float = 3.0, layers: int | None = None) -> list[dict]:
    """One decode MLP step per layer with **cold weights**: ``L`` copies of the layer (enough
    that their weights exceed ``factor`` × the LLC, or ``layers``) are visited in turn, each
    with its own mask sequence, as a decode through L layers. Per step and variant the pass
    over all L layers is timed and divided by L; variants take turns step by step; medians.

    Variants: dense torch (F.linear, fp32), ``index_select`` (gather then matmul), ``cached``
    (row-cache update + matmul), ``fused`` fp32 and bf16 (rows read in place), and the fused
    kernel's dense path (every neuron, fp32 and bf16)."""
    from .fused import FusedKernel

    llc = llc or llc_bytes()
    rows = []
    for hidden, inter in shapes:
        n_layers = layers or cold_layer_count(hidden, inter, llc, factor)
        for threads in threads_list:
            torch.set_num_threads(threads)
            stack = [ColdLayer(hidden, inter, seed=i, threads=threads) for i in range(n_layers)]
            kern = FusedKernel(threads)
            x = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
            x1 = x.view(1, hidden)
            for density in densities:
                masks = [mask_sequence(inter, density, churn, steps + 1, seed=int(1e3 * density) + i)
                         for i in range(n_layers)]
                for layer, m in zip(stack, masks):
                    layer.cache.update(m[0])
                k_max = max(int(m.sum()) for seq in masks for m in seq)
                bufs = tuple(torch.empty(k_max, hidden) for _ in range(3))

                def over_layers(step_fn):
                    def run(step):
                        for layer, seq in zip(stack, masks):
                            step_fn(layer, seq[step])
                    return run

                def dense(layer, m):
                    return F.linear(F.silu(F.linear(x1, layer.gate)) * F.linear(x1, layer.up), layer.down)

                def index_select(layer, m):
                    idx = m.nonzero().squeeze(1)
                    k = idx.numel()
                    g, u, d = (torch.index_select(w, 0, idx, out=b[:k])
                               for w, b in zip((layer.gate, layer.up, layer.down_t), bufs))
                    return (F.silu(x1 @ g.t()) * (x1 @ u.t())) @ d

                def cached(layer, m):
                    c = layer.cache
                    c.update(m)
                    z = (x1 @ c.rows(0).view(c.k * 2, hidden).t()).view(c.k, 2)
                    return (F.silu(z[:, 0]) * z[:, 1]) @ c.rows(1).view(c.k, hidden)

                variants = {
                    "dense_ms": dense, "index_select_ms": index_select, "cached_ms": cached,
                    "fused_ms": lambda layer, m: kern.mlp(layer.fused, x, m),
                    "fused_bf16_ms": lambda layer, m: kern.mlp(layer.fused_bf16, x, m),
                    "fused_dense_ms": lambda layer, m: kern.mlp(layer.fused, x, None),
                    "fused_bf16_dense_ms": lambda layer, m: kern.mlp(layer.fused_bf16, x, None),
                }
                t = _interleaved_median_ms({k: over_layers(f) for k, f in variants.items()}, range(1, steps + 1))
                t = {k: v / n_layers for k, v in t.items()}
                k_mean = sum(int(m.sum()) for seq in masks for m in seq[1:]) / (n_layers * steps)
                rows.append({
                    "hidden": hidden, "intermediate": inter, "density": density, "churn": churn, "threads": threads,
                    "layers": n_layers, "cold_bytes": n_layers * 3 * hidden * inter * 4, **t,
                    "fused_speedup": t["dense_ms"] / t["fused_ms"],
                    "fused_bf16_speedup": t["dense_ms"] / t["fused_bf16_ms"],
                    "index_select_speedup": t["dense_ms"] / t["index_select_ms"],
                    "cached_speedup": t["dense_ms"] / t["cached_ms"],
                    "fused_bf16_dense_speedup": t["dense_ms"] / t["fused_bf16_dense_ms"],
                    "limit": 1.0 / density, "fused_fraction_of_limit": t["dense_ms"] / t["fused_ms"] * density,
                    "fused_GBps": 3 * hidden * k_mean * 4 / t["fused_ms"] / 1e6,
                    "dense_GBps": 3 * hidden * inter * 4 / t["dense_ms"] / 1e6,
                })
                _print_row(rows[-1], ["hidden", "intermediate", "density", "threads", "layers", "dense_ms",
                                      "index_select_ms", "cached_ms", "fused_ms", "fused_bf16_ms", "fused_speedup",
                                      "fused_fraction_of_limit", "fused_bf16_dense_speedup", "fused_GBps"])
            del stack
    _write(out, "mlp_step_cold", rows)
    return rows


def _print_row(row, keys):
    print("  ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys), flush=True)


def _write(out: Path, name: str, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = {"benchmark": name, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "cpu_count": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"[sparsebench-bench] wrote {out / (name + '.csv')}")


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",")]


def _shapes(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in s.split(",")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="sparsebench-bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="which", required=True)
    shapes = ",".join(f"{h}x{i}" for h, i in SHAPES)
    ws = sub.add_parser("weight-selection", help="cache update vs naive index_select")
    ws.add_argument("--shapes", type=_shapes, default=_shapes(shapes), help="hidden x intermediate, e.g. 576x1536")
    ws.add_argument("--densities", type=_floats, default=[0.1, 0.2, 0.3, 0.5])
    ws.add_argument("--churns", type=_floats, default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
    ws.add_argument("--points", type=lambda s: [tuple(float(v) for v in p.split(":")) for p in s.split(",")],
                    help="density:churn pairs instead of the grid, e.g. 0.5:0.40,0.36:0.54")
    ws.add_argument("--threads", type=int, default=2)
    ws.add_argument("--steps", type=int, default=30)
    ws.add_argument("--out", type=Path, default=Path("bench"))
    ms = sub.add_parser("mlp-step", help="MLP step latency: dense vs index_select vs cached")
    ms.add_argument("--shapes", type=_shapes, default=_shapes(shapes))
    ms.add_argument("--densities", type=_floats, default=[0.1, 0.2, 0.3, 0.5])
    ms.add_argument("--churn", type=float, default=0.1, help="fraction of the active set replaced per step")
    ms.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    ms.add_argument("--steps", type=int, default=30)
    ms.add_argument("--out", type=Path, default=Path("bench"))
    cold = sub.add_parser("mlp-step-cold", help="MLP step with cold weights: dense, index_select, cached, fused")
    cold.add_argument("--shapes", type=_shapes, default=_shapes(shapes))
    cold.add_argument("--densities", type=_floats, default=[0.1, 0.3, 0.5])
    cold.add_argument("--churn", type=float, default=0.4, help="fraction of the active set replaced per step "
                      "(what the cached backend copies; about CATS's on real text)")
    # 2 threads first: on this VM a 2-thread kernel timed after 1-thread runs in the same process
    # was sometimes slowed (not reproducible in isolation); the order is recorded in the CSV
    cold.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")], default=[2, 1])
    cold.add_argument("--steps", type=int, default=15)
    cold.add_argument("--cold-factor", type=float, default=3.0, help="layer copies exceed this many LLCs")
    cold.add_argument("--layers", type=int, default=None, help="fixed number of layer copies (1: hot weights)")
    cold.add_argument("--out", type=Path, default=Path("bench"))
    a = p.parse_args(argv)
    if a.which == "mlp-step-cold":
        mlp_step_cold(a.shapes, a.densities, a.churn, a.threads, a.steps, a.out, factor=a.cold_factor,
                      layers=a.layers)
    elif a.which == "weight-selection":
        weight_selection(a.shapes, a.densities, a.churns, a.threads, a.steps, a.out, a.points)
    else:
        mlp_step(a.shapes, a.densities, a.churn, a.threads, a.steps, a.out)


if __name__ == "__main__":
    main()
