"""The `device` setting and the model dtype: every path follows the model's device.

There is no GPU in CI, so "follows the device" is checked the way it can be on a CPU:
the tiny pipeline runs for every sparsifier, backend and evaluator with an explicit
``device=cpu`` and a non-default dtype (bf16), under a torch function mode that records
every tensor factory call made from sparsebench code without a ``device=`` (such a call
lands on the CPU whatever the model's device, i.e. it breaks on CUDA). The CUDA tests
at the end run only where a GPU is present.
"""
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.overrides import TorchFunctionMode

import sparsebench
from sparsebench.cli import config_groups
from sparsebench.core.device import device_info, move_to, resolve_device, resolve_dtype
from sparsebench.core.errors import ConfigError
from test_lm_eval_sparse_path import task_dir  # noqa: F401  (a local multiple-choice task for lm_eval)

PACKAGE = Path(sparsebench.__file__).resolve().parent
# Factories whose result lands on the default (CPU) device unless told otherwise.
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor, torch.randn,
             torch.rand, torch.randint, torch.eye, torch.linspace, torch.as_tensor}
# Modules that are CPU-only by design (they refuse CUDA up front), build CPU token tensors
# that their consumers move to the model's device, or only format results.
CPU_BY_DESIGN = ("backends/cached.py", "backends/fused.py", "backends/bench.py", "data/",
                 "reporting/", "core/stats.py")
GROUPS = config_groups()


class DeviceLessFactories(TorchFunctionMode):
    """Records (file:line, factory) for each factory call from sparsebench code without
    ``device=`` (``torch.as_tensor`` of a tensor keeps that tensor's device: not counted)."""

    def __init__(self):
        super().__init__()
        self.calls: set[tuple[str, str]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs \
                and not (func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)):
            frame = sys._getframe(1)
            path = Path(frame.f_code.co_filename).resolve()
            if PACKAGE in path.parents:
                rel = path.relative_to(PACKAGE).as_posix()
                if not rel.startswith(CPU_BY_DESIGN):
                    self.calls.add((f"{rel}:{frame.f_lineno}", func.__name__))
        return func(*args, **kwargs)


def compose_cfg(overrides, tmp_path):
    with initialize_config_module(config_module="sparsebench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=tiny-llama", "data=tiny", "logger.mode=disabled", "threads=1", "device=cpu",
            "model.dtype=bfloat16", "evaluator=[sparsity,perplexity]", "print_per_layer=false",
            f"cache_dir={tmp_path / 'cache'}", *overrides])


def run_recorded(overrides, tmp_path):
    from sparsebench.run import run

    cfg = compose_cfg(overrides, tmp_path)
    with DeviceLessFactories() as mode:
        results = run(cfg, tmp_path / "out")
    return results, mode.calls


# ------------------------------------------------------------------ settings

def test_auto_is_the_cpu_without_a_gpu_and_dtype_follows_the_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


@pytest.mark.parametrize("spec,needle", [("gpu", "device=gpu is unknown"), ("cuda:x", "unknown")])
def test_bad_device_is_refused_in_one_line(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_naming_the_knob():
    with pytest.raises(ConfigError, match="device=cpu"):
        resolve_device("cuda")


def test_bad_dtype_is_refused():
    with pytest.raises(ConfigError, match="model.dtype=int8"):
        resolve_dtype("int8", torch.device("cpu"))


def test_move_to_reaches_every_tensor_in_a_state():
    state = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.arange(3), 5)], "c": "text"}
    moved = move_to(state, "meta")
    assert moved["a"].device.type == "meta" and moved["b"][0].device.type == "meta"
    assert moved["b"][1][0].device.type == "meta" and moved["b"][1][1] == 5 and moved["c"] == "text"


def test_cpu_only_backends_are_refused_on_cuda_before_the_model_loads(tmp_path, monkeypatch):
    from sparsebench.run import build_components

    import sparsebench.core.device as device_module

    monkeypatch.setattr(device_module, "resolve_device", lambda spec: torch.device("cuda"))
    for backend in ("cached", "fused"):
        with pytest.raises(ConfigError, match=f"backend={backend} runs on cpu"):
            build_components(compose_cfg([f"backend={backend}"], tmp_path))


