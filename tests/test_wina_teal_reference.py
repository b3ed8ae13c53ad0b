"""TEAL and WINA configured as their authors run them, against brute force on tiny models.

The shipped defaults are the reference setting (TEAL: a greedy over the seven linears with
the reference's step and error; WINA: the same greedy with WINA's score, on the
orthogonally transformed model). Checked here: the greedy path's structure and each of
its first choices against an independent search (own masks through forward hooks, own
error), the requested parameter-weighted sparsity on held-out tokens, each linear's own
threshold, WINA's kept sets against an exact sort over the transformed weights, and the
transform against the reference's rotation written out from the SVD.
"""
import contextlib
from importlib import resources

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_tiny, random_ids
from sparsebench.backends.dense import DenseBackend
from sparsebench.evaluators.sparsity import linear_input_sparsity
from sparsebench.models.patching import SparseLinear, SparsityController
from sparsebench.sparsifiers import SPARSIFIERS
from sparsebench.sparsifiers.base import capture_layer_inputs
from sparsebench.sparsifiers import teal
from sparsebench.sparsifiers.teal import PROJ_NAMES, interp_threshold, quantile_table

CALIB = dict(batch=4, seq=32, seed=1)
FAST = {"greedy_step": 0.1, "greedy_max": 0.7}  # a coarser path than the default (seconds, not minutes)
QKV, GATEUP = ("q", "k", "v"), ("gate", "up")


def shipped(name):
    return OmegaConf.load(resources.files("sparsebench.conf") / "sparsifier" / f"{name}.yaml")


class KeepPath:
    """Stands in for the on-disk artifact cache and keeps what the greedy computed."""

    def __init__(self):
        self.calls, self.value = 0, None

    def get(self, name, key, compute):
        self.calls += 1
        self.value = compute()
        return self.value


def build(name, arch="llama", **cfg):
    """The shipped config of ``name`` (+ a fast greedy and ``cfg``), calibrated on random ids."""
    model = make_tiny(arch)
    sp = SPARSIFIERS.get(name)(OmegaConf.merge(shipped(name), FAST, cfg))
    sp.artifacts = KeepPath()
    ctl = SparsityController(sp, DenseBackend()).attach(model)
    if sp.needs_calibration:
        sp.load_state(sp.calibrate(ctl, model, random_ids(**CALIB).split(2)))
    return model, sp, ctl


def params_of(site):
    return {p: site.projection(p).in_features * site.projection(p).out_features for p in PROJ_NAMES if p in site.slots}


# --------------------------------------------------------------------------- defaults

def test_shipped_defaults_are_the_authors_setting_and_all_key_the_calibration():
    teal, wina = shipped("teal"), shipped("wina")
    assert (teal.allocation, teal.greedy_units, teal.greedy_step, teal.greedy_error) == ("greedy", "projection", 0.025, "reference")
    assert (wina.allocation, wina.orthogonalize, wina.greedy_step, wina.greedy_error) == ("greedy", True, 0.025, "reference")
    for name, cfg in (("teal", teal), ("wina", wina)):
        sp = SPARSIFIERS.get(name)(cfg)
        assert set(cfg) - {"name"} <= set(sp.calibration_params), name  # every setting changes the cached state's key
        assert sp.needs_calibration
    assert not SPARSIFIERS.get("wina")(OmegaConf.merge(wina, {"allocation": "uniform"})).needs_calibration


# --------------------------------------------------------------------------- the greedy path

UNIT_CASES = [("teal", {}), ("teal", {"greedy_units": "group"}), ("wina", {})]


