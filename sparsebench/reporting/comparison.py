"""Paired comparisons of two runs' per-item outcomes (the ``items`` of results.json).

Two runs are compared on the items they share: lm-eval documents by (task, doc id), so a
run with ``limit=200`` and one with ``limit=50`` are compared on the 50 they share;
perplexity windows by position, when both runs scored the same windows (same sources,
same tokens per window). ``compare_items(reference, other)`` gives, per metric, the
statistics of ``sparsebench.core.stats`` with Δ = other − reference: for every lm-eval task
and for the task average (``lm_eval/avg_acc``) a 95% paired-bootstrap CI and an exact
McNemar p-value; for every held-out corpus the perplexity ratio with a paired CI over
windows.
"""
from __future__ import annotations

from ..core.stats import paired_accuracy_tasks, paired_perplexity

LM_EVAL = "lm_eval"


def _shared_tasks(ref: dict, other: dict) -> dict[str, tuple[list[int], list[int]]]:
    per_task = {}
    for task, a in ref.items():
        b = other.get(task)
        if not b:
            continue
        acc_b = dict(zip(b["doc_id"], b["acc"]))
        shared = [(d, x) for d, x in zip(a["doc_id"], a["acc"]) if d in acc_b]
        if shared:
            per_task[task] = ([int(x) for _, x in shared], [int(acc_b[d]) for d, _ in shared])
    return per_task


def _same_windows(a: dict, b: dict) -> bool:
    return a.get("tokens") == b.get("tokens") and a.get("source") == b.get("source") and len(a["nll"]) == len(b["nll"])


def compare_items(reference: dict | None, other: dict | None, seed: int = 0) -> dict:
    """Per-metric paired statistics of ``other`` against ``reference`` on shared items."""
    out: dict = {}
    if not reference or not other:
        return out
    per_task = _shared_tasks(reference.get(LM_EVAL) or {}, other.get(LM_EVAL) or {})
    if per_task:
        res = paired_accuracy_tasks(per_task, seed=seed)
        for task, r in res.pop("tasks").items():
            out[f"lm_eval/{task}/acc"] = r
        out["lm_eval/avg_acc"] = res
    for key, a in reference.items():
        b = other.get(key)
        if key.startswith("perplexity") and b and _same_windows(a, b):
            out[key] = paired_perplexity(a["nll"], b["nll"], a["tokens"], seed=seed)
    return out


def format_paired(res: dict) -> str:
    """One cell: accuracy Δ in points with its CI (``-2.4 [-4.1, -0.7]*``), or a
    perplexity ratio with its CI (``x1.034 [1.021, 1.048]*``); ``*`` = significant at 5%
    (McNemar for accuracy, CI excluding 1 for perplexity)."""
    from ..core.stats import format_delta

    if "ratio" in res:
        star = "*" if res.get("significant") else ""
        return f"x{res['ratio']:.3f} [{res['ci_low']:.3f}, {res['ci_high']:.3f}]{star}"
    return format_delta(res)
