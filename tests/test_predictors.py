"""Predictors that decide the MLP neuron mask before the MLP runs: ``svd_predictor``
(training-free low-rank gate) and ``dejavu_target`` (Deja Vu trained on CATS / CETT /
top-k labels, with over-provisioning), against brute-force references on tiny models:
numpy SVDs, full sorts for order statistics, the CATS and CETT classes' own masks."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import assert_dense_at_sparsity_zero, make_tiny, random_ids
from test_backends import assert_close, backend
from test_sparsifiers import check_mlp_calls, exact_topk
from sparsebench.backends.dense import DenseBackend
from sparsebench.core.errors import ConfigError
from sparsebench.models.patching import MLPInput, SparsityController
from sparsebench.sparsifiers import SPARSIFIERS

GATED = ["llama", "qwen2", "gemma3"]
CALIB = dict(batch=4, seq=32, seed=1)
DEFAULTS = {
    "svd_predictor": {"rank": 0.25, "score": "act", "use_up": False, "calibrate_on": "sparse_upstream"},
    "dejavu_target": {"rank": 0.25, "steps": 30, "lr": 0.005, "lookahead": False, "selection": "topk",
                      "oracle": False, "loss_weight": "reference", "labels": "cats", "overprovision": 0.0},
    "dejavu": {"rank": 0.25, "steps": 30, "lr": 0.005, "lookahead": False, "selection": "topk", "oracle": False},
    "cats": {}, "cett": {"budget": None},
}


def make(name, **cfg):
    return SPARSIFIERS.get(name)(OmegaConf.create({"name": name, **DEFAULTS[name], **cfg}))


def build(name, arch="llama", calib=CALIB, be=None, **cfg):
    model = make_tiny(arch)
    sp = make(name, **cfg)
    ctl = SparsityController(sp, be or DenseBackend()).attach(model)
    if sp.needs_calibration:
        sp.load_state(sp.calibrate(ctl, model, random_ids(**calib).split(2)))
    return model, sp, ctl


@torch.no_grad()
def layer_inputs(model, ctl, ids):
    """(site, x) of every MLP call of a dense forward over ``ids``."""
    out = []
    with ctl.recording(lambda inp: out.append((inp.site, inp.x.detach()))):
        model(input_ids=ids)
    return out


def near(values, t, tol=1e-5):
    """Entries within ``tol`` (relative to the threshold's scale) of the threshold t."""
    return (values - t).abs() <= tol * max(abs(float(t)), 1.0)


# =========================================================================== svd_predictor

@pytest.mark.parametrize("arch", GATED)
def test_svd_factors_are_the_brute_force_truncated_svd(arch):
    model, sp, ctl = build("svd_predictor", arch, sparsity=0.5, rank=0.25, use_up=True)
    r = 16  # 0.25 · hidden 64
    assert sp.A.shape == (2, r, 64) and sp.B.shape == (2, 128, r) and sp.A_up.shape == sp.A.shape
    for site in ctl.sites:
        i = site.layer_idx
        for W, A, B in ((site.gate.weight, sp.A[i], sp.B[i]), (site.up.weight, sp.A_up[i], sp.B_up[i])):
            W = W.detach().double().numpy()
            U, S, Vh = np.linalg.svd(W, full_matrices=False)
            A, B = A.double().numpy(), B.double().numpy()
            sign = np.sign(np.sum(B * U[:, :r], axis=0))  # singular vectors are unique up to sign
            np.testing.assert_allclose(B * sign, U[:, :r], atol=1e-5)
            np.testing.assert_allclose(A * sign[:, None], S[:r, None] * Vh[:r], atol=1e-5)
            # Eckart–Young: the residual is exactly the dropped spectrum
            np.testing.assert_allclose(np.linalg.norm(W - B @ A) ** 2, np.sum(S[r:] ** 2), rtol=1e-4)
        S = np.linalg.svd(site.gate.weight.detach().double().numpy(), compute_uv=False)
        assert float(sp.energy[i]) == pytest.approx(np.sum(S[:r] ** 2) / np.sum(S ** 2), rel=1e-6)


@pytest.mark.parametrize("arch,cfg", [("llama", {}), ("qwen2", {"score": "pre"}), ("gemma3", {"use_up": True}),
                                      ("opt", {"rank": 40})])
def test_svd_masks_are_the_thresholded_low_rank_scores(arch, cfg):
    """Every MLP call of the patched model = down(h ⊙ m), m recomputed from the factors:
    |act(B A x + b)| > t (score act), B A x + b > t (pre), |act(ĝ)·û| > t (use_up)."""
    model, sp, ctl = build("svd_predictor", arch, sparsity=0.6, **cfg)
    if "rank" in cfg:
        assert sp.rank == 40  # an int is an absolute rank

    def ref(site, x, pre, act, h):
        i = site.layer_idx
        g = (x @ sp.A[i].T) @ sp.B[i].T
        if site.activation_input.bias is not None:  # OPT's fc1
            g = g + site.activation_input.bias
        if cfg.get("score") == "pre":
            score = g
        elif cfg.get("use_up"):
            score = (site.act(g) * ((x @ sp.A_up[i].T) @ sp.B_up[i].T)).abs()
        else:
            score = site.act(g).abs()
        return score > sp.thresholds[i]

    check_mlp_calls(model, ctl, ref)


@pytest.mark.parametrize("arch", GATED + ["opt"])
@torch.no_grad()
def test_svd_at_full_rank_is_cats(arch):
    """rank = 1.0: the score is |act(gate x)| up to rounding, the thresholds are CATS's on the
    same data, and the masks are CATS's except for neurons within rounding of the threshold."""
    ids = random_ids(batch=4, seq=32, seed=3)
    model, sp, ctl = build("svd_predictor", arch, sparsity=0.5, rank=1.0, calibrate_on="dense")
    _, cats, _ = build("cats", arch, sparsity=0.5, calibrate_on="dense")
    assert sp.rank == 64 and torch.allclose(sp.energy, torch.ones(2))
    torch.testing.assert_close(sp.thresholds, cats.thresholds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sp.oracle_thresholds, cats.thresholds, rtol=0, atol=0)  # the same order statistic
    flips = total = 0
    for site, x in layer_inputs(model, ctl, ids):
        inp = MLPInput(site, x)
        m = sp.mask(inp)
        assert inp.computed == "x"
        act = inp.act.abs()
        torch.testing.assert_close(sp.scores(site, x), act, rtol=1e-5, atol=1e-5 * float(act.max()))
        want = act > cats.thresholds[site.layer_idx]  # CATS's rule, CATS's threshold
        diff = m != want
        assert bool(near(act[diff], cats.thresholds[site.layer_idx], 1e-4).all())
        torch.testing.assert_close(sp.oracle_mask(inp), want, rtol=0, atol=0)
        flips, total = flips + int(diff.sum()), total + diff.numel()
    assert flips <= 1e-3 * total


@pytest.mark.parametrize("arch", ["llama", "gemma3", "drelu"])
@torch.no_grad()
def test_svd_use_up_at_full_rank_scores_h(arch):
    """use_up at full rank: |act(ĝ)·û| = |h| up to rounding (dReLU: with relu applied to û)."""
    model = make_tiny("llama" if arch == "drelu" else arch)
    if arch == "drelu":  # TurboSparse's dReLU: relu on gate and on up
        from sparsebench.models.activations import ReLUOutputLinear

        for layer in model.model.layers:
            layer.mlp.up_proj.__class__ = ReLUOutputLinear
    sp = make("svd_predictor", sparsity=0.5, rank=1.0, use_up=True)
    ctl = SparsityController(sp, DenseBackend()).attach(model)
    sp.load_state(sp.calibrate(ctl, model, random_ids(**CALIB).split(2)))
    for site, x in layer_inputs(model, ctl, random_ids(seed=3)):
        h = MLPInput(site, x).h.abs()
        if arch == "drelu":
            assert bool((h == 0).any())
        torch.testing.assert_close(sp.scores(site, x), h, rtol=1e-5, atol=1e-5 * float(h.max()))


@pytest.mark.parametrize("arch,s", [(a, 0.5) for a in GATED] + [("llama", 0.7), ("gemma3", 0.3)])
def test_svd_sparsity_hits_the_target_on_held_out_ids(arch, s):
    model, sp, ctl = build("svd_predictor", arch, calib=dict(batch=8, seq=64, seed=1), sparsity=s, rank=0.25)
    with ctl.counting() as stats, torch.no_grad():
        model(input_ids=random_ids(batch=8, seq=64, seed=5))  # other tokens than calibration's
    achieved = sum(st.zeroed for st in stats.values()) / sum(st.neurons for st in stats.values())
    assert achieved == pytest.approx(s, abs=0.02)
    assert all(abs(st.sparsity - s) <= 0.04 for st in stats.values()), {i: st.sparsity for i, st in stats.items()}


def test_svd_cost_is_reported_in_bytes_and_as_a_share_of_the_mlp():
    H, I = 64, 128
    _, sp, _ = build("svd_predictor", "llama", sparsity=0.5, rank=0.25)
    r = 16
    s = sp.summary()
    assert s["predictor_params_per_layer"] == r * (H + I)
    assert s["predictor_bytes_per_token_per_layer"] == 4 * r * (H + I)  # fp32 tiny model
    assert s["predictor_mlp_fraction"] == pytest.approx(r * (H + I) / (3 * H * I))
    d = sp.describe()
    assert d["svd_predictor/bytes_per_token"] == [4 * r * (H + I)] * 2 and len(d["svd_predictor/threshold"]) == 2
    _, sp2, _ = build("svd_predictor", "llama", sparsity=0.5, rank=0.25, use_up=True)
    assert sp2.summary()["predictor_params_per_layer"] == 2 * r * (H + I)
    _, sp3, _ = build("svd_predictor", "opt", sparsity=0.5, rank=0.25)
    assert sp3.summary()["predictor_mlp_fraction"] == pytest.approx(r * (H + I) / (2 * H * I))  # fc1 + fc2


# =========================================================================== dejavu_target

def captured_training(monkeypatch):
    """Record the (X, Y) every train_predictor call of dejavu_target receives."""
    import sparsebench.sparsifiers.dejavu_target as mod

    calls, real = [], mod.train_predictor

    def spy(X, Y, *a, **kw):
        calls.append((X.clone(), Y.clone()))
        return real(X, Y, *a, **kw)

    monkeypatch.setattr(mod, "train_predictor", spy)
    return calls


@pytest.mark.parametrize("arch", GATED)
@pytest.mark.parametrize("labels", ["cats", "cett"])
def test_dejavu_target_labels_are_the_brute_force_oracle_masks(monkeypatch, arch, labels):
    """The labels the predictor trains on, recomputed in float64 from the captured inputs
    and the layer's weights: a full sort gives the s-quantile (CATS: of |act|; CETT: of
    |h_i|·‖W_down[:, i]‖), the rule gives the mask; they differ only within rounding of it."""
    calls = captured_training(monkeypatch)
    s = 0.6
    _, sp, ctl = build("dejavu_target", arch, sparsity=s, labels=labels)
    assert len(calls) == len(ctl.sites)
    for site, (X, Y) in zip(ctl.sites, calls):
        x = X.double()
        act = site.act(x @ site.gate.weight.detach().double().T)
        if labels == "cats":
            v = act.abs()
        else:
            h = act * (x @ site.up.weight.detach().double().T)
            v = h.abs() * site.down.weight.detach().double().norm(dim=0)
        flat = v.reshape(-1).sort().values
        t = flat[int(round(s * flat.numel())) - 1]
        want = v > t if labels == "cats" else v >= t
        assert float(sp.label_thresholds[site.layer_idx]) == pytest.approx(float(t), rel=1e-5)
        diff = Y != want
        assert bool(near(v[diff], t).all()) and int(diff.sum()) <= 1e-3 * diff.numel()
        assert float(Y.float().mean()) == pytest.approx(1 - s, abs=2 / Y.numel())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_dejavu_target_oracle_is_the_cats_and_cett_classes_masks(arch):
    """Layer 0 sees the dense model's input, so its thresholds are exactly what cats and
    cett (budget null) fit on the same text; with the target's thresholds loaded into the
    CATS / CETT classes, their masks equal oracle_mask on every input."""
    ids = random_ids(batch=2, seq=24, seed=4)
    for labels, other in (("cats", "cats"), ("cett", "cett")):
        model, sp, ctl = build("dejavu_target", arch, sparsity=0.5, labels=labels)
        _, ref, _ = build(other, arch, sparsity=0.5)
        first = ref.thresholds[0] if other == "cats" else ref.eps[0]
        assert float(sp.label_thresholds[0]) == float(first)
        ref.load_state({"thresholds": sp.label_thresholds} if other == "cats"
                       else {"epsilon": sp.label_thresholds, "cett": torch.zeros(2)})
        for site, x in layer_inputs(model, ctl, ids):
            got = sp.oracle_mask(MLPInput(site, x))
            torch.testing.assert_close(got, ref.mask(MLPInput(site, x)), rtol=0, atol=0)


def test_dejavu_target_oracle_mode_runs_the_label_masks():
    model, sp, ctl = build("dejavu_target", "qwen2", sparsity=0.5, labels="cett", oracle=True)
    assert sp.needs_calibration and sp.predictor_params() == 0
    check_mlp_calls(model, ctl, lambda site, x, pre, act, h:
                    h.abs() >= float(sp.label_thresholds[site.layer_idx]) / site.down.weight.norm(dim=0))


@pytest.mark.parametrize("labels", ["cats", "topk_h"])
def test_overprovision_keeps_round_1_plus_delta_k_and_recall_does_not_drop(labels):
    """δ = 0.45 at s = 0.6: k = round(0.4·128) = 51, kept = round(1.45·51) = round(73.95) = 74
    on every token;
    on the same inputs and scores the kept set contains the δ = 0 top-k, so recall of the
    oracle is at least the δ = 0 recall (and here strictly higher)."""
    model, sp, ctl = build("dejavu_target", "llama", sparsity=0.6, labels=labels, overprovision=0.45)
    k, kept = 51, 74
    assert sp.keep(128) == k and sp.keep_predicted(128) == kept
    assert sp.summary()["kept_fraction"] == pytest.approx(kept / 128)
    tp = {0.0: 0, 0.45: 0}
    n_oracle, n_calls = 0, 0

    def observe(inp, mask):
        nonlocal n_oracle, n_calls
        n_calls += 1
        assert bool((mask.sum(-1) == kept).all())
        scores = sp._scores(inp.layer_idx, inp.x)
        base = exact_topk(scores, k)
        torch.testing.assert_close(mask, exact_topk(scores, kept), rtol=0, atol=0)
        assert not bool((base & ~mask).any())  # top-k ⊆ top-(1+δ)k
        oracle = sp.oracle_mask(inp)
        tp[0.0] += int((base & oracle).sum())
        tp[0.45] += int((mask & oracle).sum())
        n_oracle += int(oracle.sum())

    ctl.mask_observer = observe
    with ctl.counting() as stats, torch.no_grad():
        model(input_ids=random_ids(batch=2, seq=32, seed=6))
    assert n_calls == 2
    assert all(st.sparsity == pytest.approx(1 - kept / 128) for st in stats.values())
    assert tp[0.45] / n_oracle > tp[0.0] / n_oracle


def test_dejavu_target_training_is_deterministic_and_topk_h_is_dejavu():
    torch.manual_seed(1)
    _, a, _ = build("dejavu_target", "llama", sparsity=0.5, labels="cett", overprovision=0.25)
    torch.manual_seed(2)  # the global RNG must not matter
    _, b, _ = build("dejavu_target", "llama", sparsity=0.5, labels="cett", overprovision=0.25)
    for k in ("A", "B", "label_thresholds"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), rtol=0, atol=0)
    for k in a.report:
        torch.testing.assert_close(a.report[k], b.report[k], rtol=0, atol=0)
    # Deja Vu's own labels and no over-provisioning: the same predictors as `dejavu`
    _, t, _ = build("dejavu_target", "llama", sparsity=0.5, labels="topk_h")
    _, d, _ = build("dejavu", "llama", sparsity=0.5)
    torch.testing.assert_close(t.A, d.A, rtol=0, atol=0)
    torch.testing.assert_close(t.B, d.B, rtol=0, atol=0)


