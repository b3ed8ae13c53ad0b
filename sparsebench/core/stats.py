"""Paired statistics for comparing a sparse model against its dense reference.

Every comparison here is *paired*: both systems are scored on the same items (lm-eval
questions) or the same windows (perplexity), so the per-item differences carry the
signal and the shared item difficulty cancels.  Conventions used throughout:

* ``a`` is the reference system (the dense model), ``b`` the other one (the sparse
  model); every difference is ``b - a``, so a negative ``delta`` means the sparse
  model is worse.
* Accuracies and deltas are fractions in [0, 1] / [-1, 1] (``format_delta`` scales
  them to points).
* Confidence intervals are percentile bootstrap intervals from
  :func:`scipy.stats.bootstrap`, driven by ``numpy.random.default_rng(seed)``: the same
  inputs and seed always give the same interval.
* Results are plain ``dict``s of Python ``float`` / ``int`` / ``bool`` (and nested
  dicts), ready for ``json.dumps(..., allow_nan=False)``.

The module needs only numpy and scipy (no torch) and does nothing at import time.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as _st

__all__ = [
    "paired_accuracy",
    "paired_accuracy_tasks",
    "paired_perplexity",
    "critical_sparsity",
    "format_delta",
    "mcnemar_exact",
]

# Bootstrap resamples are generated in batches of at most this many gathered elements
# (batch * n), so a 10k-item task with 10k resamples does not need gigabytes at once.
_MAX_BATCH_ELEMENTS = 2_000_000


# --------------------------------------------------------------------------- helpers
def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return confidence


def _check_resamples(n_resamples: int) -> int:
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    return int(n_resamples)


def _binary(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of 0/1 correctness values, got shape {arr.shape}")
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        bad = arr[~((arr == 0) | (arr == 1))][:3].tolist()
        raise ValueError(f"{name} must contain only 0/1 (or False/True) values; found e.g. {bad}")
    return arr.astype(np.int64)


def _rng_kwargs(seed: int) -> dict:
    # scipy >= 1.15 names the generator argument ``rng``; older versions ``random_state``.
    gen = np.random.default_rng(seed)
    if "rng" in inspect.signature(_st.bootstrap).parameters:
        return {"rng": gen}
    return {"random_state": gen}


def _batch(n_elements_per_resample: int, n_resamples: int) -> int:
    return max(1, min(n_resamples, _MAX_BATCH_ELEMENTS // max(1, n_elements_per_resample)))


def mcnemar_exact(n01: int, n10: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts.

    Under H0 (both systems equally accurate on discordant items) ``n01 ~ Binomial(n01 +
    n10, 1/2)``; the p-value is ``scipy.stats.binomtest(n01, n01 + n10).pvalue``, which
    for p = 1/2 equals ``min(1, 2 * sum_{k <= min(n01, n10)} C(n, k) / 2**n)``.
    With no discordant pairs there is no evidence of a difference and p = 1.
    """
    n01, n10 = int(n01), int(n10)
    if n01 < 0 or n10 < 0:
        raise ValueError(f"discordant counts must be non-negative, got n01={n01}, n10={n10}")
    if n01 + n10 == 0:
        return 1.0
    return float(min(1.0, _st.binomtest(n01, n01 + n10, 0.5).pvalue))


def _stratified_mean_ci(strata: Sequence[np.ndarray], *, confidence: float, n_resamples: int,
                        seed: int) -> tuple[float, float]:
    """Percentile-bootstrap CI of ``mean_t(mean(strata[t]))``.

    Each stratum is resampled independently with replacement (``scipy.stats.bootstrap``
    with several samples and ``paired=False``); with one stratum this is the ordinary
    bootstrap of a mean.  Strata whose values are all equal resample to themselves, so
    they enter as constants (this also covers one-element strata, which scipy refuses);
    if every stratum is constant the bootstrap distribution is a point and the interval
    is that point, exactly.
    """
    n_strata = len(strata)
    const_sum = 0.0
    varying: list[np.ndarray] = []
    for s in strata:
        if np.ptp(s) == 0:
            const_sum += float(s[0])
        else:
            varying.append(np.asarray(s, dtype=np.float64))
    if not varying:
        point = const_sum / n_strata
        return point, point

    def statistic(*samples, axis=-1):
        return (const_sum + sum(np.mean(x, axis=axis) for x in samples)) / n_strata

    res = _st.bootstrap(tuple(varying), statistic, n_resamples=n_resamples,
                        batch=_batch(sum(v.size for v in varying), n_resamples),
                        vectorized=True, paired=False, confidence_level=confidence,
                        method="percentile", **_rng_kwargs(seed))
    ci = res.confidence_interval
    return float(ci.low), float(ci.high)


