"""Markdown tables (and CSV) from trees of results.json.

    python -m sparsebench.experiments.tables methods RUNS_DIR  # method × sparsity: sparsity, perplexity, lm-eval accuracy
    python -m sparsebench.experiments.tables grid    RUNS_DIR  # per model: method rows × sparsity columns, "perplexity / avg acc"
    python -m sparsebench.experiments.tables churn   RUNS_DIR  # mask churn per method (backend benchmark 3)
    python -m sparsebench.experiments.tables decode  RUNS_DIR  # end-to-end decode (backend benchmark 4)
    python -m sparsebench.experiments.tables paired  RUNS_DIR  # per model: Δ accuracy [95% CI] and perplexity ratios vs dense
    python -m sparsebench.experiments.tables pairs   RUNS_DIR  # method against method on shared items, per model and sparsity
    python -m sparsebench.experiments.tables export  RUNS_DIR --out experiments/results/comparison
    python -m sparsebench.experiments.tables docs [--check]    # regenerate (or check) every generated table in README/docs
    python -m sparsebench.experiments.tables artifacts [CACHE]  # copy greedy paths and dense baselines of today's code to experiments/results/artifacts

Dense rows of the methods table come from runs with ``sparsifier=none``.

Each prints a markdown table; ``--csv FILE`` also writes the rows.
"""
from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from sparsebench.experiments.figures import TASKS, method, method_rows, model_name
from sparsebench.reporting.comparison import format_paired
from sparsebench.reporting.results import load_results
from sparsebench.core.stats import critical_sparsity, format_delta

REPO = Path(__file__).resolve().parent.parent
COMPARISON = REPO / "experiments" / "results" / "comparison"
# Files whose marked blocks are generated (``<!-- table:NAME -->`` … ``<!-- /table:NAME -->``).
GENERATED_FILES = ("README.md", "docs/results.md", "docs/backends.md", "docs/attention.md", "docs/methods.md",
                   "docs/gpu.md")

def evaluated_method_rows(results: list[dict]) -> list[dict]:
    return [r for r in method_rows(results) if r["perplexity"] is not None or r["avg_acc"] is not None]


def methods_markdown(rows: list[dict]) -> str:
    def f(v, d=3):
        return "—" if v is None else f"{v:.{d}f}"

    out = ["| model | method | requested | measured (min–max) | perplexity | " + " | ".join(TASKS) + " | avg acc |",
           "|---" * (6 + len(TASKS)) + "|"]
    for x in rows:
        out.append(f"| {x['model']} | {x['method']} | {f(x['sparsity'], 2)} | {f(x['measured'])} "
                   f"({f(x['min_layer'], 2)}–{f(x['max_layer'], 2)}) | {f(x['perplexity'], 2)} | "
                   + " | ".join(f(x[t], 2) for t in TASKS) + f" | {f(x['avg_acc'])} |")
    return "\n".join(out)


def grid_markdown(rows: list[dict]) -> str:
    """One block per model: a row per method, a column per requested sparsity, each cell
    "perplexity / average accuracy" ("—" where not run); measured sparsity more than 2
    points off the request is shown in brackets. Dense values head each block."""
    def cell(x):
        ppl = "—" if x["perplexity"] is None else f"{x['perplexity']:.2f}"
        acc = "—" if x["avg_acc"] is None else f"{x['avg_acc']:.3f}"
        off = "" if abs(x["measured"] - x["sparsity"]) <= 0.02 else f" (measured {x['measured']:.3f})"
        return f"{ppl} / {acc}{off}"

    out = []
    for model in sorted({x["model"] for x in rows}):
        mine = [x for x in rows if x["model"] == model]
        dense = next((x for x in mine if x["method"] == "none"), None)
        levels = sorted({x["sparsity"] for x in mine if x["method"] != "none"})
        head = f"{model}" + (f" (dense {cell(dense)})" if dense else "")
        out += [f"| {head} | " + " | ".join(f"{s:g}" for s in levels) + " |", "|---" * (1 + len(levels)) + "|"]
        for name in sorted({x["method"] for x in mine} - {"none"}):
            by_level = {x["sparsity"]: x for x in mine if x["method"] == name}
            out.append(f"| {name} | " + " | ".join(cell(by_level[s]) if s in by_level else "—" for s in levels) + " |")
        out.append("")
    return "\n".join(out).rstrip()


def churn_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        m = r["metrics"]
        if "churn/fraction" not in m:
            continue
        rows.append({"model": model_name(r), "method": method(r),
                     "shape": f"{r['model']['hidden_size']}x{r['model']['intermediate_size']}",
                     "sparsity": m.get("sparsity/mean"), "density": m["churn/density"],
                     "active_per_token": m["churn/active_per_token"], "swaps_per_token": m["churn/swaps_per_token"],
                     "churn": m["churn/fraction"],
                     "churn_min_layer": min(x["churn/fraction"] for x in r["per_layer"]),
                     "churn_max_layer": max(x["churn/fraction"] for x in r["per_layer"])})
    return rows


def decode_limits(m: dict) -> dict:
    """The two decode ceilings of a run: ``bytes`` (dense over sparse weight bytes) and
    ``amdahl`` (Amdahl's law on the measured dense step), each with the run's fraction of it.
    Runs older than the measured limit stored the bytes ratio as ``decode/amdahl_limit``:
    their ``amdahl`` is None."""
    if "decode/bytes_limit" in m:
        return {"bytes": m["decode/bytes_limit"], "fraction_of_bytes": m["decode/fraction_of_bytes_limit"],
                "amdahl": m["decode/amdahl_limit"], "fraction": m["decode/fraction_of_limit"]}
    return {"bytes": m["decode/amdahl_limit"], "fraction_of_bytes": m["decode/fraction_of_limit"],
            "amdahl": None, "fraction": None}