@pytest.mark.parametrize("lookahead", [False, True])
def test_dejavu_target_masks_are_the_top_kept_predictor_scores(lookahead):
    """Inference: the top round((1+δ)·k) of B(A x'), x' the MLP's input or (look-ahead) the
    previous layer's."""
    model, sp, ctl = build("dejavu_target", "gemma3", sparsity=0.5, labels="cett", overprovision=0.3,
                           lookahead=lookahead)
    prev = {}

    def ref(site, x, pre, act, h):
        i = site.layer_idx
        prev[i] = x
        src = prev[i - 1] if lookahead and i > 0 else x
        return exact_topk((src @ sp.A[i].T) @ sp.B[i].T, round(1.3 * 64))

    check_mlp_calls(model, ctl, ref)


def test_dejavu_target_cost_and_description():
    _, sp, _ = build("dejavu_target", "gemma3", sparsity=0.5, labels="cats", overprovision=0.2)
    r, H, I = 16, 64, 128
    s = sp.summary()
    assert s["predictor_params_per_layer"] == r * (H + I)
    assert s["predictor_mlp_fraction"] == pytest.approx(r * (H + I) / (3 * H * I))
    assert s["kept_per_token"] == round(1.2 * 64) and s["labels"] == "cats"
    d = sp.describe()
    for key in ("train_recall", "train_recall_kept", "label_density", "cats_threshold", "bytes_per_token"):
        assert len(d[f"dejavu_target/{key}"]) == 2, key
    # over-provisioning can only raise the recall on the training tokens
    assert all(a >= b for a, b in zip(d["dejavu_target/train_recall_kept"], d["dejavu_target/train_recall"]))


