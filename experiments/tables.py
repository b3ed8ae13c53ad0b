"""Markdown tables (and CSV) from trees of results.json.

    python -m sparsebench.experiments.tables methods RUNS_DIR  # method × sparsity: sparsity, perplexity, lm-eval accuracy
    python -m sparsebench.experiments.tables grid    RUNS_DIR  # per model: method rows × sparsity columns, "perplexity / avg acc"
    python -m sparsebench.experiments.tables churn   RUNS_DIR  # mask churn per method (backend benchmark 3)
    python -m sparsebench.experiments.tables decode  RUNS_DIR  # end-to-end decode (backend benchmark 4)

Dense rows of the methods table come from runs with ``sparsifier=none``.

Each prints a markdown table; ``--csv FILE`` also writes the rows.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from sparsebench.experiments.figures import TASKS, method, method_rows, model_name
from sparsebench.results import load_results

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


def decode_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        m = r["metrics"]
        if "decode/tokens_per_s" not in m:
            continue
        rows.append({"model": model_name(r), "method": method(r),
                     "sparsity": r["sparsifier"].get("sparsity"), "backend": r["backend"],
                     "threads": m["decode/threads"], "tok_s_hf": m["decode/tokens_per_s_hf"],
                     "tok_s_dense_mask": m["decode/tokens_per_s_dense_mask"], "tok_s": m["decode/tokens_per_s"],
                     "speedup": m["decode/speedup_vs_hf"], "mlp_byte_share": m["decode/mlp_byte_share"],
                     "bytes_saved": m["decode/weight_bytes_saved_fraction"], "amdahl_limit": m["decode/amdahl_limit"],
                     "fraction_of_limit": m["decode/fraction_of_limit"], "identical": m["decode/identical"],
                     "identical_free_running": m["decode/identical_free_running"],
                     "first_divergence": m["decode/first_divergence"]})
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])

    def f(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return "\n".join(["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
                     + ["| " + " | ".join(f(x[k]) for k in keys) + " |" for x in rows])


# table name → (rows from results, markdown of the rows)
TABLES = {"methods": (evaluated_method_rows, methods_markdown), "grid": (evaluated_method_rows, grid_markdown),
          "churn": (churn_rows, markdown), "decode": (decode_rows, markdown)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", choices=list(TABLES))
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("--csv", type=Path)
    a = p.parse_args(argv)
    rows_of, to_markdown = TABLES[a.table]
    rows = rows_of(load_results(a.roots))
    if not rows:
        raise SystemExit(f"no {a.table} results under {', '.join(map(str, a.roots))}")
    print(to_markdown(rows))
    if a.csv:
        with open(a.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
