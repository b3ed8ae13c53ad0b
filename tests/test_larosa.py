"""LaRoSA against brute force on random tiny models.

Q is checked against ``torch.linalg.eigh`` of the second moment of inputs captured by
hooks on an unpatched model; masks against exact sorts of |xQ| (fp64); every masked
linear's output against ((xQ) ⊙ m) Qᵀ Wᵀ + b computed in fp64 from the layer's own
weights; whole-model logits across backends.
"""
import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ARCHS, make_tiny, random_ids
from sparsebench.backends import BACKENDS
from sparsebench.backends.dense import DenseBackend
from sparsebench.core.errors import ConfigError
from sparsebench.evaluators.sparsity import linear_input_sparsity
from sparsebench.models.patching import SparseLinear, SparsityController
from sparsebench.sparsifiers import SPARSIFIERS
from sparsebench.sparsifiers.base import calibration_perplexity
from sparsebench.sparsifiers.larosa import GROUP_OF, block_levels

CALIB = dict(batch=4, seq=32, seed=1)
ROTATED = ("q", "k", "v", "gate", "up")


def config(**cfg):
    base = OmegaConf.to_container(OmegaConf.load("conf/sparsifier/larosa.yaml"))
    return OmegaConf.create({**base, **cfg})


def build(arch="llama", backend=None, state=None, **cfg):
    model = make_tiny(arch)
    sp = SPARSIFIERS.get("larosa")(config(**cfg))
    ctl = SparsityController(sp, backend or DenseBackend()).attach(model)
    if state is None:
        state = sp.calibrate(ctl, model, random_ids(**CALIB).split(2))
    sp.load_state(state)
    return model, sp, ctl, state


def captured_inputs(arch):
    """Every calibration input of q_proj and of the MLP's first linear (gate; OPT: fc1),
    per layer, from forward pre-hooks on an unpatched copy of the model."""
    model = make_tiny(arch)
    layers = model.model.decoder.layers if arch == "opt" else model.model.layers
    got = {"attn": {}, "mlp": {}}
    hooks = []
    for i, layer in enumerate(layers):
        mlp_first = layer.fc1 if arch == "opt" else layer.mlp.gate_proj
        for g, mod in (("attn", layer.self_attn.q_proj), ("mlp", mlp_first)):
            hooks.append(mod.register_forward_pre_hook(
                lambda _m, a, g=g, i=i: got[g].setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]).double())))
    with torch.no_grad():
        for b in random_ids(**CALIB).split(2):
            model(input_ids=b)
    for h in hooks:
        h.remove()
    return {g: {i: torch.cat(v) for i, v in per.items()} for g, per in got.items()}


def rotation_of(sp, layer, proj):
    """The Q a rotated linear's input goes through (from the calibrated state)."""
    group = "mlp" if GROUP_OF[proj] == "mlp" and sp.rotation == "block" else "attn"
    return sp.q[group][layer].double()


def exact_topk(scores, keep):
    order = scores.argsort(dim=-1, descending=True, stable=True)
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order[..., :keep], True)


def assert_top_k(mask, scores, keep, tol):
    """``mask`` keeps exactly ``keep`` entries per row and they are the largest: equal to a
    full sort's choice, except where a tie (within ``tol``, e.g. identical heads of GQA's
    first token) straddles the boundary, where any choice among the tied is a top-k."""
    assert bool((mask.sum(-1) == keep).all())
    kept_min = scores.masked_fill(~mask, float("inf")).min(-1).values
    dropped_max = scores.masked_fill(mask, float("-inf")).max(-1).values
    assert bool((kept_min >= dropped_max - tol).all())
    clear = (kept_min - dropped_max > tol).unsqueeze(-1)  # rows with no tie at the boundary
    assert torch.equal(mask & clear, exact_topk(scores, keep) & clear)
    assert clear.float().mean() > 0.5


def masked_calls(model, sp, ids):
    """(module, input, mask, output) of every SparseLinear call."""
    calls, masks, hooks = [], [], []
    orig = sp.input_mask
    sp.input_mask = lambda inp: masks.append(orig(inp)) or masks[-1]
    for mod in model.modules():
        if isinstance(mod, SparseLinear):
            hooks.append(mod.register_forward_hook(lambda m, i, o: calls.append((m, i[0].detach(), o.detach()))))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
        del sp.input_mask
    assert len(calls) == len(masks) and calls
    return [(m, x, mask, out) for (m, x, out), mask in zip(calls, masks)]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ------------------------------------------------------------------ 1. Q

