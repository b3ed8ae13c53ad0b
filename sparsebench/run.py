"""One run: model → sparsifier (calibrated) → backend → evaluators → results.json."""
from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .core.errors import ConfigError


def evaluator_configs(cfg: DictConfig) -> list[DictConfig]:
    """The selected evaluators' configs. An entry without a ``name`` holds only settings that
    an experiment YAML gave an evaluator the command line then left out (``experiment=decode_fused
    evaluator=[sparsity]`` keeps the experiment's ``evaluator.decode.new_tokens``): not an
    evaluator, so it is skipped (``unselected_evaluator_settings`` names them)."""
    evs = cfg.get("evaluator") or {}
    unselected = set(unselected_evaluator_settings(cfg))
    selected = [evs[k] for k in evs if k not in unselected] if isinstance(evs, DictConfig) else []
    if not selected:
        raise ConfigError("no evaluator selected; pass e.g. evaluator=perplexity or evaluator=[sparsity,perplexity]")
    return selected


def unselected_evaluator_settings(cfg: DictConfig) -> list[str]:
    """Keys under ``evaluator`` that configure an evaluator that is not selected."""
    evs = cfg.get("evaluator") or {}
    if not isinstance(evs, DictConfig):
        return []
    return [k for k in evs if not (isinstance(evs[k], DictConfig) and "name" in evs[k])]


def prefill_policy(cfg: DictConfig):
    from .models.patching import PrefillPolicy

    p = cfg.get("prefill") or {}
    n = p.get("dense_prefix", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"prefill.dense_prefix={n} must be a non-negative integer, e.g. prefill.dense_prefix=32")
    return PrefillPolicy(p.get("policy", "all"), n)


def build_components(cfg: DictConfig):
    """Instantiate sparsifier, backend and evaluators; raises ConfigError on bad values
    (done before any model is loaded, so a bad override costs nothing and writes nothing)."""
    from .backends import BACKENDS
    from .core.config_check import check_option
    from .core.device import resolve_device, resolve_dtype
    from .evaluators import EVALUATORS
    from .models.loader import check_model_config
    from .sparsifiers import SPARSIFIERS

    check_model_config(cfg.model)
    prefill_policy(cfg)
    check_option("data", cfg.data)
    check_option("sparsifier", cfg.sparsifier)
    check_option("backend", cfg.backend)
    for e in evaluator_configs(cfg):
        check_option("evaluator", e, prefix=f"evaluator.{e.name}")
    for key in unselected_evaluator_settings(cfg):
        print(f"[sparsebench] evaluator.{key}: settings for an evaluator that is not selected, ignored")
    device = resolve_device(cfg.get("device", "auto"))
    resolve_dtype(cfg.model.get("dtype", "auto"), device)
    sparsifier = SPARSIFIERS.get(cfg.sparsifier.name)(cfg.sparsifier)
    backend = BACKENDS.get(cfg.backend.name)(cfg.backend)
    if device.type not in backend.device_types:
        raise ConfigError(f"backend={backend.name} runs on {' or '.join(backend.device_types)}, not on {device}: "
                          f"use device={backend.device_types[0]} or backend=index_select")
    evaluators = [EVALUATORS.get(e.name)(e) for e in evaluator_configs(cfg)]
    for ev in evaluators:
        if device.type not in ev.device_types:
            raise ConfigError(f"evaluator {ev.name} runs on {' or '.join(ev.device_types)}, not on {device}: "
                              f"use device={ev.device_types[0]}")
    return sparsifier, backend, evaluators