# =========================================================================== both

PREDICTORS = [("svd_predictor", {}), ("svd_predictor", {"use_up": True, "score": "act"}),
              ("dejavu_target", {"labels": "cett", "overprovision": 0.25})]


@pytest.mark.parametrize("name,cfg", PREDICTORS)
def test_mask_reads_x_only_and_the_backend_skips_gate_up_down(name, cfg):
    """The mask comes from x alone (``inp.computed == "x"``), so index_select gathers the
    kept rows itself: the gate, up and down modules are never called."""
    model, sp, ctl = build(name, "qwen2", be=backend("index_select"), sparsity=0.5, **cfg)
    computed, module_calls = [], []
    original = sp.mask

    def spy(inp):
        m = original(inp)
        computed.append(inp.computed)
        return m

    sp.mask = spy
    hooks = [mod.register_forward_hook(lambda *a: module_calls.append(1))
             for site in ctl.sites for mod in (site.gate, site.up, site.down)]
    try:
        with torch.no_grad():
            model(input_ids=random_ids(batch=2, seq=8, seed=2))
    finally:
        for h in hooks:
            h.remove()
    assert computed == ["x", "x"] and module_calls == []


@pytest.mark.parametrize("arch,name,cfg", [(a, n, c) for a in GATED + ["opt"] for n, c in PREDICTORS
                                             if not (a == "opt" and c.get("use_up"))])  # use_up: gated only
