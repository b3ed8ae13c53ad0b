"""The lightning indexer (DeepSeek-V3.2 DSA, warm-up stage), checked by brute force on tiny
random models: exactness at a full budget, decode == teacher forcing, the chosen keys ==
the top-k of an independent recomputation of I_{t,s}, deterministic training whose KL falls."""
import io
import math

import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.attention import AttentionSparsity, build_attention
from sparsebench.attention.base import AttentionCall, masked_attention
from sparsebench.core.errors import ConfigError
from sparsebench.models.loader import build_tiny_model

torch.set_num_threads(1)

ARCHS = ["llama", "qwen2"]  # qwen2's tiny config has 2 kv heads for 4 query heads (GQA)
SEQ = 32


def make_cfg(**over):
    from importlib import resources

    cfg = OmegaConf.load(resources.files("sparsebench.conf") / "attention" / "lightning_indexer.yaml")
    cfg.steps = 40
    for k, v in over.items():
        cfg[k] = v
    return cfg


def ids_for(seed, batch=2, seq=SEQ):
    return torch.randint(3, 300, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=ARCHS)
def calibrated(request):
    """(arch, model, trained state): 2 batches of 2 x 32 tokens, 40 Adam steps."""
    model = build_tiny_model(request.param, num_layers=2, num_heads=4)
    method = build_attention(make_cfg())
    state = method.calibrate(model, AttentionSparsity(method), [ids_for(1), ids_for(2)])
    return request.param, model, state


def session_for(model, state, **over):
    method = build_attention(make_cfg(**over))
    method.load_state(state)
    return method, AttentionSparsity(method).attach(model)


