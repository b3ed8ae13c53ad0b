"""Tables for the backend benchmarks from trees of results.json.

    python experiments/backend_tables.py churn  RUNS_DIR   # benchmark 3: mask churn per method
    python experiments/backend_tables.py decode RUNS_DIR   # benchmark 4: end-to-end decode

Each prints a markdown table; ``--csv FILE`` also writes the rows.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def _load(root: Path):
    for f in sorted(root.rglob("results.json")):
        yield json.loads(f.read_text())


def churn_rows(root: Path) -> list[dict]:
    rows = []
    for r in _load(root):
        m = r["metrics"]
        if "churn/fraction" not in m:
            continue
        rows.append({"model": r["model"]["id"].split("/")[-1], "method": r["sparsifier"]["name"],
                     "shape": f"{r['model']['hidden_size']}x{r['model']['intermediate_size']}",
                     "sparsity": m.get("sparsity/mean"), "density": m["churn/density"],
                     "active_per_token": m["churn/active_per_token"], "swaps_per_token": m["churn/swaps_per_token"],
                     "churn": m["churn/fraction"],
                     "churn_min_layer": min(x["churn/fraction"] for x in r["per_layer"]),
                     "churn_max_layer": max(x["churn/fraction"] for x in r["per_layer"])})
    return rows


def decode_rows(root: Path) -> list[dict]:
    rows = []
    for r in _load(root):
        m = r["metrics"]
        if "decode/tokens_per_s" not in m:
            continue
        rows.append({"model": r["model"]["id"].split("/")[-1], "method": r["sparsifier"]["name"],
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", choices=["churn", "decode"])
    p.add_argument("root", type=Path)
    p.add_argument("--csv", type=Path)
    a = p.parse_args(argv)
    rows = (churn_rows if a.table == "churn" else decode_rows)(a.root)
    if not rows:
        raise SystemExit(f"no {a.table} results under {a.root}")
    print(markdown(rows))
    if a.csv:
        with open(a.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
