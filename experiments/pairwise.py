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


def versus_best_markdown(results: list[dict]) -> str:
    """Per model: methods × sparsities, each cell the method's average accuracy minus that of
    the most accurate method at the same sparsity, paired on the lm-eval documents both ran
    (95% bootstrap CI, * = exact McNemar p < 0.05). Which gaps between methods are real and
    which are noise. The best is picked on these same items, so its lead is, if anything,
    flattered: a gap that is not significant here is not evidence of a difference."""
    points: dict[str, dict[float, dict[str, tuple[float, dict]]]] = {}
    for r in results:
        sparse = (r.get("items") or {}).get("sparse")
        acc = (r.get("paired") or {}).get("lm_eval/avg_acc")
        if r["sparsifier"]["name"] == "none" or not sparse or not acc or r["sparsifier"].get("sparsity") is None:
            continue
        points.setdefault(model_name(r), {}).setdefault(r["sparsifier"]["sparsity"], {})[method(r)] = (acc["acc_b"], sparse)
    out = []
    for model, levels in sorted(points.items()):
        shown = sorted(s for s, ms in levels.items() if len(ms) >= 2)
        if not shown:
            continue
        best = {s: max(sorted(levels[s]), key=lambda m, s=s: levels[s][m][0]) for s in shown}
        out += [f"| {model}: Δ avg acc vs the best method at the sparsity, points [95% CI] | "
                + " | ".join(f"{s:g}" for s in shown) + " |", "|---" * (1 + len(shown)) + "|"]
        for name in sorted({m for s in shown for m in levels[s]}):
            cells = []
            for s in shown:
                if name not in levels[s]:
                    cells.append("—")
                elif name == best[s]:
                    cells.append(f"**best** (acc {levels[s][name][0]:.3f})")
                else:
                    paired = compare_items(levels[s][best[s]][1], levels[s][name][1]).get("lm_eval/avg_acc")
                    cells.append(format_paired(paired) if paired else "—")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip()
