"""Adapters find every MLP; patched-but-dense is bit-identical to the stock model."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_tiny, random_ids
from sparsebench.backends.dense import DenseBackend
from sparsebench.core.errors import UnsupportedArchitecture
from sparsebench.models.adapters import SUPPORTED, adapter_for_config, mlp_sites
from sparsebench.models.patching import SparseMLP, SparsityController
from sparsebench.sparsifiers.none import NoSparsifier


def test_sites_cover_every_layer(arch):
    model = make_tiny(arch, num_layers=3)
    sites = mlp_sites(model)
    assert [s.layer_idx for s in sites] == [0, 1, 2]
    for s in sites:
        assert s.intermediate_size == 128
        assert set(s.attention) == {"q", "k", "v", "o"}
        assert s.kind == ("plain" if arch == "opt" else "gated")


def test_dense_patch_is_bit_identical_and_restorable(arch):
    model = make_tiny(arch)
    ids = random_ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        ctl = SparsityController(NoSparsifier(OmegaConf.create({"sparsity": 0.0})), DenseBackend()).attach(model)
        assert sum(isinstance(m, SparseMLP) for m in model.modules()) == 2
        patched = model(input_ids=ids).logits
        ctl.detach()
        assert not any(isinstance(m, SparseMLP) for m in model.modules())
        restored = model(input_ids=ids).logits
    assert torch.equal(ref, patched)
    assert torch.equal(ref, restored)


def test_unknown_architecture_lists_supported():
    cfg = type("C", (), {"model_type": "gpt2"})()
    with pytest.raises(UnsupportedArchitecture) as err:
        adapter_for_config(cfg)
    msg = str(err.value)
    assert "gpt2" in msg and all(t in msg for t in ("llama", "mistral", "qwen2", "gemma3_text", "opt"))
    assert "\n" not in msg and set(SUPPORTED) >= {"llama", "mistral", "qwen2", "gemma3_text", "opt"}
