"""``python -m sparsebench.experiments.long_context_figure DIR... [--out DIR]``: the attention figure.

From every ``results.json`` under the folders holding long-context metrics (``passkey/*``,
``long_decode/*``; e.g. ``experiments/results/long_context``), one row of panels per model:
passkey retrieval accuracy against the KV budget (tokens each query attends to; a method
without one, head sparsity, at the K/V rows its decode steps read per query), one colour per
context length, one line style and marker per attention method, dense attention as a dotted
level; and decode speedup over dense attention against the budget at each context.
Writes ``long_context.png``, ``.pdf`` and ``.csv`` (the numbers behind every mark) into
``--out`` (default ``DIR/figures``). Nothing is rerun.

``long_context_rows`` is also what the docs tables are generated from.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from sparsebench.reporting.results import load_results

from .figures import _by_model, _plt, model_name
from .plot import write_csv

PASSKEY = re.compile(r"^passkey/(dense|method|budget=(\d+))/ctx=(\d+)$")
DECODE = re.compile(r"^long_decode/ctx=(\d+)/(method|budget=(\d+))/speedup$")
PPL = re.compile(r"^long_perplexity/([\w-]+)/len=(\d+)$")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D")


def _tokens(x: dict) -> float | None:
    """The x of a figure mark: the token budget, or for a method without one (head
    sparsity) the K/V rows its decode steps read per query on average, fraction × context;
    that needs the fraction of this context alone (recorded per context, or a run over one)."""
    if x["budget"] is not None:
        return float(x["budget"])
    if x.get("kv_read_of_context") and x.get("kv_read_fraction") is not None:
        return x["kv_read_fraction"] * x["context"]
    return None


def attention_method(r: dict) -> str:
    """The attention method plus every setting that differs from its shipped YAML (budgets
    and head sparsity's fraction of heads aside: they are the x axis), e.g. ``quest[group=kv]``."""
    from sparsebench.core.config_check import shipped_defaults

    cfg = (r.get("config") or {}).get("attention") or {}
    name = cfg.get("name", "none")
    defaults = shipped_defaults("attention", name)
    changed = [f"{k}={v}" for k, v in cfg.items()
               if k not in ("name", "budget", "budget_fraction", "heads") and k in defaults and defaults[k] != v]
    return f"{name}[{','.join(changed)}]" if changed else name


def _budget(r: dict, group: str | None) -> int | None:
    if group is not None:
        return int(group)
    cfg = (r.get("config") or {}).get("attention") or {}
    return int(cfg["budget"]) if "budget" in cfg and cfg.get("budget_fraction") is None else None


def budget_label(r: dict, budget: int | None) -> str:
    """What the method attends to, as a table cell: the token budget, or for methods without
    one the setting that takes its place (head sparsity's fraction of heads, a budget fraction)."""
    if budget is not None:
        return str(budget)
    cfg = (r.get("config") or {}).get("attention") or {}
    if cfg.get("heads") is not None:
        return f"{float(cfg['heads']):g} of heads"
    if cfg.get("budget_fraction") is not None:
        return f"{float(cfg['budget_fraction']):g} of context"
    return "—"


def _mlp(r: dict) -> str:
    sp = r["sparsifier"]
    return "dense MLP" if sp["name"] == "none" else f"{sp['name']}@{sp.get('sparsity')}"


def long_context_rows(r: dict) -> list[dict]:
    """One row per (kind, context, budget) of one run: passkey accuracy with its paired
    difference from dense, decode speed, long-window perplexity."""
    m = r["metrics"]
    base = {"model": model_name(r), "method": attention_method(r), "mlp": _mlp(r)}
    data = r.get("data") or {}
    paired = (data.get("passkey") or {}).get("paired_vs_dense") or {}
    passkey_contexts = (data.get("passkey") or {}).get("contexts") or []
    rows = []
    for key, acc in m.items():
        hit = PASSKEY.match(key)
        if hit and hit.group(1) != "dense":
            ctx = int(hit.group(3))
            p = paired.get(f"{hit.group(1)}/ctx={ctx}") or {}
            budget = _budget(r, hit.group(2))
            rows.append(base | {"kind": "passkey", "context": ctx, "budget": budget,
                                "budget_label": budget_label(r, budget), "value": acc,
                                "dense": m.get(f"passkey/dense/ctx={ctx}"), "delta": p.get("delta"),
                                "ci_low": p.get("ci_low"), "ci_high": p.get("ci_high"), "p": p.get("p_mcnemar"),
                                "n": p.get("n"), "lost": p.get("n10"), "gained": p.get("n01"),
                                # per context where the run recorded it, else pooled over its contexts
                                "kv_read_fraction": m.get(f"passkey/{hit.group(1)}/ctx={ctx}/kv_read_fraction",
                                                          m.get(f"passkey/{hit.group(1)}/kv_read_fraction")),
                                "kv_read_of_context": f"passkey/{hit.group(1)}/ctx={ctx}/kv_read_fraction" in m
                                or len(passkey_contexts) == 1})
        hit = DECODE.match(key)
        if hit:
            ctx, name = int(hit.group(1)), hit.group(2)
            pre = f"long_decode/ctx={ctx}"
            budget = _budget(r, hit.group(3))
            rows.append(base | {"kind": "decode", "context": ctx, "budget": budget,
                                "budget_label": budget_label(r, budget),
                                "value": acc, "tokens_per_s": m.get(f"{pre}/{name}/tokens_per_s"),
                                "dense": m.get(f"{pre}/dense/tokens_per_s"),
                                "bytes_limit": m.get(f"{pre}/{name}/bytes_limit_speedup"),
                                "agreement": m.get(f"{pre}/{name}/argmax_agreement"),
                                "kv_bytes": m.get(f"{pre}/{name}/kv_bytes_per_token"),
                                "dense_kv_bytes": m.get(f"{pre}/dense/kv_bytes_per_token")})
        hit = PPL.match(key)
        if hit:
            lp = ((data.get("long_perplexity") or {}).get("paired_vs_dense") or {}).get(key) or {}
            rows.append(base | {"kind": "perplexity", "corpus": hit.group(1), "context": int(hit.group(2)),
                                "budget": _budget(r, None), "budget_label": budget_label(r, _budget(r, None)),
                                "value": acc, "dense": m.get(f"{key}/dense"),
                                "ratio": lp.get("ratio"), "ci_low": lp.get("ratio_ci_low", lp.get("ci_low")),
                                "ci_high": lp.get("ratio_ci_high", lp.get("ci_high")),
                                "kv_read_fraction": m.get(f"{key}/kv_read_fraction")})
    return rows


def figure(results: list[dict]):
    plt = _plt()
    rows_by_model = {model: [x for r in rs for x in long_context_rows(r)] for model, rs in _by_model(results).items()}
    rows_by_model = {k: v for k, v in rows_by_model.items() if v}
    if not rows_by_model:
        raise SystemExit("no passkey or long_decode metrics in these results")
    fig, axes = plt.subplots(len(rows_by_model), 2, figsize=(11, 3.8 * len(rows_by_model)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    out = []
    for row_axes, (model, rows) in zip(axes, rows_by_model.items()):
        methods = sorted({x["method"] for x in rows})
        contexts = sorted({x["context"] for x in rows if x["kind"] in ("passkey", "decode")})
        for panel, kind in zip(row_axes, ("passkey", "decode")):
            for ci, ctx in enumerate(contexts):
                colour = colours[ci % len(colours)]
                dense_level = None
                for mi, meth in enumerate(methods):
                    pts = sorted(((_tokens(x), x) for x in rows
                                  if x["kind"] == kind and x["context"] == ctx and x["method"] == meth
                                  and _tokens(x) is not None), key=lambda fx: fx[0])
                    if not pts:
                        continue
                    xs, ys = [f for f, _ in pts], [x["value"] for _, x in pts]
                    panel.plot(xs, ys, LINESTYLES[mi % len(LINESTYLES)], marker=MARKERS[mi % len(MARKERS)],
                               markersize=4, color=colour, label=f"{meth}, {ctx} tokens")
                    dense_level = pts[0][1]["dense"] if kind == "passkey" else 1.0
                    out += [x | {"tokens": f} for f, x in pts]
                if dense_level is not None:
                    panel.axhline(dense_level, color=colour, linestyle=":", linewidth=1)
            panel.set_xscale("log", base=2)
            panel.set_xlabel("KV budget (tokens attended per query; head sparsity: K/V rows read)")
            if kind == "passkey":
                panel.set_ylabel("passkey accuracy")
                panel.set_ylim(-0.03, 1.03)
                panel.set_title(f"{model}: retrieval vs budget (dotted: dense attention)")
            else:
                panel.set_ylabel("decode speedup over dense attention")
                panel.set_title(f"{model}: decode tokens/s ratio (same run)")
            if panel.get_legend_handles_labels()[0]:
                panel.legend(fontsize=7)
            panel.grid(alpha=0.3)
    fig.tight_layout()
    return fig, out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    results = [r for r in load_results(a.roots) if r.get("status") == "ok"]
    fig, rows = figure(results)
    out = a.out or a.roots[0] / "figures"
    out.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(out / f"long_context.{ext}", dpi=150)
    write_csv(out / "long_context.csv", rows)
    print(f"wrote {out}/long_context.png, .pdf, .csv ({len(rows)} rows)", file=sys.stderr)


if __name__ == "__main__":
    main()
