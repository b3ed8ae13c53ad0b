"""Method against method: every pair of runs of one model at one requested sparsity,
compared on the lm-eval documents and perplexity windows they share (paired Δ, 95%
bootstrap CI, exact McNemar p; perplexity ratio with its CI), so "A beats B" comes with
how sure it is, not only "A and B each differ from dense"."""
from __future__ import annotations

from itertools import combinations

from sparsebench.reporting.comparison import compare_items, format_paired

from .figures import method, model_name


def pairwise_rows(results: list[dict]) -> list[dict]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        sparse = (r.get("items") or {}).get("sparse")
        if r["sparsifier"]["name"] == "none" or not sparse or r["sparsifier"].get("sparsity") is None:
            continue
        groups.setdefault((model_name(r), r["sparsifier"]["sparsity"]), []).append(r)
    rows = []
    for (model, sparsity), rs in sorted(groups.items()):
        rs = sorted(rs, key=method)
        for a, b in combinations(rs, 2):
            paired = compare_items(a["items"]["sparse"], b["items"]["sparse"])
            if not paired:
                continue
            row = {"model": model, "sparsity": sparsity, "method_a": method(a), "method_b": method(b)}
            for key in ("lm_eval/avg_acc", "perplexity", *sorted(k for k in paired if k.startswith("perplexity/"))):
                if key in paired:
                    row[key] = paired[key]
            rows.append(row)
    return rows


def pairwise_markdown(rows: list[dict]) -> str:
    """One table per model and sparsity: B − A in average accuracy (points) and B ÷ A in
    perplexity, each with its 95% paired CI (* = significant at 5%)."""
    out = []
    for key in sorted({(x["model"], x["sparsity"]) for x in rows}):
        mine = [x for x in rows if (x["model"], x["sparsity"]) == key]
        ppl_keys = [k for k in mine[0] if k.startswith("perplexity")]
        out += [f"**{key[0]} at sparsity {key[1]:g}**", "",
                "| A | B | Δ avg acc B − A, points [95% CI] | " + " | ".join(f"{k} B ÷ A [95% CI]" for k in ppl_keys) + " |",
                "|---" * (3 + len(ppl_keys)) + "|"]
        for x in mine:
            acc = format_paired(x["lm_eval/avg_acc"]) if "lm_eval/avg_acc" in x else "—"
            out.append(f"| {x['method_a']} | {x['method_b']} | {acc} | "
                       + " | ".join(format_paired(x[k]) if k in x else "—" for k in ppl_keys) + " |")
        out.append("")
    return "\n".join(out).rstrip()