@pytest.mark.parametrize("arch,rotation", [("llama", "layer"), ("llama", "block"), ("opt", "block")])
def test_q_is_the_orthogonal_eigenbasis_of_the_calibration_inputs(arch, rotation):
    _, sp, _, state = build(arch, rotation=rotation)
    assert set(state) == ({"q_attn", "q_mlp"} if rotation == "block" else {"q_attn"})
    inputs = captured_inputs(arch)
    for group in (("attn", "mlp") if rotation == "block" else ("attn",)):
        q = sp.q[group].double()
        for layer in range(q.shape[0]):
            Q = q[layer]
            torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[0], dtype=Q.dtype), rtol=0, atol=1e-5)
            x = inputs[group][layer]
            evals, evecs = torch.linalg.eigh(x.T @ x)
            ref = evecs[:, evals.argsort(descending=True)]  # descending, as the paper orders Q
            sign = torch.sign((ref * Q).sum(0))  # eigenvectors are unique up to sign
            assert bool((sign != 0).all())
            torch.testing.assert_close(Q, ref * sign, rtol=0, atol=1e-5)
    if rotation == "layer":  # one Q per layer: the MLP input is rotated by the attention input's Q
        assert torch.equal(sp._group_q("mlp", 1, torch.device("cpu")), sp.q["attn"][1])


# ------------------------------------------------------------------ 2. sparsity 0 / exact fold