def dense_baseline_cache(cfg: DictConfig, model, model_id: str, tokenizer):
    """Where the dense baselines of this model, data and seed are kept: every point of a
    sweep over methods and sparsities shares them, so the dense pass runs once per model.
    Keyed by the tokenizer's special prefix and library versions; each entry also by the
    sources of its evaluator (``dense_baseline``)."""
    from .store.cache import cache_root
    from .models.calibration import ArtifactCache, committed_artifacts
    from .data.corpus import prefix_tokens
    from .reporting.results import versions

    v = versions()
    params = next(model.parameters())
    key = {"model": model_id, "model_cfg": OmegaConf.to_container(cfg.model, resolve=True),
           # bf16 on a GPU gives other numbers than fp32 on the CPU
           "device": params.device.type, "dtype": str(params.dtype),
           "data": OmegaConf.to_container(cfg.data, resolve=True), "seed": int(cfg.seed),
           "prefix_tokens": prefix_tokens(tokenizer),
           "versions": {k: v[k] for k in ("torch", "transformers", "lm_eval")}}
    # committed baselines of the same key and code (experiments/results/artifacts) are reused
    return ArtifactCache(cache_root(cfg.cache_dir) / "dense_baselines", key, seed=committed_artifacts())


# Modules a dense evaluation runs through besides the evaluator's own.
DENSE_MODULES = ("sparsebench.models.patching", "sparsebench.models.loader", "sparsebench.data.corpus")


def dense_baseline(ev, ctx, cache):
    """The evaluator's result with every mask off, from the cache when the same dense
    evaluation was done before (same model, data, seed, evaluator settings and code)."""
    from .evaluators import EvalResult
    from .store.provenance import code_digest

    def compute():
        with ctx.controller.dense():
            res = ev.evaluate(ctx)
        return {"metrics": res.metrics, "per_layer": res.per_layer, "items": res.items, "info": res.info}

    if cache is None:
        state = compute()
    else:
        key = {"evaluator": OmegaConf.to_container(ev.cfg, resolve=True),
               "code": code_digest([type(ev).__module__, *DENSE_MODULES])}
        state = cache.get(f"dense-{ev.name}", key, compute)
    return EvalResult(metrics=dict(state["metrics"]), per_layer=dict(state["per_layer"]),
                      items=dict(state.get("items") or {}), info=dict(state.get("info") or {}))


def run_modules(sparsifier, backend, evaluators) -> list[str]:
    """The modules whose sources decide a run's numbers (their import closure is recorded
    in results.json and checked before a sweep reuses the point)."""
    return ["sparsebench.run", type(sparsifier).__module__, type(backend).__module__,
            *(type(e).__module__ for e in evaluators)]


