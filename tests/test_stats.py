"""sparsebench.core.stats against brute force: closed forms and exact bootstrap enumeration."""

import itertools
import json
import math
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import multinomial

from sparsebench.core.stats import (critical_sparsity, format_delta, mcnemar_exact, paired_accuracy,
                               paired_accuracy_tasks, paired_perplexity)

B = 10_000  # resamples used by the functions under test (their default)


# ------------------------------------------------------------------ brute-force helpers
def exact_quantile(values, probs, p):
    """Q(p) = min{x : P(X <= x) >= p} of a discrete distribution."""
    order = np.argsort(values, kind="stable")
    v, cum = np.asarray(values)[order], np.cumsum(np.asarray(probs)[order])
    i = np.searchsorted(cum, p - 1e-12, side="left")
    return float(v[min(i, len(v) - 1)])


def assert_ci_end_matches(estimate, values, probs, q, n_resamples=B, tol=1e-9):
    """The Monte-Carlo percentile at level q lies between the exact quantiles at q -/+ eps.

    With n_resamples draws the order statistics around rank q*B sit at CDF levels within
    a few sqrt(q(1-q)/B) of q; eps = 5 standard errors (+ interpolation slack) makes a
    failure of a correct implementation practically impossible while staying narrow
    enough that a wrong distribution (wrong pairing, wrong weights) is caught.
    """
    eps = 5 * math.sqrt(q * (1 - q) / n_resamples) + 2 / n_resamples
    lo = exact_quantile(values, probs, max(q - eps, 0.0))
    hi = exact_quantile(values, probs, min(q + eps, 1.0))
    assert lo - tol <= estimate <= hi + tol, (estimate, lo, hi, q)


def all_index_tuples(n):
    """All n**n bootstrap index tuples (each with probability n**-n)."""
    return np.array(list(itertools.product(range(n), repeat=n)), dtype=np.int64)


def trinomial_mean_distribution(d):
    """Exact bootstrap distribution of mean(d*) for d in {-1, 0, 1}: enumerate the counts."""
    d = np.asarray(d)
    n = d.size
    p = [np.mean(d == -1), np.mean(d == 0), np.mean(d == 1)]
    cn, cp = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = cn + cp <= n
    cn, cp = cn[keep], cp[keep]
    counts = np.stack([cn, n - cn - cp, cp], axis=1)
    probs = multinomial.pmf(counts, n, p)
    return (cp - cn) / n, probs


def closed_form_mcnemar(n01, n10):
    n = n01 + n10
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(n01, n10) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


def random_pair(rng, n, p_flip=0.4):
    a = rng.integers(0, 2, n)
    b = np.where(rng.random(n) < p_flip, 1 - a, a)
    return a, b