def test_whole_model_logits_match_across_backends(arch, name, cfg):
    """One calibrated state on the dense and index_select backends: the same logits
    (pattern of test_backends.test_whole_model_logits_match_across_backends)."""
    ids = random_ids(batch=2, seq=6)
    outs, state = {}, None
    for be_name, be_cfg in [("dense", {}), ("index_select", {}), ("index_select", {"union": True})]:
        model = make_tiny(arch)
        sp = make(name, sparsity=0.5, **cfg)
        ctl = SparsityController(sp, backend(be_name, **be_cfg)).attach(model)
        if state is None:
            state = sp.calibrate(ctl, model, [random_ids(batch=2, seq=16, seed=9)])
        sp.load_state(state)
        with torch.no_grad():
            outs[(be_name, str(be_cfg))] = model(ids).logits
    ref = outs[("dense", "{}")]
    for logits in outs.values():
        assert_close(logits, ref, rel=1e-4)


@pytest.mark.parametrize("name", ["svd_predictor", "dejavu_target"])
@pytest.mark.parametrize("arch", GATED)
def test_sparsity_zero_is_the_dense_model(name, arch):
    assert_dense_at_sparsity_zero(build, name, arch)


def test_mask_quality_evaluator_reports_recall_against_the_oracle(monkeypatch):
    """The existing evaluator works unchanged: full-rank SVD recalls CATS's mask (up to
    rounding at the threshold), the target's oracle mode recalls itself exactly."""
    from types import SimpleNamespace

    import sparsebench.evaluators.mask_quality as mq

    monkeypatch.setattr(mq, "heldout_windows", lambda *a, **k: SimpleNamespace(ids=random_ids(batch=4, seq=16, seed=8)))
    ev = mq.MaskQuality(OmegaConf.create({"name": "mask_quality", "num_windows": 4, "seq_len": 16, "batch_size": 2}))
    for name, cfg, bound in (("svd_predictor", {"rank": 1.0}, 0.99), ("dejavu_target", {"oracle": True}, 1.0)):
        model, sp, ctl = build(name, "llama", sparsity=0.5, **cfg)
        res = ev.evaluate(SimpleNamespace(controller=ctl, model=model, tokenizer=None, splits=None))
        assert res.metrics["mask_quality/recall"] >= bound and res.metrics["mask_quality/precision"] >= bound
        assert len(res.per_layer["recall"]) == 2


