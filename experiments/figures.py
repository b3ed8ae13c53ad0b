"""The paper figures, drawn from runs' ``results.json`` (never from a rerun).

Each figure is one function ``results -> (matplotlib Figure, rows)`` registered under a
name; ``sparsebench-plot`` writes ``NAME.png``, ``NAME.pdf`` and ``NAME.csv`` (the rows,
i.e. the numbers behind every mark). An experiment lists the figures its runs feed in
its ``figures:`` key; ``figures_for`` also infers them from the metrics present, so runs
made before that key existed still plot.

| name                     | experiment                      | from metrics                     |
|--------------------------|---------------------------------|----------------------------------|
| cett_layer_sparsity      | fig1_cett_layer_sparsity        | per-layer ``sparsity`` of CETT    |
| speedup_vs_swaps         | fig2_3_cache_speedup            | ``cache/*`` (cache_speedup)       |
| cached_vs_index_select   | fig2_3_cache_speedup            | ``cache/*select*``                |
| accuracy_vs_sparsity     | fig4_accuracy_vs_sparsity       | ``lm_eval/avg_acc``               |
| perplexity_vs_sparsity   | fig4 / fig5                     | ``perplexity``                    |
| dejavu_rank              | fig6_dejavu_rank                | per-layer ``recall``, ``sparsity``|
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

FIGURES: dict[str, Callable] = {}
CAPTIONS: dict[str, str] = {}
TASKS = ("arc_easy", "boolq", "hellaswag", "piqa", "winogrande")
METHOD_LABELS = {"cats": "CATS", "cett": "CETT", "teal": "TEAL", "wina": "WINA", "rsparse": "R-Sparse",
                 "stat_topk": "stat. top-k", "chess": "CHESS", "dejavu": "Deja Vu", "relu": "ReLU", "none": "dense"}
MARKERS = "osD^v<>Ph*X"


def figure(name: str, caption: str):
    def register(fn):
        FIGURES[name], CAPTIONS[name] = fn, caption
        return fn
    return register


def model_name(r: dict) -> str:
    return r["model"]["id"].rstrip("/").split("/")[-1]


def method(r: dict) -> str:
    """The sparsifier's name, plus every setting that differs from its shipped YAML (other
    than the sparsity), e.g. ``stat_topk[rule=abs_act]``: variants are separate rows."""
    from sparsebench.core.config_check import shipped_defaults

    name = r["sparsifier"]["name"]
    cfg = (r.get("config") or {}).get("sparsifier") or {}
    defaults = shipped_defaults("sparsifier", name)
    changed = [f"{k}={_plain(v)}" for k, v in cfg.items()
               if k not in ("name", "sparsity") and k in defaults and defaults[k] != v]
    return f"{name}[{','.join(changed)}]" if changed else name


def _plain(v) -> str:
    return "[" + ",".join(map(_plain, v)) + "]" if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _by_model(results):
    out = defaultdict(list)
    for r in results:
        out[model_name(r)].append(r)
    return dict(sorted(out.items()))


def _style(i: int) -> dict:
    return {"marker": MARKERS[i % len(MARKERS)], "markersize": 5}


# ---------------------------------------------------------------------------- applicability

def _has_layer_sparsity(r):
    return r["sparsifier"]["name"] == "cett" and r["sparsifier"].get("budget") is not None and any(
        "sparsity" in row for row in r.get("per_layer") or [])


def _sparsity_sweep(results, key) -> bool:
    """Some method of some model was run at two or more sparsities with ``key`` measured."""
    seen = defaultdict(set)
    for r in results:
        if key in r["metrics"] and r["sparsifier"].get("sparsity") is not None and r["sparsifier"]["name"] != "none":
            seen[(model_name(r), method(r))].add(r["sparsifier"]["sparsity"])
    return any(len(v) >= 2 for v in seen.values())


def figures_for(results: list[dict]) -> list[str]:
    """The figures these runs feed: what their configs name, else what their metrics allow."""
    named = {f for r in results for f in (r.get("config") or {}).get("figures") or []}
    if named:
        return [f for f in FIGURES if f in named]
    found = []
    m = [r["metrics"] for r in results]
    if any(_has_layer_sparsity(r) for r in results):
        found.append("cett_layer_sparsity")
    if any("cache/select_speedup" in x for x in m):
        found += ["speedup_vs_swaps", "cached_vs_index_select"]
    if _sparsity_sweep(results, "lm_eval/avg_acc"):
        found.append("accuracy_vs_sparsity")
    if _sparsity_sweep(results, "perplexity"):
        found.append("perplexity_vs_sparsity")
    if any(r["sparsifier"]["name"] == "dejavu" and "mask_quality/recall" in r["metrics"] for r in results):
        found.append("dejavu_rank")
    return found


# ---------------------------------------------------------------------------- figure 1

@figure("cett_layer_sparsity",
        "Fraction of MLP neurons CETT skips in each layer at error budget 0.2, on held-out text. "
        "Each layer's threshold is calibrated so the dropped neurons' output norm is 20% of the MLP's.")
def cett_layer_sparsity(results):
    plt = _plt()
    runs = [r for r in results if _has_layer_sparsity(r)]
    rows = []
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (model, rs) in enumerate(_by_model(runs).items()):
        for r in rs:
            layers = [row["layer"] for row in r["per_layer"]]
            sp = [row["sparsity"] for row in r["per_layer"]]
            mean = sum(sp) / len(sp)
            depth = [l / max(len(layers) - 1, 1) for l in layers]
            ax.plot(depth, sp, label=f"{model} (budget {r['sparsifier']['budget']:g}, mean {mean:.2f})", **_style(i))
            rows += [{"model": model, "budget": r["sparsifier"]["budget"], "layer": l, "relative_depth": d,
                      "sparsity": s, "perplexity": r["metrics"].get("perplexity"),
                      "dense_perplexity": (r.get("dense_metrics") or {}).get("perplexity")}
                     for l, d, s in zip(layers, depth, sp)]
    ax.set_xlabel("relative depth (layer / (layers − 1))")
    ax.set_ylabel("MLP neurons skipped (fraction)")
    ax.set_ylim(0, 1)
    ax.set_title("CETT at error budget 0.2: sparsity per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, rows


# ---------------------------------------------------------------------------- figures 2, 3

def _cache_runs(results):
    return [r for r in results if "cache/select_speedup" in r["metrics"]]


def _grid(r):
    out = defaultdict(dict)
    for k, v in r["metrics"].items():
        if k.startswith("cache/grid/churn="):
            churn, metric = k[len("cache/grid/churn="):].split("/", 1)
            out[float(churn)][metric] = v
    return [dict(churn=c, **out[c]) for c in sorted(out)]


@figure("speedup_vs_swaps",
        "One MLP step (gate, up and down rows gathered, batch 1, fp32) relative to the dense step, against "
        "the rows swapped into the cache per token. Lines: synthetic masks at the measured density on one "
        "layer's real weights; markers: each method's real decode masks, summed over all layers.")
def speedup_vs_swaps(results):
    plt = _plt()
    runs = _cache_runs(results)
    by_model = _by_model(runs)
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, max(len(by_model), 1), figsize=(7.6 * max(len(by_model), 1), 3.9), squeeze=False)
    rows = []
    for ax, (model, rs) in zip(axes[0], by_model.items()):
        ref = rs[0]
        grid = _grid(ref)
        if grid:
            x = [g["swaps_per_update"] for g in grid]
            ax.plot(x, [g["mlp_speedup_cached"] for g in grid], "-", color="C0", label="cached, synthetic masks")
            ax.plot(x, [g["mlp_speedup_index_select"] for g in grid], "--", color="C1",
                    label="index_select, synthetic masks")
            rows += [{"model": model, "kind": "synthetic", "method": "", "density": ref["metrics"]["cache/density"],
                      **g} for g in grid]
        for i, r in enumerate(sorted(rs, key=method)):
            m = r["metrics"]
            label = METHOD_LABELS.get(method(r), method(r))
            if abs(m["cache/density"] - ref["metrics"]["cache/density"]) > 0.05:  # e.g. TEAL's down-proj input
                label += f" (density {m['cache/density']:.2f})"
            ax.plot(m["cache/swaps_per_update"], m["cache/mlp_speedup_cached"], linestyle="none", color=f"C{i + 2}",
                    **_style(i), label=label)
            ax.plot(m["cache/swaps_per_update"], m["cache/mlp_speedup_index_select"], linestyle="none",
                    markerfacecolor="none", color=f"C{i + 2}", **_style(i))
            rows.append({"model": model, "kind": "measured", "method": method(r), "density": m["cache/density"],
                         "churn": m["cache/churn"], "swaps_per_update": m["cache/swaps_per_update"],
                         "select_speedup": m["cache/select_speedup"],
                         "mlp_speedup_cached": m["cache/mlp_speedup_cached"],
                         "mlp_speedup_index_select": m["cache/mlp_speedup_index_select"]})
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("rows swapped into the cache per token, per layer (log)")
        ax.set_ylabel("MLP step speedup over dense (×)")
        ax.set_title(f"{model}, density {ref['metrics']['cache/density']:.2f}, {int(ref['metrics']['cache/threads'])} threads")
        ax.grid(alpha=0.3, which="both")
        handles, labels = ax.get_legend_handles_labels()
        # filled markers: cached backend; hollow: index_select on the same masks
        handles += [Line2D([], [], marker="o", color="gray", linestyle="none"),
                    Line2D([], [], marker="o", color="gray", markerfacecolor="none", linestyle="none")]
        labels += ["filled: cached, real masks", "hollow: index_select, real masks"]
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig, rows


@figure("cached_vs_index_select",
        "Weight selection per decode token (all layers): naive index_select of the active gate/up/down rows vs "
        "the cached update that copies only the rows that changed, on each method's real decode masks. "
        "Labels: speedup, and the copy-bound limit (active rows / swapped rows) in brackets.")
def cached_vs_index_select(results):
    plt = _plt()
    runs = sorted(_cache_runs(results), key=lambda r: (model_name(r), method(r)))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(runs) + 2), 3.8))
    rows = []
    labels = [f"{METHOD_LABELS.get(method(r), method(r))}\n{model_name(r)}" for r in runs]
    naive = [r["metrics"]["cache/naive_select_ms"] for r in runs]
    cached = [r["metrics"]["cache/cached_select_ms"] for r in runs]
    xs = list(range(len(runs)))
    ax.bar([x - 0.2 for x in xs], naive, 0.4, label="index_select (naive)", color="C1")
    ax.bar([x + 0.2 for x in xs], cached, 0.4, label="cached update", color="C0")
    for x, r, n, c in zip(xs, runs, naive, cached):
        m = r["metrics"]
        ax.annotate(f"{n / c:.2f}×\n({m['cache/copy_bound_limit']:.1f})", (x, max(n, c)), ha="center",
                    va="bottom", fontsize=7)
        rows.append({"model": model_name(r), "method": method(r), "density": m["cache/density"],
                     "churn": m["cache/churn"], "swaps_per_update": m["cache/swaps_per_update"],
                     "naive_select_ms": n, "cached_select_ms": c, "speedup": n / c,
                     "copy_bound_limit": m["cache/copy_bound_limit"], "threads": m["cache/threads"]})
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("weight-selection time per token (ms, all layers)")
    ax.set_ylim(0, max(naive + cached + [1e-9]) * 1.3)
    ax.set_title("Cached vs naive index_select at the churn each method really has")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig, rows


# ---------------------------------------------------------------------------- figures 4, 5

def dense_value(rs: list[dict], key: str) -> float | None:
    """The dense reference of one model: a ``sparsifier=none`` run, else any run's dense baseline."""
    for r in rs:
        if r["sparsifier"]["name"] == "none" and key in r["metrics"]:
            return r["metrics"][key]
    for r in rs:
        v = (r.get("dense_metrics") or {}).get(key)
        if v is not None:
            return v
    return None