def test_device_cpu_is_the_default_on_this_machine(tmp_path):
    """``device=cpu`` and the default compose the same run here (same numbers on the CPU)."""
    if torch.cuda.is_available():
        pytest.skip("auto is CUDA here")
    from sparsebench.run import run

    base = ["model=tiny-llama", "data=tiny", "logger.mode=disabled", "threads=1", "evaluator=[perplexity]",
            "print_per_layer=false", f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_module(config_module="sparsebench.conf", version_base="1.3"):
        default = run(compose(config_name="config", overrides=base), tmp_path / "a")
        explicit = run(compose(config_name="config", overrides=[*base, "device=cpu"]), tmp_path / "b")
    assert default["metrics"] == explicit["metrics"]
    assert default["machine"]["device"] == explicit["machine"]["device"] == "cpu"
    assert default["machine"]["dtype"] == "float32"


# ------------------------------------------------------------------ every path, bf16, explicit device

@pytest.mark.parametrize("sparsifier", [s for s in GROUPS["sparsifier"] if s != "relu"])
def test_every_sparsifier_runs_in_bf16_with_no_deviceless_tensor(sparsifier, tmp_path):
    results, calls = run_recorded([f"sparsifier={sparsifier}", "sparsifier.sparsity=0.5"], tmp_path)
    assert not calls, f"tensors created without device= (they would land on the CPU under CUDA): {sorted(calls)}"
    assert results["machine"]["device"] == "cpu" and results["machine"]["dtype"] == "bfloat16"
    m = results["metrics"]
    assert torch.isfinite(torch.tensor(m["perplexity"])) and m["perplexity"] > 1


@pytest.mark.parametrize("backend", [b for b in GROUPS["backend"] if b != "triton"])
@pytest.mark.parametrize("sparsifier", ["cats", "teal"])
def test_every_backend_runs_in_bf16_with_no_deviceless_tensor(backend, sparsifier, tmp_path):
    results, calls = run_recorded([f"backend={backend}", f"sparsifier={sparsifier}"], tmp_path)
    if backend not in CPU_BY_DESIGN:
        assert not calls, sorted(calls)
    assert results["metrics"]["perplexity"] > 1


@pytest.mark.parametrize("evaluator", GROUPS["evaluator"])
def test_every_evaluator_runs_in_bf16_with_no_deviceless_tensor(evaluator, task_dir, tmp_path):
    extra = {"lm_eval": [f"evaluator.lm_eval.include_path={task_dir}", "evaluator.lm_eval.tasks=[tiny_mc]",
                         "evaluator.lm_eval.limit=2"],
             "cache_speedup": ["evaluator.cache_speedup.prompt_tokens=8", "evaluator.cache_speedup.new_tokens=5",
                               "evaluator.cache_speedup.churns=[0.1]", "evaluator.cache_speedup.grid_steps=3"],
             "long_decode": ["evaluator.long_decode.contexts=[128]", "evaluator.long_decode.new_tokens=3",
                             "evaluator.long_decode.repeats=1", "evaluator.long_decode.warmup=1"],
             "long_perplexity": ["evaluator.long_perplexity.seq_lens=[256]", "evaluator.long_perplexity.num_windows=2"],
             "passkey": ["evaluator.passkey.contexts=[200]", "evaluator.passkey.per_context=1",
                         "evaluator.passkey.question_chars=40", "evaluator.passkey.answer_tokens=4"]}.get(evaluator, [])
    setting = (["attention=quest", "sparsifier=none"] if evaluator in ("long_decode", "long_perplexity", "passkey")
               else ["sparsifier=dejavu"] if evaluator == "mask_quality"  # needs a predictor
               else ["sparsifier=cats", "backend=fused"] if evaluator == "step_overhead"  # times the fused kernel
               else ["sparsifier=cats"])
    results, calls = run_recorded([f"evaluator=[{evaluator}]", *setting, *extra], tmp_path)
    assert not calls, sorted(calls)
    assert results["status"] == "ok" and results["metrics"]


def test_calibration_state_is_kept_on_the_cpu_and_loaded_on_the_models_device(tmp_path):
    """States are saved device-free (a cache serves CPU and GPU runs); what the sparsifier
    holds after loading is on the model's device, its statistics in float32."""
    from sparsebench.models.calibration import load_or_calibrate
    from sparsebench.data.corpus import load_corpus
    from sparsebench.models.loader import load_model
    from sparsebench.models.patching import SparsityController
    from sparsebench.run import build_components, prefill_policy

    cfg = compose_cfg(["sparsifier=cats"], tmp_path)
    sparsifier, backend, _ = build_components(cfg)
    model, tok, model_id = load_model(cfg.model, cfg.cache_dir, torch.device("cpu"))
    assert next(model.parameters()).dtype == torch.bfloat16
    controller = SparsityController(sparsifier, backend, prefill=prefill_policy(cfg)).attach(model)
    splits = load_corpus(cfg.data, cfg.cache_dir)
    state, info = load_or_calibrate(sparsifier, controller, model, tok, splits, model_id, cfg.data, 0, cfg.cache_dir)
    assert info["calibration"] == "computed"
    assert state["thresholds"].dtype == torch.float32 and state["thresholds"].device.type == "cpu"
    saved = torch.load(info["calibration_file"], weights_only=True)
    assert saved["thresholds"].device.type == "cpu"


def test_results_record_the_device():
    info = device_info(torch.device("cpu"))
    assert info == {"device": "cpu"}


# ------------------------------------------------------------------ CUDA (skipped without a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("sparsifier", [s for s in GROUPS["sparsifier"] if s != "relu"])
def test_every_sparsifier_runs_on_cuda(sparsifier, tmp_path):
    from sparsebench.run import run

    cfg = compose_cfg([f"sparsifier={sparsifier}", "device=cuda", "model.dtype=auto"], tmp_path)
    results = run(cfg, tmp_path / "out")
    assert results["machine"]["device"].startswith("cuda") and results["machine"]["dtype"] == "bfloat16"
    assert results["machine"]["gpu"] and results["metrics"]["perplexity"] > 1


def test_a_gpu_only_backend_is_refused_on_the_cpu_before_the_model_loads(tmp_path):
    from sparsebench.run import build_components

    with pytest.raises(ConfigError, match="backend=triton runs on cuda, not on cpu"):
        build_components(compose_cfg(["backend=triton"], tmp_path))


@cuda
@pytest.mark.parametrize("backend", ["dense", "index_select", "triton"])
def test_backends_run_on_cuda(backend, tmp_path):
    from sparsebench.run import run

    cfg = compose_cfg(["sparsifier=cats", f"backend={backend}", "device=cuda"], tmp_path)
    assert run(cfg, tmp_path / "out")["metrics"]["perplexity"] > 1


# ------------------------------------------------------------------ bounded calibration memory

@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt"])
def test_streamed_dense_layer_inputs_equal_the_models_own(arch):
    """Calibration keeps one layer of hidden states and recomputes the dense input of
    layer i on demand; it must be exactly what the model passes layer i (captured here by
    hooks on a plain forward), in order and after going back to an earlier layer."""
    from conftest import make_tiny, random_ids
    from sparsebench.backends.dense import DenseBackend
    from sparsebench.models.patching import SparsityController
    from sparsebench.sparsifiers.base import capture_layer_inputs
    from sparsebench.sparsifiers.cats import CATS
    from omegaconf import OmegaConf

    model = make_tiny(arch, num_layers=3)
    batches = [random_ids(batch=2, seq=20, seed=s) for s in range(2)]
    sparsifier = CATS(OmegaConf.create({"name": "cats", "sparsity": 0.5}))
    controller = SparsityController(sparsifier, DenseBackend()).attach(model)
    seen: dict[tuple[int, int], torch.Tensor] = {}
    layers = [site.layer for site in controller.sites]
    current = [0]

    def grab(i):
        def hook(_m, args, kwargs):
            seen[(i, current[0])] = (args[0] if args else kwargs["hidden_states"]).clone()
        return hook

    hooks = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad(), controller.recording(None):
        for b, batch in enumerate(batches):
            current[0] = b
            model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    run_layer, first = capture_layer_inputs(controller, model, batches)
    order = [(i, b) for i in range(3) for b in range(2)] + [(1, 0), (2, 1)]  # in order, then back
    for i, b in order:
        assert torch.equal(run_layer.dense_input(i, b), seen[(i, b)]), (arch, i, b)
    assert all(torch.equal(first[b], seen[(0, b)]) for b in range(2))


# ------------------------------------------------------------------ sharded local checkpoints

def test_a_sharded_bf16_checkpoint_runs_end_to_end_as_the_same_model(tmp_path):
    """``model=local`` loads a sharded safetensors folder (as 1-8B checkpoints ship) in
    bf16, and the run gives exactly the numbers of the same weights built in memory."""
    from sparsebench.models.loader import build_tiny_model, tiny_tokenizer
    from sparsebench.run import run

    arch = "llama"  # (other architectures' Auto tokenizer classes would re-read the tiny tokenizer differently)
    folder = tmp_path / "ckpt"
    build_tiny_model(arch).save_pretrained(folder, max_shard_size="50KB")
    tiny_tokenizer().save_pretrained(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    common = ["sparsifier=cats", "evaluator=[sparsity,perplexity]", "data=tiny", "logger.mode=disabled",
              "threads=1", "device=cpu", "model.dtype=bfloat16", "print_per_layer=false",
              f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_module(config_module="sparsebench.conf", version_base="1.3"):
        local = run(compose(config_name="config", overrides=["model=local", f"model.path={folder}", *common]),
                    tmp_path / "local")
        memory = run(compose(config_name="config", overrides=[f"model=tiny-{arch}", *common]), tmp_path / "memory")
    assert local["machine"]["dtype"] == "bfloat16"
    assert local["metrics"]["perplexity"] == memory["metrics"]["perplexity"]
    assert local["metrics"]["sparsity/mean"] == memory["metrics"]["sparsity/mean"]


def test_the_calibration_memory_check_writes_what_the_docs_table_reads(tmp_path, monkeypatch):
    import json

    from sparsebench.experiments.checks.calibration_memory import main
    from sparsebench.experiments.tables import calibration_memory_block

    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    report = main(["--model", "tiny-llama", "--data", "tiny", "--out", str(tmp_path / "mem")])
    saved = json.loads((tmp_path / "mem" / "tiny-llama-cats-streamed.json").read_text())
    assert saved["calibration_peak_added_mib"] == report["calibration_peak_added_mib"] >= 0
    assert saved["layers"] == 2 and saved["code"]["source_sha256"]
    assert "| tiny-llama (2) | cats | streamed (now) |" in calibration_memory_block(tmp_path / "mem")
