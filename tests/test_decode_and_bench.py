"""Decode, churn and per-layer latency evaluators end to end; the benchmark harness.

No timing is asserted anywhere: only that the numbers exist, are consistent with each
other and with brute-force counts, and that sparse decoding reproduces the dense-mask
backend's tokens.
"""
import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_tiny, random_ids
from sparsebench.backends import BACKENDS
from sparsebench.evaluators.churn import ChurnCounter
from sparsebench.evaluators.decode import greedy_decode
from sparsebench.models.patching import SparsityController
from sparsebench.sparsifiers import SPARSIFIERS
from test_cli import TINY, sparsebench


@pytest.mark.parametrize("backend", ["cached", "index_select", "fused"])
def test_decode_reproduces_dense_mask_tokens(tmp_path, backend):
    proc = sparsebench(["sparsifier=cats", f"backend={backend}", "evaluator=[decode,layer_latency]",
                        "evaluator.decode.new_tokens=12", "evaluator.decode.prompt_tokens=8",
                        "evaluator.decode.repeats=1", "evaluator.layer_latency.prompt_tokens=8",
                        "evaluator.layer_latency.new_tokens=6", "threads=1", *TINY, "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    m = r["metrics"]
    assert m["decode/identical"] == 1.0 and m["decode/identical_free_running"] in (0.0, 1.0)
    for key in ("decode/tokens_per_s", "decode/tokens_per_s_dense_mask", "decode/tokens_per_s_hf"):
        assert m[key] > 0
    # CATS computes the gate densely: the limit counts only up and down as saved
    assert 0 < m["decode/weight_bytes_saved_fraction"] < m["decode/mlp_byte_share"] * 2 / 3
    assert m["decode/bytes_limit"] == pytest.approx(1 / (1 - m["decode/weight_bytes_saved_fraction"]))
    # the measured limit: the decoder linears are part of the dense step, and the masks save some of their time
    assert 0 < m["decode/linear_time_share"] < 1 and m["decode/amdahl_limit"] > 1
    assert m["decode/fraction_of_limit"] == pytest.approx(m["decode/speedup_vs_hf"] / m["decode/amdahl_limit"])
    rows = r["per_layer"]
    assert all(row["latency/mlp_ms"] > 0 and row["latency/attn_ms"] > 0 for row in rows)
    # only fused applies CATS's threshold inside its kernel
    assert m.get("decode/mask_rule_in_kernel") == (1.0 if backend == "fused" else None)
    if backend == "cached":  # the cache copied fewer rows per token than it holds
        assert all(0 < row["decode/rows_copied_per_update"] < row["decode/active_rows"] for row in rows)


def test_greedy_decode_uses_the_kv_cache_and_matches_full_recompute():
    model = make_tiny("llama")
    prompt = random_ids(batch=2, seq=5)
    tokens, _, _ = greedy_decode(model, prompt, 6)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):  # brute force: no cache, the whole sequence every step
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, ids[:, 5:])


def test_churn_counter_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 9, 40, generator=gen) < 0.3
    counter = ChurnCounter()
    counter.add(0, masks)
    entered = sum(len(set(masks[b, t].nonzero().flatten().tolist()) - set(masks[b, t - 1].nonzero().flatten().tolist()))
                  for b in range(2) for t in range(1, 9))
    assert counter.entered[0] == entered and counter.tokens[0] == 16


def test_churn_evaluator_and_cache_copies_agree():
    """Decoding token by token through the cached backend copies exactly the rows the
    churn of consecutive masks predicts (entered neurons), when the set size is fixed."""
    model = make_tiny("llama")
    sp = SPARSIFIERS.get("dejavu")(OmegaConf.create(
        {"name": "dejavu", "sparsity": 0.5, "rank": 0.25, "steps": 5, "lr": 0.005, "lookahead": False,
         "selection": "topk", "oracle": True}))  # oracle top-k: a fixed number of active neurons
    backend = BACKENDS.get("cached")(OmegaConf.create({"name": "cached", "threads": 1}))
    ctl = SparsityController(sp, backend).attach(model)
    masks = {}
    ctl.mask_observer = lambda inp, m: masks.setdefault(inp.layer_idx, []).append(m.reshape(-1, m.shape[-1]))
    greedy_decode(model, random_ids(batch=1, seq=1), 10)
    counter = ChurnCounter()
    for layer, ms in masks.items():
        counter.add(layer, torch.cat(ms).unsqueeze(0))
    stats = backend.stats()["per_layer"]
    for layer in masks:
        first = int(masks[layer][0].sum())
        assert stats[layer]["rows_copied"] == first + counter.entered[layer]


