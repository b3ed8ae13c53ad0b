"""Reliability: bad values are refused in one line (fuzzed); faults, kills, concurrent runs,
loggers and reruns lose nothing and repeat exactly."""
import json
import os

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparsebench.backends import BACKENDS
from sparsebench.cli import config_groups
from sparsebench.core.config_check import check_option, shipped_defaults
from sparsebench.core.errors import SparsebenchError
from sparsebench.evaluators import EVALUATORS
from sparsebench.sparsifiers import SPARSIFIERS
from bad_input_cases import CASES, error_lines, run_case
from test_cli import sparsebench

GROUPS = config_groups()

# what a user can type on the command line, as Hydra would parse it
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-10**6, 10**6), st.booleans(), st.none(),
    st.text(max_size=8), st.lists(st.floats(-2, 2, allow_nan=False), max_size=3),
)


def _yaml(group, name):
    from importlib import resources

    raw = OmegaConf.to_container(OmegaConf.load(resources.files("sparsebench.conf") / group / f"{name}.yaml"))
    # interpolations point into the whole config; a typical resolved value stands in
    return OmegaConf.create({k: 512 if isinstance(v, str) and "${" in v else v for k, v in raw.items()})


def _set(cfg, key, value):
    """Values OmegaConf itself refuses (a broken ``${``) never reach sparsebench: Hydra
    rejects them while composing (see test_cli for what the user sees)."""
    try:
        cfg[key] = value
    except OmegaConfBaseException:
        assume(False)


def _check(group, factory, cfg):
    """What build_components does for one option: the type check, then the component's own."""
    try:
        check_option(group, cfg, prefix=f"evaluator.{cfg.name}" if group == "evaluator" else None)
        factory(cfg)
    except SparsebenchError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, msg  # one line naming the fix
        assert any(k in msg for k in cfg), msg  # it names the offending setting


REGISTRIES = {"sparsifier": SPARSIFIERS, "backend": BACKENDS, "evaluator": EVALUATORS}
FUZZ_CASES = [(group, name, key) for group in REGISTRIES for name in GROUPS[group]
              for key in _yaml(group, name) if key != "name"]


@pytest.mark.parametrize("group,name,key", FUZZ_CASES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=VALUES)
def test_fuzzed_settings_build_or_fail_in_one_line(group, name, key, value):
    cfg = _yaml(group, name)
    _set(cfg, key, value)
    _check(group, REGISTRIES[group].get(name), cfg)


@pytest.mark.parametrize("group,registry", [("sparsifier", SPARSIFIERS), ("backend", BACKENDS),
                                            ("evaluator", EVALUATORS), ("data", None)])
def test_a_wrong_type_is_refused_for_every_setting(group, registry):
    """Every setting of every option refuses a value of the wrong kind (before a model loads)."""
    for name in GROUPS[group]:
        for key, default in _yaml(group, name).items():
            if key in ("name", "corpus") or key not in shipped_defaults(group, name):  # corpus names a data option
                continue  # interpolated: checked where it points (data.heldout.seq_len)
            wrong = "not-a-number" if not isinstance(default, str) else 3.5
            if default is None:
                wrong = [1, 2]
            cfg = _yaml(group, name)
            cfg[key] = wrong
            with pytest.raises(SparsebenchError, match=key):
                check_option(group, cfg, prefix=f"evaluator.{name}" if group == "evaluator" else None)
                if registry is not None:
                    registry.get(name)(cfg)


# ------------------------------------------------------------------ runs that go wrong

def _poisoned_checkpoint(tmp_path, tiny_tokenizer, layer=1):
    import torch

    from conftest import make_tiny

    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[layer].mlp.up_proj.weight[3, 5] = float("inf")
    folder = tmp_path / "poisoned"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("sparsifier", ["cats", "none"])