# --------------------------------------------------------------------------- McNemar
def test_mcnemar_matches_closed_form_grid():
    for n01 in range(26):
        for n10 in range(26):
            assert mcnemar_exact(n01, n10) == pytest.approx(closed_form_mcnemar(n01, n10), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("seed", range(8))
def test_paired_accuracy_mcnemar_from_items(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    a, b = random_pair(rng, n, p_flip=rng.random())
    r = paired_accuracy(a, b, n_resamples=200)
    n01 = int(np.sum((a == 0) & (b == 1)))
    n10 = int(np.sum((a == 1) & (b == 0)))
    assert (r["n01"], r["n10"], r["n"]) == (n01, n10, n)
    assert r["p_mcnemar"] == pytest.approx(closed_form_mcnemar(n01, n10), rel=1e-9)
    assert r["acc_a"] == pytest.approx(a.mean()) and r["acc_b"] == pytest.approx(b.mean())
    assert r["delta"] == pytest.approx(b.mean() - a.mean())
    assert r["significant"] == (r["p_mcnemar"] < 0.05)


def test_mcnemar_no_discordant_pairs_is_one():
    assert mcnemar_exact(0, 0) == 1.0
    r = paired_accuracy([1, 0, 1, 1], [1, 0, 1, 1])
    assert r["p_mcnemar"] == 1.0 and not r["significant"]


# ------------------------------------------------------- bootstrap vs exact enumeration
@pytest.mark.parametrize("n,seed", [(n, s) for n in range(2, 7) for s in range(3)])
def test_accuracy_ci_matches_full_enumeration(n, seed):
    rng = np.random.default_rng(100 * n + seed)
    while True:
        a, b = random_pair(rng, n, p_flip=0.5)
        if np.ptp(b - a) > 0:
            break
    d = (b - a).astype(float)
    idx = all_index_tuples(n)
    values = d[idx].mean(axis=1)
    probs = np.full(len(values), 1.0 / len(values))
    r = paired_accuracy(a, b, seed=seed)
    assert_ci_end_matches(r["ci_low"], values, probs, 0.025)
    assert_ci_end_matches(r["ci_high"], values, probs, 0.975)


@pytest.mark.parametrize("n,seed,conf", [(15, 0, 0.95), (40, 1, 0.95), (40, 2, 0.8), (120, 3, 0.95),
                                         (9, 4, 0.9)])
def test_accuracy_ci_matches_trinomial_enumeration(n, seed, conf):
    rng = np.random.default_rng(seed)
    a, b = random_pair(rng, n, p_flip=0.45)
    values, probs = trinomial_mean_distribution(b - a)
    assert probs.sum() == pytest.approx(1.0)
    r = paired_accuracy(a, b, confidence=conf, seed=seed)
    alpha = (1 - conf) / 2
    assert_ci_end_matches(r["ci_low"], values, probs, alpha)
    assert_ci_end_matches(r["ci_high"], values, probs, 1 - alpha)


def test_trinomial_agrees_with_full_enumeration():
    # the two brute forces describe the same distribution
    d = np.array([1, -1, 0, 1, 1])
    idx = all_index_tuples(5)
    full = d[idx].mean(axis=1)
    values, probs = trinomial_mean_distribution(d)
    for q in (0.01, 0.025, 0.3, 0.5, 0.975):
        assert exact_quantile(full, np.full(len(full), 1 / len(full)), q) == pytest.approx(
            exact_quantile(values, probs, q))


@pytest.mark.parametrize("sizes,seed", [((6, 15), 0), ((4, 30, 11), 1), ((25, 25), 2)])
def test_stratified_ci_matches_exact_convolution(sizes, seed):
    rng = np.random.default_rng(seed)
    tasks = {f"task{i}": random_pair(rng, n, p_flip=0.5) for i, n in enumerate(sizes)}
    # strata are resampled independently: the exact distribution of the macro delta is
    # the convolution of the per-task exact distributions, averaged
    values, probs = np.zeros(1), np.ones(1)
    for a, b in tasks.values():
        v, p = trinomial_mean_distribution(b - a)
        values = (values[:, None] + v[None, :]).ravel()
        probs = (probs[:, None] * p[None, :]).ravel()
    values = values / len(sizes)
    r = paired_accuracy_tasks(tasks, seed=seed)
    assert_ci_end_matches(r["ci_low"], values, probs, 0.025)
    assert_ci_end_matches(r["ci_high"], values, probs, 0.975)


@pytest.mark.parametrize("n,seed", [(3, 0), (4, 1), (5, 2), (6, 3), (6, 4)])
def test_perplexity_ci_matches_full_enumeration(n, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 200, n).astype(float)
    nll_a = tokens * rng.uniform(2.0, 3.0, n)
    nll_b = nll_a + tokens * rng.normal(0.05, 0.1, n)
    idx = all_index_tuples(n)
    values = np.exp((nll_b - nll_a)[idx].sum(axis=1) / tokens[idx].sum(axis=1))
    probs = np.full(len(values), 1.0 / len(values))
    r = paired_perplexity(nll_a, nll_b, tokens, seed=seed)
    assert_ci_end_matches(r["ci_low"], values, probs, 0.025)
    assert_ci_end_matches(r["ci_high"], values, probs, 0.975)


# ---------------------------------------------------------------------- perplexity
def test_perplexity_point_estimate_and_ci():
    rng = np.random.default_rng(7)
    n = 50
    tokens = rng.integers(100, 512, n)
    nll_a = tokens * rng.uniform(2.0, 3.0, n)
    nll_b = nll_a * rng.uniform(0.98, 1.06, n)
    r = paired_perplexity(nll_a.tolist(), nll_b.tolist(), tokens.tolist())
    ppl_a = math.exp(nll_a.sum() / tokens.sum())
    ppl_b = math.exp(nll_b.sum() / tokens.sum())
    assert r["ppl_a"] == pytest.approx(ppl_a, rel=1e-12)
    assert r["ppl_b"] == pytest.approx(ppl_b, rel=1e-12)
    assert r["ratio"] == pytest.approx(ppl_b / ppl_a, rel=1e-12)
    assert r["log_ratio"] == pytest.approx(math.log(ppl_b) - math.log(ppl_a), abs=1e-12)
    assert r["ci_low"] <= r["ratio"] <= r["ci_high"]
    assert r["significant"] == (r["ci_low"] > 1 or r["ci_high"] < 1)
    assert (r["n_windows"], r["n_tokens"]) == (n, float(tokens.sum()))


def test_perplexity_identical_inputs():
    r = paired_perplexity([30.0, 41.5, 12.25], [30.0, 41.5, 12.25], [10, 20, 5])
    assert r["ratio"] == 1.0 and r["log_ratio"] == 0.0
    assert (r["ci_low"], r["ci_high"]) == (1.0, 1.0)
    assert not r["significant"]
    assert r["ppl_a"] == r["ppl_b"]


def test_perplexity_single_window_never_significant():
    r = paired_perplexity([30.0], [33.0], [10])
    assert r["ci_low"] == r["ci_high"] == pytest.approx(r["ratio"])
    assert r["ratio"] == pytest.approx(math.exp(0.3))
    assert not r["significant"]


@pytest.mark.parametrize("args,match", [
    (([], [], []), "at least one window"),
    (([1.0, 2.0], [1.0], [1, 1]), "same windows"),
    (([1.0], [1.0], [0]), "positive"),
    (([float("nan")], [1.0], [1]), "non-finite"),
])
def test_perplexity_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        paired_perplexity(*args)


# ---------------------------------------------------------------- accuracy edge cases
def test_accuracy_degenerate_inputs():
    with pytest.raises(ValueError, match="at least one item"):
        paired_accuracy([], [])
    with pytest.raises(ValueError, match="same items"):
        paired_accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="0/1"):
        paired_accuracy([1, 2], [1, 0])
    r = paired_accuracy([1, 1, 0, 0, 1], [1, 1, 0, 0, 1])
    assert (r["delta"], r["ci_low"], r["ci_high"], r["p_mcnemar"]) == (0.0, 0.0, 0.0, 1.0)
    r = paired_accuracy([True], [False])  # one item: no variability, never significant
    assert (r["delta"], r["ci_low"], r["ci_high"], r["significant"]) == (-1.0, -1.0, -1.0, False)
    r = paired_accuracy([0] * 5, [1] * 5)  # constant difference: point CI, McNemar p = 2/32
    assert (r["ci_low"], r["ci_high"]) == (1.0, 1.0)
    assert r["p_mcnemar"] == pytest.approx(0.0625) and not r["significant"]


def test_results_are_plain_json():
    rng = np.random.default_rng(3)
    tasks = {"x": random_pair(rng, 30), "y": random_pair(rng, 12)}
    for r in (paired_accuracy(*tasks["x"], n_resamples=100),
              paired_accuracy_tasks(tasks, n_resamples=100),
              paired_perplexity([3.0, 4.0, 5.0], [3.5, 4.0, 5.5], [2, 2, 3], n_resamples=100)):
        assert json.loads(json.dumps(r, allow_nan=False)) == r


# ------------------------------------------------------------------- task averages
def test_task_average_is_mean_of_task_deltas():
    rng = np.random.default_rng(11)
    tasks = {name: random_pair(rng, n, 0.3) for name, n in [("arc", 37), ("boolq", 80), ("piqa", 5), ("one", 1)]}
    r = paired_accuracy_tasks(tasks, n_resamples=2000)
    per = r["tasks"]
    assert set(per) == set(tasks)
    for name, (a, b) in tasks.items():
        assert per[name] == paired_accuracy(a, b, n_resamples=2000)
    assert r["delta"] == pytest.approx(np.mean([per[k]["delta"] for k in tasks]))
    assert r["acc_a"] == pytest.approx(np.mean([np.mean(a) for a, _ in tasks.values()]))
    assert r["acc_b"] == pytest.approx(np.mean([np.mean(b) for _, b in tasks.values()]))
    assert r["ci_low"] <= r["delta"] <= r["ci_high"]
    n01 = sum(p["n01"] for p in per.values())
    n10 = sum(p["n10"] for p in per.values())
    assert (r["n01"], r["n10"], r["n"], r["n_tasks"]) == (n01, n10, 123, 4)
    assert r["p_mcnemar"] == pytest.approx(closed_form_mcnemar(n01, n10), rel=1e-9)


def test_task_average_equal_sizes_micro_equals_macro():
    rng = np.random.default_rng(12)
    tasks = {f"t{i}": random_pair(rng, 40, 0.3) for i in range(3)}
    r = paired_accuracy_tasks(tasks, n_resamples=500)
    assert r["delta"] == pytest.approx((r["n01"] - r["n10"]) / r["n"])


def test_task_average_all_identical_and_errors():
    r = paired_accuracy_tasks({"a": ([1, 0, 1], [1, 0, 1]), "b": ([0], [0])})
    assert (r["delta"], r["ci_low"], r["ci_high"], r["p_mcnemar"]) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="at least one task"):
        paired_accuracy_tasks({})
    with pytest.raises(ValueError, match="task 'empty'"):
        paired_accuracy_tasks({"ok": ([1], [1]), "empty": ([], [])})


