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

from ..store.cache import atomic_write_json

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


def cpu_model() -> str | None:
    """The CPU's model name as Linux reports it (None elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    cpu = cpu_model()
    if cpu:
        info["cpu_model"] = cpu  # timings differ by host: same-run ratios compare, absolute tok/s does not
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


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m} min {sec:02d} s" if m else f"{sec} s"


def headline(results: dict) -> list[str]:
    """The few lines a user wants first: sparsity reached, perplexity and accuracy against
    the same model dense with their paired 95% CIs (and whether they are significant),
    decode speed when measured, and the wall time."""
    from rich.markup import escape

    m, dense = results["metrics"], results.get("dense_metrics") or {}
    paired = results.get("paired") or {}
    sp = results["sparsifier"]
    lines = [f"[bold]{escape(results['model']['id'])} · {escape(sparsifier_label(sp))} · "
             f"backend={escape(str(results['backend']))}[/bold] — {_duration(results['run'].get('wall_time_s'))}"]
    attention = ((results.get("config") or {}).get("attention") or {})
    if attention.get("name", "none") != "none":
        settings = ", ".join(f"{k} {attention[k]}" for k in ("budget", "budget_fraction", "heads")
                             if attention.get(k) is not None)
        lines.append(f"  attention           {escape(attention['name'])} ({escape(settings)})")
    lines += _long_context_lines(results)
    if "sparsity/mean" in m:
        asked = sp.get("sparsity")
        lines.append(f"  sparsity reached    {m['sparsity/mean']:.3f}"
                     + (f" (requested {asked:g})" if asked is not None and sp["name"] != "none" else ""))
    for key in sorted(k for k in m if k == "perplexity" or (k.startswith("perplexity/") and not k.endswith("tokens"))):
        name = "perplexity" + (f" {key.split('/', 1)[1]}" if "/" in key else "")
        res = paired.get(key)
        if res and "ratio" in res:
            verdict = "significant" if res.get("significant") else "not significant"
            lines.append(f"  {name:<19} {res['ppl_a']:.2f} → {res['ppl_b']:.2f}   ×{res['ratio']:.3f} "
                         f"[{res['ci_low']:.3f}, {res['ci_high']:.3f}]  {verdict}")
        else:
            lines.append(f"  {name:<19} {m[key]:.2f}" + (f" (dense {dense[key]:.2f})" if key in dense else ""))
    acc = paired.get("lm_eval/avg_acc")
    if acc:
        verdict = "significant" if acc.get("significant") else "not significant"
        lines.append(f"  accuracy (average)  {acc['acc_a']:.3f} → {acc['acc_b']:.3f}   "
                     f"{100 * acc['delta']:+.1f} points [{100 * acc['ci_low']:+.1f}, {100 * acc['ci_high']:+.1f}]  "
                     f"{verdict}; {acc['n']} items, {acc.get('n_tasks', 1)} tasks")
    elif "lm_eval/avg_acc" in m:
        lines.append(f"  accuracy (average)  {m['lm_eval/avg_acc']:.3f}")
    if "decode/tokens_per_s" in m:
        lines.append(f"  decode              {m['decode/tokens_per_s']:.1f} tok/s, ×{m['decode/speedup_vs_hf']:.2f} vs dense "
                     f"(Amdahl limit ×{m['decode/amdahl_limit']:.2f}, {m['decode/fraction_of_limit']:.2f} of it)")
    return lines


def _long_context_lines(results: dict) -> list[str]:
    """Passkey accuracy of each attention variant against dense attention (paired), and the
    decode speedup at the longest context measured."""
    m = results["metrics"]
    lines = []
    paired = ((results.get("data") or {}).get("passkey") or {}).get("paired_vs_dense") or {}
    for name, res in paired.items():
        if "/" in name:
            continue
        verdict = "significant" if res.get("significant") else "not significant"
        lines.append(f"  passkey {name:<11} {res['acc_a']:.2f} → {res['acc_b']:.2f}   {100 * res['delta']:+.0f} points "
                     f"[{100 * res['ci_low']:+.0f}, {100 * res['ci_high']:+.0f}]  {verdict}; {res['n']} prompts")
    if "passkey/dense" in m and not paired:
        lines.append(f"  passkey (dense)     {m['passkey/dense']:.2f}")
    speed = sorted((int(k.split("/")[1][4:]), k) for k in m if k.startswith("long_decode/") and k.endswith("/speedup"))
    if speed:
        longest = speed[-1][0]
        for ctx, key in speed:
            if ctx == longest:
                lines.append(f"  decode at {ctx:<6}   {key.split('/')[2]}: ×{m[key]:.2f} tok/s vs dense attention")
    return lines


def run_table(results: dict):
    """What a run prints at its end: the headline, then (for a single run) the full metric
    table; a point of a sweep prints only its headline (the sweep ends with a combined table)."""
    from rich.console import Group
    from rich.text import Text

    head = Group(*(Text.from_markup(line) for line in headline(results)))
    if results["run"].get("group"):
        return head
    return Group(head, Text(""), metrics_table(results))


def metrics_table(results: dict):
    """Every metric, dense beside sparse, with the paired Δ and its CI."""
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


# ``print_per_layer: auto`` prints the per-layer table for a single run of at most this many layers
AUTO_PER_LAYER_MAX = 12


def per_layer_table(results: dict):
    from rich.table import Table

    rows = results.get("per_layer") or []
    if not rows:
        return None
    setting = (results.get("config") or {}).get("print_per_layer", True)
    if setting == "auto" and (results["run"].get("group") or len(rows) > AUTO_PER_LAYER_MAX):
        return None
    if len(rows[0]) <= 1:  # nothing but the layer index (e.g. sparsifier=none)
        return None
    table = Table(title="per layer")
    cols = list(rows[0].keys())
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    return table


def varying_settings(names: list[str]) -> list[str]:
    """The override keys whose value differs between the points of a sweep (point names are
    Hydra's ``key=value,key=value`` override strings; list values keep their commas)."""
    parsed = [_overrides(n) for n in names]
    keys = list(dict.fromkeys(k for p in parsed for k in p))
    return [k for k in keys if len({p.get(k) for p in parsed}) > 1]


def _overrides(name: str) -> dict[str, str]:
    out, depth, key, buf = {}, 0, None, ""
    for ch in name + ",":
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            k, _, v = buf.partition("=")
            out[k] = v
            buf = ""
        else:
            buf += ch
    return out


def point_label(name: str, keys: list[str], sparsifier: str | None = None) -> str:
    """A sweep point named by the settings that vary across the sweep (short keys), leaving
    out a sparsity its sparsifier ignores (``none``)."""
    ov = _overrides(name)
    skip = {"sparsifier.sparsity"} if sparsifier == "none" else set()
    parts = [f"{k.rsplit('.', 1)[-1]}={ov[k]}" for k in keys if k in ov and k not in skip]
    return " ".join(parts) or name


def combined_table(all_results: list[dict], title: str = "sweep"):
    """One row per point, named by what varies across the sweep; the headline metrics with
    their dense values and the paired Δ [95% CI]."""
    from rich.table import Table

    from .comparison import format_paired

    keys = [k for k in HEADLINE if any(k in r.get("metrics", {}) for r in all_results)]
    paired_keys = [k for k in ("lm_eval/avg_acc", "perplexity") if any(k in (r.get("paired") or {}) for r in all_results)]
    models = sorted({r["model"]["id"] for r in all_results})
    varying = varying_settings([r["run"]["name"] for r in all_results])
    table = Table(title=title + (f" · {models[0]}" if len(models) == 1 else ""))
    table.add_column("point")
    if len(models) > 1 and "model" not in varying:
        table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
        table.add_column(f"dense {k.split('/')[-1]}", justify="right")
    for k in paired_keys:
        table.add_column(f"paired Δ {k} [95% CI]", justify="right")
    if paired_keys:
        table.caption = "acc: points; ppl: ratio to dense; * significant at 5%"
    for r in sorted(all_results, key=lambda r: r["run"]["name"]):
        row = [_fmt(point_label(r["run"]["name"], varying, r["sparsifier"]["name"]))]
        if len(models) > 1 and "model" not in varying:
            row.append(_fmt(r["model"]["id"]))
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
