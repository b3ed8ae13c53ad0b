"""Method × sparsity table from a tree of results.json (issue 3's acceptance table).

    python experiments/sparsifier_table.py RUNS_DIR [--csv out.csv]

Rows: model, method, requested sparsity; columns: measured sparsity (the method's unit,
min–max over layers), held-out perplexity, lm-eval accuracy per task and their average.
Dense rows come from runs with ``sparsifier=none``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

TASKS = ("arc_easy", "boolq", "hellaswag", "piqa", "winogrande")


def rows_from(root: Path) -> list[dict]:
    rows = []
    for f in sorted(root.rglob("results.json")):
        r = json.loads(f.read_text())
        m, sp = r["metrics"], r["sparsifier"]
        lm = r["config"].get("evaluator", {}).get("lm_eval", {})
        rows.append({
            "model": r["model"]["id"].split("/")[-1], "method": sp["name"],
            "sparsity": 0.0 if sp["name"] == "none" else sp.get("sparsity"),
            "measured": m.get("sparsity/mean", 0.0), "min_layer": m.get("sparsity/min_layer", 0.0),
            "max_layer": m.get("sparsity/max_layer", 0.0), "perplexity": m.get("perplexity"),
            **{t: m.get(f"lm_eval/{t}/acc") for t in TASKS}, "avg_acc": m.get("lm_eval/avg_acc"),
            "lm_eval_limit": lm.get("limit"), "masked_token_fraction": m.get("lm_eval/masked_token_fraction"),
            "wall_s": r["run"]["wall_time_s"], "path": str(f.parent),
        })
    order = {"none": 0}
    rows.sort(key=lambda x: (x["model"], order.get(x["method"], 1), x["method"], x["sparsity"] or 0))
    return rows


def markdown(rows: list[dict]) -> str:
    def f(v, d=3):
        return "—" if v is None else f"{v:.{d}f}"

    out = ["| model | method | requested | measured (min–max) | perplexity | " + " | ".join(TASKS) + " | avg acc |",
           "|---" * (6 + len(TASKS)) + "|"]
    for x in rows:
        out.append(f"| {x['model']} | {x['method']} | {f(x['sparsity'], 2)} | {f(x['measured'])} "
                   f"({f(x['min_layer'], 2)}–{f(x['max_layer'], 2)}) | {f(x['perplexity'], 2)} | "
                   + " | ".join(f(x[t], 2) for t in TASKS) + f" | {f(x['avg_acc'])} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--csv", type=Path)
    a = p.parse_args(argv)
    rows = rows_from(a.root)
    if not rows:
        sys.exit(f"no results.json under {a.root}")
    print(markdown(rows))
    if a.csv:
        with open(a.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