# -------------------------------------------------------------------- determinism
def test_same_seed_same_ci_and_order_invariance():
    rng = np.random.default_rng(5)
    a, b = random_pair(rng, 300)
    assert paired_accuracy(a, b, seed=3) == paired_accuracy(a, b, seed=3)
    tasks = {"z": random_pair(rng, 50), "a": random_pair(rng, 70), "m": random_pair(rng, 20)}
    r1 = paired_accuracy_tasks(tasks, seed=9)
    r2 = paired_accuracy_tasks(dict(reversed(list(tasks.items()))), seed=9)
    assert {k: v for k, v in r1.items() if k != "tasks"} == {k: v for k, v in r2.items() if k != "tasks"}
    tok = rng.integers(50, 100, 40).astype(float)
    na = tok * 2.5
    nb = na + tok * rng.normal(0.0, 0.2, 40)
    p1, p2 = paired_perplexity(na, nb, tok, seed=1), paired_perplexity(na, nb, tok, seed=1)
    assert p1 == p2
    p3 = paired_perplexity(na, nb, tok, seed=2)
    assert (p3["ci_low"], p3["ci_high"]) != (p1["ci_low"], p1["ci_high"])
    assert p3["ratio"] == p1["ratio"]


# -------------------------------------------------------------- critical sparsity
def _res(ci_high):
    return {"delta": ci_high - 0.02, "ci_low": ci_high - 0.04, "ci_high": ci_high, "significant": False}