@pytest.mark.parametrize("name,cfg", UNIT_CASES, ids=["teal", "teal-group", "wina"])
def test_greedy_path_raises_one_unit_per_step_by_the_reference_step(name, cfg):
    s = 0.45
    model, sp, ctl = build(name, sparsity=s, **cfg)
    path = sp.artifacts.value
    group = cfg.get("greedy_units") == "group"
    units = ({"qkv": QKV, "o": ("o",), "gateup": GATEUP, "down": ("down",)} if group
             else {p: (p,) for p in PROJ_NAMES})
    for i, site in enumerate(ctl.sites):
        per = params_of(site)
        total = sum(per.values())
        rows, eff = path["levels"][i].double(), path["effective"][i]
        assert rows[0].abs().max() == 0
        # effective = parameter-weighted level, computed here from the parameter counts
        want_eff = (rows * torch.tensor([per[p] for p in PROJ_NAMES], dtype=torch.float64)).sum(-1) / total
        torch.testing.assert_close(eff, want_eff)
        n = int((eff < FAST["greedy_max"] - 1e-9).sum()) + 1  # steps up to the path's end
        assert eff[n - 1] >= FAST["greedy_max"] - 1e-9
        for k in range(1, n):
            changed = {PROJ_NAMES[j] for j in torch.nonzero(rows[k] != rows[k - 1]).flatten().tolist()}
            unit = next(u for u, ps in units.items() if set(ps) == changed)  # exactly one unit moved
            p_u = sum(per[p] for p in units[unit])
            step = FAST["greedy_step"] * per["q"] / p_u  # greedyopt.py: base_step_size / weight[unit]
            for p in units[unit]:
                j = PROJ_NAMES.index(p)
                assert float(rows[k, j]) == pytest.approx(min(1.0, float(rows[k - 1, j]) + step), abs=1e-6)
        if group:  # q/k/v share one level, gate/up one
            assert (rows[:, 0] == rows[:, 1]).all() and (rows[:, 1] == rows[:, 2]).all()
            assert (rows[:, 4] == rows[:, 5]).all()
        # the state's levels lie on the path: between the two steps around s, at block sparsity s
        lv = sp.levels[i].double()
        k = int(torch.searchsorted(eff[:n], torch.tensor(s, dtype=torch.float64), right=True)) - 1
        w = (s - eff[k]) / (eff[k + 1] - eff[k])
        torch.testing.assert_close(lv, rows[k] + w * (rows[k + 1] - rows[k]), rtol=0, atol=1e-6)
        assert float((lv * torch.tensor([per[p] for p in PROJ_NAMES], dtype=torch.float64)).sum() / total) == pytest.approx(s, abs=1e-6)


def _brute_force_greedy(name, sp, ctl, model, steps):
    """The first ``steps`` choices of greedyopt.py for layer 0, searched here: masks put on
    the linears by forward pre-hooks (thresholds on the score at each trial level, read off
    exact order statistics of the layer's dense calibration inputs), error = ‖ΔY‖ along
    the sequence over the last quarter of the positions, mean over channels."""
    site = ctl.sites[0]
    batches = random_ids(**CALIB).split(2)

    def score(p, x):  # WINA's default (reference) score: column norms on k and gate only
        x = x.abs()
        return x * site.projection(p).weight.norm(dim=0) if name == "wina" and p in ("k", "gate") else x

    vals = {}

    def record(inp):
        if inp.layer_idx == 0:
            vals.setdefault(inp.proj, []).append(score(inp.proj, inp.x).reshape(-1).float())

    ctl.linear_recorder = record
    with torch.no_grad(), ctl.dense():
        for b in batches:
            model(input_ids=b)
    ctl.linear_recorder = None
    # (TEAL: q/k/v read one tensor, so their tables are one table; gate/up likewise)
    gen = torch.Generator().manual_seed(0)
    tables = {p: quantile_table(torch.cat(v), gen) for p, v in vals.items()}

    run_layer, _ = capture_layer_inputs(ctl, model, batches)
    h = run_layer.dense_input(0, 0)[:1]
    per = params_of(site)

    def output(levels):
        hooks = []
        for p, s in levels.items():
            if s > 0:
                t = interp_threshold(tables[p], s)
                hooks.append(site.projection(p).linear.register_forward_pre_hook(
                    lambda _m, args, p=p, t=t: (args[0] * (score(p, args[0]) > t),)))
        try:
            with torch.no_grad(), ctl.dense():
                return run_layer(0, h, 0)
        finally:
            for hk in hooks:
                hk.remove()

    dense = output({})
    start = int(dense.shape[1] * 0.75)
    levels, chosen = {p: 0.0 for p in per}, []
    for _ in range(steps):
        errs = {}
        for p in per:
            trial = dict(levels, **{p: min(1.0, levels[p] + FAST["greedy_step"] * per["q"] / per[p])})
            errs[p] = float((dense - output(trial))[:, start:].norm(dim=1).mean())
        best = min(per, key=lambda p: (errs[p], PROJ_NAMES.index(p)))
        levels[best] = min(1.0, levels[best] + FAST["greedy_step"] * per["q"] / per[best])
        chosen.append(dict(levels))
    return chosen


