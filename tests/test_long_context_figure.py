"""The long-context figure's and tables' rows: token-budget methods keyed by their budget,
head sparsity (no token budget) labelled by its fraction of heads and placed at the K/V rows
it read, only where that fraction belongs to one context."""
import pytest

from sparsebench.experiments.long_context_figure import _tokens, figure, long_context_rows


def _result(attention: dict, contexts: list[int], metrics: dict, paired: dict) -> dict:
    return {"status": "ok", "model": {"id": "org/tiny"}, "sparsifier": {"name": "none"},
            "config": {"attention": attention}, "metrics": metrics,
            "data": {"passkey": {"contexts": contexts, "paired_vs_dense": paired}}}


def _paired(delta):
    return {"delta": delta, "ci_low": delta, "ci_high": delta, "p_mcnemar": 1.0, "n": 5, "n10": 0, "n01": 0}


def test_budgeted_and_head_rows():
    quest = _result({"name": "quest", "budget": 1024}, [1024, 2048],
                    {"passkey/dense/ctx=1024": 0.8, "passkey/budget=64/ctx=1024": 0.6,
                     "passkey/dense/ctx=2048": 1.0, "passkey/budget=64/ctx=2048": 0.4,
                     "passkey/budget=64/kv_read_fraction": 0.05},
                    {"budget=64/ctx=1024": _paired(-0.2), "budget=64/ctx=2048": _paired(-0.6)})
    heads = _result({"name": "head_sparsity", "heads": 0.25}, [2048],
                    {"passkey/dense/ctx=2048": 1.0, "passkey/method/ctx=2048": 0.8,
                     "passkey/method/kv_read_fraction": 0.75},
                    {"method/ctx=2048": _paired(-0.2)})
    q_rows, h_rows = long_context_rows(quest), long_context_rows(heads)
    assert sorted((x["context"], x["budget_label"]) for x in q_rows) == [(1024, "64"), (2048, "64")]
    assert all(_tokens(x) == 64 for x in q_rows)
    (h,) = h_rows
    # the heads setting is the x axis, not part of the method's name
    assert (h["method"], h["budget"], h["budget_label"]) == ("head_sparsity", None, "0.25 of heads")
    assert _tokens(h) == pytest.approx(0.75 * 2048)
    # a fraction pooled over several contexts gives no per-context position
    assert _tokens(h | {"kv_read_of_context": False}) is None
    # a run over several contexts that records the fraction per context places each
    heads2 = _result({"name": "head_sparsity", "heads": 0.5}, [1024, 2048],
                     {"passkey/dense/ctx=1024": 1.0, "passkey/method/ctx=1024": 1.0,
                      "passkey/method/ctx=1024/kv_read_fraction": 0.5, "passkey/dense/ctx=2048": 1.0,
                      "passkey/method/ctx=2048": 1.0, "passkey/method/ctx=2048/kv_read_fraction": 0.25,
                      "passkey/method/kv_read_fraction": 0.3},
                     {"method/ctx=1024": _paired(0.0), "method/ctx=2048": _paired(0.0)})
    assert sorted(_tokens(x) for x in long_context_rows(heads2)) == [512.0, 512.0]
    fig, plotted = figure([quest, heads])
    assert sorted((x["method"], x["context"], x["tokens"]) for x in plotted if x["kind"] == "passkey") == \
        [("head_sparsity", 2048, pytest.approx(1536.0)), ("quest", 1024, 64.0), ("quest", 2048, 64.0)]
