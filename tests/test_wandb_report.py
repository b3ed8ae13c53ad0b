"""W&B report spec / rendering / publishing, on hand-made results.json files (no network)."""
import json
import shlex

import pytest

from sparsebench.reporting import wandb_report
from sparsebench.reporting.results import load_results


def _write_run(root, group, name, sparsifier, sparsity, metrics, per_layer, mode="offline", offline_runs=1):
    out = root / (group or "nogroup") / name
    out.mkdir(parents=True)
    for i in range(offline_runs):
        (out / "wandb" / f"offline-run-20260101_00000{i}-abc{name}{i}").mkdir(parents=True)
    r = {"run": {"name": name, "group": group, "output_dir": str(out)},
         "model": {"id": "tiny/llama"},
         "sparsifier": {"name": sparsifier, "sparsity": sparsity},
         "metrics": metrics, "dense_metrics": None, "per_layer": per_layer,
         "config": {"logger": {"mode": mode, "project": "sb-proj", "entity": "sb-team"}}}
    (out / "results.json").write_text(json.dumps(r))
    return out


@pytest.fixture
def sweep(tmp_path):
    """Two groups: g-quality (ppl + acc, two sparsifiers, per-layer cols) and g-speed (decode only)."""
    layers = [{"layer": i, "sparsity": 0.5, "mask_quality/recall": 0.9, "note": "x"} for i in range(2)]
    _write_run(tmp_path, "g-quality", "sp=0.5,s=cats", "cats", 0.5,
               {"perplexity": 12.0, "sparsity/mean": 0.5, "lm_eval/avg_acc": 0.4}, layers, offline_runs=2)
    _write_run(tmp_path, "g-quality", "sp=0.7,s=teal", "teal", 0.7,
               {"perplexity": 14.0, "sparsity/mean": 0.7}, [{"layer": 0, "sparsity": 0.7}])
    _write_run(tmp_path, "g-speed", "s=relu", "relu", None, {"decode/tokens_per_s": 50.0}, [])
    return tmp_path


def _panels(section, kind):
    return [p for p in section["panels"] if p["kind"] == kind]


def test_spec_lists_only_present_metrics_and_columns(sweep):
    spec = wandb_report.build_report(load_results([sweep]), group="g-quality")
    assert spec["project"] == "sb-proj" and spec["entity"] == "sb-team"
    assert spec["title"] == "sparsebench: g-quality"
    (sec,) = spec["sections"]
    scatter = _panels(sec, "scatter")
    assert [p["y"] for p in scatter] == ["sparse/perplexity", "sparse/lm_eval/avg_acc", "sparse/sparsity/mean"]
    assert all(p["x"] == "config.sparsifier.sparsity" and p["group_by"] == "job_type" for p in scatter)
    # non-numeric per-layer columns are never logged, so they get no panel
    assert [p["y"] for p in _panels(sec, "line")] == [["per_layer/mask_quality/recall"], ["per_layer/sparsity"]]
    assert all(p["x"] == "layer" for p in _panels(sec, "line"))
    assert sec["filter"]["group"] == "g-quality"
    assert sec["filter"]["runs"] == ["sp=0.5,s=cats", "sp=0.7,s=teal"]
    assert sec["sparsifiers"] == ["cats", "teal"]
    (table,) = _panels(sec, "runs_table")
    assert [row[0] for row in table["rows"]] == sec["filter"]["runs"]
    json.dumps(spec)  # plain data only


def test_groups_are_separate_sections_and_deterministic(sweep):
    results = load_results([sweep])
    spec = wandb_report.build_report(results)
    assert [s["group"] for s in spec["sections"]] == ["g-quality", "g-speed"]
    speed = spec["sections"][1]
    assert [p["y"] for p in _panels(speed, "scatter")] == ["sparse/decode/tokens_per_s"]
    assert _panels(speed, "line") == [] and speed["filter"]["runs"] == ["s=relu"]
    assert wandb_report.build_report(list(reversed(results))) == spec
    with pytest.raises(ValueError, match="no results in group"):
        wandb_report.build_report(results, group="missing")


def test_to_wandb_report_builds_panels_without_network(sweep):
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    spec = wandb_report.build_report(load_results([sweep]))
    report = wandb_report.to_wandb_report(spec)
    assert isinstance(report, wr.Report) and report.project == "sb-proj" and report.entity == "sb-team"
    h1s = [b for b in report.blocks if isinstance(b, wr.H1)]
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert len(h1s) == len(grids) == 2
    quality = grids[0]
    assert {rs.name for rs in quality.runsets} == {"cats", "teal"}
    for rs in quality.runsets:  # the string must parse back to group AND job type
        tree = expr.expr_to_filters(rs.filters)
        assert {(f.key.name, f.value) for f in tree.filters} == {("group", "g-quality"), ("jobType", rs.name)}
    scatter_y = [p.y.name for p in quality.panels if isinstance(p, wr.ScatterPlot)]
    assert scatter_y == ["sparse/perplexity", "sparse/lm_eval/avg_acc", "sparse/sparsity/mean"]
    assert all(p.x.name == "sparsifier.sparsity" for p in quality.panels if isinstance(p, wr.ScatterPlot))
    lines = [p for p in quality.panels if isinstance(p, wr.LinePlot)]
    assert [p.y for p in lines] == [["per_layer/mask_quality/recall"], ["per_layer/sparsity"]]
    assert all(p.x == "layer" for p in lines)
    assert any(isinstance(p, wr.RunComparer) for p in quality.panels)
    with pytest.raises(ValueError):
        wandb_report.to_wandb_report(spec | {"entity": None})


