"""Every sparsifier against a brute-force reference on random tiny models.

Each MLP / wrapped linear call of the patched model is intercepted (forward hooks on
the SparseMLP / SparseLinear modules) and recomputed from the layer's weights with a
mask derived independently: exact sorts for top-k, exact order statistics for
quantiles, scipy's normal quantile for statistical top-k, an exhaustive search for
CETT, the SVD identity for R-Sparse.
"""
import copy

import numpy as np
import pytest
import scipy.stats
import torch
from omegaconf import OmegaConf

from conftest import ARCHS, assert_dense_at_sparsity_zero, make_tiny, random_ids, run_and_intercept
from sparsebench.backends.dense import DenseBackend
from sparsebench.core.errors import ConfigError
from sparsebench.evaluators.sparsity import linear_input_sparsity
from sparsebench.models.patching import SparseLinear, SparseMLP, SparsityController
from sparsebench.sparsifiers import SPARSIFIERS
from sparsebench.sparsifiers.cett import bisect_epsilon, mean_cett
from sparsebench.sparsifiers.rsparse import split_budget

CALIB = dict(batch=4, seq=32, seed=1)
DEFAULTS = {
    "cats": {}, "cett": {"budget": None}, "stat_topk": {"mode": "hard"}, "chess": {"up_stat": "mean_abs"},
    "teal": {"allocation": "uniform", "greedy_step": 0.45, "greedy_max": 0.8, "greedy_sequences": 1,
             "greedy_error": "token"},
    "wina": {"score": "paper", "orthogonalize": False, "allocation": "uniform"}, "rsparse": {"alphas": [1.0]},
    "dejavu": {"rank": 0.25, "steps": 30, "lr": 0.005, "lookahead": False, "selection": "topk", "oracle": False},
}
METHODS = sorted(DEFAULTS)


def build(name, arch="llama", **cfg):
    model = make_tiny(arch)
    sp = SPARSIFIERS.get(name)(OmegaConf.create({"name": name, **DEFAULTS[name], **cfg}))
    ctl = SparsityController(sp, DenseBackend()).attach(model)
    if sp.needs_calibration:
        sp.load_state(sp.calibrate(ctl, model, random_ids(**CALIB).split(2)))
    return model, sp, ctl


def mlp_parts(site, x):
    """(pre-activation, activation, h) of a site's MLP, straight from the weights."""
    pre = site.activation_input.linear(x) if isinstance(site.activation_input, SparseLinear) else site.activation_input(x)
    act = site.act(pre)
    up = site.up.linear(x) if isinstance(site.up, SparseLinear) else site.up(x)
    return pre, act, (act * up if site.kind == "gated" else act)


def down(site, h):
    return (site.down.linear if isinstance(site.down, SparseLinear) else site.down)(h)


