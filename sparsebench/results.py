"""results.json (one per run), environment facts, and the rich tables printed at the end."""
from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from .cache import atomic_write_json

RESULTS_FILE = "results.json"
PACKAGES = ("sparsebench", "torch", "transformers", "lm_eval", "hydra-core", "omegaconf", "wandb", "datasets")
# Metrics shown in the combined multirun table, in this order, when present.
HEADLINE = ("perplexity", "sparsity/mean", "lm_eval/avg_acc", "lm_eval/masked_token_fraction")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def write_results(output_dir: Path, results: dict) -> Path:
    path = Path(output_dir) / RESULTS_FILE
    atomic_write_json(path, results)
    return path


def load_results(dirs: Iterable[Path]) -> list[dict]:
    out = []
    for d in dirs:
        for p in sorted(Path(d).rglob(RESULTS_FILE), key=lambda p: str(p)):
            try:
                out.append(json.loads(p.read_text()) | {"_path": str(p)})
            except ValueError:
                continue
    return out


def _fmt(v: Any) -> str:
    from rich.markup import escape  # run names hold overrides such as evaluator=[a,b]

    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return escape(str(v))


def sparsifier_label(sp: dict) -> str:
    """``cats@0.5``, ``cett@budget=0.2``, ``relu`` (natural zeros)."""
    if sp.get("sparsity") is not None:
        return f"{sp['name']}@{sp['sparsity']:g}"
    if sp.get("budget") is not None:
        return f"{sp['name']}@budget={sp['budget']:g}"
    return sp["name"]


def run_table(results: dict):
    from rich.table import Table

    from .comparison import format_paired

    sparse, dense = results["metrics"], results.get("dense_metrics")
    paired = results.get("paired") or {}
    label = sparsifier_label(results["sparsifier"])
    table = Table(title=f"{results['model']['id']} · {label} · backend={results['backend']}")
    table.add_column("metric")
    if dense is not None:
        table.add_column("dense", justify="right")
    table.add_column(label, justify="right")
    if dense is not None:
        table.add_column("Δ", justify="right")
    if paired:
        table.caption = "* significant at 5% (accuracy: exact McNemar; perplexity: paired CI excludes 1)"
        table.add_column("paired Δ [95% CI] (acc: points; ppl: ratio)", justify="right")
    for key, value in sparse.items():
        row = [key]
        if dense is not None:
            d = dense.get(key)
            row.append(_fmt(d))
        row.append(_fmt(value))
        if dense is not None:
            row.append(_fmt(value - d) if isinstance(d, (int, float)) and isinstance(value, (int, float)) else "—")
        if paired:
            row.append(format_paired(paired[key]) if key in paired else "")
        table.add_row(*row)
    return table


def per_layer_table(results: dict):
    from rich.table import Table

    rows = results.get("per_layer") or []
    if not rows:
        return None
    table = Table(title="per layer")
    cols = list(rows[0].keys())
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    return table


def combined_table(all_results: list[dict], title: str = "sweep"):
    from rich.table import Table

    from .comparison import format_paired

    keys = [k for k in HEADLINE if any(k in r.get("metrics", {}) for r in all_results)]
    paired_keys = [k for k in ("lm_eval/avg_acc", "perplexity") if any(k in (r.get("paired") or {}) for r in all_results)]
    table = Table(title=title)
    for c in ("run", "model", "sparsifier", "sparsity"):
        table.add_column(c)
    for k in keys:
        table.add_column(k, justify="right")
        table.add_column(f"dense {k.split('/')[-1]}", justify="right")
    for k in paired_keys:
        table.add_column(f"paired Δ {k} [95% CI]", justify="right")
    if paired_keys:
        table.caption = "acc: points; ppl: ratio to dense; * significant at 5%"
    for r in all_results:
        row = [_fmt(r["run"]["name"]), _fmt(r["model"]["id"]), r["sparsifier"]["name"], _fmt(r["sparsifier"].get("sparsity"))]
        for k in keys:
            row += [_fmt(r["metrics"].get(k)), _fmt((r.get("dense_metrics") or {}).get(k))]
        for k in paired_keys:
            res = (r.get("paired") or {}).get(k)
            row.append(format_paired(res) if res else "—")
        table.add_row(*row)
    return table


def print_tables(*tables) -> None:
    from rich.console import Console

    console = Console(file=sys.stdout, width=max(100, Console().width))
    for t in tables:
        if t is not None:
            console.print(t)
