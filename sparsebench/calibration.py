"""Calibrate a sparsifier once per (model, data, method, parameters) and cache the state.

The state file is written atomically next to a sha256; a file whose checksum does
not match (killed write, disk trouble, hand edits) is recomputed, never used.
"""
from __future__ import annotations

import hashlib
import io
import json

import torch

from .cache import atomic_write_bytes, atomic_write_json, cache_root, locked
from .data.corpus import calibration_windows


def calibration_key(model_id: str, dcfg, sparsifier, seed: int) -> dict:
    return {
        "model": model_id,
        "corpus": dcfg.corpus,
        "heldout_works": list(dcfg.get("heldout_works", [])),
        "num_sequences": int(dcfg.calibration.num_sequences),
        "seq_len": int(dcfg.calibration.seq_len),
        "seed": seed,
        **sparsifier.calibration_key(),
    }


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def load_or_calibrate(sparsifier, controller, model, tokenizer, splits, model_id, dcfg, seed, cache_dir=None):
    """Return (state, info) where info says whether the state came from the cache."""
    if not sparsifier.needs_calibration:
        return {}, {"calibration": "none"}
    key = calibration_key(model_id, dcfg, sparsifier, seed)
    path = cache_root(cache_dir) / "calibration" / f"{sparsifier.name}-{_digest(key)}.pt"
    meta = path.with_suffix(".json")
    with locked(path):
        if path.exists() and meta.exists():
            blob = path.read_bytes()
            recorded = json.loads(meta.read_text())
            if recorded.get("sha256") == hashlib.sha256(blob).hexdigest() and recorded.get("key") == key:
                state = torch.load(io.BytesIO(blob), weights_only=True)
                sparsifier.load_state(state)
                return state, {"calibration": "cached", "calibration_file": str(path)}
        windows = calibration_windows(tokenizer, splits, key["num_sequences"], key["seq_len"], seed)
        batches = windows.split(int(dcfg.calibration.batch_size))
        state = sparsifier.calibrate(controller, model, batches)
        buf = io.BytesIO()
        torch.save(state, buf)
        blob = buf.getvalue()
        atomic_write_bytes(path, blob)
        atomic_write_json(meta, {"key": key, "sha256": hashlib.sha256(blob).hexdigest()})
    sparsifier.load_state(state)
    return state, {"calibration": "computed", "calibration_file": str(path),
                   "calibration_tokens": int(windows.numel())}