@pytest.mark.parametrize("name", ["teal", "wina"])
def test_greedy_first_choices_match_a_brute_force_search(name):
    model, sp, ctl = build(name, sparsity=0.5)
    path = sp.artifacts.value["levels"][0]
    want = _brute_force_greedy(name, sp, ctl, model, steps=20)
    for k, lv in enumerate(want, start=1):
        got = {p: float(path[k, PROJ_NAMES.index(p)]) for p in lv}
        assert got == pytest.approx(lv, abs=1e-6), k


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3", "opt"])
def test_scored_rows_only_keeps_the_scored_rows_of_a_sparse_layer_and_computes_only_them(arch):
    model, sp, ctl = build("teal", arch, sparsity=0.5)
    run_layer, _ = capture_layer_inputs(ctl, model, random_ids(**CALIB).split(2))
    h = run_layer.dense_input(1, 0)
    site, seq = ctl.sites[1], h.shape[1]
    start = int(seq * (1 - teal.TAIL_FRACTION))
    rows_seen = []
    count = site.attention["q"].linear.register_forward_pre_hook(lambda _m, args: rows_seen.append(args[0].shape[-2]))
    try:
        with torch.no_grad(), ctl.recording(None, sparse_layers={1}):
            full = run_layer(1, h, 0)
            with teal.scored_rows_only(site, seq, start):
                scored = run_layer(1, h, 0)
    finally:
        count.remove()
    torch.testing.assert_close(scored[:, start:], full[:, start:], rtol=1e-5, atol=1e-6)
    assert rows_seen == [seq, seq - start]  # the hooked forward fed q only the scored rows


@pytest.mark.parametrize("name,arch,cfg", [("teal", "llama", {}), ("teal", "opt", {}), ("wina", "gemma3", {}),
                                           ("teal", "qwen2", {"greedy_units": "group"})])
def test_greedy_path_with_its_shortcuts_equals_the_plain_greedy(name, arch, cfg, monkeypatch):
    """The greedy computing only the scored rows and reusing the attention output of MLP
    trials finds the same path as every forward computed in full."""
    seen = []
    reuse = teal.attention_reuse

    @contextlib.contextmanager
    def counting_reuse(site, units):
        with reuse(site, units) as before:
            seen.append(type(site.layer.self_attn).__name__)
            yield before

    monkeypatch.setattr(teal, "attention_reuse", counting_reuse)
    fast = build(name, arch, sparsity=0.5, **cfg)[1].artifacts.value
    assert seen and set(seen) == {"_ReusedAttention"}
    monkeypatch.setattr(teal, "scored_rows_only", lambda *_a: contextlib.nullcontext())
    monkeypatch.setattr(teal, "attention_reuse", lambda *_a: contextlib.nullcontext(lambda _levels: None))
    every_row = build(name, arch, sparsity=0.5, **cfg)[1].artifacts.value
    torch.testing.assert_close(fast["levels"], every_row["levels"], rtol=0, atol=0)
    torch.testing.assert_close(fast["effective"], every_row["effective"], rtol=0, atol=0)


# --------------------------------------------------------------------------- achieved sparsity

@pytest.mark.parametrize("name,s,tol", [("teal", 0.5, 0.02), ("wina", 0.4, 0.01)])
def test_greedy_reaches_the_requested_sparsity_on_heldout_tokens(name, s, tol):
    model, sp, ctl = build(name, sparsity=s)
    with torch.no_grad(), ctl.counting():
        model(input_ids=random_ids(batch=4, seq=64, seed=5))  # not the calibration tokens
    per_proj, per_layer, overall = linear_input_sparsity(ctl)
    assert overall == pytest.approx(s, abs=tol)
    for v in per_layer:
        assert v == pytest.approx(s, abs=tol)
    # the allocation is not uniform: the linears of a layer sit at different levels
    assert any(len(set(lv.tolist())) > 1 for lv in sp.levels)


def test_teal_every_linear_has_its_own_threshold_on_a_shared_input():
    """The reference gives q, k, v (gate, up) their own levels on one distribution: on the
    calibration tokens each linear drops its own level of its input (thresholds fitted on
    the sparse block), q/k/v see one tensor, and their levels differ somewhere."""
    model, sp, ctl = build("teal", sparsity=0.5)
    seen, inputs = {}, {}

    def record(inp):
        t = float(sp.thresholds[inp.layer_idx, PROJ_NAMES.index(inp.proj)])
        seen[(inp.layer_idx, inp.proj)] = float((inp.x.abs() <= t).float().mean())
        inputs[(inp.layer_idx, inp.proj)] = inp.x

    ctl.linear_recorder = record
    with torch.no_grad():
        model(input_ids=random_ids(**CALIB))
    ctl.linear_recorder = None
    for (i, p), dropped in seen.items():
        assert dropped == pytest.approx(float(sp.levels[i, PROJ_NAMES.index(p)]), abs=0.01), (i, p)
    for i in range(len(ctl.sites)):
        assert inputs[(i, "q")] is inputs[(i, "k")] is inputs[(i, "v")]
        assert inputs[(i, "gate")] is inputs[(i, "up")]
    qkv = sp.levels[:, [PROJ_NAMES.index(p) for p in QKV]]
    assert (qkv.max(1).values > qkv.min(1).values).any()