@pytest.mark.parametrize("arch", ARCHS)
def test_sparsity_zero_is_the_dense_model_and_the_folded_rotation_is_exact(arch):
    ids = random_ids(seed=9)
    with torch.no_grad():
        want = make_tiny(arch)(input_ids=ids).logits
    model, sp, _, state = build(arch, sparsity=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
    # every channel kept, but through the rotation: (xQ)(WQ)ᵀ = xWᵀ
    model, sp, _, _ = build(arch, sparsity=0.5)
    sp.input_mask = lambda inp: torch.ones_like(inp.x, dtype=torch.bool)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert rel_err(got, want) < 1e-4
    assert sp._folded  # the folded weights were used
    assert {p for (_, p) in sp._folded} == ({"q", "k", "v", "up"} if arch == "opt" else set(ROTATED))


# ------------------------------------------------------------------ 3. top-k of |xQ|

@pytest.mark.parametrize("coefficients", [[1.0, 1.0], [0.8, 1.2]])
@pytest.mark.parametrize("s", [0.3, 0.7])
def test_masks_keep_exactly_the_top_k_rotated_channels(coefficients, s):
    model, sp, _, _ = build("llama", sparsity=s, coefficients=coefficients, coefficient_norm="params")
    for mod, x, mask, _ in masked_calls(model, sp, random_ids(seed=3)):
        layer, proj, d = mod.site.layer_idx, mod.proj, x.shape[-1]
        level = sp.level(layer, proj)
        if coefficients == [1.0, 1.0]:
            assert level == pytest.approx(s)  # uniform: every linear at s
        keep = round((1 - level) * d)
        rotated = proj in ROTATED
        score = (x.double() @ rotation_of(sp, layer, proj)).abs() if rotated else x.double().abs()
        assert_top_k(mask, score, keep, tol=1e-5 if rotated else 0.0)


def block_params(site):
    """(P_rot, P_out, d² per rotated input × inputs) of a block's seven (OPT: six) linears."""
    params = {p: site.projection(p).in_features * site.projection(p).out_features for p in site.slots
              if p in GROUP_OF.keys() | {"o", "down"}}
    p_rot = sum(n for p, n in params.items() if p in GROUP_OF)
    cost = site.attention["q"].in_features ** 2 + site.up.in_features ** 2  # xQ of the attention and MLP inputs
    return params, p_rot, sum(params.values()) - p_rot, cost


@pytest.mark.parametrize("s", [0.25, 0.5, 0.9])
def test_params_levels_keep_the_reference_ratio_and_drop_the_requested_channels(s):
    _, sp, ctl, _ = build("llama", sparsity=s, coefficient_norm="params")
    for site in ctl.sites:
        s_rot, s_out = sp.levels(site.layer_idx)
        params, *_ = block_params(site)
        weighted = sum(n * (s_rot if p in GROUP_OF else s_out) for p, n in params.items()) / sum(params.values())
        assert weighted == pytest.approx(s)  # channels dropped = s; the rotations are not counted
        if s_out < 1:
            assert s_out / s_rot == pytest.approx(1.2 / 0.8)
        else:  # capped: the excess moved to the rotated inputs
            assert s == 0.9 and s_rot < 1
    _, lit, _, _ = build("llama", sparsity=s, coefficient_norm="none")
    assert lit.levels(0) == (pytest.approx(0.8 * s), pytest.approx(min(1.2 * s, 1.0)))
    assert block_levels(0.8, 1.2, 0.5, 0, 100, "params") == (0.5, 0.5)  # one group: all of it
    assert block_levels(0.8, 1.2, 0.5, 0, 100, "effective", cost=10) == (0.6, 0.6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("s", [0.3, 0.5, 0.74])
def test_effective_levels_pay_for_the_rotations(arch, s):
    """effective: channels dropped minus the rotations' d² per rotated input = s, per layer."""
    _, sp, ctl, _ = build(arch, sparsity=s, coefficient_norm="effective")
    assert sp.norm == "effective"
    for site in ctl.sites:
        s_rot, s_out = sp.levels(site.layer_idx)
        params, p_rot, p_out, cost = block_params(site)
        assert sum(sp.dense_cost(site.layer_idx, p) for p in params) == cost
        assert (p_rot * s_rot + p_out * s_out - cost) / (p_rot + p_out) == pytest.approx(s)
        if s_out < 1:
            assert s_out / s_rot == pytest.approx(1.2 / 0.8)
        else:  # capped at 1, the excess on the rotated inputs
            assert s == 0.74 and s_rot <= 1
    # the same ratio under params, with fewer channels dropped
    _, par, _, _ = build(arch, sparsity=s, coefficient_norm="params", state={})
    assert par.levels(0)[0] < sp.levels(0)[0]


def test_rotation_none_is_plain_top_k_of_the_magnitude():
    model, sp, _, state = build("llama", sparsity=0.5, rotation="none", coefficients=[1.0, 1.0])
    assert state == {}
    for mod, x, mask, out in masked_calls(model, sp, random_ids(seed=4)):
        assert_top_k(mask, x.abs(), round(0.5 * x.shape[-1]), tol=0.0)
        lin = mod.linear
        torch.testing.assert_close(out, torch.nn.functional.linear(x * mask, lin.weight, lin.bias))


# ------------------------------------------------------------------ 4. masked linear

@pytest.mark.parametrize("arch,rotation", [("llama", "layer"), ("qwen2", "block"), ("opt", "layer")])
def test_masked_linear_is_the_rotated_brute_force(arch, rotation):
    model, sp, _, _ = build(arch, sparsity=0.45, rotation=rotation)  # levels < 1 (o/down ≈ 0.9)
    seen = set()
    for mod, x, mask, out in masked_calls(model, sp, random_ids(seed=5)):
        w, b = mod.linear.weight.double(), mod.linear.bias
        if mod.proj in ROTATED:
            Q = rotation_of(sp, mod.site.layer_idx, mod.proj)
            xr = x.double() @ Q
            want = ((xr * mask) @ Q.T) @ w.T  # the reference's form: rotate back, dense linear
        else:
            want = (x.double() * mask) @ w.T
        if b is not None:
            want = want + b.double()
        assert rel_err(out, want) < 1e-5, mod.proj
        seen.add(mod.proj)
    assert seen == ({"q", "k", "v", "o", "up", "down"} if arch == "opt" else set(ROTATED) | {"o", "down"})


# ------------------------------------------------------------------ 5. backends

@pytest.mark.parametrize("arch", ARCHS)
def test_whole_model_logits_match_across_backends(arch):
    ids = random_ids(batch=2, seq=6)
    outs, state = {}, None
    from test_backends import SPARSE_BACKENDS  # index_select, cached, fused (+ union, per-token, portable)

    for name, cfg in [("dense", {})] + SPARSE_BACKENDS:
        backend = BACKENDS.get(name)(OmegaConf.create({"name": name, **cfg}))
        model, sp, _, state = build(arch, backend=backend, state=state, sparsity=0.5)
        with torch.no_grad():
            outs[(name, str(cfg))] = model(input_ids=ids).logits
    ref = outs[("dense", "{}")]
    for key, logits in outs.items():
        assert rel_err(logits, ref) < 1e-4, key
    with torch.no_grad():
        dense = make_tiny(arch)(input_ids=ids).logits
    assert rel_err(ref, dense) > 1e-3  # the sparse model is not the dense one


# ------------------------------------------------------------------ accounting

def test_sparsity_accounting_charges_the_rotations():
    model, sp, ctl, _ = build("llama", sparsity=0.5, coefficient_norm="params")
    with ctl.counting(), torch.no_grad():
        model(input_ids=random_ids(seed=6))
    per_proj, per_layer, overall = linear_input_sparsity(ctl)
    for site in ctl.sites:
        i = site.layer_idx
        params = {p: site.projection(p).in_features * site.projection(p).out_features for p in per_proj}
        channels = 0.0
        for p, n in params.items():
            d = site.projection(p).in_features
            assert per_proj[p][i] == pytest.approx(1 - round((1 - sp.level(i, p)) * d) / d)
            channels += n * per_proj[p][i]
        d = site.up.in_features
        # two d×d rotations per layer (attention input, MLP input), read whatever the mask
        assert sum(sp.dense_cost(i, p) for p in params) == 2 * d * d
        assert sp.dense_cost(i, "q") == sp.dense_cost(i, "gate") == d * d
        assert per_layer[i] == pytest.approx((channels - 2 * d * d) / sum(params.values()))
        assert channels / sum(params.values()) == pytest.approx(0.5, abs=0.01)  # rounding of k only
    assert overall < 0.5 - 0.2  # params: the rotations (2·64²/36864 ≈ 0.22) come off the channels
    _, dense_sp, _, _ = build("llama", sparsity=0.0)
    assert dense_sp.dense_cost(0, "q") == 0  # no rotation is computed at sparsity 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("s", [0.3, 0.5])
def test_effective_reported_sparsity_is_the_requested_sparsity(arch, s):
    """The sparsity evaluator's number (dropped channels minus the rotations, from
    ``controller.linear_stats`` and ``dense_cost``) lands on s under ``effective``."""
    model, sp, ctl, _ = build(arch, sparsity=s, coefficient_norm="effective")
    with ctl.counting(), torch.no_grad():
        model(input_ids=random_ids(batch=4, seq=24, seed=6))
    _, per_layer, overall = linear_input_sparsity(ctl)
    assert overall == pytest.approx(s, abs=0.02)
    assert per_layer == [pytest.approx(s, abs=0.02)] * len(ctl.sites)
    assert all(sp.dense_cost(i, "q") > 0 for i in range(len(ctl.sites)))  # the rotations are charged


def test_unreachable_sparsity_is_refused_at_attach_naming_the_largest():
    model = make_tiny("llama")  # 2·64² of rotations per 36864 weights: at most 1 − 2/9 = 0.777…
    sp = SPARSIFIERS.get("larosa")(config(sparsity=0.8, coefficient_norm="effective"))  # a valid setting
    with pytest.raises(ConfigError, match=r"sparsifier.sparsity=0.8 .*largest reachable sparsity is 0\.777") as exc:
        SparsityController(sp, DenseBackend()).attach(model)
    assert "\n" not in str(exc.value) and "coefficient_norm=params" in str(exc.value)
    # just below the limit: every channel but a few dropped, levels at most 1
    _, top, _, _ = build("llama", sparsity=0.777, coefficient_norm="effective")
    assert max(top.levels(0)) <= 1.0 and min(top.levels(0)) > 0.95
    # params and none do not count the rotations: 0.8 of the channels is reachable
    for norm in ("params", "none"):
        _, ok, _, _ = build("llama", sparsity=0.8, coefficient_norm=norm, state={})
        assert max(ok.levels(0)) <= 1.0
    # rotation none costs nothing: everything below 1 is reachable
    _, plain, ctl, _ = build("llama", sparsity=0.9, rotation="none", coefficient_norm="effective")
    _, p_rot, p_out, _ = block_params(ctl.sites[0])
    assert plain.dense_cost(0, "q") == 0
    assert plain.levels(0) == block_levels(0.8, 1.2, 0.9, p_rot, p_out, "params")


# ------------------------------------------------------------------ search and config

def test_coefficient_search_keeps_the_pair_with_the_lowest_perplexity():
    model, sp, _, state = build("llama", sparsity=0.6, coefficient_search="grid", coefficient_grid=[0.7, 1.0])
    search = dict(zip(state["search_c"].tolist(), state["search_ppl"].tolist()))
    assert sorted(search) == [0.7, 1.0]
    best = min(search, key=search.get)
    assert state["coefficients"].tolist() == [best, 2 - best]
    assert sp.coefficients == (best, 2 - best) and len(sp.summary()["coefficient_search_ppl"]) == 2
    val = random_ids(**CALIB).split(2)[1:]  # the last quarter (here: the second of two batches)
    for c, ppl in search.items():
        sp.coefficients, sp._levels = (c, 2 - c), {}
        assert calibration_perplexity(model, val) == pytest.approx(ppl, rel=1e-5)
    assert search[0.7] != pytest.approx(search[1.0])  # the grid points differ
    assert "sparsity" in sp.calibration_params and "sparsity" not in build("llama")[1].calibration_params


@pytest.mark.parametrize("key,value", [("rotation", "pca"), ("coefficients", [0.8]), ("coefficients", [0.0, 1.0]),
                                       ("coefficient_norm", "flops"), ("coefficient_search", "random"),
                                       ("coefficient_grid", [2.5]), ("coefficient_grid", []),
                                       ("projections", ["q", "x"]), ("projections", []), ("sparsity", 1.0)])
def test_bad_settings_fail_in_one_line_naming_the_setting(key, value):
    with pytest.raises(ConfigError, match=key) as exc:
        SPARSIFIERS.get("larosa")(config(**{key: value}))
    assert "\n" not in str(exc.value)


def test_a_projection_subset_masks_only_those_linears():
    model, sp, ctl, _ = build("llama", sparsity=0.5, projections=["gate", "up", "down"], coefficient_norm="effective")
    assert sp.input_projections == ("gate", "up", "down")
    assert {m.proj for m, *_ in masked_calls(model, sp, random_ids(seed=8))} == {"gate", "up", "down"}
    s_rot, s_out = sp.levels(0)
    site = ctl.sites[0]
    p_rot = 2 * site.gate.in_features * site.gate.out_features
    p_out = site.down.in_features * site.down.out_features
    cost = site.gate.in_features ** 2  # one rotation: the MLP input
    assert sp.dense_cost(0, "gate") == cost and sp.dense_cost(0, "up") == sp.dense_cost(0, "down") == 0
    assert (p_rot * s_rot + p_out * s_out - cost) / (p_rot + p_out) == pytest.approx(0.5)


def test_cli_run_end_to_end(tmp_path):
    from test_cli import TINY, sparsebench

    sweep = tmp_path / "sweep"
    proc = sparsebench(["-m", "sparsifier=larosa", "sparsifier.sparsity=0.5,0.3", "evaluator=[sparsity]", *TINY,
                        f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["sparsifier"]["sparsity"]: r for r in (json.loads(f.read_text()) for f in sweep.glob("*/results.json"))}
    assert set(runs) == {0.5, 0.3}
    for s, r in runs.items():
        assert r["sparsifier"]["coefficients"] == [0.8, 1.2] and r["sparsifier"]["sparsity_unit"] == "linear_inputs"
        # the default is the released code's literal levels 0.8·s / 1.2·s; the rotations are
        # not paid for, so the reported sparsity (channels dropped minus them) is below s
        assert r["config"]["sparsifier"]["coefficient_norm"] == "none"
        for row in r["per_layer"]:
            assert row["larosa_level/rotated"] == pytest.approx(0.8 * s)
            assert row["larosa_level/out"] == pytest.approx(1.2 * s)
        assert r["metrics"]["sparsity/mean"] < s - 0.1
    # Q does not depend on the sparsity: one calibration serves both points
    assert {r["sparsifier"]["calibration"] for r in runs.values()} == {"computed", "cached"}


def test_cli_unreachable_sparsity_fails_in_one_line_without_results(tmp_path):
    from test_cli import TINY, sparsebench

    proc = sparsebench(["sparsifier=larosa", "sparsifier.sparsity=0.8", "sparsifier.coefficient_norm=effective",
                        "evaluator=[sparsity]", *TINY,
                        "hydra.run.dir=out"], tmp_path)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sparsebench: error:") and "largest reachable sparsity is 0.777" in lines[0]
    assert not list(tmp_path.rglob("results.json"))