def test_critical_sparsity_rule():
    m = -0.01
    # all acceptable: the largest tested
    assert critical_sparsity([(0.1, _res(0.01)), (0.3, _res(0.0)), (0.5, _res(-0.005))], m) == 0.5
    # stops at the first failure; given in any order
    pts = [(0.7, _res(-0.05)), (0.1, _res(0.01)), (0.5, _res(-0.02)), (0.3, _res(-0.009))]
    assert critical_sparsity(pts, m) == 0.3
    # non-monotone: 0.5 passes again after 0.3 failed, but does not count
    pts = [(0.1, _res(0.0)), (0.3, _res(-0.02)), (0.5, _res(0.0)), (0.7, _res(0.01))]
    assert critical_sparsity(pts, m) == 0.1
    # the smallest already fails
    assert critical_sparsity([(0.1, _res(-0.011)), (0.2, _res(0.5))], m) is None
    # the boundary counts as acceptable (ci_high >= margin)
    assert critical_sparsity([(0.2, _res(-0.25)), (0.4, _res(-0.26))], margin=-0.25) == 0.2
    # default margin is one accuracy point
    assert critical_sparsity([(0.25, _res(-0.0099)), (0.5, _res(-0.0101))]) == 0.25


def test_critical_sparsity_with_real_results_and_errors():
    rng = np.random.default_rng(21)
    tasks = {"t": random_pair(rng, 200, 0.0)}  # identical systems: CI [0, 0]
    assert critical_sparsity([(0.4, paired_accuracy_tasks(tasks, n_resamples=200))]) == 0.4
    with pytest.raises(ValueError, match="at least one"):
        critical_sparsity([])
    with pytest.raises(ValueError, match="more than once"):
        critical_sparsity([(0.1, _res(0.0)), (0.1, _res(0.0))])
    with pytest.raises(ValueError, match="ci_high"):
        critical_sparsity([(0.1, {"delta": 0.0})])


# ------------------------------------------------------------------- formatting
def test_format_delta():
    r = {"delta": -0.024, "ci_low": -0.041, "ci_high": -0.007, "significant": True}
    assert format_delta(r) == "-2.4 [-4.1, -0.7]*"
    assert format_delta({**r, "significant": False}) == "-2.4 [-4.1, -0.7]"
    assert format_delta({"delta": 0.01234, "ci_low": -0.00004, "ci_high": 0.025, "significant": False},
                        digits=2) == "1.23 [0.00, 2.50]"
    assert format_delta({"delta": -0.0004, "ci_low": -0.001, "ci_high": 0.0, "significant": False}) == "0.0 [-0.1, 0.0]"
    assert format_delta({"delta": 0.5, "ci_low": 0.25, "ci_high": 0.75, "significant": True}, scale=1, digits=2) \
        == "0.50 [0.25, 0.75]*"


def test_format_delta_star_follows_mcnemar():
    r = paired_accuracy([0] * 5, [1] * 5)  # CI [1, 1] but p = 0.0625: no star
    assert format_delta(r) == "100.0 [100.0, 100.0]"
    r = paired_accuracy([0] * 6, [1] * 6)  # p = 2/64 < 0.05: star
    assert format_delta(r) == "100.0 [100.0, 100.0]*"


# ------------------------------------------------------------------------- module
def test_module_is_light():
    code = ("import sys; import sparsebench.core.stats; "
            "assert 'torch' not in sys.modules, 'sparsebench.core.stats imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