def test_teal_group_units_share_one_threshold():
    _, sp, _ = build("teal", sparsity=0.5, greedy_units="group")
    idx = {p: PROJ_NAMES.index(p) for p in PROJ_NAMES}
    for t in (sp.thresholds, sp.levels):
        assert (t[:, idx["q"]] == t[:, idx["k"]]).all() and (t[:, idx["k"]] == t[:, idx["v"]]).all()
        assert (t[:, idx["gate"]] == t[:, idx["up"]]).all()


# --------------------------------------------------------------------------- WINA masks and transform

@pytest.mark.parametrize("arch,cfg", [
    ("llama", {}),  # the default: greedy + transform, the released code's score
    ("qwen2", {"score": "paper"}),
    ("gemma3", {}),
    ("llama", {"orthogonalize": False}),
    ("llama", {"allocation": "uniform", "orthogonalize": False}),
], ids=["llama", "qwen2-paper-score", "gemma3", "llama-no-transform", "llama-uniform"])
def test_wina_keeps_an_exact_sort_of_weighted_magnitudes_per_linear(arch, cfg):
    s = 0.5
    model, sp, ctl = build("wina", arch, sparsity=s, **cfg)
    uniform = cfg.get("allocation") == "uniform"
    calls, masks, hooks = [], [], []
    for mod in model.modules():
        if isinstance(mod, SparseLinear):
            hooks.append(mod.register_forward_hook(lambda m, i, o: calls.append((m, i[0].detach(), o.detach()))))
    ctl.linear_mask_observer = lambda inp, mask: masks.append(mask)
    with torch.no_grad():
        model(input_ids=random_ids(seed=8))
    ctl.linear_mask_observer = None
    for h in hooks:
        h.remove()
    assert {m.proj for m, _, _ in calls} == set(PROJ_NAMES) and len(masks) == len(calls)
    for (mod, x, out), mask in zip(calls, masks):
        c = mod.linear.weight.norm(dim=0)  # the weights the model runs with (transformed)
        if cfg.get("score", "reference") == "reference" and mod.proj not in ("k", "gate"):
            c = torch.ones_like(c)
        level = s if uniform else float(sp.levels[mod.site.layer_idx, PROJ_NAMES.index(mod.proj)])
        keep = round((1 - level) * x.shape[-1])
        score = x.abs() * c
        if level == 0:
            assert mask is None
            continue
        # the kept set is the top-`keep` of an exact sort (any order among equal scores:
        # GQA heads sharing a kv head give equal attention outputs at the first position)
        srt = score.sort(dim=-1, descending=True).values
        assert (mask.sum(-1) == keep).all()
        assert (score.masked_fill(~mask, float("inf")).amin(-1) == srt[..., keep - 1]).all()
        if keep < x.shape[-1]:
            assert (score.masked_fill(mask, -1.0).amax(-1) == srt[..., keep]).all()
        torch.testing.assert_close(out, mod.linear(x * mask), rtol=1e-5, atol=1e-5)


