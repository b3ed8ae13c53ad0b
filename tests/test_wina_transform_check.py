"""The WINA transform check (experiments/checks/wina_transform_error.py) against brute force:
the masked error against a per-row loop, the captured inputs and weights against the
linears' own outputs, and the rotated basis against the model's own one."""
import itertools

import pytest
import torch

from conftest import make_tiny, random_ids
from sparsebench.experiments.checks.wina_transform_error import (
    ROTATED, block_input_concentration, compare, concentration, linear_inputs, masked_error, norm_gain, wina_controller)


def test_masked_error_matches_a_row_by_row_enumeration():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(3, 7, generator=gen, dtype=torch.float64)
    score = torch.rand(5, 7, generator=gen)
    for keep in range(8):
        num, den = 0.0, 0.0
        for row, sc in zip(x, score):
            kept = sorted(range(7), key=lambda i: -sc[i].item())[:keep]
            masked = torch.zeros(7, dtype=torch.float64)
            masked[kept] = row[kept]
            num += ((masked - row) @ w.T).pow(2).sum().item()
            den += (row @ w.T).pow(2).sum().item()
        assert masked_error(x, w, score, keep) == pytest.approx((num / den) ** 0.5, rel=1e-9)


def test_concentration_of_one_hot_and_constant_rows():
    d = 16
    assert concentration(torch.eye(d)[:3] * 5.0) == pytest.approx(d ** 0.5)
    assert concentration(torch.full((2, d), -3.0)) == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_both_bases_compute_the_same_linear_outputs(arch):
    ids = random_ids(seed=3)
    plain_model, rotated_model = make_tiny(arch), make_tiny(arch)
    plain = linear_inputs(plain_model, wina_controller(plain_model, False), ids, skip=1)
    rotated = linear_inputs(rotated_model, wina_controller(rotated_model, True), ids, skip=1)
    layers = len(plain_model.model.layers)
    assert set(plain) == set(rotated) == set(itertools.product(range(layers), ROTATED))
    for key, (x, w) in plain.items():
        xr, wr = rotated[key]
        assert x.shape[0] == ids.shape[0] * (ids.shape[1] - 1)  # the skipped position is left out
        torch.testing.assert_close(xr @ wr.T, x @ w.T, rtol=1e-4, atol=1e-4)  # the same linear, another basis
    rows = compare(plain, rotated, [0.0, 0.5])
    assert len(rows) == 2 * len(plain)
    for r in rows:
        errors = [r["own_basis"], r["rotated_reference_score"], r["rotated_paper_score"]]
        if r["sparsity"] == 0.0:
            assert max(errors) < 1e-5  # keeping every input changes nothing in either basis
        else:
            assert min(errors) > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_block_inputs_name_the_planted_dominant_channel_and_its_scale(arch):
    model = make_tiny(arch)
    ctl = wina_controller(model, False)
    site = ctl.sites[0]
    norm = site.layer.input_layernorm
    d = norm.weight.shape[0]
    with torch.no_grad():  # a scale of 2 everywhere but 0.5 on channel 3
        want = torch.full((d,), 2.0)
        want[3] = 0.5
        norm.weight.copy_(want - 1.0 if "Gemma" in type(norm).__name__ else want)
    torch.testing.assert_close(norm_gain(norm), want)
    hidden = torch.randn(1, 6, d, generator=torch.Generator().manual_seed(0))
    hidden[..., 3] = 100.0  # the dominant channel in every position but the skipped first
    hidden[0, 0, 3] = 0.0
    hook = norm.register_forward_pre_hook(lambda _m, args: (hidden.to(args[0].dtype),) + tuple(args[1:]))
    try:
        out = block_input_concentration(model, ctl, random_ids(batch=1, seq=6), skip=1)
    finally:
        hook.remove()
    got = out[(0, "attn")]
    x = hidden[0, 1:]
    brute = sorted((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).tolist())[2]  # the median of 5 rows
    assert got["dominant_channel"] == 3 and got["dominant_share_of_tokens"] == 1.0
    assert got["dominant_scale_over_median"] == pytest.approx(0.25)
    assert got["concentration"] == pytest.approx(brute, rel=1e-6)
