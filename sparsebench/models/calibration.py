"""Calibrate a sparsifier once per (model, data, method, parameters, code) and cache the state.

The key holds the tokens the tokenizer prepends (a state fitted without Gemma's BOS is
never reused for inputs with it) and the digest of the calibration code's sources (the
sparsifier's module and everything it, the driver, the patching and the data pipeline
import; ``sparsebench.store.provenance``), so editing that code recomputes the state.

The state file is written atomically next to a sha256; a file whose checksum does
not match (killed write, disk trouble, hand edits) is recomputed, never used.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from ..store.cache import atomic_write_bytes, atomic_write_json, cache_root, locked
from ..data.corpus import calibration_windows, prefix_tokens
from ..core.device import move_to
from ..store.provenance import code_digest

# Modules every calibration runs through, besides the sparsifier's own.
CALIBRATION_MODULES = ("sparsebench.models.calibration", "sparsebench.models.patching", "sparsebench.models.loader",
                       "sparsebench.data.corpus")


def calibration_code(sparsifier) -> str:
    return code_digest([type(sparsifier).__module__, *CALIBRATION_MODULES])


def calibration_key(model_id: str, dcfg, sparsifier, seed: int, tokenizer=None, model=None) -> dict:
    params = next(model.parameters()) if model is not None else None
    return {
        "model": model_id,
        # statistics of bf16 activations on a GPU are not those of fp32 ones on the CPU
        "device": params.device.type if params is not None else None,
        "dtype": str(params.dtype) if params is not None else None,
        "corpus": dcfg.corpus,
        "heldout_works": list(dcfg.get("heldout_works", [])),
        "num_sequences": int(dcfg.calibration.num_sequences),
        "seq_len": int(dcfg.calibration.seq_len),
        "seed": seed,
        "prefix_tokens": prefix_tokens(tokenizer) if tokenizer is not None else None,
        "code": calibration_code(sparsifier),
        **sparsifier.calibration_key(),
    }


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _load_verified(path, meta, key):
    """The state at ``path`` if its sha256 and key match the sidecar, else None."""
    if path.exists() and meta.exists():
        blob = path.read_bytes()
        try:
            recorded = json.loads(meta.read_text())
        except json.JSONDecodeError:
            return None
        if recorded.get("sha256") == hashlib.sha256(blob).hexdigest() and recorded.get("key") == key:
            return torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    return None


def _save(path, meta, key, state) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()
    atomic_write_bytes(path, blob)
    atomic_write_json(meta, {"key": key, "sha256": hashlib.sha256(blob).hexdigest()})


def committed_artifacts() -> Path:
    """Artifacts committed with the checkout (``experiments/results/artifacts``): slow
    intermediate results, e.g. TEAL's and WINA's greedy paths (an hour each on 2 cores),
    kept so a fresh machine need not recompute them. They are used only when their
    recorded key — code digest included — equals the one being asked for."""
    from ..store.provenance import package_dir

    return package_dir().parent / "experiments" / "results" / "artifacts"


class ArtifactCache:
    """Lets a sparsifier cache an intermediate result that depends on fewer parameters
    than its state (e.g. TEAL's greedy trajectory, shared by every target sparsity).
    A verified file of the same name, key and checksum in ``seed`` (the committed
    artifacts) is copied in instead of computing it."""

    def __init__(self, folder, base_key: dict, seed: Path | None = None):
        self.folder, self.base_key, self.seed = folder, base_key, seed

    def get(self, name: str, extra_key: dict, compute):
        key = {**self.base_key, "artifact": name, **extra_key}
        path = self.folder / f"{name}-{_digest(key)}.pt"
        meta = path.with_suffix(".json")
        with locked(path):
            state = _load_verified(path, meta, key)
            if state is None and self.seed is not None:
                state = _load_verified(self.seed / path.name, self.seed / meta.name, key)
                if state is not None:
                    _save(path, meta, key, state)
            if state is None:
                # on the CPU whether computed or read back, so callers see one device
                state = move_to(compute(), "cpu")
                _save(path, meta, key, state)
        return state


def load_or_calibrate(sparsifier, controller, model, tokenizer, splits, model_id, dcfg, seed, cache_dir=None):
    """Return (state, info) where info says whether the state came from the cache.

    The state is stored on the CPU (one cache serves CPU and GPU runs) and handed to
    ``sparsifier.load_state`` on the model's device."""
    device = next(model.parameters()).device
    if not sparsifier.needs_calibration:
        return {}, {"calibration": "none"}
    key = calibration_key(model_id, dcfg, sparsifier, seed, tokenizer, model)
    folder = cache_root(cache_dir) / "calibration"
    path = folder / f"{sparsifier.name}-{_digest(key)}.pt"
    meta = path.with_suffix(".json")
    own = sparsifier.calibration_key()
    base_key = {k: v for k, v in key.items() if k not in own} | {"method": own["method"], "version": own["version"]}
    sparsifier.artifacts = ArtifactCache(folder, base_key, seed=committed_artifacts())
    with locked(path):
        state = _load_verified(path, meta, key)
        if state is not None:
            sparsifier.load_state(move_to(state, device))
            return state, {"calibration": "cached", "calibration_file": str(path)}
        windows = calibration_windows(tokenizer, splits, key["num_sequences"], key["seq_len"], seed)
        batches = windows.to(device).split(int(dcfg.calibration.batch_size))
        # lm-eval and others reseed the global RNG; calibration uses its own seed
        torch.manual_seed(seed)
        state = move_to(sparsifier.calibrate(controller, model, batches), "cpu")
        _save(path, meta, key, state)
    sparsifier.load_state(move_to(state, device))
    return state, {"calibration": "computed", "calibration_file": str(path),
                   "calibration_tokens": int(windows.numel())}
