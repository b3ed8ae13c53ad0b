"""Experiments compose; figures, tables and reports are drawn from fixture results.json files."""
import csv
import json
import math

import pytest
from hydra import compose, initialize_config_module

from sparsebench.cli import config_groups
from sparsebench.experiments import plot, report
from sparsebench.experiments.figures import FIGURES, figures_for
from sparsebench.run import build_components

EXPERIMENTS = config_groups()["experiment"]


def _compose(overrides):
    with initialize_config_module(config_module="sparsebench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_with_a_fixed_sweep_folder(name):
    cfg = _compose([f"experiment={name}"])
    assert cfg.hydra.sweep.dir == f"multirun/{name}"  # the same command finds its finished points
    assert set(cfg.figures) <= set(FIGURES)
    params = dict(cfg.hydra.sweeper.params or {})
    groups = config_groups()
    first = []
    for key, values in params.items():
        options = [v.strip() for v in str(values).split(",")]
        if key in groups:
            assert set(options) <= set(groups[key]), (key, options)
        first.append(f"{key}={options[0]}")
    # the first point of the sweep builds (no model is loaded)
    sp, backend, evs = build_components(_compose([f"experiment={name}", *first]))
    assert sp.name and backend.name and evs


def test_every_figure_has_an_experiment():
    named = {f for e in EXPERIMENTS for f in _compose([f"experiment={e}"]).figures}
    assert named == set(FIGURES)


# ------------------------------------------------------------------ fixture results

def fake(tmp, name, model, method, sparsity=None, metrics=None, dense=None, per_layer=None, config=None, hidden=64):
    d = tmp / name
    d.mkdir(parents=True)
    r = {"status": "ok", "run": {"name": name, "group": "g", "wall_time_s": 1.0, "output_dir": str(d)},
         "model": {"id": f"/cache/models/{model}", "hidden_size": hidden, "intermediate_size": 4 * hidden},
         "sparsifier": {"name": method, "sparsity": sparsity, **(config or {})}, "backend": "dense",
         "metrics": metrics or {}, "dense_metrics": dense, "per_layer": per_layer or [],
         "config": {"sparsifier": {"name": method, "sparsity": sparsity, **(config or {})},
                    "evaluator": {"lm_eval": {"limit": 50}}, "logger": {"mode": "disabled"}}}
    (d / "results.json").write_text(json.dumps(r))
    return r


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def sweep(tmp_path):
    """Method × sparsity runs for two models with known numbers, dense as a ``none`` run
    for one model and as carried dense baselines for the other."""
    acc = {}
    for model, dense_acc in (("m-a", 0.6), ("m-b", 0.5)):
        if model == "m-a":
            fake(tmp_path, f"{model}-none", model, "none", None, {"lm_eval/avg_acc": dense_acc, "perplexity": 10.0})
        for method, slope in (("cats", 0.2), ("cett", 0.1)):
            for s in (0.25, 0.5):
                a, ppl = dense_acc - slope * s, 10.0 * math.exp(8 * slope * s)
                acc[(model, method, s)] = (a, ppl)
                fake(tmp_path, f"{model}-{method}-{s}", model, method, s,
                     {"lm_eval/avg_acc": a, "perplexity": ppl, "sparsity/mean": s + 0.004},
                     dense={"lm_eval/avg_acc": dense_acc, "perplexity": 10.0} if model == "m-b" else None)
    return tmp_path, acc


def test_accuracy_and_perplexity_figures_carry_exactly_the_runs(sweep, tmp_path):
    root, acc = sweep
    out = tmp_path / "figs"
    written = plot.draw_dirs([str(root), "--out", str(out)])
    assert set(written) == {"accuracy_vs_sparsity", "perplexity_vs_sparsity"}  # inferred from the metrics
    for name in written:
        for ext in ("png", "pdf", "csv"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
    rows = _rows(out / "accuracy_vs_sparsity.csv")
    got = {(r["model"], r["method"], float(r["requested_sparsity"])): float(r["value"]) for r in rows}
    assert got == pytest.approx({k: v[0] for k, v in acc.items()})
    dense = {r["model"]: float(r["dense"]) for r in rows}
    assert dense == {"m-a": 0.6, "m-b": 0.5}  # from the none run, and from the carried baseline
    ppl = {(r["model"], r["method"], float(r["requested_sparsity"])): float(r["value"])
           for r in _rows(out / "perplexity_vs_sparsity.csv") if r["metric"] == "perplexity"}
    assert ppl == pytest.approx({k: v[1] for k, v in acc.items()})


def test_plot_draws_only_the_requested_figure_and_refuses_empty_input(sweep, tmp_path):
    root, _ = sweep
    written = plot.draw_dirs([str(root), "--figure", "perplexity_vs_sparsity", "--out", str(tmp_path / "o")])
    assert list(written) == ["perplexity_vs_sparsity"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        plot.draw_dirs([str(tmp_path / "empty")])


def test_figures_named_by_the_experiment_win_over_inference(tmp_path):
    r = fake(tmp_path, "a", "m", "cats", 0.5, {"perplexity": 3.0, "lm_eval/avg_acc": 0.5})
    r2 = dict(r, config=dict(r["config"], figures=["perplexity_vs_sparsity"]))
    assert figures_for([r2]) == ["perplexity_vs_sparsity"]


def test_cett_layer_sparsity_figure(tmp_path):
    per = {"m-a": [0.1, 0.5, 0.7], "m-b": [0.3, 0.2, 0.6, 0.9]}
    for model, sp in per.items():
        fake(tmp_path, model, model, "cett", None, {"sparsity/mean": sum(sp) / len(sp), "perplexity": 5.0},
             per_layer=[{"layer": i, "sparsity": s} for i, s in enumerate(sp)], config={"budget": 0.2})
    written = plot.draw_dirs([str(tmp_path), "--out", str(tmp_path / "f")])
    assert list(written) == ["cett_layer_sparsity"]
    rows = _rows(tmp_path / "f" / "cett_layer_sparsity.csv")
    for model, sp in per.items():
        mine = [r for r in rows if r["model"] == model]
        assert [float(r["sparsity"]) for r in mine] == sp
        assert float(mine[-1]["relative_depth"]) == 1.0 and float(mine[0]["relative_depth"]) == 0.0


def _cache_metrics(swaps, active, naive, cached):
    m = {"cache/select_speedup": naive / cached, "cache/naive_select_ms": naive, "cache/cached_select_ms": cached,
         "cache/swaps_per_update": swaps, "cache/churn": swaps / active, "cache/density": 0.5,
         "cache/copy_bound_limit": active / swaps, "cache/threads": 2, "cache/mlp_speedup_cached": 1.5,
         "cache/mlp_speedup_index_select": 1.2}
    for c in (0.1, 0.5):
        m |= {f"cache/grid/churn={c:g}/swaps_per_update": c * active, f"cache/grid/churn={c:g}/select_speedup": 1 / c,
              f"cache/grid/churn={c:g}/mlp_speedup_cached": 2 - c, f"cache/grid/churn={c:g}/mlp_speedup_index_select": 1.1}
    return m


def test_cache_figures(tmp_path):
    fake(tmp_path, "a", "m", "cats", 0.5, _cache_metrics(300, 768, 0.9, 0.45))
    fake(tmp_path, "b", "m", "teal", 0.5, _cache_metrics(400, 768, 0.9, 0.6))
    written = plot.draw_dirs([str(tmp_path), "--out", str(tmp_path / "f")])
    assert set(written) == {"speedup_vs_swaps", "cached_vs_index_select"}
    bars = {r["method"]: float(r["speedup"]) for r in _rows(tmp_path / "f" / "cached_vs_index_select.csv")}
    assert bars == pytest.approx({"cats": 2.0, "teal": 1.5})
    rows = _rows(tmp_path / "f" / "speedup_vs_swaps.csv")
    assert sorted(float(r["swaps_per_update"]) for r in rows if r["kind"] == "measured") == [300, 400]
    assert sorted(float(r["churn"]) for r in rows if r["kind"] == "synthetic") == [0.1, 0.5]


def test_dejavu_rank_figure(tmp_path):
    for rank in (0.05, 0.2):
        fake(tmp_path, f"r{rank}", "m", "dejavu", 0.5, {"mask_quality/recall": rank, "perplexity": 9.0},
             per_layer=[{"layer": i, "recall": rank + 0.1 * i, "precision": 0.5, "sparsity": 0.5 - 0.1 * i}
                        for i in range(3)], config={"rank": rank}, hidden=100)
    written = plot.draw_dirs([str(tmp_path), "--out", str(tmp_path / "f")])
    assert list(written) == ["dejavu_rank"]
    rows = _rows(tmp_path / "f" / "dejavu_rank.csv")
    assert sorted({int(r["rank"]) for r in rows}) == [5, 20]
    assert [float(r["recall"]) for r in rows if r["rank"] == "20"] == pytest.approx([0.2, 0.3, 0.4])


def test_report_has_figures_tables_and_failed_points(sweep, tmp_path):
    root, acc = sweep
    (root / "broken").mkdir()
    (root / "broken" / "failed.json").write_text(json.dumps({"overrides": "sparsifier=wina", "error": "E: boom"}))
    out = tmp_path / "rep"
    written = report.report([str(root), "--out", str(out), "--wandb", "offline"])
    md = (out / "report.md").read_text()
    assert "![accuracy_vs_sparsity](figures/accuracy_vs_sparsity.png)" in md
    table = md.split("## Method × sparsity")[1].split("\n## ")[0]
    assert table.count("| m-a | cats |") == 2 and table.count("| m-a | none |") == 1
    assert "sparsifier=wina" in md and "E: boom" in md
    html = (out / "report.html").read_text()
    assert "<table>" in html and 'src="figures/accuracy_vs_sparsity.png"' in html
    assert json.loads((out / "wandb_report_spec.json").read_text())["sections"]
    assert written["wandb"]["sync_command"] is None  # these fixture runs had W&B disabled


TINY_RUN = ["model=tiny-llama", "data=tiny", "logger.mode=disabled"]


@pytest.mark.parametrize("experiment,overrides,figure", [
    ("fig1_cett_layer_sparsity", [], "cett_layer_sparsity"),
    ("fig2_3_cache_speedup", ["sparsifier=cats,teal", "evaluator.cache_speedup.new_tokens=6",
                              "evaluator.cache_speedup.prompt_tokens=8", "evaluator.cache_speedup.grid_steps=5",
                              "evaluator.cache_speedup.churns=[0.1,1.0]", "evaluator.cache_speedup.threads=1"],
     "speedup_vs_swaps"),
    ("fig5_perplexity_vs_sparsity", ["sparsifier=cats", "sparsifier.sparsity=0.3,0.6"], "perplexity_vs_sparsity"),
    ("fig6_dejavu_rank", ["sparsifier.rank=0.1,0.5", "sparsifier.steps=10"], "dejavu_rank"),
])
def test_figure_experiment_runs_and_plots_end_to_end(tmp_path, experiment, overrides, figure):
    """The figure's own command on a tiny model (command-line values replace its sweep lists),
    then sparsebench-plot on the sweep folder it wrote."""
    from test_cli import sparsebench

    sweep = tmp_path / "sweep"
    proc = sparsebench(["-m", f"experiment={experiment}", *overrides, *TINY_RUN, f"hydra.sweep.dir={sweep}"],
                       tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = plot.draw_dirs([str(sweep)])
    assert figure in written and (sweep / "figures" / f"{figure}.png").stat().st_size > 0


def test_grid_table_places_each_run_in_its_cell_and_flags_missed_sparsity():
    from sparsebench.experiments.tables import grid_markdown

    def row(model, method, s, measured, ppl, acc):
        return {"model": model, "method": method, "sparsity": s, "measured": measured, "perplexity": ppl, "avg_acc": acc}

    rows = [row("m", "none", 0.0, 0.0, 10.0, 0.5), row("m", "a", 0.5, 0.51, 12.345, 0.4),
            row("m", "a", 0.25, 0.20, 11.0, None), row("m", "b", 0.5, 0.5, None, 0.3)]
    lines = grid_markdown(rows).splitlines()
    assert lines[0] == "| m (dense 10.00 / 0.500) | 0.25 | 0.5 |"
    assert lines[2] == "| a | 11.00 / — (measured 0.200) | 12.35 / 0.400 |"
    assert lines[3] == "| b | — | — / 0.300 |"


def test_accuracy_figure_draws_the_paired_ci_and_marks_significance(tmp_path):
    from sparsebench.core.stats import paired_accuracy_tasks

    import random

    rng = random.Random(0)
    for s, drop in ((0.25, 0.0), (0.5, 0.3)):
        a = [int(rng.random() < 0.6) for _ in range(80)]
        b = [x if rng.random() > drop else 0 for x in a]
        res = paired_accuracy_tasks({"arc_easy": (a, b)})
        res.pop("tasks")
        r = fake(tmp_path, f"cats-{s}", "m", "cats", s, {"lm_eval/avg_acc": res["acc_b"]},
                 dense={"lm_eval/avg_acc": res["acc_a"]})
        r["paired"] = {"lm_eval/avg_acc": res}
        (tmp_path / f"cats-{s}" / "results.json").write_text(json.dumps(r))
    rows = {float(x["requested_sparsity"]): x for x in _rows_of(tmp_path)}
    assert rows[0.25]["significant"] == "False" and float(rows[0.25]["delta"]) == 0.0
    assert rows[0.5]["significant"] == "True" and float(rows[0.5]["delta_ci_high"]) < 0


def _rows_of(root):
    plot.draw_dirs([str(root), "--figure", "accuracy_vs_sparsity", "--out", str(root / "f")])
    return _rows(root / "f" / "accuracy_vs_sparsity.csv")