def decode_logits(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        return torch.cat([model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                          for t in range(ids.shape[1])], 1)


def spy(session, method):
    """Record every attend() call (inputs and output) and every selection."""
    calls, selections = [], []
    attend, select = session.attend, method.select

    def attend_spy(handle, module, query, key, value, attention_mask, scaling):
        out = attend(handle, module, query, key, value, attention_mask, scaling)
        calls.append({"layer": handle.layer, "hidden": handle.hidden, "query": query, "key": key,
                      "value": value, "scaling": scaling, "out": out})
        return out

    def select_spy(call):
        sel = select(call)
        selections.append((call.layer, call.q_len, sel))
        return sel

    session.attend, method.select = attend_spy, select_spy
    return calls, selections


# -- an independent recomputation of the index score, in float64 and plain loops ---------------

def brute_scores(state, layer, hidden, rope_fraction=0.5, theta=10000.0):
    """I[t, s] for one sequence's hidden [T, D] (positions 0..T-1), straight from the
    definition: sum_j w_{t,j} ReLU(q_{t,j} . k_s), w scaled by (H_I d_I)^-1/2, k LayerNorm-ed,
    RoPE as complex rotations of channel pairs (i, i + r/2) of the first r channels."""
    i = state["layers"].tolist().index(layer)
    wq, wk, ww = (state[p][i].double() for p in ("wq", "wk", "ww"))
    ln_w, ln_b = state["k_norm_weight"][i].double(), state["k_norm_bias"][i].double()
    heads, dim = ww.shape[0], wk.shape[0]
    r = round(rope_fraction * dim)
    h = hidden.double()
    T = h.shape[0]

    def rot(v, pos):
        out = v.clone()
        for c in range(r // 2):
            z = complex(v[c], v[c + r // 2]) * complex(math.cos(pos * theta ** (-2 * c / r)),
                                                      math.sin(pos * theta ** (-2 * c / r)))
            out[c], out[c + r // 2] = z.real, z.imag
        return out

    keys = []
    for s in range(T):
        k = wk @ h[s]
        k = (k - k.mean()) / torch.sqrt(((k - k.mean()) ** 2).mean() + 1e-6) * ln_w + ln_b
        keys.append(rot(k, s))
    scores = torch.full((T, T), float("-inf"), dtype=torch.float64)
    for t in range(T):
        qs = [rot(wq[j * dim:(j + 1) * dim] @ h[t], t) for j in range(heads)]
        w = (ww @ h[t]) / math.sqrt(heads * dim)
        for s in range(t + 1):
            scores[t, s] = sum(float(w[j]) * max(0.0, float(qs[j] @ keys[s])) for j in range(heads))
    return scores


def brute_topk(scores_row, t, k):
    """The k keys s <= t of highest score, ties to the later key."""
    cand = sorted(range(t + 1), key=lambda s: (float(scores_row[s]), s), reverse=True)
    return sorted(cand[:k])


# -- tests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefill", ["dense", "sparse"])
def test_full_budget_is_exactly_dense(calibrated, prefill):
    arch, model, state = calibrated
    ids = ids_for(5)
    with torch.no_grad():
        ref = model(ids).logits
    ref_dec = decode_logits(model, ids)
    for over in ({"budget": SEQ}, {"budget": 1, "budget_fraction": 1.0}):
        _, session = session_for(model, state, prefill=prefill, **over)
        with session:
            with torch.no_grad():
                got = model(ids).logits
            got_dec = decode_logits(model, ids)
        assert torch.equal(got, ref), (arch, over)
        assert torch.equal(got_dec, ref_dec), (arch, over)
        assert session.density() == [1.0, 1.0]


def test_teacher_forced_equals_decode(calibrated):
    _, model, state = calibrated
    ids = ids_for(6)
    with torch.no_grad():
        dense = model(ids).logits
    _, session = session_for(model, state, budget=6, prefill="sparse")
    with session:
        with torch.no_grad():
            tf = model(ids).logits
        tf_density = session.density()
        session.reset_stats()
        dec = decode_logits(model, ids)
        dec_density = session.density()
    assert (tf - dense).abs().max() > 1e-2  # the selection does change the output
    assert all(d < 0.5 for d in tf_density)
    torch.testing.assert_close(dec, tf, atol=1e-4, rtol=0)
    # the same keys read either way: (6 per query, all of them for the first 6 queries)
    expected = (6 * (SEQ - 6) + 21) / (SEQ * (SEQ + 1) / 2)
    assert tf_density == pytest.approx([expected] * 2)
    # decode counts only the sparse steps (the first 6 run dense and are not recorded)
    assert dec_density == pytest.approx([6 * (SEQ - 6) / sum(range(7, SEQ + 1))] * 2)


@pytest.mark.parametrize("layer", [0, 1])
def test_selection_is_topk_of_bruteforce_index_score(calibrated, layer):
    _, model, state = calibrated
    budget = 5
    ids = ids_for(7, batch=1, seq=20)
    # teacher-forced: every query's own top-k
    method, session = session_for(model, state, budget=budget, prefill="sparse")
    calls, selections = spy(session, method)
    with session:
        with torch.no_grad():
            model(ids)
    call = next(c for c in calls if c["layer"] == layer)
    keep = next(s for lay, _, s in selections if lay == layer).keep
    assert keep.shape == (1, 4, 20, 20) and bool((keep == keep[:, :1]).all())  # one choice for all heads
    scores = brute_scores(state, layer, call["hidden"][0])
    want = torch.zeros(20, 20, dtype=torch.bool)
    for t in range(20):
        want[t, brute_topk(scores[t], t, budget)] = True
    assert torch.equal(keep[0, 0], want)
    ref = masked_attention(call["query"], call["key"], call["value"], want[None, None].expand(1, 4, 20, 20),
                           call["scaling"])
    torch.testing.assert_close(call["out"], ref, atol=1e-6, rtol=0)

    # decode: a dense prefill of 19 tokens, then one step reads the top-k rows by index
    from transformers import DynamicCache

    method, session = session_for(model, state, budget=budget, prefill="dense")
    calls, selections = spy(session, method)
    cache = DynamicCache(config=model.config)
    with session:
        with torch.no_grad():
            model(ids[:, :19], past_key_values=cache, use_cache=True)
            model(ids[:, 19:], past_key_values=cache, use_cache=True)
    pre, step = [c for c in calls if c["layer"] == layer]
    assert pre["out"] is None  # dense prefill ran the model's own sdpa
    index = next(s for lay, q, s in selections if lay == layer and q == 1).index
    kv_heads = step["key"].shape[1]
    assert index.shape == (1, kv_heads, budget) and bool((index == index[:, :1]).all())
    hidden = torch.cat([pre["hidden"], step["hidden"]], 1)[0]
    scores = brute_scores(state, layer, hidden)
    assert index[0, 0].tolist() == brute_topk(scores[19], 19, budget)
    want = torch.zeros(1, 4, 1, 20, dtype=torch.bool)
    want[..., index[0, 0]] = True
    ref = masked_attention(step["query"], step["key"], step["value"], want, step["scaling"])
    torch.testing.assert_close(step["out"], ref, atol=1e-5, rtol=1e-5)


def test_training_is_deterministic_and_kl_falls(calibrated):
    _, model, state = calibrated
    batches = [ids_for(1), ids_for(2)]
    method = build_attention(make_cfg())
    again = method.calibrate(model, AttentionSparsity(method), batches)
    assert set(again) == set(state)
    for key in state:
        assert torch.equal(again[key], state[key]), key
    assert state["layers"].tolist() == [0, 1]
    assert state["losses"].shape == (2, 40)
    assert bool((state["losses"][:, -1] < 0.6 * state["losses"][:, 0]).all())
    assert bool((state["loss_final"] < 0.6 * state["loss_initial"]).all())
    other = build_attention(make_cfg(seed=1))
    moved = other.calibrate(model, AttentionSparsity(other), batches)
    assert not torch.equal(moved["wq"], state["wq"])
    # the state survives the calibration cache's round trip (torch.save, weights_only load)
    buf = io.BytesIO()
    torch.save(state, buf)
    method.load_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    summary = method.summary()
    assert summary["trained_layers"] == [0, 1]
    assert summary["kl_final"] == pytest.approx(state["loss_final"].tolist())


def test_trained_indexer_generalises(calibrated):
    """On held-out tokens, the trained indexer's softmax is closer (KL) to the dense attention
    than an untrained one's (1 step), and its top-k hold more of the attention mass."""
    from sparsebench.attention import lightning_indexer as li

    arch, model, _ = calibrated
    batches = [ids_for(10 + i, batch=4) for i in range(16)]
    states = {}
    for steps in (1, 200):
        method = build_attention(make_cfg(steps=steps))
        states[steps] = method.calibrate(model, AttentionSparsity(method), batches)
    ids = ids_for(9, batch=8)
    allowed = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()[None, None].expand(8, 1, SEQ, SEQ)
    method, session = session_for(model, states[1])  # dense prefill: only collects the inputs
    calls, _ = spy(session, method)
    with session:
        with torch.no_grad():
            model(ids)
    result = {}
    for steps, state in states.items():
        method.load_state(state)
        for c in calls:
            p = li.attention_target(c["query"], c["key"], allowed, c["scaling"])
            w, pos = method.weights(c["layer"], "cpu"), torch.arange(SEQ)
            q, weights = li.index_queries(w, c["hidden"], pos, method.rope_dim, method.rope_theta)
            scores = li.index_scores(q, weights, li.index_keys(w, c["hidden"], pos, method.rope_dim, method.rope_theta))
            kl = float(li.kl_loss(scores, p, allowed[:, 0]))
            keep = (li.rank_keys(scores.masked_fill(~allowed[:, 0], float("-inf"))) < 6) & allowed[:, 0]
            result[steps, c["layer"]] = kl, float((p * keep).sum(-1)[:, 6:].mean())
    for layer in (0, 1):
        (kl0, mass0), (kl1, mass1) = result[1, layer], result[200, layer]
        assert kl1 < 0.7 * kl0, (arch, layer, result)
        assert mass1 > mass0, (arch, layer, result)
    gain = sum(result[200, layer][1] - result[1, layer][1] for layer in (0, 1)) / 2
    assert gain > 0.01, (arch, result)


def test_decode_index_skips_masked_keys_and_pads():
    """A key the model's mask forbids (left padding) is never picked; fewer allowed keys than
    the budget leave -1 pads."""
    method = build_attention(make_cfg(budget=4))
    model = build_tiny_model("llama", num_layers=1, num_heads=4)
    state = method.calibrate(model, AttentionSparsity(method), [ids_for(3, seq=16)])
    method.load_state(state)
    n, hidden = 8, torch.randn(1, 8, 64)
    mask = torch.zeros(1, 1, 1, n)
    mask[..., :5] = torch.finfo(torch.float32).min  # only keys 5, 6, 7 allowed
    st: dict = {}
    kv = torch.randn(1, 2, n, 16)
    prefill = AttentionCall(0, torch.randn(1, 4, 7, 16), kv[:, :, :7], kv[:, :, :7], hidden[:, :7], None, 0.25, st)
    method.observe(prefill)
    step = AttentionCall(0, torch.randn(1, 4, 1, 16), kv, kv, hidden[:, 7:], mask, 0.25, st)
    method.observe(step)
    assert st["index_keys"].shape == (1, 8, 32)
    index = method.select(step).index
    assert index.tolist() == [[[5, 6, 7, -1]] * 2]


def test_missing_prefill_keys_are_refused(calibrated):
    _, _, state = calibrated
    method = build_attention(make_cfg(budget=4))
    method.load_state(state)
    call = AttentionCall(1, torch.randn(1, 4, 1, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16),
                         torch.randn(1, 1, 64), None, 0.25, {})
    with pytest.raises(RuntimeError, match="indexer keys for 0 of the 8"):
        method.observe(call)


def test_config_schema_and_calibration_key():
    from sparsebench.core.config_check import check_option

    cfg = make_cfg()
    check_option("attention", cfg)
    method = build_attention(cfg)
    key = method.calibration_key()
    assert "budget" not in key and "dense_layers" not in key and key["index_dim"] == 32
    assert build_attention(make_cfg(budget=7, dense_layers=[0])).calibration_key() == key
    assert build_attention(make_cfg(lr=0.01)).calibration_key() != key
    for bad in ({"steps": 0}, {"index_heads": -1}, {"rope_fraction": 1.5}, {"rope_fraction": 0.1},
                {"lr": 0.0}, {"budget_fraction": 2.0}, {"dense_layers": ["a"]}, {"prefill": "half"}):
        with pytest.raises(ConfigError):
            build_attention(make_cfg(**bad))
    # keys at elem_bytes plus the weights: (4*32 + 32 + 4) * 64 projections, 2*32 LayerNorm
    model = build_tiny_model("llama", num_layers=1, num_heads=4)
    method.load_state(method.calibrate(model, AttentionSparsity(method), [ids_for(3, seq=8)]))
    assert method.selection_bytes(100, 2, 16, 2) == (100 * 32 + 164 * 64 + 64) * 2


def test_indexer_keys_append_in_place_as_cat():
    """Appending keys step by step equals concatenating them, writes into one buffer until it is
    full (then doubles), and a deep-copied state (a session snapshot) keeps its own buffer."""
    import copy

    from sparsebench.attention.lightning_indexer import append_in_place

    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, t, 8, generator=gen) for t in (200, *([1] * 100), 40)]
    state, start, ptrs = {}, 0, set()
    for i, new in enumerate(chunks):
        state["index_keys"] = append_in_place(state, start, new)
        start += new.shape[1]
        assert torch.equal(state["index_keys"], torch.cat(chunks[:i + 1], dim=1))
        ptrs.add(state["index_keys_buf"].data_ptr())
        if i == 50:
            snap = copy.deepcopy(state)
    assert len(ptrs) == 2 and state["index_keys_buf"].shape[1] == 512  # 256, then doubled once
    # the copy continues on its own buffer and leaves the original untouched
    before = state["index_keys"].clone()
    assert snap["index_keys"].shape[1] == 250  # 200 + 50 single steps
    snap["index_keys"] = append_in_place(snap, 250, torch.zeros(2, 1, 8))
    assert snap["index_keys"].data_ptr() == snap["index_keys_buf"].data_ptr() != state["index_keys_buf"].data_ptr()
    assert torch.equal(state["index_keys"], before)
    assert torch.equal(snap["index_keys"][:, :250], before[:, :250]) and not snap["index_keys"][:, 250].any()


def test_top_keys_is_the_rank_rule_with_ties_and_forbidden_keys():
    """The linear-time top-k equals the sort-based rank rule (ties to the later key, forbidden
    keys never chosen, -1 padding) on small integer scores, where ties are everywhere."""
    from sparsebench.attention.lightning_indexer import rank_keys, top_keys

    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n, k = (int(v) for v in torch.randint(1, 40, (2,), generator=gen))
        scores = torch.randint(-2, 3, (3, n), generator=gen).float()
        scores[torch.rand(3, n, generator=gen) < 0.3] = float("-inf")
        ranks = rank_keys(scores)
        expected = []
        for row, rank in zip(scores, ranks):
            chosen = [i for i in range(n) if rank[i] < k and row[i] > float("-inf")]
            expected.append(chosen + [-1] * (min(k, n) - len(chosen)))
        assert torch.equal(top_keys(scores, k), torch.tensor(expected))