# ------------------------------------------------------------------------ accuracy
def paired_accuracy(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray, *,
                    confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Compare two systems' 0/1 correctness on the same items.

    ``a[i]``, ``b[i]`` are whether the reference system (``a``, e.g. dense) and the other
    system (``b``, e.g. sparse) got item ``i`` right.  Returns::

        n            number of items
        acc_a, acc_b accuracies
        delta        acc_b - acc_a (= mean of the per-item differences d_i = b_i - a_i)
        ci_low,      percentile-bootstrap CI of delta: items are resampled with
        ci_high      replacement (a_i and b_i stay together), n_resamples times,
                     from default_rng(seed); deterministic
        p_mcnemar    exact two-sided McNemar p-value (binomial test on the discordant
                     pairs; 1.0 when there are none), see ``mcnemar_exact``
        n01          items a got wrong and b got right
        n10          items a got right and b got wrong
        confidence   the confidence level used
        significant  p_mcnemar < 1 - confidence

    ``significant`` is the McNemar decision; the bootstrap interval is its descriptive
    companion and, being a different procedure, can occasionally disagree with it at
    the margin (e.g. 5 of 5 discordant items favour b: CI [1, 1] yet p = 0.0625).
    If every item has the same difference (e.g. identical systems) the bootstrap
    distribution is a single point and the CI is exactly ``[delta, delta]``.

    Raises ``ValueError`` for empty input, unequal lengths or non-0/1 values.
    """
    confidence = _check_confidence(confidence)
    n_resamples = _check_resamples(n_resamples)
    a, b = _binary(a, "a"), _binary(b, "b")
    if a.size != b.size:
        raise ValueError(f"a and b must score the same items: got {a.size} and {b.size} values")
    if a.size == 0:
        raise ValueError("paired_accuracy needs at least one item; got empty a and b")
    d = b - a
    n01 = int(np.count_nonzero(d == 1))
    n10 = int(np.count_nonzero(d == -1))
    lo, hi = _stratified_mean_ci([d], confidence=confidence, n_resamples=n_resamples, seed=seed)
    p = mcnemar_exact(n01, n10)
    return {
        "n": int(a.size),
        "acc_a": float(a.mean()),
        "acc_b": float(b.mean()),
        "delta": (n01 - n10) / a.size,
        "ci_low": lo,
        "ci_high": hi,
        "p_mcnemar": p,
        "n01": n01,
        "n10": n10,
        "confidence": confidence,
        "significant": bool(p < 1.0 - confidence),
    }


def paired_accuracy_tasks(per_task: Mapping[str, tuple[Any, Any]], *, confidence: float = 0.95,
                          n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Macro-averaged paired comparison over several tasks (each task weighted equally).

    ``per_task[name] = (a, b)``: 0/1 correctness of that task's items under the
    reference ``a`` and the other system ``b``.  Returns::

        n_tasks, n   number of tasks, total number of items
        acc_a, acc_b mean over tasks of the per-task accuracies
        delta        acc_b - acc_a = mean over tasks of the per-task deltas
        ci_low,      stratified paired percentile bootstrap of delta: in every
        ci_high      resample the items of each task are resampled with replacement
                     independently of the other tasks (so every task keeps its size
                     and weight), the per-task deltas are recomputed and averaged
        p_mcnemar    exact two-sided McNemar p-value on the discordant pairs pooled
                     over all tasks (n01, n10 below are the pooled counts)
        n01, n10     pooled discordant counts
        confidence   the confidence level used
        significant  p_mcnemar < 1 - confidence (the same rule as paired_accuracy)
        tasks        {name: paired_accuracy(a, b, ...)} for every task

    What the pooled McNemar test tests: H0 "over all items pooled, b is as likely to
    win a discordant pair as a", i.e. the *item-weighted* (micro) average delta,
    ``(n01 - n10) / n``, is zero.  When all tasks have the same number of items the
    micro and macro averages coincide, so the p-value tests exactly the reported
    ``delta``.  With unequal task sizes it tests the item-weighted average instead:
    large tasks dominate, and ``p_mcnemar``/``significant`` may disagree with the
    (macro) ``delta`` and its stratified CI, even in sign.  The CI always refers to the
    reported macro ``delta``.

    The bootstrap visits tasks in sorted-name order, so the result does not depend on
    the dict's insertion order; each per-task result uses the same ``seed``, so a
    task's own CI does not change when other tasks are added.
    """
    confidence = _check_confidence(confidence)
    n_resamples = _check_resamples(n_resamples)
    if not per_task:
        raise ValueError("paired_accuracy_tasks needs at least one task; got an empty mapping")
    per: dict[str, dict] = {}
    diffs: dict[str, np.ndarray] = {}
    for name, pair in per_task.items():
        try:
            a, b = pair
        except (TypeError, ValueError):
            raise ValueError(f"task {name!r}: expected an (a, b) pair of correctness sequences") from None
        try:
            per[name] = paired_accuracy(a, b, confidence=confidence, n_resamples=n_resamples, seed=seed)
        except ValueError as exc:
            raise ValueError(f"task {name!r}: {exc}") from None
        diffs[name] = _binary(b, "b") - _binary(a, "a")
    names = sorted(per)
    lo, hi = _stratified_mean_ci([diffs[k] for k in names], confidence=confidence,
                                 n_resamples=n_resamples, seed=seed)
    n01 = sum(per[k]["n01"] for k in names)
    n10 = sum(per[k]["n10"] for k in names)
    p = mcnemar_exact(n01, n10)
    return {
        "n_tasks": len(names),
        "n": sum(per[k]["n"] for k in names),
        "acc_a": float(np.mean([per[k]["acc_a"] for k in names])),
        "acc_b": float(np.mean([per[k]["acc_b"] for k in names])),
        "delta": float(np.mean([per[k]["delta"] for k in names])),
        "ci_low": lo,
        "ci_high": hi,
        "p_mcnemar": p,
        "n01": n01,
        "n10": n10,
        "confidence": confidence,
        "significant": bool(p < 1.0 - confidence),
        "tasks": per,
    }


# ---------------------------------------------------------------------- perplexity
def paired_perplexity(nll_a: Sequence[float] | np.ndarray, nll_b: Sequence[float] | np.ndarray,
                      tokens: Sequence[float] | np.ndarray, *, confidence: float = 0.95,
                      n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Compare two systems' perplexity on the same evaluation windows.

    ``nll_a[i]``, ``nll_b[i]``: summed negative log-likelihood (nats) of window ``i``
    under the reference ``a`` and the other system ``b``; ``tokens[i]``: the number of
    scored tokens in that window (> 0).  Returns::

        n_windows, n_tokens
        ppl_a, ppl_b  exp(sum nll / sum tokens) for each system
        log_ratio     log ppl_b - log ppl_a = (sum nll_b - sum nll_a) / sum tokens
        ratio         ppl_b / ppl_a = exp(log_ratio)
        ci_low,       percentile-bootstrap CI of ratio: windows are resampled with
        ci_high       replacement (nll_a, nll_b, tokens of a window stay together) and
                      the ratio of sums is recomputed for every resample; the
                      percentiles are taken of log_ratio and exponentiated
        confidence    the confidence level used
        significant   the CI excludes 1 (ci_low > 1 or ci_high < 1) and there are at
                      least 2 windows

    If every window has the same per-token log-ratio ``(nll_b - nll_a) / tokens``
    (e.g. identical inputs, or a single window) every resample gives the same ratio and
    the CI is exactly ``[ratio, ratio]``; identical inputs give ratio 1 with CI [1, 1].
    A single window says nothing about variability, so it is never ``significant``.
    """
    confidence = _check_confidence(confidence)
    n_resamples = _check_resamples(n_resamples)
    arrs = []
    for name, x in (("nll_a", nll_a), ("nll_b", nll_b), ("tokens", tokens)):
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D sequence (one value per window), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains non-finite values")
        arrs.append(arr)
    na, nb, t = arrs
    if not (na.size == nb.size == t.size):
        raise ValueError(f"nll_a, nll_b and tokens must describe the same windows: "
                         f"got {na.size}, {nb.size} and {t.size} values")
    if na.size == 0:
        raise ValueError("paired_perplexity needs at least one window; got empty inputs")
    if np.any(t <= 0):
        raise ValueError("tokens must be positive for every window")

    diff = nb - na
    n_tok = float(t.sum())
    log_ratio = float(diff.sum() / n_tok)
    rates = diff / t
    if np.ptp(rates) == 0:
        lo_log = hi_log = log_ratio
    else:
        def statistic(dx, tx, axis=-1):
            return np.sum(dx, axis=axis) / np.sum(tx, axis=axis)

        res = _st.bootstrap((diff, t), statistic, n_resamples=n_resamples,
                            batch=_batch(2 * na.size, n_resamples), vectorized=True, paired=True,
                            confidence_level=confidence, method="percentile", **_rng_kwargs(seed))
        lo_log, hi_log = float(res.confidence_interval.low), float(res.confidence_interval.high)
    lo, hi = math.exp(lo_log), math.exp(hi_log)
    return {
        "n_windows": int(na.size),
        "n_tokens": n_tok,
        "ppl_a": math.exp(float(na.sum()) / n_tok),
        "ppl_b": math.exp(float(nb.sum()) / n_tok),
        "log_ratio": log_ratio,
        "ratio": math.exp(log_ratio),
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "significant": bool(na.size >= 2 and (lo > 1.0 or hi < 1.0)),
    }


# ------------------------------------------------------------- sweeps and reporting
def critical_sparsity(points: Iterable[tuple[float, Mapping[str, Any]]], margin: float = -0.01) -> float | None:
    """The largest sparsity up to which the sparse model is not significantly worse than ``margin``.

    ``points``: ``(sparsity, result)`` pairs, ``result`` a dict with ``ci_high`` (as
    returned by ``paired_accuracy_tasks`` or ``paired_accuracy``); any order.

    Rule (exactly): call a tested sparsity *acceptable* when ``result["ci_high"] >=
    margin``, i.e. the upper end of the CI of the average delta (at the confidence the
    result was computed with, by default 95%) does not lie below ``margin``, so the data
    cannot rule out that the loss is at most ``-margin``; this is a one-sided
    non-inferiority-style check done with the two-sided interval.  The critical
    sparsity is the largest tested ``s`` such that ``s`` *and every tested sparsity
    below it* are acceptable.  The sweep stops at the first unacceptable sparsity even
    if a larger one passes again (non-monotone noise does not extend it).  Returns
    ``None`` when the smallest tested sparsity already fails.

    ``margin`` is in the units of ``delta`` (fractions: -0.01 = one accuracy point).
    Raises ``ValueError`` for no points, a repeated sparsity, or a missing/NaN ``ci_high``.
    """
    pts = [(float(s), r) for s, r in points]
    if not pts:
        raise ValueError("critical_sparsity needs at least one (sparsity, result) point")
    seen = [s for s, _ in pts]
    if len(set(seen)) != len(seen):
        dup = sorted({s for s in seen if seen.count(s) > 1})
        raise ValueError(f"critical_sparsity: sparsity tested more than once: {dup}")
    best: float | None = None
    for s, r in sorted(pts, key=lambda p: p[0]):
        if "ci_high" not in r:
            raise ValueError(f"critical_sparsity: result at sparsity {s} has no 'ci_high'")
        hi = float(r["ci_high"])
        if math.isnan(hi):
            raise ValueError(f"critical_sparsity: result at sparsity {s} has a NaN 'ci_high'")
        if hi < margin:
            break
        best = s
    return best


def format_delta(res: Mapping[str, Any], scale: float = 100, digits: int = 1) -> str:
    """Format a delta with its CI, e.g. ``"-2.4 [-4.1, -0.7]*"``.

    Values are ``delta``, ``ci_low`` and ``ci_high`` times ``scale`` (100: accuracy
    points) with ``digits`` decimals and an ASCII ``-``; no ``+`` on positive values and a
    value that rounds to zero prints without a sign.  The trailing ``*`` is printed
    exactly when ``res["significant"]`` is true: for ``paired_accuracy`` and
    ``paired_accuracy_tasks`` that is the exact McNemar test at ``1 - confidence``
    (``p_mcnemar < 1 - confidence``), not the CI.
    """
    def fmt(x: float) -> str:
        s = f"{float(x) * scale:.{digits}f}"
        return s[1:] if s.startswith("-") and float(s) == 0 else s

    star = "*" if res.get("significant") else ""
    return f"{fmt(res['delta'])} [{fmt(res['ci_low'])}, {fmt(res['ci_high'])}]{star}"