def _randomize_norms(model, seed=0):
    """Tiny models start with unit RMSNorm scales; random ones make the folding matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if "RMSNorm" in type(mod).__name__ and getattr(mod, "weight", None) is not None:
                gamma = 0.5 + torch.rand(mod.weight.shape, generator=gen)
                mod.weight.copy_(gamma - 1.0 if "Gemma" in type(mod).__name__ else gamma)


def _norm_inputs(model):
    """(input to each layer's attention norm, to its MLP norm) of a run, per layer."""
    out, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
        for kind, norm in (("attn", layer.input_layernorm), ("mlp", mlp_norm)):
            hooks.append(norm.register_forward_pre_hook(lambda _m, a, key=(i, kind): out.__setitem__(key, a[0].detach())))
    return out, hooks


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_wina_transform_is_the_references_rotation_and_keeps_dense_logits(arch):
    """tensor_transform.py: fold γ into q/k/v (gate/up), Q_a = V of svd(W_k·diag γ),
    Q_m = V of svd(W_gate·diag γ); q/k/v see RMSNorm(h)·Q_a with weights W·diag(γ)·Q_a."""
    ref = make_tiny(arch)
    _randomize_norms(ref)
    ids = random_ids(seed=2)
    captured, hooks = _norm_inputs(ref)
    with torch.no_grad():
        want_logits = ref(input_ids=ids).logits
    for h in hooks:
        h.remove()

    model = make_tiny(arch)
    _randomize_norms(model)
    sp = SPARSIFIERS.get("wina")(OmegaConf.merge(shipped("wina"), {"allocation": "uniform", "sparsity": 0.5}))
    ctl = SparsityController(sp, DenseBackend()).attach(model)  # the transform happens here
    seen = {}
    ctl.linear_recorder = lambda inp: seen.__setitem__((inp.layer_idx, inp.proj), inp.x.detach())
    with torch.no_grad(), ctl.dense():
        got_logits = model(input_ids=ids).logits
    ctl.linear_recorder = None
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)

    for i, layer in enumerate(ref.model.layers):
        mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
        block = {"attn": (layer.input_layernorm, layer.self_attn, QKV, "k_proj"),
                 "mlp": (mlp_norm, layer.mlp, GATEUP, "gate_proj")}
        for kind, (norm, parent, projs, basis) in block.items():
            gamma = norm.weight.double() + (1.0 if "Gemma" in type(norm).__name__ else 0.0)
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
            h = captured[(i, kind)].double()
            normalized = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
            q_rot = torch.linalg.svd(getattr(parent, basis).weight.double() * gamma, full_matrices=True).Vh.T
            for p in projs:
                w_ref = getattr(parent, f"{p}_proj").weight.double() * gamma @ q_rot
                torch.testing.assert_close(ctl.sites[i].projection(p).weight.double(), w_ref, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(seen[(i, p)].double(), normalized @ q_rot, rtol=1e-4, atol=1e-4)
        for p in ("o", "down"):  # untouched: the reference rotates their output side only
            w = getattr(layer.self_attn if p == "o" else layer.mlp, f"{p}_proj").weight
            torch.testing.assert_close(ctl.sites[i].projection(p).weight, w)


# --------------------------------------------------------------------------- cache

def test_wina_greedy_path_is_computed_once_per_model_and_transform(tmp_path):
    from sparsebench.models.calibration import ArtifactCache

    cache = ArtifactCache(tmp_path, {"model": "tiny", "method": "wina", "version": 1})
    calls = []
    for s, ortho in ((0.3, True), (0.5, True), (0.5, False)):
        model = make_tiny("llama")
        sp = SPARSIFIERS.get("wina")(OmegaConf.merge(shipped("wina"), FAST, {"sparsity": s, "orthogonalize": ortho}))
        sp.artifacts = cache
        original = sp.greedy_trajectory
        sp.greedy_trajectory = lambda *a, original=original: calls.append(1) or original(*a)
        ctl = SparsityController(sp, DenseBackend()).attach(model)
        sp.load_state(sp.calibrate(ctl, model, random_ids(**CALIB).split(2)))
    assert len(calls) == 2 and len(list(tmp_path.glob("wina-greedy-[0-9a-f]*.pt"))) == 2


@pytest.mark.parametrize("name", ["teal", "wina"])
def test_a_stopped_greedy_path_resumes_from_its_last_finished_layer(name, tmp_path, monkeypatch):
    """Each layer's path is kept as it is found: after a stop in layer 1, the next run
    computes layer 1 onwards only, and the path equals an uninterrupted one."""
    from sparsebench.models.calibration import ArtifactCache
    from sparsebench.sparsifiers import teal

    cfg = {**OmegaConf.to_container(shipped(name)), "name": name, "sparsity": 0.5, "greedy_step": 0.1}
    calls, real = [], teal.greedy_path

    def counted(*args, **kwargs):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt  # the machine went away
        return real(*args, **kwargs)

    monkeypatch.setattr(teal, "greedy_path", counted)
    batches = random_ids(**CALIB).split(2)

    def calibrate(folder):
        model = make_tiny("llama")  # the same weights every time (seeded)
        sp = SPARSIFIERS.get(name)(OmegaConf.create(cfg))
        sp.artifacts = ArtifactCache(folder, {"model": "tiny"})
        ctl = SparsityController(sp, DenseBackend()).attach(model)
        return sp.calibrate(ctl, model, batches)

    stop_at = 2
    with pytest.raises(KeyboardInterrupt):
        calibrate(tmp_path / "a")
    stop_at, calls[:] = None, []
    resumed = calibrate(tmp_path / "a")
    layers = len(make_tiny("llama").model.layers)
    assert len(calls) == layers - 1  # layer 0 came from the cache
    calls[:] = []
    fresh = calibrate(tmp_path / "b")
    assert len(calls) == layers
    for k in resumed:
        torch.testing.assert_close(resumed[k], fresh[k])
