"""Relufied checkpoints saved in their published formats (ReluLLaMA: stock Llama with
hidden_act relu; ProSparse: `sparsellama` + FATReLU threshold in hidden_act_param;
TurboSparse: `bamboo`, dReLU on both branches) load with the right activation, checked
against an MLP computed by hand from the weights; a stock activation is refused."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_tiny, random_ids
from sparsebench.backends.dense import DenseBackend
from sparsebench.core.errors import ConfigError
from sparsebench.models.loader import load_model
from sparsebench.models.patching import SparsityController
from sparsebench.sparsifiers import SPARSIFIERS


def save_checkpoint(tmp_path, arch, tokenizer, edit):
    model = make_tiny(arch, hidden_act="relu")
    folder = tmp_path / arch
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, model


def fatrelu_format(cfg):
    cfg.update(model_type="sparsellama", hidden_act="fatrelu", hidden_act_param=0.05,
               architectures=["SparseLlamaForCausalLM"],
               auto_map={"AutoModelForCausalLM": "modeling_sparsellama.SparseLlamaForCausalLM"})


def drelu_format(cfg):
    cfg.update(model_type="bamboo", hidden_act="relu", architectures=["BambooForCausalLM"],
               auto_map={"AutoModelForCausalLM": "modeling_bamboo.BambooForCausalLM"})


def hand_mlp(mlp_weights, x, kind, t=0.0):
    gate, up, down = (w.float() for w in mlp_weights)
    z, u = x @ gate.T, x @ up.T
    if kind == "fatrelu":
        a = z * (z >= t)
    else:
        a = torch.relu(z)
    if kind == "drelu":
        u = torch.relu(u)
    return (a * u) @ down.T


def local(folder, **kw):
    return OmegaConf.create({"name": "ckpt", "source": "path", "path": str(folder), "dtype": "float32", **kw})


@pytest.mark.parametrize("kind,arch,edit", [("relu", "llama", lambda c: None), ("fatrelu", "llama", fatrelu_format),
                                            ("drelu", "mistral", drelu_format)])
def test_format_loads_with_its_activation(tmp_path, tiny_tokenizer, kind, arch, edit):
    folder, ref = save_checkpoint(tmp_path, arch, tiny_tokenizer, edit)
    model, _, _ = load_model(local(folder))
    layer = model.model.layers[0]
    x = torch.randn(5, model.config.hidden_size)
    weights = (layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(layer.mlp(x), hand_mlp(weights, x, kind, t=0.05), rtol=1e-5, atol=1e-6)
    # the natural zeros are the mask: the relu sparsifier's run equals the stock forward
    ids = random_ids(seed=3)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        sp = SPARSIFIERS.get("relu")(OmegaConf.create({"name": "relu", "sparsity": None, "swap": False}))
        ctl = SparsityController(sp, DenseBackend()).attach(model)
        with ctl.counting() as stats:
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert all(s.masked_tokens == s.tokens and s.sparsity > 0.3 for s in stats.values())


@pytest.mark.parametrize("edit,requested", [(fatrelu_format, "stock"), (fatrelu_format, "relu"),
                                            (drelu_format, "stock"), (drelu_format, "relu")])
def test_stock_activation_on_relufied_checkpoint_is_refused(tmp_path, tiny_tokenizer, edit, requested):
    folder, _ = save_checkpoint(tmp_path, "llama" if edit is fatrelu_format else "mistral", tiny_tokenizer, edit)
    with pytest.raises(ConfigError, match="would silently compute a different function"):
        load_model(local(folder, activation=requested))


def test_relu_sparsifier_refuses_silu_model_without_swap():
    model = make_tiny("llama")
    sp = SPARSIFIERS.get("relu")(OmegaConf.create({"name": "relu", "sparsity": None, "swap": False}))
    with pytest.raises(ConfigError, match="swap=true"):
        SparsityController(sp, DenseBackend()).attach(model)


def test_relu_swap_equals_a_relu_model_and_keeps_the_dense_baseline():
    silu = make_tiny("llama")
    relu = make_tiny("llama", hidden_act="relu")  # same seed: same weights, ReLU activation
    ids = random_ids(seed=4)
    with torch.no_grad():
        dense_silu, dense_relu = silu(input_ids=ids).logits, relu(input_ids=ids).logits
        sp = SPARSIFIERS.get("relu")(OmegaConf.create({"name": "relu", "sparsity": None, "swap": True}))
        ctl = SparsityController(sp, DenseBackend()).attach(silu)
        torch.testing.assert_close(silu(input_ids=ids).logits, dense_relu)
        with ctl.dense():
            torch.testing.assert_close(silu(input_ids=ids).logits, dense_silu)


@pytest.mark.parametrize("target", [0.7, 0.85])
def test_fatrelu_threshold_reaches_a_sparsity_above_the_natural_one(target):
    model = make_tiny("llama", hidden_act="relu")
    sp = SPARSIFIERS.get("relu")(OmegaConf.create({"name": "relu", "sparsity": target, "swap": False}))
    ctl = SparsityController(sp, DenseBackend()).attach(model)
    calib = random_ids(batch=4, seq=32, seed=1)
    sp.load_state(sp.calibrate(ctl, model, calib.split(2)))
    with torch.no_grad(), ctl.counting() as stats:
        model(input_ids=calib)
    for s in stats.values():  # on the calibration tokens: the quantile is exact
        assert s.sparsity == pytest.approx(target, abs=0.01)
    assert (sp.thresholds > 0).all()
