"""``python -m sparsebench.experiments.offload_figure DIR... [--out DIR]``: the offload figure.

From every ``results.json`` under the folders that holds ``offload/*`` metrics (e.g.
``multirun/offload_cache``), one row of panels per model: hit rate and modelled ms/token
against the fast tier's capacity (fraction of each layer's MLP rows), one colour per
method; solid: ``lru``, dashed: ``hot``; capacity 0 is the active-rows-only baseline
(no cache), by definition. ``window`` points sit at their mean occupancy (the capacity
the window needed), labelled ``k``. Dotted: dense from the slow tier (``none``); dash-dot
grey: every row already in the fast tier (``in_memory``, per method: the floor). Writes
``offload.png``, ``offload.pdf`` and ``offload.csv`` (the numbers behind every mark) into
``--out`` (default ``DIR/figures``). Nothing is rerun. Not a registered paper figure.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from sparsebench.reporting.results import load_results

from .figures import METHOD_LABELS, _by_model, _plt, _style, method
from .plot import write_csv

CAP = re.compile(r"^offload/(lru|hot)/c([0-9.eE+-]+)/hit_rate$")
WIN = re.compile(r"^offload/window/k(\d+)/hit_rate$")


def offload_rows(r: dict, model: str) -> list[dict]:
    """One row per (policy, capacity or window) of one run, plus the baselines."""
    m = r["metrics"]
    base = {"model": model, "method": method(r), "tier": (r.get("config") or {}).get("evaluator", {})
            .get("offload", {}).get("tier")}
    rows = []
    for key in m:
        hit = CAP.match(key)
        win = WIN.match(key)
        if hit:
            tag, x, k = f"{hit.group(1)}/c{hit.group(2)}", float(hit.group(2)), None
        elif win:
            tag, k = f"window/k{win.group(1)}", int(win.group(1))
            x = m[f"offload/{tag}/occupancy"]
        else:
            continue
        rows.append({**base, "policy": tag.split("/")[0], "capacity": x, "window_tokens": k,
                     "hit_rate": m[key], "bytes_per_token": m[f"offload/{tag}/bytes_per_token"],
                     "fetch_ops_per_token": m[f"offload/{tag}/fetch_ops_per_token"],
                     "ms_per_token": m[f"offload/{tag}/ms_per_token"]})
    for name in ("none", "active_only", "in_memory"):
        rows.append({**base, "policy": name, "capacity": 0.0 if name == "active_only" else None,
                     "window_tokens": None, "hit_rate": 0.0 if name == "active_only" else None,
                     "bytes_per_token": m.get(f"offload/{name}/bytes_per_token"),
                     "fetch_ops_per_token": m.get(f"offload/{name}/fetch_ops_per_token"),
                     "ms_per_token": m[f"offload/{name}/ms_per_token"]})
    return rows


def offload_figure(results: list[dict]):
    plt = _plt()
    runs = [r for r in results if "offload/none/ms_per_token" in r.get("metrics", {})]
    by_model = _by_model(runs)
    n = max(len(by_model), 1)
    fig, axes = plt.subplots(n, 2, figsize=(11.5, 3.8 * n), squeeze=False)
    rows: list[dict] = []
    for (ax_hit, ax_ms), (model, rs) in zip(axes, by_model.items()):
        for i, r in enumerate(sorted(rs, key=method)):
            own = offload_rows(r, model)
            rows += own
            color, label = f"C{i}", METHOD_LABELS.get(method(r), method(r))
            zero = next(x for x in own if x["policy"] == "active_only")
            for policy, style in (("lru", "-"), ("hot", "--")):
                pts = sorted((x for x in own if x["policy"] == policy), key=lambda x: x["capacity"])
                if not pts:
                    continue
                if pts[0]["capacity"] > 0:
                    pts = [zero, *pts]
                xs = [x["capacity"] for x in pts]
                kw = {"color": color, "linestyle": style, **_style(i)}
                ax_hit.plot(xs, [x["hit_rate"] for x in pts], label=f"{label} {policy}", **kw)
                ax_ms.plot(xs, [x["ms_per_token"] for x in pts], label=f"{label} {policy}", **kw)
            for x in (x for x in own if x["policy"] == "window"):
                for ax, key in ((ax_hit, "hit_rate"), (ax_ms, "ms_per_token")):
                    ax.plot(x["capacity"], x[key], linestyle="none", marker="*", markersize=9, color=color)
                    ax.annotate(f"k={x['window_tokens']}", (x["capacity"], x[key]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points", color=color)
            floor = next(x for x in own if x["policy"] == "in_memory")["ms_per_token"]
            ax_ms.axhline(floor, color=color, lw=0.8, linestyle="-.", alpha=0.6)
        dense = next(x for x in rows if x["model"] == model and x["policy"] == "none")
        ax_ms.axhline(dense["ms_per_token"], color="black", lw=1.0, linestyle=":", label="dense from slow tier")
        tier = dense["tier"] or "?"
        ax_hit.set_title(f"{model}: fast-tier hit rate (★ window, at its occupancy)")
        ax_ms.set_title(f"{model}: modelled ms/token, tier={tier}")
        for ax, ylabel in ((ax_hit, "hit rate"), (ax_ms, "ms / token (model)")):
            ax.set_xlabel("fast-tier capacity (fraction of each layer's MLP rows)")
            ax.set_ylabel(ylabel)
            ax.set_xlim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        ax_hit.set_ylim(-0.02, 1.02)
        ax_ms.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig, rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="offload_figure", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="folders holding results.json files (searched recursively)")
    p.add_argument("--out", type=Path, help="output folder (default: FIRST_DIR/figures)")
    a = p.parse_args(argv)
    results = load_results(a.dirs)
    fig, rows = offload_figure(results)
    if not rows:
        p.error(f"no results.json with offload metrics under {', '.join(map(str, a.dirs))}")
    out = a.out or a.dirs[0] / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "offload.png", "pdf": out / "offload.pdf", "csv": out / "offload.csv"}
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=150)
    fig.savefig(paths["pdf"])
    write_csv(paths["csv"], rows)
    print(f"[offload_figure] {paths['png']} (+ .pdf, .csv; {len(rows)} rows)", file=sys.stderr)
    return {k: str(v) for k, v in paths.items()}


if __name__ == "__main__":
    main()