def test_weight_selection_and_mlp_step_harness(tmp_path):
    from sparsebench.backends.bench import mask_sequence, mlp_step, weight_selection

    seq = mask_sequence(100, 0.3, 0.2, steps=5)
    for a, b in zip(seq, seq[1:]):
        assert int(a.sum()) == int(b.sum()) == 30 and int((b & ~a).sum()) == 6
    rows = weight_selection([(16, 64)], [0.25], [0.1, 1.0], threads=1, steps=3, out=tmp_path)
    assert [r["rows_copied_per_step"] for r in rows] == [2.0, 16.0]
    assert all(r["naive_ms"] > 0 and r["cached_ms"] > 0 for r in rows)
    rows = mlp_step([(16, 64)], [0.25], 0.1, [1], steps=3, out=tmp_path)
    assert rows[0]["dense_ms"] > 0 and rows[0]["target_speedup"] == pytest.approx(3.2)
    assert (tmp_path / "weight_selection.csv").exists() and (tmp_path / "mlp_step.json").exists()


def test_cold_mlp_step_harness(tmp_path):
    """The cold benchmark cycles through enough layer copies, and each compared path computes
    the masked MLP of its layer (fused fp32 exactly, bf16 from the bf16-rounded weights)."""
    import torch.nn.functional as F

    from sparsebench.backends.fused import FusedKernel
    from sparsebench.backends.bench import ColdLayer, cold_layer_count, mlp_step_cold

    assert cold_layer_count(576, 1536, 32 << 20) * 3 * 576 * 1536 * 4 >= 3 * (32 << 20)
    assert cold_layer_count(3072, 8192, 32 << 20) == 2
    rows = mlp_step_cold([(16, 64)], [0.25, 0.5], 0.1, [1], steps=2, out=tmp_path, layers=3)
    assert [r["layers"] for r in rows] == [3, 3]
    for r in rows:
        assert all(r[k] > 0 for k in ("dense_ms", "index_select_ms", "cached_ms", "fused_ms", "fused_bf16_ms"))
        assert r["fused_fraction_of_limit"] == pytest.approx(r["fused_speedup"] * r["density"])
    layer = ColdLayer(16, 64, seed=1, threads=1)
    x, mask = torch.randn(16), torch.rand(64) < 0.3
    ref = ((F.silu(x @ layer.gate.t()) * (x @ layer.up.t())) * mask) @ layer.down_t
    torch.testing.assert_close(FusedKernel(1).mlp(layer.fused, x, mask)[0], ref, rtol=1e-5, atol=1e-6)
    g, u, d = (t.to(torch.bfloat16).float() for t in (layer.gate, layer.up, layer.down_t))
    ref16 = ((F.silu(x @ g.t()) * (x @ u.t())) * mask) @ d
    torch.testing.assert_close(FusedKernel(1).mlp(layer.fused_bf16, x, mask)[0], ref16, rtol=1e-5, atol=1e-6)