def method_rows(results: list[dict]) -> list[dict]:
    """One row per run: requested and measured sparsity, perplexity, per-task and average accuracy."""
    rows = []
    for r in results:
        m, sp = r["metrics"], r["sparsifier"]
        lm = (r.get("config") or {}).get("evaluator", {}).get("lm_eval") or {}
        rows.append({
            "model": model_name(r), "method": method(r),
            "sparsity": 0.0 if r["sparsifier"]["name"] == "none" else sp.get("sparsity"),
            "measured": m.get("sparsity/mean", 0.0), "min_layer": m.get("sparsity/min_layer", 0.0),
            "max_layer": m.get("sparsity/max_layer", 0.0), "perplexity": m.get("perplexity"),
            **{t: m.get(f"lm_eval/{t}/acc") for t in TASKS}, "avg_acc": m.get("lm_eval/avg_acc"),
            "dense_perplexity": (r.get("dense_metrics") or {}).get("perplexity"),
            "dense_avg_acc": (r.get("dense_metrics") or {}).get("lm_eval/avg_acc"),
            "lm_eval_limit": lm.get("limit"), "masked_token_fraction": m.get("lm_eval/masked_token_fraction"),
            "wall_s": r["run"].get("wall_time_s"),
        })
    order = {"none": 0}
    rows.sort(key=lambda x: (x["model"], order.get(x["method"], 1), x["method"], x["sparsity"] or 0))
    return rows


