"""The `sparsebench` command end to end, in subprocesses, on tiny offline models."""
import json
import os
import subprocess
import sys

import pytest

TINY = ["model=tiny-llama", "data=tiny", "logger.mode=disabled"]


def sparsebench(args, tmp_path, env=None):
    cmd = [sys.executable, "-c", "from sparsebench.cli import main; main()", *args]
    full_env = {**os.environ, "SPARSEBENCH_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=1200)


def test_multirun_sweep_writes_one_result_per_point(tmp_path):
    sweep = tmp_path / "sweep"
    proc = sparsebench(["-m", "sparsifier=none,cats", "sparsifier.sparsity=0.3,0.6",
                        "evaluator=[sparsity,perplexity]", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(sweep.glob("*/results.json"))
    assert len(files) == 3  # sparsifier=none ignores the sparsity: its second point is not run
    assert "not run, sparsifier=none ignores its sparsity" in proc.stdout
    results = [json.loads(f.read_text()) for f in files]
    by_point = {(r["sparsifier"]["name"], r["config"]["sparsifier"]["sparsity"]): r for r in results}
    assert set(by_point) == {("none", 0.3), ("cats", 0.3), ("cats", 0.6)}
    for (name, s), r in by_point.items():
        measured = r["metrics"]["sparsity/mean"]
        assert measured == (pytest.approx(s, abs=0.1) if name == "cats" else 0.0)
        assert r["dense_metrics"] is None if name == "none" else r["dense_metrics"]["sparsity/mean"] == 0.0
        assert len(r["per_layer"]) == 2 and r["versions"]["torch"] and r["machine"]["cpu_count"]
        assert r["run"]["wall_time_s"] > 0 and r["run"]["group"]
    # the second CATS point reused nothing but the model; calibration keyed by sparsity
    assert by_point[("cats", 0.3)]["sparsifier"]["calibration_file"] != by_point[("cats", 0.6)]["sparsifier"]["calibration_file"]
    assert "sweep" in proc.stdout and "perplexity" in proc.stdout  # combined table


def test_single_run_and_calibration_cache(tmp_path):
    args = ["evaluator=sparsity", *TINY, "hydra.run.dir=run1"]
    first = sparsebench(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    r1 = json.loads((tmp_path / "run1" / "results.json").read_text())
    assert r1["sparsifier"]["calibration"] == "computed"
    second = sparsebench(["evaluator=sparsity", *TINY, "hydra.run.dir=run2"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    r2 = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert r2["sparsifier"]["calibration"] == "cached"
    assert r1["metrics"] == r2["metrics"]


@pytest.mark.parametrize("args,needle", [
    (["sparsifier=catz"], "choose one of: cats, cett, chess, countdown, dejavu, dejavu_target, larosa, none, relu, rsparse, scap, stat_topk, svd_predictor, teal, wina"),
    (["-m", "sparsifier=cats,catz"], "choose one of: cats, cett, chess, countdown, dejavu, dejavu_target, larosa, none, relu, rsparse, scap, stat_topk, svd_predictor, teal, wina"),
    (["sparsifier.sparsity=1.5"], "sparsifier.sparsity=1.5"),
    (["model=local"], "model.path="),
    (["model=local", "model.path=/does/not/exist"], "does not exist"),
    (["evaluator=[sparsity,bogus]"], "unknown evaluator 'bogus'"),
])
def test_bad_overrides_fail_in_one_line_without_results(tmp_path, args, needle):
    base = [a for a in TINY if not a.startswith("model=")] if any(a.startswith("model=") for a in args) else TINY
    proc = sparsebench([*args, *base, "hydra.run.dir=out", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sparsebench: error:") and needle in lines[0]
    assert not list(tmp_path.rglob("results.json"))


def test_unsupported_local_architecture_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    proc = sparsebench(["model=local", f"model.path={tmp_path / 'gpt2'}", "data=tiny", "logger.mode=disabled",
                        "hydra.run.dir=out"], tmp_path)
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "architecture 'gpt2' is not supported" in lines[0] and "llama" in lines[0]
    assert not list(tmp_path.rglob("results.json"))


def test_every_sparsifier_runs_in_the_comparison_sweep(tmp_path):
    """The issue's comparison command, on a tiny model: every method × two sparsities."""
    sweep = tmp_path / "sweep"
    proc = sparsebench(["-m", "experiment=sparsifier_comparison", "sparsifier.sparsity=0.25,0.5",
                        "evaluator=[sparsity,perplexity]", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(f.read_text()) for f in sweep.glob("*/results.json")]
    names = {"cats", "cett", "teal", "wina", "rsparse", "stat_topk", "chess", "dejavu"}
    assert {(r["sparsifier"]["name"], r["sparsifier"]["sparsity"]) for r in results} == {(n, s) for n in names for s in (0.25, 0.5)}
    for r in results:
        m = r["metrics"]
        assert m["perplexity"] > 1 and m["sparsity/tokens"] > 0
        # held-out text differs from calibration text, and the model has 2 layers of width
        # 128: loose bound here; the real-model numbers are in docs/results.md
        assert m["sparsity/mean"] == pytest.approx(r["sparsifier"]["sparsity"], abs=0.12), r["sparsifier"]
        unit = r["sparsifier"]["sparsity_unit"]
        assert unit == ("linear_inputs" if r["sparsifier"]["name"] in ("teal", "wina", "rsparse") else "mlp_neurons")
