"""CATS against brute force: exact-sort thresholds and a masked dense computation
written independently of the patching code (the activation function itself is
wrapped to zero sub-threshold outputs)."""
import copy

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_tiny, random_ids
from sparsebench.backends.dense import DenseBackend
from sparsebench.models.adapters import mlp_sites
from sparsebench.models.patching import SparsityController
from sparsebench.sparsifiers.cats import CATS, quantile_threshold


class MaskedAct(torch.nn.Module):
    def __init__(self, act, t):
        super().__init__()
        self.act, self.t = act, t

    def forward(self, z):
        a = self.act(z)
        return a * (a.abs() > self.t).to(a.dtype)


def calibrated(model, sparsity, calib, calibrate_on="sparse_upstream"):
    cats = CATS(OmegaConf.create({"sparsity": sparsity, "calibrate_on": calibrate_on}))
    ctl = SparsityController(cats, DenseBackend()).attach(model)
    cats.load_state(cats.calibrate(ctl, model, calib.split(2)))
    return cats, ctl


def gate_activations(model, calib):
    """|act(gate(x))| per layer, by hooking the stock model's activation input."""
    acts = {}
    hooks = []
    for site in mlp_sites(model):
        def hook(_mod, _inp, out, i=site.layer_idx, act=site.act):
            acts.setdefault(i, []).append(act(out).abs().reshape(-1))
        hooks.append(site.activation_input.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=calib)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in acts.items()}


def mask_activation(site, t):
    if site.kind == "plain":
        site.layer.activation_fn = MaskedAct(site.act, t)
    else:
        site.layer.mlp.act_fn = MaskedAct(site.act, t)


@pytest.mark.parametrize("calibrate_on", ["sparse_upstream", "dense"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_thresholds_are_exact_order_statistics(arch, sparsity, calibrate_on):
    model = make_tiny(arch)
    calib = random_ids(batch=4, seq=32, seed=1)
    # Brute force: layer by layer, sort |act| of that layer; for sequential calibration,
    # mask the layer with its threshold before moving on to the next.
    reference = copy.deepcopy(model)
    acts = {}
    for site in mlp_sites(reference):
        a = gate_activations(reference, calib)[site.layer_idx]
        k = int(round(sparsity * a.numel()))
        acts[site.layer_idx] = (a, torch.sort(a).values[k - 1])
        if calibrate_on == "sparse_upstream":
            mask_activation(site, acts[site.layer_idx][1])
    cats, _ = calibrated(model, sparsity, calib, calibrate_on)
    for i, (a, expected) in acts.items():
        k = int(round(sparsity * a.numel()))
        assert cats.thresholds[i] == expected
        # exact target sparsity on the calibration tokens, up to ties (ReLU's zeros tie)
        below = (a < cats.thresholds[i]).sum().item()
        at_or_below = (a <= cats.thresholds[i]).sum().item()
        assert below <= k <= at_or_below
        if arch != "opt":
            assert at_or_below == k


@pytest.mark.parametrize("sparsity", [0.0, 0.4, 0.8])
def test_cats_equals_masked_dense_reference(arch, sparsity):
    model = make_tiny(arch)
    reference = copy.deepcopy(model)
    calib = random_ids(batch=4, seq=32, seed=1)
    cats, ctl = calibrated(model, sparsity, calib)
    # Brute force: wrap the stock activation so sub-threshold outputs are zero.
    for site in mlp_sites(reference):
        mask_activation(site, cats.thresholds[site.layer_idx])
    ids = random_ids(batch=3, seq=20, seed=7)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if sparsity == 0.0:
        assert torch.equal(got, want)


def test_quantile_threshold_zero_keeps_everything():
    assert quantile_threshold(torch.rand(100), 0.0) == float("-inf")


def test_sparsity_out_of_range_is_refused():
    from sparsebench.core.errors import ConfigError

    for bad in (1.0, 1.5, -0.1, "half"):
        with pytest.raises(ConfigError, match="sparsifier.sparsity"):
            CATS(OmegaConf.create({"sparsity": bad}))