def test_ungrouped_runs_filter_by_quoted_names(tmp_path):
    from wandb_workspaces import expr

    _write_run(tmp_path, None, "s=cats,tag='a'", "cats", 0.5, {"perplexity": 1.0}, [])
    _write_run(tmp_path, None, "s=teal", "teal", 0.5, {"perplexity": 1.0}, [])
    spec = wandb_report.build_report(load_results([tmp_path]))
    (sec,) = spec["sections"]
    assert sec["group"] is None and sec["title"] == "sparsebench: ungrouped"
    runsets = wandb_report.to_wandb_report(spec).blocks[1].runsets
    for rs in runsets:
        expr.expr_to_filters(rs.filters)  # the display string stays parseable despite the quote
        # Runset._to_model sends this stash when the string is unchanged; the library's own
        # string parse would turn "s=cats" into "s==cats", so the names must be exact here.
        v2 = {f["key"]["name"]: f["value"] for f in rs._stashed_filters_v2["filters"]}
        assert v2 == {"displayName": sec["filter"]["runs"], "jobType": rs.name}
        assert rs._stashed_filter_string == rs.filters


def test_offline_publish_writes_spec_and_sync_command(sweep, tmp_path, capsys):
    results = load_results([sweep])
    out = wandb_report.publish(results, tmp_path / "report", mode="offline")
    assert out["url"] is None
    assert json.loads((tmp_path / "report" / wandb_report.SPEC_FILE).read_text()) == wandb_report.build_report(results)
    sync, follow_up = out["sync_command"].split(" && ")
    args = shlex.split(sync)
    assert args[:2] == ["wandb", "sync"] and args[args.index("--project") + 1] == "sb-proj"
    expected = sorted(str(p) for p in sweep.rglob("offline-run-*"))
    assert len(expected) == 4 and [a for a in args if "offline-run-" in a] == expected
    assert follow_up.startswith("sparsebench-report") and "--wandb online" in follow_up
    assert out["sync_command"] in capsys.readouterr().out


def test_publish_group_only_syncs_that_group(sweep, tmp_path):
    out = wandb_report.publish(load_results([sweep]), tmp_path, mode="offline", group="g-speed")
    args = shlex.split(out["sync_command"].split(" && ")[0])
    assert [a for a in args if "offline-run-" in a] == [str(p) for p in (sweep / "g-speed").rglob("offline-run-*")]
    assert "--group g-speed" in out["sync_command"]


def test_no_offline_dirs_is_reported_not_an_error(sweep, tmp_path):
    for d in sorted(sweep.rglob("offline-run-*"), reverse=True):
        d.rmdir()
    out = wandb_report.publish(load_results([sweep]), tmp_path, mode="disabled")
    assert out["sync_command"] is None and "no offline W&B run dirs" in out["note"]
    assert (tmp_path / wandb_report.SPEC_FILE).exists()


def test_moved_results_use_results_json_folder(sweep, tmp_path):
    results = load_results([sweep])
    for r in results:
        r["run"]["output_dir"] = str(tmp_path / "gone")
    assert len(wandb_report.offline_run_dirs(results)) == 4


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No API key anywhere, W&B offline, and .save() would fail loudly if reached."""
    import wandb_workspaces.reports.v2 as wr

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(wr.Report, "save", lambda self, *a, **k: calls.append(self) or 1 / 0)
    return calls


def test_online_without_key_falls_back_to_offline(sweep, tmp_path, no_network):
    results = load_results([sweep])
    out = wandb_report.publish(results, tmp_path / "rep")  # mode taken from the runs' logger config
    assert out["mode"] == "offline"
    out = wandb_report.publish(results, tmp_path / "rep", mode="online")
    assert out["url"] is None and out["sync_command"] and no_network == []


def test_online_save_failure_falls_back_with_warning(sweep, tmp_path, no_network, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    out = wandb_report.publish(load_results([sweep]), tmp_path, mode="online")
    assert len(no_network) == 1  # tried once (stubbed), then fell back
    assert out["url"] is None and out["sync_command"]
    assert "falling back" in caplog.text


def test_online_success_returns_url(sweep, tmp_path, no_network, monkeypatch):
    import wandb_workspaces.reports.v2 as wr

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(wr.Report, "save", lambda self, *a, **k: self)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: f"https://wandb.test/{self.entity}/{self.project}"))
    out = wandb_report.publish(load_results([sweep]), tmp_path, mode="online")
    assert out["url"] == "https://wandb.test/sb-team/sb-proj" and out["sync_command"] is None


def test_run_summary_carries_paired_stats_and_code(monkeypatch, tmp_path):
    """log_run writes Δ / CI / p of every paired metric and the code version to the summary."""
    import sys
    import types

    from omegaconf import OmegaConf

    from sparsebench.reporting.wandb_logger import log_run

    summary = {}

    class FakeRun:
        dir = str(tmp_path)

        def __init__(self):
            self.summary = types.SimpleNamespace(update=summary.update)

        def finish(self):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: FakeRun()))
    res = {"delta": -0.02, "ci_low": -0.04, "ci_high": 0.0, "p_mcnemar": 0.03, "significant": True}
    results = {"config": {}, "sparsifier": {"name": "cats"}, "metrics": {"lm_eval/avg_acc": 0.5},
               "dense_metrics": {"lm_eval/avg_acc": 0.52}, "paired": {"lm_eval/avg_acc": res},
               "code": {"git_commit": "abc", "git_dirty": False, "files": {"x.py": "0"}}}
    assert log_run(OmegaConf.create({"mode": "offline", "project": "p"}), results, tmp_path, None, "n") == str(tmp_path)
    assert {f"paired/lm_eval/avg_acc/{k}": v for k, v in res.items()}.items() <= summary.items()
    assert summary["code/git_commit"] == "abc" and "code/files" not in summary