def exact_topk(scores, keep):
    """Mask of the ``keep`` largest per row, by a full sort."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter(-1, order[..., :keep], True)


@torch.no_grad()
def check_mlp_calls(model, ctl, reference_mask, ids=None):
    calls = run_and_intercept(model, SparseMLP, random_ids(seed=7) if ids is None else ids)
    for mod, x, out in calls:
        pre, act, h = mlp_parts(mod.site, x)
        m = reference_mask(mod.site, x, pre, act, h)
        torch.testing.assert_close(out, down(mod.site, h * m), rtol=1e-5, atol=1e-5)
    return calls


# --------------------------------------------------------------------------- all methods

@pytest.mark.parametrize("name,arch", [(n, a) for n in METHODS for a in ARCHS if (n, a) != ("chess", "opt")])
def test_sparsity_zero_is_the_dense_model(name, arch):
    assert_dense_at_sparsity_zero(build, name, arch)


def test_every_method_has_a_config_and_validates_sparsity():
    for name in METHODS:
        with pytest.raises(ConfigError, match="sparsity"):
            SPARSIFIERS.get(name)(OmegaConf.create({"name": name, **DEFAULTS[name], "sparsity": 1.0}))


# --------------------------------------------------------------------------- CETT

def test_cett_bisection_matches_exhaustive_search():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        h = torch.randn(30, 10, generator=gen) * torch.rand(10, generator=gen) * 3
        w = torch.randn(6, 10, generator=gen)
        c = w.norm(dim=0)
        budget = float(torch.rand(1, generator=gen)) * 0.6 + 0.05
        # exhaustive: drop the k smallest ‖n_i‖ (over tokens × neurons) for every k
        values = (h.abs() * c).reshape(-1).sort().values
        cuts = [0.0] + [float(a + b) / 2 for a, b in zip(values[:-1], values[1:])] + [float(values[-1]) * 2]
        cetts = [mean_cett(h, w, c, cut) for cut in cuts]  # cetts[k]: the k smallest dropped
        first_cross = next(k for k, v in enumerate(cetts) if v > budget) - 1
        eps = bisect_epsilon(h, w, budget, iters=80, tol=0.0)
        k = int(((h.abs() * c) < eps).sum())
        assert cetts[k] <= budget + 1e-6 and cetts[k + 1] > budget  # a crossing of the budget
        if all(a <= b + 1e-12 for a, b in zip(cetts, cetts[1:])):  # monotone: the crossing
            assert k == first_cross


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_cett_masks_are_per_neuron_thresholds(arch):
    model, sp, ctl = build("cett", arch, sparsity=0.5, budget=0.2)

    def ref(site, x, pre, act, h):
        c = down(site, torch.eye(h.shape[-1])) - (site.down.bias if site.down.bias is not None else 0)
        return h.abs() * c.norm(dim=-1) >= float(sp.eps[site.layer_idx])

    check_mlp_calls(model, ctl, ref)
    assert sp.cett.sub(0.2).abs().max() < 1e-3  # calibration CETT equals the budget per layer


# --------------------------------------------------------------------------- statistical top-k

@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt"])
@pytest.mark.parametrize("s", [0.3, 0.7])
def test_stat_topk_threshold_and_gaussian_sparsity(arch, s):
    model, _, ctl = build("stat_topk", arch, sparsity=s)

    def ref(site, x, pre, act, h):
        z = pre.double().numpy()
        t = z.mean(-1, keepdims=True) + z.std(-1, keepdims=True) * scipy.stats.norm.ppf(s)
        return torch.from_numpy(z > t)

    check_mlp_calls(model, ctl, ref)
    # on Gaussian inputs the threshold approximates the exact top-k
    from sparsebench.sparsifiers.stat_topk import gaussian_threshold

    z = torch.randn(64, 4096, generator=torch.Generator().manual_seed(1))
    got = (z > gaussian_threshold(z, s)).float().mean()
    assert abs(float(got) - (1 - s)) < 0.01


# --------------------------------------------------------------------------- CHESS

def test_chess_thresholds_are_exact_quantiles_of_scaled_activations():
    model, sp, ctl = build("chess", "llama", sparsity=0.6)
    # layer 0 sees the same input in calibration whatever the masks above: its sparsity
    # on the calibration tokens is exactly s
    calib = random_ids(**CALIB)
    seen = []
    ctl.mask_observer = lambda inp, m: seen.append((inp.layer_idx, (~m).float().mean().item(), m.numel()))
    with torch.no_grad():
        model(input_ids=calib)
    ctl.mask_observer = None
    assert pytest.approx(0.6, abs=0.01) == seen[0][1]

    def ref(site, x, pre, act, h):
        return act.abs() > sp.tau[site.layer_idx]

    check_mlp_calls(model, ctl, ref)


def test_chess_refuses_a_plain_mlp():
    with pytest.raises(ConfigError, match="gated MLP"):
        build("chess", "opt", sparsity=0.5)


# --------------------------------------------------------------------------- Deja Vu

@pytest.mark.parametrize("lookahead", [False, True])
def test_dejavu_masks_are_exact_topk_of_predictor_scores(lookahead):
    model, sp, ctl = build("dejavu", "llama", sparsity=0.5, lookahead=lookahead)
    d_ff = ctl.sites[0].intermediate_size
    prev = {}

    def ref(site, x, pre, act, h):
        i = site.layer_idx
        prev[i] = x
        src = prev[i - 1] if lookahead and i > 0 else x
        scores = (src @ sp.A[i].T) @ sp.B[i].T
        return exact_topk(scores, d_ff // 2)

    check_mlp_calls(model, ctl, ref)


def test_dejavu_oracle_is_exact_topk_of_h():
    model, sp, ctl = build("dejavu", "opt", sparsity=0.6, oracle=True)
    keep = round(0.4 * ctl.sites[0].intermediate_size)
    check_mlp_calls(model, ctl, lambda site, x, pre, act, h: exact_topk(h.abs(), keep) & (h != 0))


def test_dejavu_predictor_learns_a_relu_model():
    """On ReLU activations the oracle is linear in x: the predictor must beat chance clearly."""
    model, sp, ctl = build("dejavu", "opt", sparsity=0.5, rank=0.5, steps=300, lr=0.01)
    from sparsebench.evaluators.mask_quality import MaskQuality

    counts = {}

    def observe(inp, mask):
        o = sp.oracle_mask(inp)
        c = counts.setdefault(inp.layer_idx, [0, 0])
        c[0] += int((mask & o).sum())
        c[1] += int(o.sum())

    ctl.mask_observer = observe
    with torch.no_grad():
        model(input_ids=random_ids(batch=4, seq=32, seed=11))  # not the training tokens
    recall = [tp / n for tp, n in counts.values()]
    assert min(recall) > 0.75, recall
    assert MaskQuality  # the evaluator wraps exactly this observer


# --------------------------------------------------------------------------- linear-input methods

@torch.no_grad()
def check_linear_calls(model, reference_mask, extra=None, ids=None):
    calls = run_and_intercept(model, SparseLinear, random_ids(seed=8) if ids is None else ids)
    for mod, x, out in calls:
        m = reference_mask(mod, x)
        want = mod.linear(x * m)
        if extra is not None:
            want = want + extra(mod, x, m)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("score", ["paper", "reference"])
def test_wina_keeps_exact_topk_of_weighted_magnitudes(arch, score):
    model, _, ctl = build("wina", arch, sparsity=0.6, score=score)

    def ref(mod, x):
        c = mod.linear.weight.norm(dim=0)
        if score == "reference" and mod.proj not in ("k", "gate"):
            c = torch.ones_like(c)
        return exact_topk(x.abs() * c, round(0.4 * x.shape[-1]))

    calls = check_linear_calls(model, ref)
    assert {m.proj for m, _, _ in calls} >= {"q", "k", "v", "o", "up", "down"}
    with ctl.counting():
        model(input_ids=random_ids(seed=8))
    assert linear_input_sparsity(ctl)[2] == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_wina_orthogonal_transform_keeps_dense_logits(arch):
    ref = make_tiny(arch)
    ids = random_ids(seed=2)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    model, _, ctl = build("wina", arch, sparsity=0.5, orthogonalize=True)
    with torch.no_grad(), ctl.dense():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for site in ctl.sites:  # W_k and W_gate are now column-orthogonal
        for w in (site.projection("k").weight, site.projection("gate").weight):
            gram = (w.T @ w).double()
            off = gram - torch.diag(torch.diag(gram))
            assert off.abs().max() < 1e-4 * gram.diag().max()


def test_wina_transform_refuses_opt():
    with pytest.raises(ConfigError, match="orthogonalize"):
        build("wina", "opt", sparsity=0.5, orthogonalize=True)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_teal_uniform_thresholds_are_quantiles_of_each_group_input(arch):
    model, sp, ctl = build("teal", arch, sparsity=0.5, allocation="uniform")
    from sparsebench.sparsifiers.teal import GROUP_NAMES, GROUP_OF

    check_linear_calls(model, lambda mod, x: x.abs() > sp.thresholds[mod.site.layer_idx, GROUP_NAMES.index(GROUP_OF[mod.proj])])
    # layer 0's inputs don't depend on any mask: per group, half of the calibration
    # inputs fall below the threshold (exact order statistic of the sampled values)
    calib = random_ids(**CALIB)
    seen = {}
    ctl.linear_recorder = lambda inp: seen.setdefault(inp.proj, inp.x) if inp.layer_idx == 0 else None
    with torch.no_grad(), ctl.dense():
        model(input_ids=calib)
    ctl.linear_recorder = None
    for proj in ("q", "gate" if arch != "opt" else "up"):
        t = sp.thresholds[0, GROUP_NAMES.index(GROUP_OF[proj])]
        assert float((seen[proj].abs() <= t).float().mean()) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("name", ["teal", "rsparse"])
def test_input_thresholds_hit_the_target_on_every_linear_of_the_sparse_model(name):
    """Run the fully sparse model on its own calibration text: every linear of every
    layer drops the requested fraction of its input channels. This holds only if the
    thresholds of o, gate/up and down were fitted on what the *sparse* block feeds them
    (fitting on the dense block overshoots them, by 2 points at 65% on SmolLM2)."""
    s = 0.6
    cfg = {"allocation": "uniform"} if name == "teal" else {"alphas": [0.9]}
    model, sp, ctl = build(name, "llama", sparsity=s, **cfg)
    target = s if name == "teal" else 1 - (1 - s) * 0.9
    seen = {}

    def record(inp):
        if name == "teal":
            from sparsebench.sparsifiers.teal import GROUP_NAMES, GROUP_OF
            t = float(sp.thresholds[inp.layer_idx, GROUP_NAMES.index(GROUP_OF[inp.proj])])
            score = inp.x.abs()
        else:
            t = sp.thresholds[(inp.layer_idx, inp.proj)]
            score = inp.x.abs() * inp.site.projection(inp.proj).weight.norm(dim=0)
        seen[(inp.layer_idx, inp.proj)] = float((score <= t).float().mean())

    ctl.linear_recorder = record
    with torch.no_grad():
        model(input_ids=random_ids(**CALIB))
    ctl.linear_recorder = None
    assert len(seen) == len(ctl.sites) * 7
    for key, dropped in seen.items():
        assert dropped == pytest.approx(target, abs=0.01), key


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_teal_greedy_probe_on_part_of_a_batch(arch):
    """The greedy probe runs on the first sequence of a calibration batch: the layer's
    other arguments (Gemma3's sliding-window masks, per-sequence tensors) are cut to
    match, and the result equals running that sequence alone."""
    from sparsebench.sparsifiers.base import LayerProbe, capture_layer_inputs

    model, sp, ctl = build("teal", arch, sparsity=0.5, allocation="greedy")
    batches = random_ids(batch=4, seq=80, seed=1).split(2)  # longer than the sliding window (64)
    run_layer, hidden = capture_layer_inputs(ctl, model, batches)
    alone, _ = capture_layer_inputs(ctl, model, [batches[0][:1]])
    for i in range(len(ctl.sites)):
        part = LayerProbe(ctl, i, run_layer, [run_layer.dense_input(i, 0)[:1]]).outputs(sparse=True)[0]
        ref = LayerProbe(ctl, i, alone, [alone.dense_input(i, 0)]).outputs(sparse=True)[0]
        torch.testing.assert_close(part, ref, rtol=1e-5, atol=1e-5)


def test_teal_greedy_meets_the_block_target_and_each_step_is_the_best():
    model, sp, ctl = build("teal", "llama", sparsity=0.5, allocation="greedy")
    from sparsebench.sparsifiers.teal import GROUP_NAMES

    params = sp.group_params(ctl.sites[0])
    total = sum(params.values())
    for i in range(len(ctl.sites)):
        eff = sum(params[g] * float(sp.levels[i, GROUP_NAMES.index(g)]) for g in params) / total
        assert eff == pytest.approx(0.5, abs=1e-4)
    # the greedy path's first step is the group whose step gives the least block error
    from sparsebench.sparsifiers.base import LayerProbe, capture_layer_inputs

    run_layer, hidden = capture_layer_inputs(ctl, model, random_ids(**CALIB).split(2))
    table_sp = copy.deepcopy(sp)
    probe = LayerProbe(ctl, 0, run_layer, [hidden[0][:1]])
    path = sp._greedy(0, _tables_for_layer0(ctl, model, run_layer, sp), params, probe, 0.05, 0.2)
    first = path[1]
    raised = [g for g in params if first[g] > 0]
    assert len(raised) == 1
    errs = {}
    dense = probe.outputs(sparse=False)[0]
    tables = _tables_for_layer0(ctl, model, run_layer, table_sp)
    for g in params:
        trial = {k: 0.0 for k in params}
        trial[g] = 0.05 * total / params[g]
        sp._set_levels(0, tables, trial)
        errs[g] = float((dense - probe.outputs(sparse=True)[0]).norm(dim=-1).mean())
    assert raised[0] == min(errs, key=errs.get)


def _tables_for_layer0(ctl, model, run_layer, sp):
    from sparsebench.sparsifiers.teal import _group_input

    vals = {}
    with ctl.recording(None, linear_recorder=lambda inp: vals.setdefault(inp.proj, []).append(_group_input(inp)) if inp.layer_idx == 0 else None):
        run_layer(0, run_layer.dense_input(0, 0), 0)
    return sp._tables(vals, torch.Generator().manual_seed(0))


def test_rsparse_full_rank_is_the_identity_and_budget_split_is_exact():
    gen = torch.Generator().manual_seed(0)
    model, sp, ctl = build("rsparse", "llama", sparsity=0.5, alphas=[1.0])
    lin = ctl.sites[0].projection("gate")
    # at full rank the low-rank term restores exactly what the mask dropped: y = W x
    full = min(lin.in_features, lin.out_features)
    sp.rank, sp.factors = (lambda layer, proj: full), {}  # full rank (beyond any budget)
    from sparsebench.models.patching import LinearInput

    x = torch.randn(3, 5, lin.in_features, generator=gen)
    m = torch.rand(x.shape, generator=gen) > 0.5
    y = sp.masked_linear(LinearInput(ctl.sites[0], "gate", x), lin.linear, m, ctl.backend)
    torch.testing.assert_close(y, lin.linear(x), rtol=1e-4, atol=1e-4)
    for d_in, d_out in [(64, 128), (128, 64), (576, 1536), (576, 192)]:
        for s in (0.25, 0.5, 0.65):
            for a in (0.0, 0.5, 0.9, 1.0):
                c, r = split_budget(d_in, d_out, s, a)
                budget = (1 - s) * d_in * d_out
                assert c * d_out + r * (d_in + d_out) <= budget + 1e-6
                assert r == min(d_in, d_out) or c * d_out + (r + 1) * (d_in + d_out) > budget


def test_rsparse_linear_is_masked_plus_low_rank_complement():
    model, sp, ctl = build("rsparse", "llama", sparsity=0.5, alphas=[0.8])

    def ref_mask(mod, x):
        c = mod.linear.weight.norm(dim=0)
        return x.abs() * c > sp.thresholds[(mod.site.layer_idx, mod.proj)]

    def low_rank(mod, x, m):
        r = sp.rank(mod.site.layer_idx, mod.proj)
        U, S, Vh = torch.linalg.svd(mod.linear.weight.double(), full_matrices=False)
        w_r = (U[:, :r] * S[:r]) @ Vh[:r]
        return ((x * ~m).double() @ w_r.T).float()

    check_linear_calls(model, ref_mask, extra=low_rank)
    assert 0 < sp.rank(0, "gate") < 64


def test_rsparse_alpha_search_picks_the_lowest_calibration_perplexity():
    model, sp, ctl = build("rsparse", "llama", sparsity=0.5, alphas=[0.5, 1.0])
    assert set(sp.search) == {0.5, 1.0}
    assert sp.alpha == min(sp.search, key=sp.search.get)


# --------------------------------------------------------------------------- prefill policy

@pytest.mark.parametrize("policy,prefix", [("dense_prefix", 10), ("decode_only", 0)])
def test_prefill_policy_keeps_the_chosen_positions_dense(policy, prefix):
    from sparsebench.models.patching import PrefillPolicy

    model, sp, ctl = build("cats", "llama", sparsity=0.5)
    ctl.prefill = PrefillPolicy(policy, prefix)
    ids = random_ids(seed=3)
    seen = []
    ctl.mask_observer = lambda inp, m: seen.append(m)
    with torch.no_grad():
        model(input_ids=ids)
    if policy == "decode_only":
        assert all(m is None for m in seen)
    else:
        for m in seen:
            assert m[:, :prefix].all() and not m[:, prefix:].all()
    # single-token decode steps with a KV cache are sparse under both policies
    seen.clear()
    with torch.no_grad():
        out = model(input_ids=ids[:, :12], use_cache=True)
        model(input_ids=ids[:, 12:13], past_key_values=out.past_key_values, use_cache=True)
    decode = seen[-len(ctl.sites):]
    assert all(m is not None and not m.all() for m in decode)
    np.testing.assert_equal(len(decode), len(ctl.sites))


# --------------------------------------------------------------------------- searches, caching, determinism

def test_cett_ppl_search_finds_the_budget_at_the_perplexity_ratio():
    model, sp, ctl = build("cett", "llama", sparsity=0.5, budget=None, ppl_increase=0.05)
    assert 0 < sp.found_budget < 1
    assert sp.found_ratio <= 1.05 + 1e-9
    # the per-layer CETT at calibration equals the budget that was found
    assert sp.cett.sub(sp.found_budget).abs().max() < 1e-3


def test_teal_greedy_path_is_computed_once_for_every_sparsity(tmp_path):
    from sparsebench.models.calibration import ArtifactCache

    cache = ArtifactCache(tmp_path, {"model": "tiny"})
    calls = []
    for s in (0.25, 0.5):
        model = make_tiny("llama")
        sp = SPARSIFIERS.get("teal")(OmegaConf.create({"name": "teal", **DEFAULTS["teal"], "allocation": "greedy", "sparsity": s}))
        sp.artifacts = cache
        original = sp.greedy_trajectory
        sp.greedy_trajectory = lambda *a, original=original: calls.append(1) or original(*a)
        ctl = SparsityController(sp, DenseBackend()).attach(model)
        sp.load_state(sp.calibrate(ctl, model, random_ids(**CALIB).split(2)))
    assert len(calls) == 1 and len(list(tmp_path.glob("teal-greedy-[0-9a-f]*.pt"))) == 1
    # a corrupted artifact is detected by its checksum and recomputed
    f = next(tmp_path.glob("teal-greedy-[0-9a-f]*.pt"))
    f.write_bytes(f.read_bytes()[:-10])
    sp.calibrate(ctl, model, random_ids(**CALIB).split(2))
    assert len(calls) == 2


def test_teal_greedy_path_survives_a_new_calibration_version(tmp_path):
    """The greedy path is keyed by its own version: bumping the method's calibration
    version (a change to the final fit) recomputes the thresholds, not the path."""
    from sparsebench.models.calibration import ArtifactCache

    calls = []
    for method_version in (2, 3):
        sp = SPARSIFIERS.get("teal")(OmegaConf.create({"name": "teal", **DEFAULTS["teal"], "allocation": "greedy", "sparsity": 0.5}))
        sp.artifacts = ArtifactCache(tmp_path, {"model": "tiny", "method": "teal", "version": method_version})
        original = sp.greedy_trajectory
        sp.greedy_trajectory = lambda *a, original=original: calls.append(1) or original(*a)
        model = make_tiny("llama")
        ctl = SparsityController(sp, DenseBackend()).attach(model)
        sp.calibrate(ctl, model, random_ids(**CALIB).split(2))
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["dejavu", "teal", "rsparse", "cett"])
def test_calibration_is_reproducible_and_ignores_the_global_rng(name):
    torch.manual_seed(123)
    _, a, _ = build(name, "llama", sparsity=0.4)
    torch.manual_seed(999)  # e.g. lm-eval reseeding between runs
    _, b, _ = build(name, "llama", sparsity=0.4)
    sa = {k: v for k, v in vars(a).items() if isinstance(v, torch.Tensor)}
    sb = {k: v for k, v in vars(b).items() if isinstance(v, torch.Tensor)}
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    if name == "rsparse":
        assert a.thresholds == b.thresholds