def run(cfg: DictConfig, output_dir: Path, name: str = "default", group: str | None = None) -> dict:
    import torch

    from . import __version__
    from .models.calibration import load_or_calibrate
    from .reporting.comparison import compare_items
    from .data.corpus import load_corpus, prefix_tokens
    from .core.device import device_info, resolve_device
    from .store.provenance import code_version, source_files
    from .evaluators import RunContext
    from .core.faults import checkpoint
    from .store.timing_lock import exclusive_timing
    from .models.loader import load_model, set_offline
    from .models.patching import SparsityController
    from .reporting.results import (
        machine,
        per_layer_table,
        print_tables,
        run_table,
        versions,
        write_results,
    )
    from .reporting.wandb_logger import log_run

    started = time.time()
    sparsifier, backend, evaluators = build_components(cfg)
    # the code this run computes with, hashed before it computes anything
    code = code_version() | {"files": source_files(run_modules(sparsifier, backend, evaluators))}
    set_offline()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))

    device = resolve_device(cfg.get("device", "auto"))
    model, tokenizer, model_id = load_model(cfg.model, cfg.cache_dir, device)
    splits = load_corpus(cfg.data, cfg.cache_dir)
    check_finite = bool(cfg.get("check_finite", True))
    controller = SparsityController(sparsifier, backend, prefill=prefill_policy(cfg),
                                    check_finite=check_finite).attach(model)
    _, calib_info = load_or_calibrate(sparsifier, controller, model, tokenizer, splits, model_id,
                                      cfg.data, int(cfg.seed), cfg.cache_dir)
    checkpoint("after_calibration")
    ctx = RunContext(model=model, tokenizer=tokenizer, controller=controller, splits=splits, cfg=cfg,
                     cache_dir=cfg.cache_dir)

    compare = bool(cfg.compare_dense) and sparsifier.name != "none"
    dense_cache = dense_baseline_cache(cfg, model, model_id, tokenizer) if cfg.get("dense_cache", True) else None
    metrics, dense_metrics, per_layer, timings = {}, ({} if compare else None), {}, {}
    items, dense_items, info = {}, {}, {}
    lock_wait = 0.0
    for ev in evaluators:
        t0, waited = time.time(), 0.0
        if ev.timing:
            controller.check_finite = False  # the unpatched baseline it is timed against has no check
            with exclusive_timing(cfg.cache_dir, ev.name, device) as lock:
                res = ev.evaluate(ctx)
            controller.check_finite = check_finite
            waited = lock["waited_s"]
        else:
            res = ev.evaluate(ctx)
        lock_wait += waited
        timings[ev.name] = round(time.time() - t0 - waited, 2)
        checkpoint("after_evaluator")
        metrics.update(res.metrics)
        per_layer.update(res.per_layer)
        items.update(res.items)
        info.update(res.info)
        if compare and ev.compare_dense:
            t0 = time.time()
            dres = dense_baseline(ev, ctx, dense_cache)
            timings[f"{ev.name}/dense"] = round(time.time() - t0, 2)
            dense_metrics.update(dres.metrics)
            dense_items.update(dres.items)
            per_layer.update({f"dense_{k}": v for k, v in dres.per_layer.items()})
    for key, values in sparsifier.describe().items():
        per_layer[key] = values

    n_layers = len(controller.sites)
    rows = [{"layer": i, **{k: v[i] for k, v in per_layer.items() if len(v) == n_layers}} for i in range(n_layers)]
    results = {
        "status": "ok",
        "run": {"name": name, "group": group, "output_dir": str(output_dir),
                "started_at": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
                "wall_time_s": None, "evaluator_time_s": timings, "timing_lock_wait_s": lock_wait},
        "model": {"id": model_id, "model_type": model.config.model_type, "num_layers": n_layers,
                  "hidden_size": model.config.hidden_size,
                  "intermediate_size": controller.sites[0].intermediate_size if n_layers else None},
        "sparsifier": {"name": sparsifier.name, "sparsity": sparsifier.requested_sparsity,
                       "sparsity_unit": sparsifier.sparsity_unit, **sparsifier.summary(), **calib_info},
        "prefill": OmegaConf.to_container(cfg.prefill) if cfg.get("prefill") else {"policy": "all"},
        "backend": backend.name,
        "data": {"corpus": splits.name, "heldout_works": splits.heldout_works,
                 "extra_heldout": list(splits.extra_heldout), "prefix_tokens": prefix_tokens(tokenizer), **info},
        "metrics": metrics,
        "dense_metrics": dense_metrics,
        "per_layer": rows,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": versions() | {"sparsebench": __version__},
        "machine": machine() | device_info(device) | {"dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
        "code": code,
        # vs the dense baseline on the same items: Δ, 95% paired-bootstrap CI, exact McNemar p
        "paired": compare_items(dense_items, items) if compare else {},
        "items": {"sparse": items, "dense": dense_items if compare else None},
    }
    results["run"]["wall_time_s"] = round(time.time() - started, 2)
    checkpoint("before_results")
    write_results(output_dir, results)  # before W&B: a failing logger must not lose results
    log_run(cfg.logger, results, output_dir, group, name)
    print_tables(run_table(results), per_layer_table(results) if cfg.get("print_per_layer", True) else None)
    print(f"[sparsebench] results: {Path(output_dir) / 'results.json'} ({results['run']['wall_time_s']:.0f}s)")
    return results