def test_non_finite_activation_stops_the_run_naming_the_layer(tmp_path, tiny_tokenizer, sparsifier):
    folder = _poisoned_checkpoint(tmp_path, tiny_tokenizer)
    proc = sparsebench(["model=local", f"model.path={folder}", f"sparsifier={sparsifier}", "data=tiny",
                        "logger.mode=disabled", "evaluator=[sparsity,perplexity]", "hydra.run.dir=out"], tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sparsebench: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "NaN/inf in the MLP output of layer 1" in lines[0] and "input was finite" in lines[0]
    assert not list(tmp_path.rglob("results.json"))


def test_a_failing_logger_keeps_results_json(tmp_path):
    # an unknown W&B mode makes wandb.init raise; the run must still finish with its results
    proc = sparsebench(["evaluator=[sparsity]", "model=tiny-llama", "data=tiny", "logger.mode=no-such-mode",
                        "hydra.run.dir=out"], tmp_path, env={"WANDB_MODE": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["status"] == "ok"
    assert "W&B logging failed" in proc.stderr


def test_offline_wandb_finishes_without_network(tmp_path):
    proc = sparsebench(["evaluator=[sparsity]", "model=tiny-llama", "data=tiny", "logger.mode=offline",
                        "hydra.run.dir=out"], tmp_path, env={"WANDB_MODE": "offline", "WANDB_API_KEY": "",
                                                             "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))


def _stable(r):
    return {k: r[k] for k in ("metrics", "dense_metrics", "per_layer", "sparsifier")} | {
        "sparsifier": {k: v for k, v in r["sparsifier"].items() if k not in ("calibration", "calibration_file")}}


@pytest.mark.parametrize("sparsifier", ["cats", "dejavu", "teal"])
def test_same_config_and_seed_give_the_same_results_twice(tmp_path, sparsifier):
    """Masks (per-layer sparsity), metrics and generated tokens repeat exactly, with the
    calibration computed afresh each time (separate caches)."""
    fast = {"dejavu": ["sparsifier.steps=20"], "teal": ["sparsifier.greedy_step=0.1", "sparsifier.greedy_max=0.6"]}
    args = [f"sparsifier={sparsifier}", *fast.get(sparsifier, []),
            "evaluator=[sparsity,perplexity,churn]", "model=tiny-llama", "data=tiny", "logger.mode=disabled"]
    runs = []
    for i in range(2):
        proc = sparsebench([*args, f"hydra.run.dir=run{i}", f"cache_dir={tmp_path}/cache{i}"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads((tmp_path / f"run{i}" / "results.json").read_text()))
    assert runs[0]["sparsifier"]["calibration"] == runs[1]["sparsifier"]["calibration"] == "computed"
    assert _stable(runs[0]) == _stable(runs[1])


def test_two_runs_on_a_cold_cache_at_once_share_one_calibration(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "SPARSEBENCH_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-c", "from sparsebench.cli import main; main()", "sparsifier=teal", "evaluator=[sparsity]",
           "model=tiny-llama", "data=tiny", "logger.mode=disabled"]
    procs = [subprocess.Popen([*cmd, f"hydra.run.dir=run{i}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        p.communicate(timeout=600)
        assert p.returncode == 0
    rs = [json.loads((tmp_path / f"run{i}" / "results.json").read_text()) for i in range(2)]
    # one computed it under the lock, the other waited and loaded it
    assert sorted(r["sparsifier"]["calibration"] for r in rs) == ["cached", "computed"]
    assert rs[0]["metrics"] == rs[1]["metrics"]
    states = [p for p in (tmp_path / "cache" / "calibration").glob("teal-*.pt") if "greedy" not in p.name]
    assert len(states) == 1


@pytest.mark.parametrize("point", ["job_start", "after_calibration", "after_evaluator", "before_results"])
def test_killed_run_leaves_nothing_trusted_and_the_rerun_completes(tmp_path, point):
    args = ["sparsifier=cats", "evaluator=[sparsity,perplexity]", "model=tiny-llama", "data=tiny",
            "logger.mode=disabled", "hydra.run.dir=out"]
    killed = sparsebench(args, tmp_path, env={"SPARSEBENCH_KILL_AT": point})
    assert killed.returncode == -9
    assert not (tmp_path / "out" / "results.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written file left behind under its final name
    again = sparsebench(args, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["status"] == "ok" and r["metrics"]["sparsity/mean"] > 0
    # the calibration state is reused only if it was completely written before the kill
    expected = "computed" if point == "job_start" else "cached"
    assert r["sparsifier"]["calibration"] == expected


@pytest.mark.parametrize("case,args,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case, args, needle):
    proc = run_case(args(tmp_path) if callable(args) else args, tmp_path)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert needle in lines[0], lines[0]
    assert not list(tmp_path.rglob("results.json"))


# ------------------------------------------------------------------ corrupt caches

def _wheel(folder, record_ok=True, payload=b"some packaged data\n" * 100):
    """A minimal wheel ``fakepkg-1.0`` that pip can download from a local folder."""
    import base64
    import hashlib
    import zipfile

    files = {"fakepkg/__init__.py": b"", "fakepkg/data.txt": payload,
             "fakepkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n",
             "fakepkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    rows = []
    for name, data in files.items():
        digest = hashlib.sha256(data if record_ok or name != "fakepkg/data.txt" else b"other").digest()
        rows.append(f"{name},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},{len(data)}")
    rows.append("fakepkg-1.0.dist-info/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "fakepkg-1.0-py3-none-any.whl", "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("fakepkg-1.0.dist-info/RECORD", "\n".join(rows) + "\n")


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    index = tmp_path / "index"
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip reads only the local folder
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def test_unpacked_package_with_a_truncated_file_is_fetched_again(tmp_path, local_index):
    from sparsebench.store.cache import fetch_package

    _wheel(local_index)
    cache = tmp_path / "cache"
    folder = fetch_package("fakepkg==1.0", cache)
    data = folder / "fakepkg" / "data.txt"
    original = data.read_bytes()
    data.write_bytes(original[:10])  # truncated behind our back
    again = fetch_package("fakepkg==1.0", cache)
    assert (again / "fakepkg" / "data.txt").read_bytes() == original


def test_pip_output_goes_to_the_run_log_and_the_console_gets_one_line(tmp_path, local_index, capfd):
    import logging

    from sparsebench.cli import route_library_output
    from sparsebench.store.cache import fetch_package

    _wheel(local_index)
    log = route_library_output(tmp_path / "run")
    fetch_package("fakepkg==1.0", tmp_path / "cache")
    for h in logging.getLogger("pip").handlers:
        h.flush()
    out = capfd.readouterr()
    console = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert len(console) == 1 and console[0].startswith("[sparsebench] fetching fakepkg==1.0") and " s" in console[0]
    assert "fakepkg" in log.read_text() and "Saved" in log.read_text()  # pip's own report, kept in the file
    logging.captureWarnings(False)


def test_a_wheel_failing_its_record_is_refused_and_not_trusted(tmp_path, local_index):
    from sparsebench.store.cache import fetch_package
    from sparsebench.core.errors import DataUnavailable

    _wheel(local_index, record_ok=False)
    with pytest.raises(DataUnavailable, match="fails its RECORD checksum"):
        fetch_package("fakepkg==1.0", tmp_path / "cache")
    assert not (tmp_path / "cache" / "packages" / "fakepkg-1.0").exists()


def test_kill_between_download_and_unpack_then_rerun(tmp_path, local_index):
    import subprocess
    import sys

    _wheel(local_index)
    code = f"from pathlib import Path; from sparsebench.store.cache import fetch_package; print(fetch_package('fakepkg==1.0', Path('{tmp_path}/cache')))"
    env = {**os.environ, "SPARSEBENCH_KILL_AT": "package_downloaded"}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9
    assert not (tmp_path / "cache" / "packages" / "fakepkg-1.0" / ".complete").exists()
    env.pop("SPARSEBENCH_KILL_AT")
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "cache" / "packages" / "fakepkg-1.0" / "fakepkg" / "data.txt").exists()


def test_converted_model_folder_is_trusted_only_while_its_manifest_matches(tmp_path):
    from sparsebench.store.cache import atomic_write_json
    from sparsebench.models.loader import _manifest, _verified

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    (folder / "config.json").write_text("{}")
    assert not _verified(folder)  # no manifest: a conversion that never finished
    atomic_write_json(folder / "manifest.json", {"files": _manifest(folder)})
    assert _verified(folder)
    (folder / "model.safetensors").write_bytes(b"\0" * 100)  # truncated
    assert not _verified(folder)
    (folder / "manifest.json").write_text('{"files": {')  # a torn manifest
    assert not _verified(folder)
