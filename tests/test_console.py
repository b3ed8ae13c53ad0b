"""What a run prints: the headline first, library chatter in a log file, per-layer tables only
where they help, sweep points named by what varies."""
import itertools
import json
import logging
import warnings

import pytest

from sparsebench.reporting.results import AUTO_PER_LAYER_MAX, headline, per_layer_table, point_label, varying_settings
from test_cli import TINY, sparsebench


def test_varying_settings_against_enumeration():
    """Every grid of overrides: exactly the keys with more than one value are named."""
    grid = {"model": ["a", "b"], "sparsifier": ["none", "cats"], "sparsifier.sparsity": ["0.3"],
            "evaluator": ["[perplexity,sparsity]", "perplexity"]}
    for keys in itertools.combinations(grid, 3):
        names = [",".join(f"{k}={v}" for k, v in zip(keys, values))
                 for values in itertools.product(*(grid[k] for k in keys))]
        expected = [k for k in keys if len(grid[k]) > 1]
        assert varying_settings(names) == expected
        for n in names:
            label = point_label(n, expected)
            assert all(f"{k.rsplit('.', 1)[-1]}=" in label for k in expected)
            assert "[perplexity" not in label or "evaluator=[perplexity,sparsity]" in label  # list values intact


def test_point_label_leaves_out_an_ignored_sparsity():
    names = ["sparsifier.sparsity=0.3,sparsifier=none", "sparsifier.sparsity=0.5,sparsifier=cats"]
    keys = varying_settings(names)
    assert point_label(names[0], keys, "none") == "sparsifier=none"
    assert point_label(names[1], keys, "cats") == "sparsity=0.5 sparsifier=cats"


def _results(n_layers, group=None, setting="auto"):
    return {"run": {"group": group, "wall_time_s": 75.0}, "model": {"id": "m"}, "backend": "dense",
            "sparsifier": {"name": "cats", "sparsity": 0.5}, "config": {"print_per_layer": setting},
            "metrics": {"sparsity/mean": 0.49, "perplexity": 11.0, "lm_eval/avg_acc": 0.4},
            "dense_metrics": {"perplexity": 10.0, "lm_eval/avg_acc": 0.42},
            "paired": {"perplexity": {"ppl_a": 10.0, "ppl_b": 11.0, "ratio": 1.1, "ci_low": 1.05, "ci_high": 1.15,
                                      "significant": True},
                       "lm_eval/avg_acc": {"acc_a": 0.42, "acc_b": 0.40, "delta": -0.02, "ci_low": -0.05,
                                           "ci_high": 0.01, "significant": False, "n": 1000, "n_tasks": 5}},
            "per_layer": [{"layer": i, "sparsity": 0.5} for i in range(n_layers)]}


def test_headline_leads_with_sparsity_perplexity_and_accuracy_with_cis():
    lines = headline(_results(2))
    assert "1 min 15 s" in lines[0]
    assert "0.490 (requested 0.5)" in lines[1]
    assert "10.00 → 11.00" in lines[2] and "×1.100 [1.050, 1.150]" in lines[2] and "  significant" in lines[2]
    assert "-2.0 points [-5.0, +1.0]" in lines[3] and "not significant" in lines[3] and "1000 items, 5 tasks" in lines[3]


@pytest.mark.parametrize("n_layers,group,setting,shown", [
    (2, None, "auto", True), (AUTO_PER_LAYER_MAX + 1, None, "auto", False), (2, "sweep", "auto", False),
    (30, "sweep", True, True)])
def test_per_layer_table_only_where_it_helps(n_layers, group, setting, shown):
    assert (per_layer_table(_results(n_layers, group, setting)) is not None) == shown


def test_library_messages_go_to_the_run_log_not_the_console(tmp_path, capsys):
    from sparsebench.cli import route_library_output

    path = route_library_output(tmp_path)
    logging.getLogger("lm_eval.models.huggingface").warning("`pretrained` model kwarg is not of type `str`")
    logging.getLogger("transformers.modeling_utils").warning("a transformers note")
    warnings.warn("a python warning", UserWarning)
    for h in logging.getLogger("lm_eval").handlers:
        h.flush()
    out = capsys.readouterr()
    text = path.read_text()
    assert "pretrained" in text and "a python warning" in text
    assert "pretrained" not in out.err + out.out and "a python warning" not in out.err + out.out
    logging.captureWarnings(False)


def test_single_run_console_leads_with_the_headline(tmp_path):
    proc = sparsebench(["evaluator=[sparsity,perplexity]", *TINY, "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("[sparsebench] library messages") and (tmp_path / "run" / "libraries.log").exists()
    assert lines[1].startswith("tiny-llama · cats@0.5 · backend=dense")
    assert lines[2].lstrip().startswith("sparsity reached") and "→" in lines[3]
    assert "per layer" in proc.stdout  # two layers, a single run: shown
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["status"] == "ok"