def test_step_overhead_evaluator(tmp_path):
    """Overhead = wall time inside the sparse modules minus kernel time (and minus the torch
    linears of projections left dense), per decode token; refused on a backend that does not
    time its kernels."""
    proc = sparsebench(["sparsifier=cats", "backend=fused", "evaluator=step_overhead",
                        "evaluator.step_overhead.new_tokens=8", "evaluator.step_overhead.prompt_tokens=8",
                        "evaluator.step_overhead.repeats=1", "threads=1", *TINY, "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert 0 < m["overhead/kernel_ms_per_token"] < m["overhead/mlp_ms_per_token"] < m["overhead/step_ms"] * 1.5
    # CATS's rule runs every MLP in the kernel: no projection left to torch
    assert m["overhead/dense_linear_calls_per_token"] == 0 and m["overhead/dense_linears_ms_per_token"] == 0
    assert m["overhead/ms_per_token"] == pytest.approx(
        m["overhead/mlp_ms_per_token"] - m["overhead/kernel_ms_per_token"] - m["overhead/dense_linears_ms_per_token"],
        rel=0.5)
    assert 0 < m["overhead/fraction_of_mlp"] < 1
    # the hooks' own cost is subtracted for the net figure, never added: the clock's floor per
    # timed call times the timed calls per decode token (CATS: one MLP module per layer)
    assert m["overhead/timed_calls_per_token"] == 2  # tiny-llama's two layers
    assert m["overhead/clock_floor_us"] >= 0
    assert m["overhead/hooks_ms_per_token"] == pytest.approx(
        m["overhead/clock_floor_us"] * 1e-3 * m["overhead/timed_calls_per_token"])
    assert m["overhead/net_ms_per_token"] == pytest.approx(
        max(0.0, m["overhead/ms_per_token"] - m["overhead/hooks_ms_per_token"]), abs=1e-9)
    assert m["overhead/net_fraction_of_step"] == pytest.approx(m["overhead/net_ms_per_token"] / m["overhead/step_ms"])
    proc = sparsebench(["sparsifier=cats", "backend=index_select", "evaluator=step_overhead", "threads=1", *TINY,
                        "hydra.run.dir=run2"], tmp_path)
    assert proc.returncode != 0 and "backend=fused" in proc.stderr


def test_module_clock_counts_single_token_calls_and_its_floor_is_what_it_adds():
    """ModuleClock times single-token calls only, and counts them; the floor is what it
    records for a module that does nothing (so a non-negative, sub-millisecond figure)."""
    from sparsebench.evaluators.decode import ModuleClock
    from sparsebench.evaluators.step_overhead import _Passthrough, clock_floor_s

    mods = {"a": _Passthrough(), "b": _Passthrough()}
    clock = ModuleClock(mods)
    for shape, key in [((1, 1, 8), "a"), ((1, 5, 8), "a"), ((2, 1, 8), "b"), ((1, 1, 8), "b"), ((1, 1, 8), "a")]:
        mods[key](torch.zeros(shape))
    clock.remove()
    assert clock.calls == {"a": 2, "b": 1}
    mods["a"](torch.zeros(1, 1, 8))  # removed: no longer counted, the class's forward again
    assert clock.calls == {"a": 2, "b": 1} and all("forward" not in m.__dict__ for m in mods.values())
    outer = ModuleClock({"a": mods["a"]})  # two clocks on one module: each counts, each removes its own
    inner = ModuleClock({"a": mods["a"]})
    mods["a"](torch.zeros(1, 1, 8))
    inner.remove()
    mods["a"](torch.zeros(1, 1, 8))
    outer.remove()
    assert (outer.calls["a"], inner.calls["a"]) == (2, 1) and "forward" not in mods["a"].__dict__
    assert outer.seconds["a"] > 0 and inner.seconds["a"] > 0
    assert 0 <= clock_floor_s(200, repeats=3) < 1e-3


@pytest.mark.parametrize("sparsity", [0.5, 0.0])
def test_overhead_by_module_counts_every_sparse_call(tmp_path, monkeypatch, sparsity):
    """The per-module breakdown: TEAL on tiny-llama times one MLP and q/k/v/o per layer and
    decode step (an enumeration of the model's sparse modules), and inside = kernel + the torch
    linears of dense projections + outside. At sparsity 0 every attention projection is dense
    and runs in torch (one call each per layer), the MLP's dense selections in the kernel; at
    0.5 none runs in torch."""
    from sparsebench.experiments.checks.overhead_by_module import main

    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    report = main(["--model", "tiny-llama", "--sparsifier", "teal", "--prompt-tokens", "6", "--new-tokens", "5",
                   "--repeats", "1", "--threads", "1", "data=tiny", "logger.mode=disabled",
                   f"sparsifier.sparsity={sparsity}"])
    kinds = report["by_kind"]
    assert set(kinds) == {"mlp", "q", "k", "v", "o"}
    for kind, k in kinds.items():
        assert k["calls_per_token"] == 2  # tiny-llama's two layers
        assert k["dense_linear_calls_per_token"] == (2 if sparsity == 0.0 and kind != "mlp" else 0)
        assert k["inside_us_per_call"] == pytest.approx(
            k["kernel_us_per_call"] + k["dense_linear_us_per_call"] + k["outside_us_per_call"], abs=0.03)
        assert (k["dense_linear_us_per_call"] > 0) == (k["dense_linear_calls_per_token"] > 0)
    assert kinds["mlp"]["kernel_us_per_call"] > 0 and report["step_ms"] > 0


def test_dense_linears_are_the_torch_linears_inside_the_sparse_modules():
    """The linears whose time the overhead evaluators count as compute: every nn.Linear inside
    the installed modules, once each (TEAL: the seven projections per layer; CATS: the MLP's
    three), checked against an enumeration of the model's decoder projections."""
    from sparsebench.evaluators.step_overhead import dense_linears, sparse_modules

    for method, names in (("teal", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
                          ("cats", ("gate_proj", "up_proj", "down_proj"))):
        model = make_tiny("llama")
        sp = SPARSIFIERS.get(method)(OmegaConf.create({"name": method, "sparsity": 0.5}))
        expected = {id(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(names)}
        ctl = SparsityController(sp, BACKENDS.get("dense")(None)).attach(model)
        found = dense_linears(sparse_modules(ctl))
        assert len(found) == len({id(m) for m in found}) and {id(m) for m in found} == expected, method


def test_bench_mlp_step_computes_the_masked_mlp():
    """The cached step the benchmark times computes the right thing."""
    import torch.nn.functional as F

    from sparsebench.backends.bench import cache_for, random_mlp

    gate, up, down_t = random_mlp(16, 64)
    x = torch.randn(1, 16)
    mask = torch.rand(64) < 0.3
    cache = cache_for(gate, up, down_t, 1)
    cache.update(mask)
    z = (x @ cache.rows(0).view(cache.k * 2, 16).t()).view(cache.k, 2)
    y = (F.silu(z[:, 0]) * z[:, 1]) @ cache.rows(1).view(cache.k, 16)
    ref = ((F.silu(x @ gate.t()) * (x @ up.t())) * mask) @ down_t
    torch.testing.assert_close(y, ref[0], rtol=1e-5, atol=1e-6)


def _calibrated_cats(arch: str, backend: str):
    """A tiny model with CATS at 50% on ``backend``, calibrated on random ids."""
    model = make_tiny(arch)
    sp = SPARSIFIERS.get("cats")(OmegaConf.create({"name": "cats", "sparsity": 0.5}))
    ctl = SparsityController(sp, BACKENDS.get(backend)(OmegaConf.create({"name": backend, "threads": 1}))).attach(model)
    sp.load_state(sp.calibrate(ctl, model, [random_ids(batch=2, seq=16, seed=9)]))
    return model, sp, ctl


def test_mask_replay_reproduces_the_recorded_run_and_restores_the_sparsifier():
    from sparsebench.backends.dense import DenseBackend
    from sparsebench.evaluators.decode import recording_masks, replaying_masks

    model, sp, ctl = _calibrated_cats("qwen2", "cached")
    prompt = random_ids(batch=1, seq=6)
    mlp, lin = [], []
    with recording_masks(sp, mlp, lin):
        tokens, _, _ = greedy_decode(model, prompt, 8)
    assert len(mlp) == 2 * 8 and "mask" not in sp.__dict__
    ctl.backend = DenseBackend()
    seen = []
    ctl.mask_observer = lambda inp, m: seen.append(m)
    with replaying_masks(sp, mlp, lin):
        replayed, _, _ = greedy_decode(model, prompt, 8)
    assert torch.equal(tokens, replayed)
    assert all(a is b for a, b in zip(seen, mlp))  # the recorded tensors themselves were used


def test_replay_on_the_fused_rule_path_replays_only_the_masks_the_sparsifier_made():
    """CATS on ``fused``: decode steps go through the in-kernel rule and make no mask, so a
    recording holds the prefill's masks only, and replaying them reproduces the run (the
    step_overhead evaluator's replay relies on this)."""
    from sparsebench.evaluators.decode import recording_masks, replaying_masks

    model, sp, ctl = _calibrated_cats("llama", "fused")
    prompt = random_ids(batch=1, seq=6)
    mlp, lin = [], []
    with recording_masks(sp, mlp, lin):
        tokens, _, _ = greedy_decode(model, prompt, 8)
    n_layers = len(ctl.sites)
    assert len(mlp) == n_layers and all(m.shape[-2] == prompt.shape[1] for m in mlp)  # the prefill's
    with replaying_masks(sp, mlp, lin):
        replayed, _, _ = greedy_decode(model, prompt, 8)
    assert torch.equal(tokens, replayed)


def test_churn_union_density_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    masks = torch.rand(4, 5, 30, generator=gen) < 0.2
    counter = ChurnCounter()
    counter.add(0, masks)
    for b in (1, 2, 4):
        ref = masks[:b].any(0).float().mean().item()
        assert counter.union_sum[(0, b)] == pytest.approx(ref)
    assert counter.union_sum[(0, 1)] < counter.union_sum[(0, 2)] < counter.union_sum[(0, 4)]


def test_cache_speedup_evaluator_counts_what_the_cache_copies(tmp_path):
    """On real decode masks the row cache copies exactly the neurons that entered (brute-force
    diff of consecutive masks); the synthetic curve swaps churn × active rows per step."""
    proc = sparsebench(["sparsifier=dejavu", "sparsifier.oracle=true", "sparsifier.steps=5", "evaluator=[cache_speedup]",
                        "evaluator.cache_speedup.new_tokens=9", "evaluator.cache_speedup.prompt_tokens=8",
                        "evaluator.cache_speedup.threads=1", "evaluator.cache_speedup.churns=[0.25,1.0]",
                        *TINY, "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    m, rows = r["metrics"], r["per_layer"]
    assert m["cache/timed_updates"] == 7 and m["cache/density"] == pytest.approx(0.5, abs=0.02)
    for row in rows:  # oracle top-k: a fixed-size set, so each entering neuron is one row copy
        assert row["cache/rows_copied_per_step"] == pytest.approx(row["cache/swaps_per_update"])
        assert 0 <= row["cache/churn"] <= 1
    k = m["cache/density"] * r["model"]["intermediate_size"]
    assert m["cache/grid/churn=1/swaps_per_update"] == pytest.approx(k, abs=1)
    assert m["cache/grid/churn=0.25/swaps_per_update"] == pytest.approx(0.25 * k, abs=1)
    for key in ("select_speedup", "mlp_speedup_cached", "mlp_speedup_index_select"):
        assert m[f"cache/{key}"] > 0
    assert r["run"]["timing_lock_wait_s"] >= 0


def test_amdahl_limit_charges_a_predictors_own_reads(tmp_path):
    """Deja Vu reads its low-rank predictor every token: the limit adds those bytes back."""
    proc = sparsebench(["sparsifier=dejavu", "evaluator=[decode]", "evaluator.decode.new_tokens=4",
                        "evaluator.decode.prompt_tokens=8", "evaluator.decode.repeats=1", "threads=1",
                        "data.calibration.num_sequences=4", *TINY, "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert m["decode/predictor_bytes_fraction"] > 0
    assert m["decode/bytes_limit"] == pytest.approx(
        1 / (1 - m["decode/weight_bytes_saved_fraction"] + m["decode/predictor_bytes_fraction"]))


def test_amdahl_limit_is_amdahls_law_on_the_measured_step():
    """Brute force: rebuild the sparse step component by component (every linear at its
    dense time × the fraction of its bytes still read, the predictor's bytes at the mean
    time per byte, the rest unchanged) and compare the ratio with ``amdahl_limit``."""
    from sparsebench.evaluators.decode import amdahl_limit

    gen = torch.Generator().manual_seed(3)
    keys = [(layer, p) for layer in range(4) for p in ("q", "k", "v", "o", "gate", "up", "down")]
    linear_s = {k: float(t) for k, t in zip(keys, torch.rand(len(keys), generator=gen) * 1e-3)}
    linear_bytes = {k: float(b) for k, b in zip(keys, torch.randint(1000, 5000, (len(keys),), generator=gen))}
    masked = keys[::3]
    saved = {k: linear_bytes[k] * float(f) for k, f in zip(masked, torch.rand(len(masked), generator=gen))}
    rest_s, predictor = 0.02, 7000.0
    step = rest_s + sum(linear_s.values())
    per_byte = sum(linear_s.values()) / sum(linear_bytes.values())
    sparse_step = rest_s + predictor * per_byte
    for k in keys:
        sparse_step += linear_s[k] * (1 - saved.get(k, 0.0) / linear_bytes[k])
    assert amdahl_limit(step, linear_s, linear_bytes, saved, predictor) == pytest.approx(step / sparse_step)
    # every linear fully skipped, no predictor: 1 / (1 - p), p the linears' share of the step
    everything = amdahl_limit(step, linear_s, linear_bytes, dict(linear_bytes), 0.0)
    assert everything == pytest.approx(1 / (1 - sum(linear_s.values()) / step))


def test_predictor_read_bytes_counts_every_predictor_weight():
    from sparsebench.evaluators.decode import predictor_read_bytes

    cfg = OmegaConf.create({"name": "dejavu", "sparsity": 0.5, "rank": 0.25})
    dv = SPARSIFIERS.get("dejavu")(OmegaConf.merge(_shipped("dejavu"), cfg))
    dv.A, dv.B = torch.zeros(3, 4, 16), torch.zeros(3, 32, 4)
    assert predictor_read_bytes(dv) == (3 * 4 * 16 + 3 * 32 * 4) * 4
    cats = SPARSIFIERS.get("cats")(OmegaConf.merge(_shipped("cats"), {"sparsity": 0.5}))
    assert predictor_read_bytes(cats) == 0.0


def _shipped(name):
    from sparsebench.core.config_check import shipped_defaults

    return OmegaConf.create(shipped_defaults("sparsifier", name))