@pytest.mark.parametrize("name,cfg,key", [
    ("svd_predictor", {"rank": 0.0}, "rank"), ("svd_predictor", {"rank": 1.5}, "rank"),
    ("svd_predictor", {"rank": 0}, "rank"), ("svd_predictor", {"score": "gate"}, "score"),
    ("svd_predictor", {"use_up": True, "score": "pre"}, "use_up"),
    ("svd_predictor", {"calibrate_on": "x"}, "calibrate_on"), ("svd_predictor", {"sparsity": 1.0}, "sparsity"),
    ("dejavu_target", {"labels": "teal"}, "labels"), ("dejavu_target", {"overprovision": -0.1}, "overprovision"),
    ("dejavu_target", {"overprovision": 0.2, "selection": "threshold"}, "overprovision"),
    ("dejavu_target", {"sparsity": 1.0}, "sparsity"),
])
def test_bad_settings_are_refused(name, cfg, key):
    with pytest.raises(ConfigError, match=key):
        make(name, **{"sparsity": 0.5, **cfg})


def test_use_up_is_refused_on_a_plain_mlp():
    with pytest.raises(ConfigError, match="gated MLP"):
        build("svd_predictor", "opt", sparsity=0.5, use_up=True)


def test_predictor_table_gives_recall_gap_to_oracle_and_cost(tmp_path):
    """experiment=predictor_quality on the tiny model: the table reads recall, the perplexity
    gap to the oracle run of the same labels, and the cost r·(H + I) / (3·H·I)."""
    import json

    from test_cli import TINY, sparsebench
    from sparsebench.experiments.tables import predictor_rows
    from sparsebench.reporting.results import load_results

    common = ["-m", "experiment=predictor_quality", *TINY, "threads=1", "evaluator.perplexity.num_windows=2",
              "evaluator.sparsity.num_windows=2", "evaluator.mask_quality.num_windows=2",
              "data.calibration.num_sequences=4", "hydra.sweep.dir=sweep"]
    for extra in (["sparsifier=svd_predictor", "sparsifier.rank=0.25"],
                  ["sparsifier=dejavu_target", "sparsifier.oracle=true", "sparsifier.rank=0.1"]):
        proc = sparsebench([*common, *extra], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows = predictor_rows(load_results([tmp_path / "sweep"]))
    assert len(rows) == 1  # the oracle run is the reference, not a row
    row = rows[0]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("results.json")]
    oracle = [r for r in runs if r["config"]["sparsifier"].get("oracle")][0]["metrics"]["perplexity"]
    assert row["oracle"] == "cats" and row["oracle_perplexity"] == oracle
    assert row["gap_to_oracle"] == pytest.approx(row["perplexity"] / oracle - 1)
    H, I = 64, 128
    assert row["cost_mlp_fraction"] == pytest.approx(round(0.25 * H) * (H + I) / (3 * H * I))
    assert 0 < row["recall"] <= 1
