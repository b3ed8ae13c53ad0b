"""The offload evaluator: its cache policies against brute-force simulations, its cost model
against a hand formula, its whole metric assembly against an independent recomputation on
known masks, and one real run through ``sparsebench.run.run`` on a tiny model."""
import math
import random
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.core.errors import ConfigError
from sparsebench.evaluators.offload import (LRU, Hot, Tier, Window, capacity_rows, capture_masks, fetch_ops,
                                            hot_set, replay)


def random_sets(steps, width, density, seed):
    rng = random.Random(seed)
    # bursty: a drifting "topic" set plus noise, so there is reuse for a cache to find
    topic = set(rng.sample(range(width), max(1, width // 3)))
    out = []
    for _ in range(steps):
        if rng.random() < 0.2:
            topic = set(rng.sample(range(width), max(1, width // 3)))
        out.append({i for i in range(width) if rng.random() < (0.8 if i in topic else density)})
    return out


def to_masks(rows_of_sets, width):
    """[T, R, I] bool from R sequences of T sets."""
    T = len(rows_of_sets[0])
    m = torch.zeros(T, len(rows_of_sets), width, dtype=torch.bool)
    for r, seq in enumerate(rows_of_sets):
        for t, s in enumerate(seq):
            m[t, r, sorted(s)] = True
    return m


# ------------------------------------------------------------------------- brute force

def lru_brute(seq, cap):
    """OrderedDict LRU: per token, misses against the state before it; the token's active
    neurons are then used in index order; evict the least recent while over capacity."""
    od, out = OrderedDict(), []
    for active in seq:
        miss = {i for i in active if i not in od}
        for i in sorted(active):
            od[i] = None
            od.move_to_end(i)
        while len(od) > cap:
            od.popitem(last=False)
        out.append((miss, len(od)))
    return out


def window_brute(seq, k):
    """Resident before token t: every neuron active in tokens t-k..t-1 (set enumeration)."""
    out = []
    for t, active in enumerate(seq):
        before = set().union(*seq[max(0, t - k):t])
        after = set().union(*seq[max(0, t - k + 1):t + 1])
        out.append((active - before, len(after)))
    return out


def hot_brute(counts, cap):
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    return set(order[:cap])


def runs_brute(ids, coalesce=True):
    ids = sorted(ids)
    if not coalesce:
        return len(ids)
    return sum(1 for j, i in enumerate(ids) if j == 0 or ids[j - 1] != i - 1)


# ----------------------------------------------------------------------- policies

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lru_equals_an_ordereddict_lru_at_every_step(seed):
    width, steps = 24, 60
    caps = [0, 1, 3, 6, 12, 24, 5]  # includes capacities below the active-set size
    seqs = [random_sets(steps, width, 0.25, seed * 100 + r) for r in range(len(caps))]
    masks = to_masks(seqs, width)
    lru = LRU(torch.tensor(caps), width)
    refs = [lru_brute(s, c) for s, c in zip(seqs, caps)]
    for t in range(steps):
        miss = lru.access(masks[t])
        resident = lru.resident()
        for r in range(len(caps)):
            want_miss, want_size = refs[r][t]
            assert set(miss[r].nonzero().flatten().tolist()) == want_miss, (t, r)
            assert int(resident[r]) == want_size, (t, r)


def test_lru_with_every_row_held_misses_only_first_uses():
    width = 16
    seq = [set(range(width))] + random_sets(30, width, 0.4, 7)
    masks = to_masks([seq], width)
    res = replay(masks, LRU(torch.tensor([width]), width), warmup=1)
    assert int(res.misses.sum()) == 0 and int(res.accesses.sum()) > 0  # hit rate 1 after warm-up
    res0 = replay(masks, LRU(torch.tensor([width]), width), warmup=0)
    assert int(res0.misses.sum()) == width  # only the compulsory misses


@pytest.mark.parametrize("k", [1, 2, 5])
def test_window_equals_set_enumeration(k):
    width, steps = 20, 40
    seqs = [random_sets(steps, width, 0.3, 10 + r) for r in range(3)]
    masks = to_masks(seqs, width)
    win = Window(k, len(seqs), width)
    refs = [window_brute(s, k) for s in seqs]
    for t in range(steps):
        miss = win.access(masks[t])
        resident = win.resident()
        for r in range(len(seqs)):
            assert set(miss[r].nonzero().flatten().tolist()) == refs[r][t][0]
            assert int(resident[r]) == refs[r][t][1]


def test_window_of_one_token_misses_exactly_the_entering_neurons():
    """k = 1 is the cached backend's cache: misses = neurons entering (churn's swaps)."""
    seq = random_sets(30, 16, 0.4, 3)
    masks = to_masks([seq], 16)
    res = replay(masks, Window(1, 1, 16))
    assert int(res.misses.sum()) == len(seq[0]) + sum(len(b - a) for a, b in zip(seq[:-1], seq[1:]))


def test_hot_set_equals_a_brute_force_count_and_sort_with_ties():
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 4, (5, 17), generator=gen)  # many ties
    caps = torch.tensor([0, 1, 5, 9, 17])
    pinned = hot_set(counts, caps)
    for r in range(5):
        assert set(pinned[r].nonzero().flatten().tolist()) == hot_brute(counts[r].tolist(), int(caps[r]))
    hot = Hot(pinned)
    active = torch.rand(5, 17, generator=gen) < 0.5
    assert torch.equal(hot.access(active), active & ~pinned)
    assert hot.resident().tolist() == caps.tolist()


def test_fetch_ops_counts_runs_of_adjacent_misses():
    gen = torch.Generator().manual_seed(1)
    m = torch.rand(50, 13, generator=gen) < 0.5
    for r in range(50):
        ids = m[r].nonzero().flatten().tolist()
        assert int(fetch_ops(m[r:r + 1])[0]) == runs_brute(ids)
        assert int(fetch_ops(m[r:r + 1], coalesce=False)[0]) == runs_brute(ids, coalesce=False)


def test_capacity_rows_rounds_and_clips():
    assert [capacity_rows(c, 1536) for c in (0.0, 0.1, 0.25, 0.5, 1.0)] == [0, 154, 384, 768, 1536]
    assert capacity_rows(1.0, 7) == 7 and capacity_rows(0.5, 5) == 2  # round half to even


def test_cost_model_on_a_hand_example():
    """One layer of 6 neurons, 100 bytes each, LRU of 2; tokens {0,1}, {1,2}, {0,1,2,4}."""
    seq = [{0, 1}, {1, 2}, {0, 1, 2, 4}]
    res = replay(to_masks([seq], 6), LRU(torch.tensor([2]), 6))
    # t0: miss 0,1 (one read); t1: miss 2 (one read), evict 0; t2: cache {1,2} -> miss 0 and 4 (two reads)
    assert res.misses.tolist() == [5] and res.ops.tolist() == [4] and res.accesses.tolist() == [8]
    tier = Tier(slow_gbps=2.0, latency_us=10.0, fast_gbps=50.0)
    per_token_slow, per_token_ops, per_token_fast = 5 * 100 / 3, 4 / 3, 8 * 100 / 3
    want = 1e3 * (per_token_slow / 2e9 + per_token_ops * 10e-6 + per_token_fast / 50e9)
    assert tier.ms(per_token_slow, per_token_ops, per_token_fast) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(1e3 * (250 / 3 / 1e9 + 4 / 3 * 1e-5 + 800 / 3 / 50e9), rel=1e-12)


# --------------------------------------------------------- the evaluator on known masks

def mask_fn(layer, ids, width):
    """A deterministic mask of the token ids: [B, T, width]."""
    i = torch.arange(width)
    return ((ids[..., None] * (layer + 3) + i * 7 + ids[..., None] // 5) % 5) < 2


class FakeModel:
    """Calls the controller's observers as SparseMLP / SparseLinear would: layer 0 gives an
    MLP mask; layer 1 masks linear inputs (MLP observer None, down input mask); layer 2 is
    never masked (dense)."""

    def __init__(self, ctl, widths):
        self.ctl, self.widths, self.calls = ctl, widths, 0

    def __call__(self, input_ids, logits_to_keep=1):
        self.calls += 1
        ctl = self.ctl
        ctl.mask_observer(SimpleNamespace(layer_idx=0), mask_fn(0, input_ids, self.widths[0]))
        ctl.mask_observer(SimpleNamespace(layer_idx=1), None)
        ctl.linear_mask_observer(SimpleNamespace(layer_idx=1, proj="q"), torch.zeros(1, dtype=torch.bool))
        ctl.linear_mask_observer(SimpleNamespace(layer_idx=1, proj="down"), mask_fn(1, input_ids, self.widths[1]))


def _evaluator_cfg(**over):
    from importlib import resources

    raw = OmegaConf.load(resources.files("sparsebench.conf") / "evaluator" / "offload.yaml")
    raw.seq_len = 12
    for k, v in over.items():
        OmegaConf.update(raw, k, v)
    return raw


@pytest.fixture(scope="module")
def bos_tokenizer():
    from sparsebench.models.loader import tiny_tokenizer

    return tiny_tokenizer(add_bos=True)


def test_evaluator_metrics_equal_an_independent_recomputation(bos_tokenizer):
    from sparsebench.data.corpus import calibration_windows, heldout_windows, load_tiny, prefix_tokens
    from sparsebench.evaluators.offload import Offload

    assert prefix_tokens(bos_tokenizer) == [1]  # windows start with the BOS, as the loader's
    widths, hidden, kinds = [8, 6, 5], [4, 3, 2], ["gated", "plain", "gated"]
    sites = [SimpleNamespace(layer_idx=i, intermediate_size=w, kind=k, down=SimpleNamespace(out_features=h))
             for i, (w, h, k) in enumerate(zip(widths, hidden, kinds))]
    ctl = SimpleNamespace(sites=sites, sparsifier=SimpleNamespace(name="fake"), mask_observer="mine",
                          linear_mask_observer="mine too")
    splits = load_tiny(None)
    run_cfg = OmegaConf.create({"seed": 3, "data": {"calibration": {"num_sequences": 5, "seq_len": 10}}})
    ev_cfg = _evaluator_cfg(num_windows=3, batch_size=2, capacities=[0.25, 0.5], window_tokens=[2],
                            warmup_tokens=2, dtype_bytes=2, tier="mine",
                            **{"tiers.mine": {"slow_gbps": 3.0, "latency_us": 7.0, "fast_gbps": 90.0}})
    model = FakeModel(ctl, widths)
    ctx = SimpleNamespace(model=model, tokenizer=bos_tokenizer, controller=ctl, splits=splits, cfg=run_cfg)
    res = Offload(ev_cfg).evaluate(ctx)
    assert ctl.mask_observer == "mine" and ctl.linear_mask_observer == "mine too"  # restored

    # independent recomputation
    held = heldout_windows(bos_tokenizer, splits, 3, 12).ids
    calib = calibration_windows(bos_tokenizer, splits, 5, 10, 3)
    assert model.calls == 2 + 3  # held-out in batches of 2, calibration in batches of 2

    def layer_masks(layer, ids):
        return mask_fn(layer, ids, widths[layer]) if layer < 2 else torch.ones(*ids.shape, widths[layer], dtype=torch.bool)

    rb = [(3 if k == "gated" else 2) * h * 2 for k, h in zip(kinds, hidden)]
    warm, n, T = 2, held.shape[0], held.shape[1]
    tokens = n * (T - warm)
    tier = (3.0, 7.0, 90.0)

    def ms(slow, ops, fast):
        return 1e3 * (slow / (tier[0] * 1e9) + ops * tier[1] * 1e-6 + fast / (tier[2] * 1e9))

    seqs = {(l, w): [set(layer_masks(l, held)[w, t].nonzero().flatten().tolist()) for t in range(T)]
            for l in range(3) for w in range(n)}
    acc = {l: sum(len(seqs[l, w][t]) for w in range(n) for t in range(warm, T)) for l in range(3)}
    active_bytes = sum(acc[l] * rb[l] for l in range(3)) / tokens
    m = res.metrics
    assert m["offload/tokens"] == tokens
    assert m["offload/active_bytes_per_token"] == pytest.approx(active_bytes)
    dense = sum(w * b for w, b in zip(widths, rb))
    assert m["offload/none/bytes_per_token"] == dense
    assert m["offload/none/ms_per_token"] == pytest.approx(ms(dense, 3, dense))
    assert m["offload/in_memory/ms_per_token"] == pytest.approx(ms(0, 0, active_bytes))
    ao_ops = sum(runs_brute(seqs[l, w][t]) for l in range(3) for w in range(n) for t in range(warm, T)) / tokens
    assert m["offload/active_only/ms_per_token"] == pytest.approx(ms(active_bytes, ao_ops, active_bytes))

    calib_counts = {l: [0] * widths[l] for l in range(3)}
    for l in range(3):
        for i in layer_masks(l, calib).reshape(-1, widths[l]).nonzero()[:, 1].tolist():
            calib_counts[l][i] += 1

    def check(tag, misses_of):  # misses_of(layer, window) -> list of (missed set, resident) per token
        mis = {l: 0 for l in range(3)}
        bytes_, ops, occ = 0.0, 0.0, []
        for l in range(3):
            resident = 0
            for w in range(n):
                for t, (miss, size) in enumerate(misses_of(l, w)):
                    if t >= warm:
                        mis[l] += len(miss)
                        bytes_ += len(miss) * rb[l]
                        ops += runs_brute(miss)
                        resident += size
            occ.append(resident / (tokens * widths[l]))
        hit = 1 - sum(mis.values()) / sum(acc.values())
        assert m[f"offload/{tag}/hit_rate"] == pytest.approx(hit), tag
        assert m[f"offload/{tag}/bytes_per_token"] == pytest.approx(bytes_ / tokens), tag
        assert m[f"offload/{tag}/bytes_per_layer_token"] == pytest.approx(bytes_ / tokens / 3), tag
        assert m[f"offload/{tag}/fetch_ops_per_token"] == pytest.approx(ops / tokens), tag
        assert m[f"offload/{tag}/occupancy"] == pytest.approx(sum(occ) / 3), tag
        assert m[f"offload/{tag}/ms_per_token"] == pytest.approx(ms(bytes_ / tokens, ops / tokens, active_bytes)), tag
        return [1 - mis[l] / acc[l] for l in range(3)]

    for c in (0.25, 0.5):
        caps = [capacity_rows(c, w) for w in widths]
        lru_layers = check(f"lru/c{c:g}", lambda l, w: lru_brute(seqs[l, w], caps[l]))
        hot = {l: hot_brute(calib_counts[l], caps[l]) for l in range(3)}
        hot_layers = check(f"hot/c{c:g}", lambda l, w: [(s - hot[l], len(hot[l])) for s in seqs[l, w]])
        if c == 0.25:  # per-layer rows are for the middle capacity, sorted([0.25, 0.5])[1]
            assert "offload/lru/c0.25/hit_rate" not in res.per_layer
        else:
            assert res.per_layer["offload/lru/c0.5/hit_rate"] == pytest.approx(lru_layers)
            assert res.per_layer["offload/hot/c0.5/hit_rate"] == pytest.approx(hot_layers)
    win_layers = check("window/k2", lambda l, w: window_brute(seqs[l, w], 2))
    assert res.per_layer["offload/window/k2/hit_rate"] == pytest.approx(win_layers)
    # the dense layer 2 in an LRU of round(0.5 * 5) = 2 rows: the two last-used (highest-index)
    # neurons of each token stay and hit at the next one, the other three always miss
    assert res.per_layer["offload/lru/c0.5/hit_rate"][2] == pytest.approx(2 / 5)
    assert all(len(v) == 3 for v in res.per_layer.values())


def test_capture_refuses_a_method_without_neuron_masks_and_restores_observers(bos_tokenizer):
    from sparsebench.data.corpus import load_tiny
    from sparsebench.evaluators.offload import Offload

    sites = [SimpleNamespace(layer_idx=0, intermediate_size=4, kind="gated", down=SimpleNamespace(out_features=2))]
    ctl = SimpleNamespace(sites=sites, sparsifier=SimpleNamespace(name="fake"), mask_observer=None,
                          linear_mask_observer=None)

    def model(input_ids, logits_to_keep=1):
        ctl.mask_observer(SimpleNamespace(layer_idx=0), None)

    ctx = SimpleNamespace(model=model, tokenizer=bos_tokenizer, controller=ctl, splits=load_tiny(None),
                          cfg=OmegaConf.create({"seed": 0, "data": {"calibration": {"num_sequences": 2, "seq_len": 8}}}))
    with pytest.raises(ConfigError, match="no MLP neuron masks"):
        Offload(_evaluator_cfg(num_windows=2)).evaluate(ctx)
    assert ctl.mask_observer is None and ctl.linear_mask_observer is None


def test_capture_broadcasts_a_static_mask():
    sites = [SimpleNamespace(layer_idx=0, intermediate_size=4)]
    ctl = SimpleNamespace(sites=sites, mask_observer=None, linear_mask_observer=None)
    static = torch.tensor([True, False, False, True])

    def model(input_ids, logits_to_keep=1):
        ctl.mask_observer(SimpleNamespace(layer_idx=0), static)

    got = []
    found = capture_masks(SimpleNamespace(model=model, controller=ctl), torch.zeros(3, 5, dtype=torch.long), 2,
                          lambda row, m: got.append((row, m)))
    assert found and [r for r, _ in got] == [0, 2]
    assert all(torch.equal(m[0], static.expand(m.shape[1], 5, 4)) for _, m in got)


@pytest.mark.parametrize("over,match", [
    ({"policies": ["lru", "fifo"]}, "policies"),
    ({"capacities": [0.5, 1.5]}, "capacities"),
    ({"window_tokens": [0]}, "window_tokens"),
    ({"tier": "tape"}, "tier"),
    ({"tiers.flash.slow_gbps": 0.0}, "slow_gbps"),
    ({"per_layer_capacity": 0.3}, "per_layer_capacity"),
    ({"warmup_tokens": -1}, "warmup_tokens"),
])
def test_bad_settings_are_refused_before_any_model_loads(over, match):
    from sparsebench.evaluators.offload import Offload

    with pytest.raises(ConfigError, match=match):
        Offload(_evaluator_cfg(**over))


# ------------------------------------------------------------------------ end to end

def _compose(overrides, hydra_config=True):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="sparsebench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_config)


def test_experiment_composes_and_builds():
    from sparsebench.run import build_components

    cfg = _compose(["experiment=offload_cache"])
    assert cfg.hydra.sweep.dir == "multirun/offload_cache"
    assert [v.strip() for v in str(cfg.hydra.sweeper.params.sparsifier).split(",")] == ["cats", "cett", "teal", "dejavu"]
    assert cfg.sparsifier.sparsity == 0.5
    sp, _, evs = build_components(_compose(["experiment=offload_cache", "sparsifier=cats"]))
    assert [e.name for e in evs] == ["offload", "sparsity"] and sp.name == "cats"


def test_run_on_a_tiny_model_through_run(tmp_path):
    """CATS on tiny-llama through ``sparsebench.run.run``; the first position kept dense
    (prefill.dense_prefix=1), so a cache holding every row hits every later access."""
    from sparsebench.run import run

    cfg = _compose(["model=tiny-llama", "data=tiny", "logger.mode=disabled", "sparsifier=cats",
                    "evaluator=[offload,sparsity,churn]", "compare_dense=false", "print_per_layer=false",
                    "evaluator.offload.capacities=[0.0,0.25,0.5,1.0]", "evaluator.offload.window_tokens=[1,32]",
                    "evaluator.offload.warmup_tokens=1", "prefill.policy=dense_prefix", "prefill.dense_prefix=1",
                    f"cache_dir={tmp_path / 'cache'}"], hydra_config=False)
    r = run(cfg, tmp_path / "out")
    m = r["metrics"]
    for tag in ("lru/c0", "lru/c0.25", "lru/c0.5", "lru/c1", "hot/c0.25", "hot/c1", "window/k1", "window/k32"):
        for key in ("hit_rate", "bytes_per_token", "bytes_per_layer_token", "fetch_ops_per_token", "occupancy",
                    "ms_per_token"):
            assert math.isfinite(m[f"offload/{tag}/{key}"]), (tag, key)
        assert 0.0 <= m[f"offload/{tag}/hit_rate"] <= 1.0
    for key in ("none", "active_only", "in_memory"):
        assert m[f"offload/{key}/ms_per_token"] > 0
    # capacity 1: after the dense first token every row is resident; nothing more is read
    assert m["offload/lru/c1/hit_rate"] == 1.0 and m["offload/lru/c1/bytes_per_token"] == 0.0
    assert m["offload/hot/c1/hit_rate"] == 1.0
    assert m["offload/window/k32/hit_rate"] == 1.0  # a window as long as the sequence keeps everything
    # capacity 0 is the active-rows-only baseline; hit rate grows with capacity
    assert m["offload/lru/c0/hit_rate"] == 0.0
    assert m["offload/lru/c0/bytes_per_token"] == m["offload/active_only/bytes_per_token"]
    assert m["offload/lru/c0/ms_per_token"] == pytest.approx(m["offload/active_only/ms_per_token"])
    assert m["offload/lru/c0.25/hit_rate"] <= m["offload/lru/c0.5/hit_rate"] <= 1.0
    assert m["offload/lru/c0.25/occupancy"] == pytest.approx(0.25)  # CATS at 50% overfills a quarter
    # the replayed masks are CATS's: their density is one minus the measured sparsity (all
    # positions but the dense first one; the sparsity evaluator counts the same windows)
    T = cfg.data.heldout.seq_len
    dens = (m["offload/density"] * (T - 1) + 1.0) / T
    assert dens == pytest.approx(1.0 - m["sparsity/mean"], abs=1e-3)
    assert 0.3 < m["offload/density"] < 0.7
    # a window of one token is the cached backend's cache: its misses are churn's swaps
    assert m["offload/window/k1/bytes_per_layer_token"] / m["offload/row_bytes"] == pytest.approx(
        m["churn/swaps_per_token"], rel=1e-9)
    # bytes follow the model's shape: tiny-llama is gated, hidden 64, bf16 rows
    assert m["offload/row_bytes"] == 3 * 64 * 2
    assert m["offload/none/bytes_per_token"] == 2 * 128 * 3 * 64 * 2
    assert m["offload/active_only/bytes_per_token"] == pytest.approx(
        m["offload/density"] * m["offload/none/bytes_per_token"])
    rows = r["per_layer"]
    assert len(rows) == 2 and all(0.0 <= row["offload/lru/c0.5/hit_rate"] <= 1.0 for row in rows)
    assert r["data"]["offload_profile_tokens"] == cfg.data.calibration.num_sequences * cfg.data.calibration.seq_len
    # the figure script reads the run back: one CSV row per policy point, the window at its occupancy
    import csv

    from sparsebench.experiments.offload_figure import main as offload_figure

    paths = offload_figure([str(tmp_path / "out"), "--out", str(tmp_path / "fig")])
    assert Path(paths["png"]).stat().st_size > 0
    with open(paths["csv"]) as fh:
        got = list(csv.DictReader(fh))
    lru = {float(x["capacity"]): float(x["hit_rate"]) for x in got if x["policy"] == "lru"}
    assert lru == pytest.approx({c: m[f"offload/lru/c{c:g}/hit_rate"] for c in (0.0, 0.25, 0.5, 1.0)})
    (k32,) = [x for x in got if x["policy"] == "window" and x["window_tokens"] == "32"]
    assert float(k32["capacity"]) == pytest.approx(m["offload/window/k32/occupancy"])