def paired_avg_acc(r: dict) -> dict | None:
    """The run's average-accuracy comparison with its dense baseline on the same items
    (Δ, 95% paired-bootstrap CI, McNemar p), when it has one."""
    return (r.get("paired") or {}).get("lm_eval/avg_acc")


# matplotlib's ten colours, then ten darker ones (tab20b/tab20c's first shades), dashed
METHOD_COLOURS = tuple(f"C{i}" for i in range(10)) + (
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363")
LINESTYLES = ("-", "--", ":")


def _method_style(i: int) -> dict:
    """Colour, line style and marker of the i-th method: no two of the first 20 share a
    colour, and the 11th on are dashed as well (then dotted past 20)."""
    return {**_style(i), "color": METHOD_COLOURS[i % len(METHOD_COLOURS)],
            "ls": LINESTYLES[(i // 10) % len(LINESTYLES)]}


def _versus_sparsity(results, panels, title, log_when_exploding):
    """One row of panels per (metric key, y label) present, one column per model; one
    legend for the whole figure, below the panels, so no mark is hidden under it."""
    plt = _plt()
    panels = [(k, y) for k, y in panels if any(k in r["metrics"] for r in results)] or panels[:1]
    by_model = _by_model([r for r in results if any(k in r["metrics"] for k, _ in panels)])
    ncol = max(len(by_model), 1)
    # one colour, line style and marker per method across every panel
    everyone = sorted({method(r) for r in results} - {"none"})
    # five columns: six overflowed the figure once variant labels ("wina[orthogonalize=false]") joined
    legend_columns = 5
    legend_rows = math.ceil((len(everyone) + 1) / legend_columns)
    fig, axes = plt.subplots(len(panels), ncol, squeeze=False, layout="constrained",
                             figsize=(6.4 * ncol, 4.2 * len(panels) + 0.25 * legend_rows))
    rows = []
    for axrow, (key, ylabel) in zip(axes, panels):
        for ax, (model, rs) in zip(axrow, by_model.items()):
            rows += _panel(ax, [r for r in rs if key in r["metrics"]], model, key, everyone, log_when_exploding)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}: {model}")
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    order = [k for k in [*(METHOD_LABELS.get(m, m) for m in everyone), "dense"] if k in handles]
    fig.legend([handles[k] for k in order], order,
               loc="outside lower center", ncol=legend_columns, fontsize=8, frameon=False)
    return fig, rows


def _panel(ax, rs, model, key, everyone, log_when_exploding) -> list[dict]:
    rows = []
    dense = dense_value(rs, key)
    # methods sharing a sparsity are drawn side by side (x offset by method), so their
    # bars do not cover one another; the CSV keeps the requested sparsity
    dodge = min(0.006, 0.09 / max(len(everyone), 1))
    for name in sorted({method(r) for r in rs} - {"none"}):
        i = everyone.index(name)
        style = _method_style(i)
        offset = (i - (len(everyone) - 1) / 2) * dodge
        pts = sorted(((r["sparsifier"]["sparsity"], r["metrics"].get("sparsity/mean"), r["metrics"][key],
                       paired_avg_acc(r) if key == "lm_eval/avg_acc" else None)
                      for r in rs if method(r) == name and r["sparsifier"].get("sparsity") is not None),
                     key=lambda p: p[0])
        if not pts:
            continue
        xs, ys = [p[0] + offset for p in pts], [p[2] for p in pts]
        if all(p[3] is not None for p in pts):
            # the 95% paired CI of Δ vs dense, drawn around the sparse accuracy; filled
            # markers: significantly different from dense (McNemar p < 0.05)
            err = [[p[3]["delta"] - p[3]["ci_low"] for p in pts], [p[3]["ci_high"] - p[3]["delta"] for p in pts]]
            ax.errorbar(xs, ys, yerr=err, capsize=2, color=style["color"], ls=style["ls"], marker="none", lw=1.2,
                        elinewidth=0.9)
            for x, y, p in zip(xs, ys, pts):
                ax.plot([x], [y], ls="none", markerfacecolor=style["color"] if p[3]["significant"] else "white",
                        **{k: v for k, v in style.items() if k != "ls"})
            ax.plot([], [], label=METHOD_LABELS.get(name, name), **style)  # the legend entry: line and marker
        else:
            ax.plot(xs, ys, label=METHOD_LABELS.get(name, name), **style)
        rows += [{"model": model, "metric": key, "method": name, "requested_sparsity": s, "measured_sparsity": ms,
                  "value": v, **({"delta": pr["delta"], "delta_ci_low": pr["ci_low"], "delta_ci_high": pr["ci_high"],
                                  "p_mcnemar": pr["p_mcnemar"], "significant": pr["significant"]} if pr else {}),
                  "dense": dense}
                 for s, ms, v, pr in pts]
    if dense is not None:
        ax.axhline(dense, color="black", ls="--", lw=1, label="dense")
        ax.annotate(f"dense {dense:.3g}", (1, dense), xycoords=("axes fraction", "data"), xytext=(-3, 3),
                    textcoords="offset points", ha="right", va="bottom", fontsize=7)
    values = [row["value"] for row in rows]
    if log_when_exploding and dense and values and max(values) > 3 * dense:
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_yscale("log")
        # plain numbers at 1-2-5 steps on the log axis
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    xs = sorted({row["requested_sparsity"] for row in rows})
    if xs:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlim(min(xs) - 0.08, max(xs) + 0.08)
    ax.set_xlabel("requested sparsity (fraction skipped; methods side by side)")
    ax.grid(alpha=0.3, which="both")
    return rows


@figure("accuracy_vs_sparsity",
        "Average zero-shot accuracy over ARC-E, BoolQ, HellaSwag, PIQA and WinoGrande (lm-eval, the sparse "
        "path active on every scored token) vs requested sparsity; dashed: the dense model; bars: the 95% "
        "paired-bootstrap CI of the difference to dense on the same items; filled markers: significantly "
        "different from dense (exact McNemar p < 0.05), hollow: not; methods at one sparsity are drawn side "
        "by side.")
def accuracy_vs_sparsity(results):
    return _versus_sparsity(results, [("lm_eval/avg_acc", "average accuracy (5 tasks)")], "Accuracy vs sparsity", False)


@figure("perplexity_vs_sparsity",
        "Held-out perplexity vs requested sparsity (the fraction of MLP neurons, or of linear inputs for "
        "TEAL/WINA/R-Sparse, skipped): top, the five held-out Shakespeare plays; bottom, LAMBADA (modern "
        "fiction); log scale where a method explodes; dashed: the dense model.")
def perplexity_vs_sparsity(results):
    return _versus_sparsity(results, [("perplexity", "perplexity, held-out plays"),
                                      ("perplexity/lambada", "perplexity, LAMBADA passages")],
                            "Perplexity vs sparsity", True)


# ---------------------------------------------------------------------------- figure 6

@figure("dejavu_rank",
        "Deja Vu predictors of increasing rank (fraction of the hidden size): per-layer recall of the oracle "
        "top-k neurons, the sparsity each layer ends up with, and the model's perplexity, on held-out text.")
def dejavu_rank(results):
    plt = _plt()
    runs = sorted((r for r in results if r["sparsifier"]["name"] == "dejavu" and r.get("per_layer")
                   and "recall" in r["per_layer"][0]), key=lambda r: (model_name(r), r["sparsifier"].get("rank", 0)))
    fig, (ax_r, ax_s, ax_p) = plt.subplots(1, 3, figsize=(14.5, 3.8), gridspec_kw={"width_ratios": [3, 3, 2]})
    rows = []
    for i, r in enumerate(runs):
        rank = r["config"]["sparsifier"]["rank"]
        hidden = r["model"]["hidden_size"]
        layers = [row["layer"] for row in r["per_layer"]]
        recall = [row["recall"] for row in r["per_layer"]]
        sparsity = [row.get("sparsity", math.nan) for row in r["per_layer"]]
        label = f"{model_name(r)}, rank {rank:g}·d = {max(1, round(rank * hidden))}"
        ax_r.plot(layers, recall, label=label, **_style(i))
        ax_s.plot(layers, sparsity, label=label, **_style(i))
        rows += [{"model": model_name(r), "rank_fraction": rank, "rank": max(1, round(rank * hidden)), "layer": l,
                  "recall": rc, "precision": row.get("precision"), "sparsity": s,
                  "perplexity": r["metrics"].get("perplexity")}
                 for l, rc, s, row in zip(layers, recall, sparsity, r["per_layer"])]
    for i, (model, rs) in enumerate(_by_model(runs).items()):
        pts = sorted((r["config"]["sparsifier"]["rank"], r["metrics"]["perplexity"]) for r in rs
                     if "perplexity" in r["metrics"])
        if pts:
            ax_p.plot([p[0] for p in pts], [p[1] for p in pts], label=model, **_style(i))
    ax_p.set_xscale("log")
    ranks = sorted({r["config"]["sparsifier"]["rank"] for r in runs})
    ax_p.set_xticks(ranks, [f"{x:g}" for x in ranks])
    ax_p.xaxis.set_minor_locator(plt.NullLocator())
    ax_p.set_yscale("log")
    ax_p.set_xlabel("predictor rank (fraction of hidden size, log)")
    ax_p.set_ylabel("held-out perplexity (log)")
    ax_p.grid(alpha=0.3, which="both")
    ax_p.legend(fontsize=7)
    ax_r.set_ylabel("recall of the oracle top-k neurons")
    ax_s.set_ylabel("MLP neurons skipped (fraction)")
    for ax in (ax_r, ax_s):
        ax.set_xlabel("decoder layer")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    ax_r.legend(fontsize=7)
    fig.suptitle("Deja Vu predictor rank: recall and sparsity per layer, perplexity")
    return fig, rows
