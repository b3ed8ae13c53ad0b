"""Resumable sweeps, failed points, launchers and the per-machine timing lock."""
import json

from sparsebench.store.provenance import source_files
import multiprocessing as mp
import os
import time

from sparsebench.sweep import comparable_config, failed_points, finished_run, record_failure
from test_cli import TINY, sparsebench

SWEEP = ["-m", "sparsifier=cats", "sparsifier.sparsity=0.3,0.6", "evaluator=[sparsity]", *TINY]


def _results(sweep):
    return {p.parent.name: p for p in sweep.glob("*/results.json")}


def test_killed_sweep_resumes_without_rerunning_finished_points(tmp_path):
    sweep = tmp_path / "sweep"
    args = [*SWEEP, f"hydra.sweep.dir={sweep}"]
    # SIGKILL the whole sweep as the second point starts: the first is finished, the second never ran
    killed = sparsebench(args, tmp_path, env={"SPARSEBENCH_KILL_AT": "job_start#2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    first = _results(sweep)
    assert len(first) == 1
    (name, path), = first.items()
    before = (path.stat().st_mtime_ns, path.read_text())

    resumed = sparsebench(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "reusing its results.json" in resumed.stdout
    after = _results(sweep)
    assert len(after) == 2 and (after[name].stat().st_mtime_ns, after[name].read_text()) == before
    other = next(p for n, p in after.items() if n != name)
    assert json.loads(other.read_text())["status"] == "ok"
    # the combined table at the end covers both points, the reused one included
    assert "2 runs" in resumed.stdout
    # both points compared against one dense baseline, computed once and cached
    baselines = list((tmp_path / "cache" / "dense_baselines").glob("dense-sparsity-*.pt"))
    assert len(baselines) == 1
    dense = [json.loads(p.read_text())["dense_metrics"] for p in after.values()]
    assert dense[0] == dense[1] and dense[0]["sparsity/mean"] == 0.0

    forced = sparsebench([*args, "rerun=true"], tmp_path)
    assert forced.returncode == 0 and "reusing" not in forced.stdout
    assert after[name].stat().st_mtime_ns != before[0]


def test_failed_point_does_not_stop_the_sweep_and_is_listed(tmp_path):
    sweep = tmp_path / "sweep"
    proc = sparsebench(["-m", "sparsifier=cats", "sparsifier.sparsity=1.5,0.3", "evaluator=[sparsity]", *TINY,
                        f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 1
    ok = _results(sweep)
    assert list(ok) == ["sparsifier.sparsity=0.3,sparsifier=cats"] or len(ok) == 1
    failed = failed_points(sweep)
    assert len(failed) == 1 and "sparsity=1.5" in failed[0]["overrides"] and "ConfigError" in failed[0]["error"]
    assert "1 point(s) failed" in proc.stderr and "sparsifier.sparsity=1.5" in proc.stderr.split("failed;")[-1]
    assert not (sweep / "sparsifier.sparsity=1.5,sparsifier=cats" / "results.json").exists()


def test_finished_run_requires_same_config_and_ok_status(tmp_path):
    cfg = {"seed": 0, "sparsifier": {"name": "cats", "sparsity": 0.5}, "logger": {"mode": "offline"}}
    assert finished_run(tmp_path, cfg) is None
    code = {"files": source_files(["sparsebench.run"])}
    (tmp_path / "results.json").write_text(json.dumps({"status": "ok", "config": cfg, "code": code}))
    assert finished_run(tmp_path, cfg) is not None
    # a logger change cannot change a result; a sparsity change can
    assert finished_run(tmp_path, cfg | {"logger": {"mode": "disabled"}}) is not None
    assert finished_run(tmp_path, cfg | {"sparsifier": {"name": "cats", "sparsity": 0.6}}) is None
    assert comparable_config(cfg).keys() == {"seed", "sparsifier"}
    (tmp_path / "results.json").write_text('{"status": "ok", "conf')  # truncated by hand
    assert finished_run(tmp_path, cfg) is None
    record_failure(tmp_path, ValueError("boom"), "a=1")
    assert failed_points(tmp_path)[0]["error"] == "ValueError: boom"


def _hold_timing_lock(cache, log, hold_s):
    from sparsebench.store.timing_lock import exclusive_timing

    with exclusive_timing(cache, "test") as info:
        with open(log, "a") as f:
            f.write(f"start {os.getpid()} {time.time()} {info['waited_s']}\n")
        time.sleep(hold_s)
        with open(log, "a") as f:
            f.write(f"end {os.getpid()} {time.time()}\n")


def test_timing_sections_never_overlap_across_processes(tmp_path):
    log = tmp_path / "log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hold_timing_lock, args=(str(tmp_path), str(log), 0.3)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["start", "end"] * 3  # strictly one holder at a time
    assert all(events[i][1] == events[i + 1][1] for i in range(0, 6, 2))


def test_timing_evaluators_are_marked():
    from sparsebench.evaluators import EVALUATORS

    timing = {name for name in EVALUATORS.available() if EVALUATORS.get(name).timing}
    assert {"decode", "layer_latency"} <= timing
    assert not {"perplexity", "lm_eval", "sparsity", "churn"} & timing


def test_submitit_local_launcher_runs_points_as_separate_jobs(tmp_path):
    """The cluster path, exercised with submitit's local executor: one job per point,
    a failing point recorded and listed, the rest finished."""
    sweep = tmp_path / "sweep"
    proc = sparsebench(["-m", "hydra/launcher=local", "sparsifier=cats", "sparsifier.sparsity=0.3,1.5",
                        "evaluator=[sparsity]", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    done = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert [r["config"]["sparsifier"]["sparsity"] for r in done] == [0.3]
    jobs = [d for d in (sweep / ".submitit").iterdir() if d.name != "%j"]
    assert len(jobs) == 2 and all(list(d.glob("*_log.out")) for d in jobs)
    assert len(failed_points(sweep)) == 1 and "sparsity=1.5" in proc.stderr


def test_run_names_with_brackets_survive_the_rich_table():
    from rich.console import Console

    from sparsebench.reporting.results import combined_table

    r = {"run": {"name": "evaluator=[sparsity],sparsifier=cats"}, "model": {"id": "m"},
         "sparsifier": {"name": "cats", "sparsity": 0.5}, "metrics": {"sparsity/mean": 0.5}}
    console = Console(width=300, record=True)
    console.print(combined_table([r]))
    assert "evaluator=[sparsity],sparsifier=cats" in console.export_text()


def test_long_override_lists_get_short_stable_folder_names():
    from sparsebench.cli import MAX_DIRNAME_BYTES, point_dirname

    short = "model=tiny-llama,sparsifier=cats"
    assert point_dirname(short) == short
    long_a = ",".join(f"evaluator.cache_speedup.k{i}=ü{i}" for i in range(40))
    long_b = long_a.replace("k39", "k40")
    a, b = point_dirname(long_a), point_dirname(long_b)
    assert len(a.encode()) <= MAX_DIRNAME_BYTES and len(b.encode()) <= MAX_DIRNAME_BYTES
    assert a == point_dirname(long_a) and a != b  # stable across reruns, distinct per point