def decode_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        m = r["metrics"]
        if "decode/tokens_per_s" not in m:
            continue
        lim = decode_limits(m)
        rows.append({"model": model_name(r), "method": method(r),
                     "sparsity": r["sparsifier"].get("sparsity"), "backend": r["backend"],
                     "threads": m["decode/threads"], "tok_s_hf": m["decode/tokens_per_s_hf"],
                     "tok_s_dense_mask": m["decode/tokens_per_s_dense_mask"], "tok_s": m["decode/tokens_per_s"],
                     "speedup": m["decode/speedup_vs_hf"], "mlp_byte_share": m["decode/mlp_byte_share"],
                     "bytes_saved": m["decode/weight_bytes_saved_fraction"], "bytes_limit": lim["bytes"],
                     "fraction_of_bytes_limit": lim["fraction_of_bytes"], "amdahl_limit": lim["amdahl"],
                     "fraction_of_limit": lim["fraction"], "identical": m["decode/identical"],
                     "identical_free_running": m["decode/identical_free_running"],
                     "first_divergence": m["decode/first_divergence"]})
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])

    def f(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return "\n".join(["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
                     + ["| " + " | ".join(f(x[k]) for k in keys) + " |" for x in rows])


def paired_rows(results: list[dict]) -> list[dict]:
    """One row per sparse point with its paired statistics against its own dense baseline
    (same items, same windows): average-accuracy Δ with 95% CI and McNemar p, and the
    perplexity ratio with its CI on every held-out corpus."""
    rows = []
    for r in results:
        paired = r.get("paired") or {}
        if r["sparsifier"]["name"] == "none" or "lm_eval/avg_acc" not in paired:
            continue
        acc = paired["lm_eval/avg_acc"]
        row = {"model": model_name(r), "method": method(r), "sparsity": r["sparsifier"].get("sparsity"),
               "measured": r["metrics"].get("sparsity/mean"), "items_per_task": min(
                   paired[f"lm_eval/{t}/acc"]["n"] for t in TASKS if f"lm_eval/{t}/acc" in paired),
               "dense_avg_acc": acc["acc_a"], "avg_acc": acc["acc_b"], "delta_acc": acc["delta"],
               "delta_ci_low": acc["ci_low"], "delta_ci_high": acc["ci_high"], "p_mcnemar": acc["p_mcnemar"],
               "significant": acc["significant"]}
        for t in TASKS:
            if f"lm_eval/{t}/acc" in paired:
                row[f"delta_{t}"] = paired[f"lm_eval/{t}/acc"]["delta"]
        for key, res in paired.items():
            if key.startswith("perplexity"):
                corpus = key.partition("/")[2] or r.get("data", {}).get("corpus", "heldout")
                row |= {f"ppl_{corpus}": res["ppl_b"], f"dense_ppl_{corpus}": res["ppl_a"],
                        f"ppl_ratio_{corpus}": res["ratio"], f"ppl_ratio_ci_low_{corpus}": res["ci_low"],
                        f"ppl_ratio_ci_high_{corpus}": res["ci_high"], f"ppl_significant_{corpus}": res["significant"]}
        row["_paired_avg"] = acc
        code = r.get("code") or {}
        row["commit"] = (code.get("git_commit") or "") + ("+dirty" if code.get("git_dirty") else "")
        rows.append(row)
    rows.sort(key=lambda x: (x["model"], x["method"], x["sparsity"] or 0))
    return rows


def _by_model_method(rows):
    out: dict = {}
    for x in rows:
        out.setdefault(x["model"], {}).setdefault(x["method"], {})[x["sparsity"]] = x
    return out


def critical_sparsities(rows: list[dict]) -> dict[tuple[str, str], float | None]:
    """Per (model, method): the largest tested sparsity whose average-accuracy Δ, and that of
    every smaller tested sparsity, is not significantly worse than −1 point (the upper end
    of its 95% paired CI is ≥ −0.01); None when the smallest tested sparsity fails."""
    return {(model, name): critical_sparsity([(s, x["_paired_avg"]) for s, x in pts.items()])
            for model, methods in _by_model_method(rows).items() for name, pts in methods.items()}


def paired_accuracy_markdown(rows: list[dict]) -> str:
    """Per model: methods × sparsities, each cell the average-accuracy Δ vs dense in points
    with its 95% paired-bootstrap CI (* = McNemar p < 0.05), and the critical sparsity."""
    crit = critical_sparsities(rows)
    out = []
    for model, methods in _by_model_method(rows).items():
        levels = sorted({s for pts in methods.values() for s in pts})
        any_row = next(iter(next(iter(methods.values())).values()))
        head = (f"{model}: Δ avg acc, points [95% CI] (dense {any_row['dense_avg_acc']:.3f}, "
                f"{any_row['items_per_task']} items × {len(TASKS)} tasks)")
        out += [f"| {head} | " + " | ".join(f"{s:g}" for s in levels) + " | critical sparsity |",
                "|---" * (2 + len(levels)) + "|"]
        for name, pts in methods.items():
            c = crit[(model, name)]
            cells = [format_delta(pts[s]["_paired_avg"]) + _off(pts[s]) if s in pts else "—" for s in levels]
            out.append(f"| {name} | " + " | ".join(cells) + f" | {'< ' + format(min(pts), 'g') if c is None else format(c, 'g')} |")
        out.append("")
    return "\n".join(out).rstrip()


def _off(x) -> str:
    m = x["measured"]
    return "" if m is None or x["sparsity"] is None or abs(m - x["sparsity"]) <= 0.02 else f" (measured {m:.3f})"


def paired_perplexity_markdown(rows: list[dict]) -> str:
    """Per model: methods × sparsities, each cell the perplexity ratio to dense on every
    held-out corpus with its 95% paired CI over windows (* = the CI excludes 1)."""
    out = []
    for model, methods in _by_model_method(rows).items():
        levels = sorted({s for pts in methods.values() for s in pts})
        any_row = next(iter(next(iter(methods.values())).values()))
        corpora = [k.removeprefix("ppl_ratio_") for k in any_row if k.startswith("ppl_ratio_") and "_ci_" not in k]
        dense = ", ".join(f"{c} {any_row[f'dense_ppl_{c}']:.2f}" for c in corpora)
        out += [f"| {model}: perplexity ÷ dense [95% CI] ({' / '.join(corpora)}; dense {dense}) | "
                + " | ".join(f"{s:g}" for s in levels) + " |", "|---" * (1 + len(levels)) + "|"]
        for name, pts in methods.items():
            def cell(x):
                return " / ".join(f"{x[f'ppl_ratio_{c}']:.2f} [{x[f'ppl_ratio_ci_low_{c}']:.2f}, "
                                  f"{x[f'ppl_ratio_ci_high_{c}']:.2f}]{_star(x, c)}" for c in corpora
                                  if f"ppl_ratio_{c}" in x)
            out.append(f"| {name} | " + " | ".join(cell(pts[s]) if s in pts else "—" for s in levels) + " |")
        out.append("")
    return "\n".join(out).rstrip()


def _star(x: dict, corpus: str) -> str:
    """* when the perplexity ratio's 95% CI excludes 1 (``paired_perplexity``'s ``significant``)."""
    return "*" if x[f"ppl_significant_{corpus}"] else ""


def paired_markdown(rows: list[dict]) -> str:
    return paired_accuracy_markdown(rows) + "\n\n" + paired_perplexity_markdown(rows)


def _pairwise_rows(results):
    from sparsebench.experiments.pairwise import pairwise_rows

    return pairwise_rows(results)


def _pairwise_markdown(rows):
    from sparsebench.experiments.pairwise import pairwise_markdown

    return pairwise_markdown(rows)


def _csv_rows(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in x.items() if not k.startswith("_")} for x in rows]


# table name → (rows from results, markdown of the rows)
def _oracle_of(r: dict) -> tuple[str, str]:
    """(model, the mask a predictor imitates): CATS's for svd_predictor (rank 1 is CATS), the
    configured labels for dejavu_target, the top-k of |h| for dejavu."""
    sp = (r.get("config") or {}).get("sparsifier") or {}
    labels = {"svd_predictor": "cats", "dejavu": "topk_h"}.get(sp.get("name"), sp.get("labels"))
    return model_name(r), str(labels)


def predictor_rows(results: list[dict]) -> list[dict]:
    """One row per predictor run (``mask_quality`` metrics): recall of the oracle, perplexity
    and its gap to the oracle's (the same labels run as masks, ``oracle: true``), and the
    predictor's own weights per token as a fraction of the MLP's."""
    oracles = {}
    for r in results:
        sp = (r.get("config") or {}).get("sparsifier") or {}
        if sp.get("oracle") and "perplexity" in r["metrics"]:
            oracles[_oracle_of(r)] = r["metrics"]["perplexity"]
    rows = []
    for r in results:
        m, sp = r["metrics"], (r.get("config") or {}).get("sparsifier") or {}
        if "mask_quality/recall" not in m or sp.get("oracle"):
            continue
        H, I = r["model"]["hidden_size"], r["model"]["intermediate_size"]
        rank = max(1, int(round(float(sp.get("rank", 0.1)) * H)))
        n_mats = 2 if sp.get("use_up") else 1
        mlp_mats = 3 if r["model"]["model_type"] != "opt" else 2
        oracle = oracles.get(_oracle_of(r))
        paired = (r.get("paired") or {}).get("perplexity") or {}
        rows.append({"model": model_name(r), "predictor": method(r), "oracle": _oracle_of(r)[1],
                     "rank": sp.get("rank"), "sparsity": m.get("sparsity/mean"),
                     "sparsity_requested": r["sparsifier"].get("sparsity"), "recall": m["mask_quality/recall"],
                     "min_layer_recall": m.get("mask_quality/min_layer_recall"),
                     "perplexity": m.get("perplexity"), "ppl_vs_dense": paired.get("ratio"),
                     "oracle_perplexity": oracle,
                     "gap_to_oracle": m["perplexity"] / oracle - 1 if oracle and "perplexity" in m else None,
                     "cost_mlp_fraction": n_mats * rank * (H + I) / (mlp_mats * H * I)})
    return sorted(rows, key=lambda x: (x["model"], x["predictor"], x["rank"]))


TABLES = {"methods": (evaluated_method_rows, methods_markdown), "grid": (evaluated_method_rows, grid_markdown),
          "churn": (churn_rows, markdown), "decode": (decode_rows, markdown),
          "paired": (paired_rows, paired_markdown), "pairs": (_pairwise_rows, _pairwise_markdown),
          "predictors": (predictor_rows, markdown)}


# ------------------------------------------------------------------ generated blocks in README / docs

def committed_results(root: Path = COMPARISON) -> list[dict]:
    return load_results([root]) if root.exists() else []


def generated_blocks(results: list[dict]) -> dict[str, str]:
    """Every generated table by block name: the comparison tables from the committed
    comparison results (a one-line note saying how to make them while there are none) and
    the backend speed tables from the committed CSVs (``backend_blocks``)."""
    from sparsebench.experiments.pairwise import versus_best_markdown

    rows = paired_rows(results)
    if rows:
        blocks = {"comparison-accuracy": paired_accuracy_markdown(rows),
                  "comparison-perplexity": paired_perplexity_markdown(rows),
                  "comparison-status": comparison_status(rows),
                  "comparison-vs-best": versus_best_markdown(results)}
    else:
        blocks = dict.fromkeys(COMPARISON_BLOCKS, NO_COMPARISON)
    return blocks | backend_blocks() | attention_blocks() | {"predictor-quality": predictor_block(),
                                                             "predictor-decode": best_predictor_decode_block(),
                                                             "cett-budget": cett_budget_block(),
                                                             "calibration-memory": calibration_memory_block(),
                                                             "readme-timings": readme_timings_block()}


def planned_grid() -> tuple[list[str], list[str], list[float]]:
    """Models, methods and sparsities the comparison experiment sweeps (its YAML)."""
    from importlib import resources

    from omegaconf import OmegaConf

    params = OmegaConf.load(resources.files("sparsebench.conf") / "experiment" / "fig4_accuracy_vs_sparsity.yaml")
    params = params.hydra.sweeper.params
    split = lambda v: [x.strip() for x in str(v).split(",")]
    return split(params.model), split(params.sparsifier), [float(x) for x in split(params["sparsifier.sparsity"])]


def comparison_status(rows: list[dict]) -> str:
    """Which points of the planned grid are committed, which are missing, per model, and
    the code versions (git commits) the committed points were made with."""
    models, methods, levels = planned_grid()
    have = {(x["model"], x["method"], x["sparsity"]) for x in rows}
    lines = []
    for model in models:
        missing = [f"{m}@{s:g}" for m in methods for s in levels if (model, m, s) not in have]
        done = sum((model, m, s) in have for m in methods for s in levels)
        extra = sorted({f"{x['method']}@{x['sparsity']:g}" for x in rows if x["model"] == model and x["method"] not in methods})
        line = f"- **{model}**: {done} of {len(methods) * len(levels)} planned points committed"
        line += f"; missing: {', '.join(missing)}" if missing else ""
        line += f"; variants: {', '.join(extra)}" if extra else ""
        lines.append(line + ".")
    commits = sorted({x["commit"] for x in rows if x.get("commit")})
    if commits:
        lines.append(f"- made with code at commit{'s' if len(commits) > 1 else ''} {', '.join(c[:10] for c in commits)}.")
    return "\n".join(lines)


COMPARISON_BLOCKS = ("comparison-accuracy", "comparison-perplexity", "comparison-status", "comparison-vs-best")
NO_COMPARISON = ("_No committed comparison results yet: run `sparsebench -m experiment=fig4_accuracy_vs_sparsity "
                 "hydra.sweep.dir=experiments/results/comparison logger.mode=disabled threads=1` and commit the folder._")

# ------------------------------------------------------------------ backend speed tables (committed CSVs)

BACKENDS = REPO / "experiments" / "results" / "backends"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _md_table(header: list[str], rows: list[list[str]], source: str) -> str:
    out = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + f"\n\n_From {source}._"


def _rel(path: Path) -> str:
    try:
        return f"`{path.relative_to(REPO)}`"
    except ValueError:
        return f"`{path}`"


def _shape(x: dict) -> str:
    return x["shape"].replace("x", "×") if "shape" in x else f"{x['hidden']}×{x['intermediate']}"


def _yes_no(v: str) -> str:
    return {1.0: "yes", 0.0: "no"}.get(float(v), v)


def backend_churn_block(root: Path = BACKENDS) -> str:
    """Benchmark 3: mask churn of each method's real decode masks (``churn.csv``)."""
    path = root / "churn.csv"
    rows = [[x["model"], x["method"], _shape(x), f"{float(x['density']):.2f}", f"{float(x['active_per_token']):.0f}",
             f"{float(x['swaps_per_token']):.0f}",
             f"{float(x['churn']):.2f} ({float(x['churn_min_layer']):.2f}–{float(x['churn_max_layer']):.2f})"]
            for x in _read_csv(path)]
    return _md_table(["model", "method", "MLP shape", "density", "active neurons / token", "rows entering / token",
                      "churn (min–max over layers)"], rows, _rel(path))


def _methods_by_churn(root: Path) -> dict[tuple[str, float, float], list[str]]:
    """(shape, density, churn) rounded to 3 decimals → methods of ``churn.csv`` with those values
    (the weight-selection points were run at the measured density and churn of each method)."""
    out: dict = {}
    for x in _read_csv(root / "churn.csv"):
        key = (_shape(x), round(float(x["density"]), 3), round(float(x["churn"]), 3))
        out.setdefault(key, []).append(x["method"])
    return out


def backend_weight_selection_block(root: Path = BACKENDS) -> str:
    """Benchmark 1 at the measured points: cached update vs ``index_select`` for each
    method's own density and churn (``weight_selection_measured_*.csv``), 1 and 2 threads."""
    paths = sorted(root.glob("weight_selection_measured_*.csv"))
    points: dict = {}
    for path in paths:
        for x in _read_csv(path):
            key = (_shape(x), float(x["density"]), float(x["churn"]))
            p = points.setdefault(key, {"x": x})
            p[int(x["threads"])] = float(x["speedup"])
    methods = _methods_by_churn(root)
    rows = []
    for (shape, density, churn), p in points.items():
        x = p["x"]
        names = methods.get((shape, round(density, 3), round(churn, 3)), [])
        rows.append([shape, ", ".join(names) or "—", f"{density:.3f}", f"{churn:.3f}", x["active_rows"],
                     f"{float(x['rows_copied_per_step']):.0f}",
                     *(f"{p[t]:.2f}×" if t in p else "—" for t in (1, 2)), f"{float(x['copy_bound_limit']):.2f}×"])
    source = ", ".join(_rel(p) for p in paths) + " (method: the `churn.csv` row with that density and churn)"
    return _md_table(["MLP shape", "method", "density", "churn", "active rows", "rows copied / step",
                      "speedup, 1 thread", "speedup, 2 threads", "copy-bound limit (1/churn)"], rows, source)


def backend_weight_selection_grid_block(root: Path = BACKENDS) -> str:
    """Benchmark 1 over a grid (``weight_selection_t2.csv``): speedup of the cached update
    over ``index_select``, per shape and density (rows) and churn (columns)."""
    path = root / "weight_selection_t2.csv"
    data = _read_csv(path)
    churns = sorted({float(x["churn"]) for x in data})
    cells: dict = {}
    for x in data:
        cells[(_shape(x), float(x["density"]), x["threads"])] = cells.get(
            (_shape(x), float(x["density"]), x["threads"]), {}) | {float(x["churn"]): float(x["speedup"])}
    rows = [[shape, f"{density:g}", threads, *(f"{by[c]:.2f}×" if c in by else "—" for c in churns)]
            for (shape, density, threads), by in cells.items()]
    return _md_table(["MLP shape", "density", "threads", *(f"churn {c:g}" for c in churns)], rows, _rel(path))


def backend_mlp_step_block(root: Path = BACKENDS) -> str:
    """Benchmark 2 (``mlp_step_churn*.csv``): one MLP step, update included, relative to
    the dense step: cached / ``index_select`` speedup per density, for each shape, churn
    and thread count."""
    paths = sorted(root.glob("mlp_step_churn*.csv"), key=lambda p: float(p.stem.removeprefix("mlp_step_churn")))
    densities: dict[float, float] = {}
    cells: dict = {}
    for path in paths:
        for x in _read_csv(path):
            d = float(x["density"])
            densities[d] = float(x["target_speedup"])
            key = (_shape(x), float(x["churn"]), x["threads"])
            c = cells.setdefault(key, {"dense_ms": float(x["dense_ms"])})
            c[d] = f"{float(x['cached_speedup']):.2f}× / {float(x['index_select_speedup']):.2f}×"
    levels = sorted(densities)
    rows = [[shape, f"{churn:g}", threads, f"{c['dense_ms']:.3g}", *(c.get(d, "—") for d in levels)]
            for (shape, churn, threads), c in sorted(cells.items(), key=lambda kv: (
                int(kv[0][0].split("×")[0]), kv[0][1], int(kv[0][2])))]
    return _md_table(["MLP shape", "churn", "threads", "dense ms",
                      *(f"density {d:g}: cached / index_select (target {densities[d]:.2f}×)" for d in levels)],
                     rows, ", ".join(_rel(p) for p in paths))


def backend_decode_block(root: Path = BACKENDS) -> str:
    """Benchmark 4 (``decode.csv``): end-to-end greedy decode, tokens/s and the Amdahl limit."""
    path = root / "decode.csv"
    rows = []
    for x in _read_csv(path):
        div = int(float(x["first_divergence"]))
        free = _yes_no(x["identical_free_running"]) + ("" if div < 0 else f" (diverges at token {div})")
        rows.append([x["model"], x["method"], f"{float(x['sparsity']):g}", x["backend"], x["threads"],
                     f"{float(x['tok_s_hf']):.1f}", f"{float(x['tok_s_dense_mask']):.1f}", f"{float(x['tok_s']):.1f}",
                     f"{float(x['speedup']):.2f}×", f"{float(x['mlp_byte_share']):.2f}",
                     f"{float(x['bytes_saved']):.3f}", f"{float(x['amdahl_limit']):.2f}×",
                     f"{float(x['fraction_of_limit']):.2f}", _yes_no(x["identical"]), free])
    # decode.csv predates the measured Amdahl limit: its amdahl_limit column is the bytes ratio
    return _md_table(["model", "method", "sparsity", "backend", "threads", "tok/s HF dense", "tok/s dense mask",
                      "tok/s", "speedup vs HF", "MLP byte share", "weight bytes saved", "bytes limit",
                      "fraction of bytes limit", "identical tokens (replayed masks)", "identical tokens (free-running)"],
                     rows, _rel(path))


def backend_mlp_step_cold_block(root: Path = BACKENDS) -> str:
    """Benchmark 2, weights cold (``mlp_step_cold.csv``): speedup over torch's dense fp32 step
    of fused fp32, fused bf16, cached and index_select per density, with the fused fp32
    speedup as a fraction of 1/density, and the fused kernel's own dense path (every neuron)
    on fp32 and on bf16 weights against the same torch step."""
    path = root / "mlp_step_cold.csv"
    if not path.exists():
        return "_No cold-weight MLP-step results committed yet (`sparsebench-bench mlp-step-cold`)._"
    data = _read_csv(path)
    levels = sorted({float(x["density"]) for x in data})
    by_row: dict = {}
    for x in data:
        key = (_shape(x), int(x["threads"]), int(x["layers"]))
        v = by_row.setdefault(key, {"dense": [], "fp32_dense": [], "bf16_dense": [], "self": {}})
        v["dense"].append(float(x["dense_ms"]))  # measured once per density: the median is shown
        v["fp32_dense"].append(float(x["dense_ms"]) / float(x["fused_dense_ms"]))
        v["bf16_dense"].append(float(x["fused_bf16_dense_speedup"]))
        d = float(x["density"])
        v["self"][d] = float(x["fused_dense_ms"]) / float(x["fused_ms"]) * d
        by_row[key][d] = (f"{float(x['fused_speedup']):.2f}× ({float(x['fused_fraction_of_limit']):.2f}) / "
                          f"{float(x['fused_bf16_speedup']):.2f}× / {float(x['cached_speedup']):.2f}× / "
                          f"{float(x['index_select_speedup']):.2f}×")
    rows = []
    for (shape, threads, layers), v in sorted(by_row.items(), key=lambda kv: (int(kv[0][0].split("×")[0]), kv[0][1])):
        rows.append([shape, str(threads), str(layers), f"{statistics.median(v['dense']):.3g}",
                     *(v.get(d, "—") for d in levels), f"{statistics.median(v['fp32_dense']):.2f}×",
                     f"{statistics.median(v['bf16_dense']):.2f}×",
                     " / ".join(f"{v['self'][d]:.2f}" if d in v["self"] else "—" for d in levels)])
    return _md_table(["MLP shape", "threads", "layer copies", "dense torch fp32 ms (median over densities)",
                      *(f"density {d:g}: fused (fraction of {1 / d:.3g}×) / fused bf16 / cached / index_select"
                        for d in levels), "fused fp32 dense path", "fused bf16 dense path",
                      "fused fp32 ÷ its own dense path, as a fraction of 1/density (" + " / ".join(f"{d:g}" for d in levels)
                      + ")"], rows, _rel(path))


DECODE_FUSED = REPO / "experiments" / "results" / "decode_fused"


def _accuracy_beside(comparison: list[dict]) -> dict:
    """(model, method, sparsity) → the comparison's paired accuracy/perplexity row."""
    return {(x["model"], x["method"], x["sparsity"]): x for x in paired_rows(comparison)}


def _timed_on(r: dict) -> str:
    """The day a run was timed and its CPU where recorded: hosts differ between days, so
    tokens/s compare within a row (same-run ratios), not across days."""
    day = ((r.get("run") or {}).get("started_at") or "")[:10] or "—"
    cpu = (r.get("machine") or {}).get("cpu_model")
    return f"{day} ({cpu})" if cpu else day


def backend_decode_fused_block(root: Path = DECODE_FUSED, comparison: list[dict] | None = None) -> str:
    """Benchmark 4 with the fused backend (results.json under ``decode_fused/``): tokens/s,
    Amdahl limit and fraction of it, token identity with replayed masks, the per-step
    overhead outside the kernels, whether the kernel applied the sparsifier's mask rule
    (runs older than that metric say so), and the same masks' accuracy from the comparison."""
    results = load_results([root]) if root.exists() else []
    if not results:
        return "_No fused decode results committed yet (`sparsebench -m experiment=decode_fused`)._"
    acc = _accuracy_beside(committed_results() if comparison is None else comparison)
    rows = []

    def budget_of(r):
        return ((r.get("config") or {}).get("sparsifier") or {}).get("budget")

    for r in sorted(results, key=lambda r: (model_name(r), method(r), str(budget_of(r)),
                                            str((r.get("config") or {}).get("backend")))):
        m = r["metrics"]
        sp = r["sparsifier"].get("sparsity")
        budget = budget_of(r)
        setting = f"budget {budget:g}" if budget is not None else f"{sp:g}"
        weights = ((r.get("config") or {}).get("backend") or {}).get("weights", "model")
        if weights != "model":
            setting += f" ({weights} weights)"
        # the comparison ran fp32 weights: its accuracy belongs beside the fp32 rows only
        beside = acc.get((model_name(r), method(r), sp)) if budget is None and weights == "model" else None
        accuracy = "—" if beside is None else format_delta(beside["_paired_avg"])
        div = int(m["decode/first_divergence"])
        lim = decode_limits(m)
        rows.append([model_name(r), method(r), setting, f"{m.get('sparsity/mean', float('nan')):.3f}"
                     if "sparsity/mean" in m else "—", str(int(m["decode/threads"])), _timed_on(r),
                     f"{m['decode/tokens_per_s_hf']:.1f}", f"{m['decode/tokens_per_s']:.1f}",
                     f"{m['decode/speedup_vs_hf']:.2f}×", f"{lim['bytes']:.2f}× ({lim['fraction_of_bytes']:.2f})",
                     "— (older run)" if lim["amdahl"] is None else f"{lim['amdahl']:.2f}×",
                     "—" if lim["fraction"] is None else f"{lim['fraction']:.2f}", _yes_no(m["decode/identical"]),
                     "yes" if div < 0 else f"from token {div}",
                     f"{m['overhead/ms_per_token']:.2f} ({100 * m['overhead/fraction_of_step']:.1f}%)"
                     if "overhead/ms_per_token" in m else "—",
                     f"{m['overhead/net_ms_per_token']:.2f} ({100 * m['overhead/net_fraction_of_step']:.1f}%)"
                     # ‡: an older run, whose hooks' cost was the instrumented minus the plain decode;
                     # §: one that counted the torch time of projections left dense as overhead
                     + ("" if "overhead/clock_floor_us" in m else " ‡")
                     + ("" if "overhead/dense_linears_ms_per_token" in m else " §")
                     if "overhead/net_ms_per_token" in m else "— (older run)",
                     _yes_no(m["decode/mask_rule_in_kernel"]) if "decode/mask_rule_in_kernel" in m else "— (older run)",
                     accuracy])
    return _md_table(["model", "method", "sparsity", "measured", "threads", "timed (CPU)", "tok/s HF dense", "tok/s fused",
                      "speedup", "bytes limit (fraction of it)", "Amdahl limit", "fraction of limit",
                      "identical (replayed masks)",
                      "identical (free-running)", "overhead ms/token (share of step)",
                      "overhead without the clock's own cost", "mask rule in kernel",
                      "Δ avg acc, points [95% CI] (comparison)"], rows, f"`{DECODE_FUSED.relative_to(REPO)}/`")


OFFLOAD = REPO / "experiments" / "results" / "offload"


def backend_offload_block(root: Path = OFFLOAD) -> str:
    """The offload evaluator's modelled two-level memory (results.json under ``offload/``):
    per model and method, hit rate and modelled ms/token of the LRU and hot-neuron caches at
    each capacity, the sliding window at its occupancy, and the no-cache baselines."""
    from sparsebench.experiments.offload_figure import offload_rows

    results = load_results([root]) if root.exists() else []
    results = [r for r in results if "offload/none/ms_per_token" in r.get("metrics", {})]
    if not results:
        return "_No offload results committed yet (`sparsebench -m experiment=offload_cache`)._"
    rows, caps, tiers = [], set(), set()
    for r in sorted(results, key=lambda r: (model_name(r), method(r))):
        by = {(x["policy"], x["capacity"] if x["policy"] != "window" else x["window_tokens"]): x
              for x in offload_rows(r, model_name(r))}
        caps |= {c for (p, c) in by if p in ("lru", "hot")}
        tiers.add(by[("none", None)]["tier"])
        rows.append((r, by))
    caps = sorted(caps)
    out = []
    for r, by in rows:
        def cell(policy, c):
            x = by.get((policy, c))
            return "—" if x is None else f"{x['hit_rate']:.2f} / {x['ms_per_token']:.1f}"
        windows = sorted(k for (p, k) in by if p == "window")
        win = "; ".join(f"k={k}: {by[('window', k)]['hit_rate']:.2f} / {by[('window', k)]['ms_per_token']:.1f} "
                        f"(holds {by[('window', k)]['capacity']:.2f})" for k in windows)
        out.append([model_name(r), method(r), f"{r['metrics'].get('sparsity/mean', float('nan')):.3f}",
                    f"{by[('none', None)]['ms_per_token']:.1f}", f"{by[('active_only', 0.0)]['ms_per_token']:.1f}",
                    *(cell("lru", c) for c in caps), *(cell("hot", c) for c in caps), win or "—",
                    f"{by[('in_memory', None)]['ms_per_token']:.2f}"])
    tier = ", ".join(sorted(str(t) for t in tiers))
    return _md_table(["model", "method", "sparsity", "dense from slow tier ms", "active rows, no cache ms",
                      *(f"LRU C={c:g}: hit / ms" for c in caps), *(f"hot C={c:g}: hit / ms" for c in caps),
                      "window: hit / ms (occupancy)", "all rows fast ms"], out,
                     f"`{OFFLOAD.relative_to(REPO)}/` (tier: {tier})")


def backend_blocks(root: Path = BACKENDS) -> dict[str, str]:
    """The backend speed tables by block name, each read from the committed CSVs under ``root``."""
    return {"backend-churn": backend_churn_block(root),
            "backend-mlp-step-cold": backend_mlp_step_cold_block(root),
            "backend-decode-fused": backend_decode_fused_block(),
            "backend-offload": backend_offload_block(),
            "backend-weight-selection": backend_weight_selection_block(root),
            "backend-weight-selection-grid": backend_weight_selection_grid_block(root),
            "backend-mlp-step": backend_mlp_step_block(root),
            "backend-decode": backend_decode_block(root)}


LONG_CONTEXT = REPO / "experiments" / "results" / "long_context"
NO_LONG_CONTEXT = "_No long-context results committed yet (`sparsebench -m experiment=long_context`)._"


def _long_context_rows(root: Path) -> list[dict]:
    from sparsebench.experiments.long_context_figure import long_context_rows

    results = [r for r in load_results([root]) if r.get("status") == "ok"] if root.exists() else []
    return [x for r in sorted(results, key=lambda r: (model_name(r), r["run"].get("name") or "")) for x in
            long_context_rows(r)]


def _pts(x) -> str:
    return "—" if x is None else f"{100 * x:+.0f}"


def attention_passkey_block(root: Path = LONG_CONTEXT) -> str:
    """Passkey accuracy per model, method, context and budget, with the paired difference
    from dense attention on the same prompts (points, 95% bootstrap CI; * = McNemar p < 0.05)."""
    rows = [x for x in _long_context_rows(root) if x["kind"] == "passkey"]
    if not rows:
        return NO_LONG_CONTEXT
    out = []
    for x in sorted(rows, key=lambda x: (x["model"], x["method"], x["mlp"], x["context"], x["budget"] or 0)):
        star = "*" if x["p"] is not None and x["p"] < 0.05 else ""
        out.append([x["model"], x["method"], x["mlp"], str(x["context"]), x["budget_label"], f"{x['dense']:.2f}",
                    f"{x['value']:.2f}", f"{_pts(x['delta'])} [{_pts(x['ci_low'])}, {_pts(x['ci_high'])}]{star}",
                    str(x["n"]), f"{x['kv_read_fraction']:.3f}" if x["kv_read_fraction"] is not None else "—"])
    return _md_table(["model", "attention", "MLP", "context", "budget", "dense acc", "acc",
                      "Δ points [95% CI]", "prompts", "K/V rows read (decode steps)"], out,
                     f"`{LONG_CONTEXT.relative_to(REPO)}/`")


def attention_decode_block(root: Path = LONG_CONTEXT) -> str:
    """Decode at long context: tokens/s of dense attention and of each method/budget, their
    same-run ratio, the bytes-bound limit of that ratio and the argmax agreement."""
    rows = [x for x in _long_context_rows(root) if x["kind"] == "decode"]
    if not rows:
        return NO_LONG_CONTEXT
    out = []
    for x in sorted(rows, key=lambda x: (x["model"], x["method"], x["mlp"], x["context"], x["budget"] or 0)):
        out.append([x["model"], x["method"], x["mlp"], str(x["context"]), x["budget_label"], f"{x['dense']:.1f}",
                    f"{x['tokens_per_s']:.1f}", f"{x['value']:.2f}", f"{x['bytes_limit']:.2f}",
                    f"{x['kv_bytes'] / 2**20:.1f} / {x['dense_kv_bytes'] / 2**20:.1f}", f"{x['agreement']:.2f}"])
    return _md_table(["model", "attention", "MLP", "context", "budget", "dense tok/s", "tok/s", "speedup",
                      "bytes limit", "K/V MiB read per token (method / dense)", "argmax agreement"], out,
                     f"`{LONG_CONTEXT.relative_to(REPO)}/`")


def attention_perplexity_block(root: Path = LONG_CONTEXT) -> str:
    """Long-window perplexity, the method at every position vs dense attention, paired over windows."""
    rows = [x for x in _long_context_rows(root) if x["kind"] == "perplexity"]
    if not rows:
        return NO_LONG_CONTEXT
    out = []
    for x in sorted(rows, key=lambda x: (x["model"], x["method"], x["mlp"], x["corpus"], x["context"])):
        sig = "*" if x["ci_low"] is not None and (x["ci_low"] > 1 or x["ci_high"] < 1) else ""
        out.append([x["model"], x["method"], x["mlp"], x["corpus"], str(x["context"]), x["budget_label"],
                    f"{x['dense']:.2f}", f"{x['value']:.2f}",
                    f"x{x['ratio']:.3f} [{x['ci_low']:.3f}, {x['ci_high']:.3f}]{sig}",
                    f"{x['kv_read_fraction']:.3f}"])
    return _md_table(["model", "attention", "MLP", "corpus", "window", "budget", "dense ppl", "ppl",
                      "ratio [95% CI]", "K/V rows read"], out, f"`{LONG_CONTEXT.relative_to(REPO)}/`")


WITHIN_POINTS = 0.02  # issue 18: a budget "keeps retrieval" when it loses at most 2 points


def loss_upper_bound(lost: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper–Pearson upper bound on the fraction of prompts a method loses
    (dense right, method wrong), from ``lost`` of ``n``: it bounds the accuracy drop."""
    from scipy.stats import beta

    return 1.0 if n == 0 else (1.0 if lost >= n else float(beta.ppf(confidence, lost + 1, n - lost)))


def attention_budget_rows(rows: list[dict]) -> list[dict]:
    """Per model, method, MLP and budget, passkey pooled over context lengths: prompts,
    prompts lost and gained against dense attention, the accuracy change, the 95% upper
    bound on the loss (``loss_upper_bound``), whether that bound is within 2 points, and the
    decode speedup at the longest context timed for that budget."""
    decode = {}
    for x in rows:
        if x["kind"] == "decode":
            key = (x["model"], x["method"], x["mlp"], x["budget_label"])
            if key not in decode or x["context"] > decode[key]["context"]:
                decode[key] = x
    pooled: dict = {}
    for x in rows:
        if x["kind"] != "passkey" or x["n"] is None or x["lost"] is None:
            continue
        p = pooled.setdefault((x["model"], x["method"], x["mlp"], x["budget_label"]),
                              {"n": 0, "lost": 0, "gained": 0, "contexts": [], "budget": x["budget"]})
        p["n"] += x["n"]
        p["lost"] += x["lost"]
        p["gained"] += x["gained"]
        p["contexts"].append(x["context"])
    out = []
    for key, p in sorted(pooled.items(), key=lambda kv: (*kv[0][:3], kv[1]["budget"] or 0, kv[0][3])):
        bound = loss_upper_bound(p["lost"], p["n"])
        d = decode.get(key)
        out.append(dict(zip(("model", "method", "mlp", "budget_label"), key)) | p | {
            "delta": (p["gained"] - p["lost"]) / p["n"], "loss_bound": bound, "within": bound <= WITHIN_POINTS,
            "decode_context": d["context"] if d else None, "speedup": d["value"] if d else None})
    return out


def attention_budget_block(root: Path = LONG_CONTEXT) -> str:
    """``attention_budget_rows`` as a table, and per model the budgets (if any) whose loss is
    bounded within 2 points, with their speedup at the longest context."""
    rows = attention_budget_rows(_long_context_rows(root))
    if not rows:
        return NO_LONG_CONTEXT
    table = _md_table(["model", "attention", "MLP", "budget", "prompts (contexts)", "lost / gained vs dense",
                       "Δ acc, points", "loss bound (95%), points", "within 2 points", "decode speedup (context)"],
                      [[x["model"], x["method"], x["mlp"], x["budget_label"],
                        f"{x['n']} ({', '.join(str(c) for c in sorted(x['contexts']))})",
                        f"{x['lost']} / {x['gained']}", f"{100 * x['delta']:+.0f}", f"{100 * x['loss_bound']:.0f}",
                        "yes" if x["within"] else "no",
                        "—" if x["speedup"] is None else f"{x['speedup']:.2f}× ({x['decode_context']})"] for x in rows],
                      f"`{LONG_CONTEXT.relative_to(REPO)}/`")
    lines = []
    for model in sorted({x["model"] for x in rows}):
        ok = [x for x in rows if x["model"] == model and x["within"]]
        if ok:
            best = max(ok, key=lambda x: x["speedup"] or 0)
            lines.append(f"- **{model}**: {best['method']} at budget {best['budget_label']} keeps passkey retrieval within "
                         f"2 points of dense (95% bound); decode speedup "
                         + ("not timed" if best["speedup"] is None else
                            f"{best['speedup']:.2f}× at {best['decode_context']} tokens") + ".")
        else:
            n = max(x["n"] for x in rows if x["model"] == model)
            lines.append(f"- **{model}**: no method and budget is shown to keep passkey retrieval within 2 points of "
                         f"dense: losing none of {n} prompts would bound the drop only at "
                         f"{100 * loss_upper_bound(0, n):.0f} points (95%); bounding it at 2 points takes "
                         f"≥ {min_prompts_for(WITHIN_POINTS)} prompts with none lost.")
    return table + "\n\n" + "\n".join(lines)


def min_prompts_for(bound: float, confidence: float = 0.95) -> int:
    """Fewest prompts, none lost, whose ``loss_upper_bound`` is at most ``bound``."""
    n = 1
    while loss_upper_bound(0, n, confidence) > bound:
        n += 1
    return n


def attention_blocks(root: Path = LONG_CONTEXT) -> dict[str, str]:
    return {"attention-passkey": attention_passkey_block(root), "attention-decode": attention_decode_block(root),
            "attention-perplexity": attention_perplexity_block(root), "attention-budget": attention_budget_block(root)}


PREDICTORS = REPO / "experiments" / "results" / "predictors"


def predictor_block(root: Path = PREDICTORS) -> str:
    """The predictor table (``predictor_rows``) from the committed predictor_quality runs."""
    rows = predictor_rows([r for r in load_results([root]) if r.get("status") == "ok"]) if root.exists() else []
    if not rows:
        return "_No predictor results committed yet (`sparsebench -m experiment=predictor_quality`)._"

    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    out = [[x["model"], x["predictor"], x["oracle"], f(x["rank"], "g"), f(x["sparsity"], ".3f"), f(x["recall"], ".3f"),
            f(x["min_layer_recall"], ".3f"), f(x["perplexity"], ".2f"), f(x["oracle_perplexity"], ".2f"),
            "—" if x["gap_to_oracle"] is None else f"{100 * x['gap_to_oracle']:+.1f}%",
            f(x["ppl_vs_dense"], ".3f"), f(x["cost_mlp_fraction"], ".3f")] for x in rows]
    return _md_table(["model", "predictor", "imitates", "rank", "sparsity", "recall", "min layer recall",
                      "perplexity", "oracle perplexity", "gap to oracle", "ppl / dense", "cost (of MLP bytes)"],
                     out, f"`{PREDICTORS.relative_to(REPO)}/`")


def _paired_cell(paired: dict, key: str) -> str:
    """``format_paired`` of one paired result (Δ or ratio with CI and *), "—" when absent."""
    return format_paired(paired[key]) if paired.get(key) else "—"


def best_predictor_decode_rows(predictor_results: list[dict], decode_results: list[dict]) -> list[dict]:
    """Per model, the predictor with the lowest perplexity ratio to dense (``predictor_rows``),
    beside the fused decode of the same sparsifier settings (same ``method`` label and
    sparsity) when one is committed: what the best predictor buys end to end, and at what
    perplexity. ``decode`` is None while that decode has not been run."""
    best, compared = {}, {}
    for x in predictor_rows(predictor_results):
        compared[x["model"]] = compared.get(x["model"], 0) + 1
        if x["ppl_vs_dense"] is not None and (x["model"] not in best
                                              or x["ppl_vs_dense"] < best[x["model"]]["ppl_vs_dense"]):
            best[x["model"]] = x
    decodes = {(model_name(r), method(r), r["sparsifier"].get("sparsity")): r["metrics"] for r in decode_results
               if "decode/speedup_vs_hf" in r["metrics"] and ((r.get("config") or {}).get("backend") or {})
               .get("weights", "model") == "model"}
    rows = []
    for model, x in sorted(best.items()):
        paired = next((r.get("paired") or {} for r in predictor_results
                       if model_name(r) == model and method(r) == x["predictor"]
                       and "mask_quality/recall" in r["metrics"]), {})
        rows.append(x | {"ppl_paired": paired.get("perplexity"), "compared": compared[model],
                         "decode": decodes.get((model, x["predictor"], x["sparsity_requested"]))})
    return rows


def best_predictor_decode_block(root: Path = PREDICTORS, decode_root: Path = DECODE_FUSED,
                                comparison: list[dict] | None = None) -> str:
    """``best_predictor_decode_rows`` from the committed predictor and fused-decode runs, with
    the same predictor's lm-eval accuracy from the comparison when it has that point."""
    ok = lambda rs: [r for r in rs if r.get("status") == "ok"]  # noqa: E731
    rows = best_predictor_decode_rows(ok(load_results([root])) if root.exists() else [],
                                      ok(load_results([decode_root])) if decode_root.exists() else [])
    acc = _accuracy_beside(committed_results() if comparison is None else comparison)
    if not rows:
        return "_No predictor results committed yet (`sparsebench -m experiment=predictor_quality`)._"
    out = []
    for x in rows:
        ppl = _paired_cell({"perplexity": x["ppl_paired"]}, "perplexity")
        d = x["decode"]
        lim = None if d is None else decode_limits(d)
        timed = (["—"] * 4 if d is None else
                 [f"{d['decode/tokens_per_s_hf']:.1f} → {d['decode/tokens_per_s']:.1f}", f"{d['decode/speedup_vs_hf']:.2f}×",
                  *((f"{lim['amdahl']:.2f}×", f"{lim['fraction']:.2f}") if lim["amdahl"] is not None else
                    (f"{lim['bytes']:.2f}× (bytes)", f"{lim['fraction_of_bytes']:.2f} (bytes)"))])
        beside = acc.get((x["model"], x["predictor"], x["sparsity_requested"]))
        out.append([x["model"], x["predictor"], str(x["compared"]), f"{x['sparsity_requested']:g}",
                    f"{x['recall']:.3f}", ppl,
                    "yes" if x["ppl_vs_dense"] <= PREDICTOR_PPL_LIMIT else "no",
                    "—" if beside is None else format_delta(beside["_paired_avg"]), *timed])
    table = _md_table(["model", "best predictor", "of (runs committed)", "sparsity", "recall",
                       "ppl / dense on the plays [95% CI]",
                       "≤ +5% perplexity", "Δ avg acc, points [95% CI] (comparison)",
                       "decode tok/s HF → fused", "speedup", "Amdahl limit", "fraction of limit"], out,
                      f"`{PREDICTORS.relative_to(REPO)}/`, `{DECODE_FUSED.relative_to(REPO)}/` and "
                      f"`{COMPARISON.relative_to(REPO)}/`")
    return table + "\n\n" + predictor_verdict(rows)


PREDICTOR_PPL_LIMIT = 1.05  # the issue's bar: ≤ +5% perplexity at 50% sparsity


def predictor_verdict(rows: list[dict], limit: float = PREDICTOR_PPL_LIMIT) -> str:
    """The plain answer to "does any predictor reach ≤ +5% perplexity at 50%?", per model,
    from the best predictor of each (``best_predictor_decode_rows``)."""
    reached = [x for x in rows if x["ppl_vs_dense"] <= limit]
    closest = ", ".join(f"{x['model']} {x['predictor']} ×{x['ppl_vs_dense']:.3f} at {x['sparsity_requested']:g}"
                        for x in rows)
    if not reached:
        return (f"**No predictor reaches ≤ +{100 * (limit - 1):.0f}% perplexity on the plays** on any model: "
                f"the best of each ({closest}) stays above it.")
    return (f"**Within +{100 * (limit - 1):.0f}% perplexity on the plays**: "
            + ", ".join(f"{x['model']} ({x['predictor']})" for x in reached)
            + f"; the best of each: {closest}.")


CETT_BUDGET = REPO / "experiments" / "results" / "fig1_cett_layer_sparsity"


def cett_budget_block(root: Path = CETT_BUDGET) -> str:
    """CETT at an error budget (figure 1's runs): the sparsity each layer ends up with (mean,
    min, max over layers) and what it costs in perplexity on both held-out corpora."""
    results = [r for r in load_results([root]) if r.get("status") == "ok"] if root.exists() else []
    if not results:
        return "_No CETT budget runs committed yet (`sparsebench -m experiment=fig1_cett_layer_sparsity`)._"
    out = []
    for r in sorted(results, key=model_name):
        sp = [row["sparsity"] for row in r["per_layer"]]
        paired, dense = r.get("paired") or {}, r.get("dense_metrics") or {}
        out.append([model_name(r), f"{r['sparsifier']['budget']:g}", f"{sum(sp) / len(sp):.3f}",
                    f"{min(sp):.3f} – {max(sp):.3f}",
                    f"{dense['perplexity']:.2f}" if "perplexity" in dense else "—", _paired_cell(paired, "perplexity"),
                    f"{dense['perplexity/lambada']:.2f}" if "perplexity/lambada" in dense else "—",
                    _paired_cell(paired, "perplexity/lambada")])
    return _md_table(["model", "budget", "mean layer sparsity", "min – max over layers", "dense ppl (plays)",
                      "ppl ratio (plays) [95% CI]", "dense ppl (LAMBADA)", "ppl ratio (LAMBADA) [95% CI]"], out,
                     f"`{CETT_BUDGET.relative_to(REPO)}/`")


CALIBRATION_MEMORY = REPO / "experiments" / "results" / "calibration_memory"
CAPTURE_LABELS = {"every_layer_held": "every layer's input held (before)", "streamed": "streamed (now)"}


def calibration_memory_block(root: Path = CALIBRATION_MEMORY) -> str:
    """Peak memory a calibration adds on top of the loaded model, per capture scheme
    (``experiments/checks/calibration_memory.py --out``)."""
    import json

    runs = [json.loads(f.read_text()) for f in sorted(root.glob("*.json"))] if root.exists() else []
    if not runs:
        return "_No calibration memory measured yet (`python -m sparsebench.experiments.checks.calibration_memory`)._"
    order = list(CAPTURE_LABELS)
    runs.sort(key=lambda r: (r["model"], r["sparsifier"], order.index(r["label"]) if r["label"] in order else len(order)))
    out = [[f"{r['model']} ({r['layers']})", r["sparsifier"], CAPTURE_LABELS.get(r["label"], r["label"]),
            f"{r['calibration_tokens']:,}", f"{r['resident_after_load_mib']:,.1f}",
            f"{r['calibration_peak_added_mib']:,.1f}", f"{r['one_layer_of_hidden_states_mib']:,.1f}"] for r in runs]
    return _md_table(["model (layers)", "sparsifier", "calibration", "tokens", "resident after load, MiB",
                      "peak added, MiB", "one layer of hidden states, MiB"], out,
                     f"`{CALIBRATION_MEMORY.relative_to(REPO)}/`")


README_TIMINGS = REPO / "experiments" / "results" / "readme_timings" / "readme-timings.json"


def readme_timings_block(path: Path = README_TIMINGS) -> str:
    """How long the README's commands took on a fresh clone (``experiments/checks/readme_timings.py``)."""
    import json

    if not path.exists():
        return "_Not measured yet (`python experiments/checks/readme_timings.py --out experiments/results/readme_timings`)._"
    r = json.loads(path.read_text())
    m = r["machine"]

    def took(s):
        t = round(s["seconds"])
        return (f"{t // 60} min {t % 60:02d} s" if t >= 60 else f"{t} s") + ("" if s["returncode"] == 0 else
                                                                             f" (failed, exit {s['returncode']})")
    steps = "; ".join(f"`{s['command']}` {took(s)}" for s in r["steps"])
    return (f"Measured on a fresh clone ({r['date']}, commit `{r['commit'][:10]}`, {m['cpus']} CPU cores, "
            f"{m['memory_gib']} GiB, Python {m['python']}; pip cache {r['pip_cache'].split(' ')[0]}, model and data "
            f"cache {r['sparsebench_cache']}): {steps}. _From {_rel(path)}._")


def fill_blocks(text: str, blocks: dict[str, str]) -> str:
    """Replace the body of every ``<!-- table:NAME -->`` … ``<!-- /table:NAME -->`` block."""
    import re

    def sub(m):
        name = m.group(1)
        if name not in blocks:
            raise SystemExit(f"no generator for table block '{name}'; known: {', '.join(blocks) or 'none (no results)'}")
        return f"<!-- table:{name} -->\n{blocks[name]}\n<!-- /table:{name} -->"

    return re.sub(r"<!-- table:([\w-]+) -->.*?<!-- /table:\1 -->", sub, text, flags=re.S)


def update_docs(check: bool = False, repo: Path = REPO, results: list[dict] | None = None) -> list[str]:
    """Regenerate the marked blocks of README/docs; with ``check`` write nothing and
    return the files whose blocks differ from what the committed results give."""
    blocks = generated_blocks(committed_results() if results is None else results)
    stale = []
    for rel in GENERATED_FILES:
        path = repo / rel
        if not path.exists():
            continue
        text = path.read_text()
        new = fill_blocks(text, blocks)
        if new != text:
            stale.append(rel)
            if not check:
                path.write_text(new)
    return stale


ARTIFACTS = REPO / "experiments" / "results" / "artifacts"


def commit_artifacts(cache: Path, out: Path = ARTIFACTS) -> list[Path]:
    """Copy from the cache the slow, point-independent results a fresh machine would
    otherwise recompute — TEAL/WINA greedy paths (per layer and whole) and dense baselines —
    when they were computed by today's code (their key's code digest equals the current
    one); ``sparsebench.models.calibration.ArtifactCache`` reuses them only on an exact key match."""
    import json
    import shutil

    from sparsebench.models.calibration import CALIBRATION_MODULES
    from sparsebench.store.provenance import code_digest
    from sparsebench.run import DENSE_MODULES

    out.mkdir(parents=True, exist_ok=True)
    copied = []
    candidates = [*(cache / "calibration").glob("*-greedy*.json"), *(cache / "dense_baselines").glob("dense-*.json")]
    for meta in sorted(candidates):
        key = json.loads(meta.read_text()).get("key") or {}
        if (key.get("model_cfg") or {}).get("source") == "tiny":
            continue  # tiny random models: made in seconds, never worth committing
        if meta.parent.name == "dense_baselines":
            modules = [f"sparsebench.evaluators.{key.get('artifact', '').removeprefix('dense-')}", *DENSE_MODULES]
        else:
            modules = [f"sparsebench.sparsifiers.{key.get('method')}", *CALIBRATION_MODULES]
        blob = meta.with_suffix(".pt")
        if key.get("code") != code_digest(modules) or not blob.exists():
            continue
        for f in (meta, blob):
            shutil.copy2(f, out / f.name)
        copied.append(out / blob.name)
    return copied


def export(roots: list[Path], out: Path) -> list[Path]:
    """Copy each finished run's results.json under ``out/<model>/<method>@<sparsity>.json``
    (the committed results the README tables are generated from)."""
    import json

    written = []
    for r in load_results(roots):
        if r.get("status") != "ok":
            continue
        sp = r["sparsifier"].get("sparsity")
        name = method(r) if r["sparsifier"]["name"] == "none" else f"{method(r)}@{sp:g}"
        path = out / model_name(r) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: v for k, v in r.items() if k != "_path"}, indent=1) + "\n")
        written.append(path)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", choices=[*TABLES, "export", "docs", "artifacts"])
    p.add_argument("roots", type=Path, nargs="*")
    p.add_argument("--csv", type=Path)
    p.add_argument("--out", type=Path, default=COMPARISON, help="export: where the results go")
    p.add_argument("--check", action="store_true", help="docs: only report blocks that differ (exit 1)")
    a = p.parse_args(argv)
    if a.table == "artifacts":  # roots: the cache folder (default: $SPARSEBENCH_CACHE or ~/.cache/sparsebench)
        from sparsebench.store.cache import cache_root

        copied = commit_artifacts(cache_root(a.roots[0] if a.roots else None))
        print(f"copied {len(copied)} artifacts to {ARTIFACTS}")
        return
    if a.table == "docs":
        stale = update_docs(check=a.check)
        if a.check and stale:
            raise SystemExit(f"generated tables out of date in: {', '.join(stale)} "
                             "(python -m sparsebench.experiments.tables docs)")
        print("up to date" if not stale else f"rewrote {', '.join(stale)}")
        return
    if not a.roots:
        p.error("give the folders holding results.json files")
    if a.table == "export":
        print(f"wrote {len(export(a.roots, a.out))} files under {a.out}")
        return
    rows_of, to_markdown = TABLES[a.table]
    rows = rows_of(load_results(a.roots))
    if not rows:
        raise SystemExit(f"no {a.table} results under {', '.join(map(str, a.roots))}")
    print(to_markdown(rows))
    if a.csv:
        with open(a.csv, "w", newline="") as fh:
            rows = _csv_rows(rows)
            w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for x in rows for k in x)))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
