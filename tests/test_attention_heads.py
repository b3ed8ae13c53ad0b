"""Deja Vu attention-head sparsity (attention=head_sparsity), checked by brute force on
tiny random models: a full budget is the dense model bit for bit; a sparse run equals the
same model with the dropped heads' outputs zeroed before o_proj by a hook of our own;
teacher forcing equals token-by-token decode; training is deterministic and learns."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.attention import AttentionSparsity, build_attention
from sparsebench.attention.base import attention_modules
from sparsebench.core.errors import ConfigError
from sparsebench.models.loader import build_tiny_model

torch.set_num_threads(1)


def make_cfg(**over):
    cfg = OmegaConf.load("conf/attention/head_sparsity.yaml")
    cfg.steps = 60
    for k, v in over.items():
        cfg[k] = v
    return cfg


def ids_for(batch=1, seq=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (batch, seq), generator=gen)


def calibration_batches(n=2, batch=2, seq=32):
    return [ids_for(batch, seq, seed=100 + i) for i in range(n)]


def text_config(model):
    return model.config.get_text_config()


def o_proj(attn):
    return attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj


def random_state(model, rank=5, seed=0):
    """A predictor set by hand: random A [layers, r, d], B [layers, heads, r]."""
    cfg = text_config(model)
    gen = torch.Generator().manual_seed(seed)
    n, d, h = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
    return {"A": torch.randn(n, rank, d, generator=gen), "B": torch.randn(n, h, rank, generator=gen),
            "trained": torch.ones(n, dtype=torch.bool)}


# --------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("arch,unit", [("llama", "query"), ("qwen2", "kv"), ("opt", "query")])
def test_all_heads_is_the_dense_model_exactly(arch, unit):
    model = build_tiny_model(arch, num_layers=2, num_heads=4)
    ids = ids_for(2, 20)
    with torch.no_grad():
        ref = model(ids).logits
    method = build_attention(make_cfg(heads=1.0, unit=unit, dense_layers=[]))
    method.load_state(random_state(model))
    with AttentionSparsity(method).attach(model):
        with torch.no_grad():
            out = model(ids).logits
    assert torch.equal(out, ref)
    assert method.selection_bytes(20, 2, 16, 2) == 0  # the predictor does not run


def reference_zeroed(model, ids, state, heads_frac, unit, dense_layers):
    """The unpatched model with our own hooks: per token, the predictor's top heads (or
    KV groups, scored by the sum of sigmoid probabilities) chosen by a plain Python sort,
    every other head's output zeroed in the input of o_proj."""
    cfg = text_config(model)
    h, hkv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    g = h // hkv
    hooks, seen = [], {}

    def on_attn(module, args, kwargs, i):
        seen[i] = kwargs.get("hidden_states", args[0] if args else None)

    def on_o(module, args, i):
        if i in dense_layers:
            return None
        x = args[0]
        scores = (seen[i].float() @ state["A"][i].T) @ state["B"][i].T  # [b, q, h]
        mask = torch.zeros(scores.shape, dtype=x.dtype)
        for b in range(scores.shape[0]):
            for t in range(scores.shape[1]):
                s = scores[b, t].tolist()
                if unit == "query":
                    k = max(1, int(heads_frac * h))
                    keep = sorted(range(h), key=lambda j: -s[j])[:k]
                else:
                    k = max(1, int(heads_frac * hkv))
                    prob = [sum(float(torch.sigmoid(torch.tensor(s[j]))) for j in range(c * g, (c + 1) * g))
                            for c in range(hkv)]
                    top = sorted(range(hkv), key=lambda c: -prob[c])[:k]
                    keep = [j for c in top for j in range(c * g, (c + 1) * g)]
                for j in keep:
                    mask[b, t, j] = 1
        hd = x.shape[-1] // h
        return (x * mask.repeat_interleave(hd, dim=-1),)

    for i, attn in enumerate(attention_modules(model)):
        hooks.append(attn.register_forward_pre_hook(lambda m, a, k, i=i: on_attn(m, a, k, i), with_kwargs=True))
        hooks.append(o_proj(attn).register_forward_pre_hook(lambda m, a, i=i: on_o(m, a, i)))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for hk in hooks:
            hk.remove()


@pytest.mark.parametrize("arch,unit", [("llama", "query"), ("llama", "kv"), ("qwen2", "kv"), ("opt", "query")])
def test_sparse_run_equals_zeroed_heads_reference(arch, unit):
    model = build_tiny_model(arch, num_layers=3, num_heads=4)
    ids = ids_for(2, 18, seed=1)
    state = random_state(model, seed=3)
    dense_layers = [1]
    method = build_attention(make_cfg(heads=0.5, unit=unit, dense_layers=dense_layers))
    method.load_state(state)
    with torch.no_grad():
        dense = model(ids).logits
    with AttentionSparsity(method).attach(model) as session:
        with torch.no_grad():
            out = model(ids).logits
    ref = reference_zeroed(model, ids, state, 0.5, unit, dense_layers)
    assert (out - dense).abs().max() > 1e-2  # heads were really dropped
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    stats = session.stats
    assert stats[1].calls == 0  # a dense layer
    for i in (0, 2):
        assert stats[i].heads_run * 2 == stats[i].heads_total
        if unit == "kv" and arch != "opt":  # whole groups dropped: half the K/V rows read
            assert stats[i].keys_attended * 2 == stats[i].keys_allowed


def test_prefill_dense_leaves_multi_token_forwards_dense():
    model = build_tiny_model("llama", num_layers=2, num_heads=4)
    ids = ids_for(1, 16)
    with torch.no_grad():
        ref = model(ids).logits
    method = build_attention(make_cfg(heads=0.5, prefill="dense", dense_layers=[]))
    method.load_state(random_state(model))
    with AttentionSparsity(method).attach(model):
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref)
            cache = model(ids[:, :-1], use_cache=True).past_key_values
            step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    assert (step[:, 0] - ref[:, -1]).abs().max() > 1e-3  # the decode step dropped heads


# --------------------------------------------------------------------------- training

def calibrated(arch, unit="query", **over):
    model = build_tiny_model(arch, num_layers=2, num_heads=4)
    method = build_attention(make_cfg(unit=unit, dense_layers=[], **over))
    session = AttentionSparsity(method).attach(model)
    state = method.calibrate(model, session, calibration_batches())
    return model, method, session, state


@pytest.mark.parametrize("arch,unit", [("llama", "query"), ("qwen2", "kv")])
def test_teacher_forced_equals_token_by_token_decode(arch, unit):
    from transformers import DynamicCache

    model, method, session, _ = calibrated(arch, unit, heads=0.5)
    ids = ids_for(2, 24, seed=7)
    with session:
        with torch.no_grad():
            with session.dense():
                dense = model(ids).logits
            forced = model(ids).logits
            cache = DynamicCache(config=model.config)
            steps = [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(ids.shape[1])]
    decoded = torch.cat(steps, 1)
    assert (forced - dense).abs().max() > 1e-2
    torch.testing.assert_close(decoded, forced, atol=1e-4, rtol=0)


@pytest.mark.parametrize("q_heads,kv_heads,batch", [(9, 3, 1), (4, 4, 2), (8, 2, 3)])
def test_headwise_decode_equals_masked_attention(q_heads, kv_heads, batch):
    """The decode path that reads only the running groups' K/V equals dense attention over
    every key with the dropped heads zeroed (a whole dropped group included)."""
    from sparsebench.attention.base import headwise_attention, masked_attention

    gen = torch.Generator().manual_seed(q_heads * 10 + batch)
    n, d = 37, 16
    q = torch.randn(batch, q_heads, 1, d, generator=gen)
    k, v = (torch.randn(batch, kv_heads, n, d, generator=gen) for _ in range(2))
    heads = torch.rand(batch, 1, q_heads, generator=gen) < 0.5
    heads[0, 0, : q_heads // kv_heads] = False  # one KV group with no head running
    keep = torch.ones(batch, q_heads, 1, n, dtype=torch.bool)
    ref = masked_attention(q, k, v, keep, 0.3) * heads[..., None]
    torch.testing.assert_close(headwise_attention(q, k, v, heads, 0.3), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch,unit", [("llama", "query"), ("qwen2", "kv")])
def test_unrecorded_decode_steps_equal_teacher_forcing(arch, unit, monkeypatch):
    """Without statistics a decode step takes the head-wise path; it equals the recorded run."""
    from transformers import DynamicCache

    from sparsebench.attention import base

    calls = []
    headwise = base.headwise_attention
    monkeypatch.setattr(base, "headwise_attention", lambda *a: calls.append(1) or headwise(*a))
    model, method, _, _ = calibrated(arch, unit, heads=0.5)
    ids = ids_for(1, 20, seed=11)
    with AttentionSparsity(method, record_stats=False).attach(model):
        with torch.no_grad():
            forced = model(ids).logits
            cache = DynamicCache(config=model.config)
            steps = [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), forced, atol=1e-4, rtol=0)
    assert len(calls) == 2 * ids.shape[1]  # both layers, every one-query step


def test_training_is_deterministic_and_beats_random_heads():
    model, method, session, state = calibrated("llama", label_heads=0.5)
    session.detach()
    method2 = build_attention(make_cfg(dense_layers=[], label_heads=0.5))
    again = method2.calibrate(model, None, calibration_batches())
    assert state.keys() == again.keys()
    for k in state:
        assert torch.equal(state[k], again[k]), k
    h = text_config(model).num_attention_heads
    k = 2  # label heads per token: floor(0.5 · 4)
    # recall of the label heads by the predictor's top k on its training tokens; a random
    # choice of k heads recovers k / h of them on average
    recall = state["train_recall"][:, k - 1]
    assert bool((recall > k / h + 0.2).all()), recall
    assert bool(state["trained"].all())
    assert state["A"].shape[1] == max(1, round(0.1 * text_config(model).hidden_size))
    # the independent recomputation: predicted top k vs the labels on all training tokens
    s = method.summary()
    assert 0.0 <= s["holdout_recall"] <= 1.0 and s["train_recall"] == pytest.approx(float(recall.mean()))


def test_kv_unit_training_recall_beats_random_groups():
    model, method, session, state = calibrated("qwen2", "kv", label_heads=0.5)
    session.detach()
    cfg = text_config(model)
    hkv = cfg.num_key_value_heads
    assert hkv == 2 and cfg.num_attention_heads == 4
    # one group of two kept: a random group covers half of the label heads on average
    assert bool((state["train_recall_kv"][:, 0] > 0.5 + 0.1).all()), state["train_recall_kv"]
    assert method.summary()["train_recall"] == pytest.approx(float(state["train_recall_kv"][:, 0].mean()))


def test_labels_are_head_output_norms():
    """Labels through calibrate's hook equal norms computed by hand per head, both the
    reference's ||x_h|| and the projected ||W_o[:, h] x_h||."""
    from sparsebench.attention.head_sparsity import head_grams, head_norms

    gen = torch.Generator().manual_seed(0)
    h, hd, out = 4, 8, 24
    x = torch.randn(3, 5, h * hd, generator=gen)
    w = torch.randn(out, h * hd, generator=gen)
    plain = head_norms(x, h)
    proj = head_norms(x, h, head_grams(w, h))
    flat = x.reshape(-1, h * hd)
    for j in range(h):
        sl = slice(j * hd, (j + 1) * hd)
        torch.testing.assert_close(plain[:, j], flat[:, sl].norm(dim=-1))
        torch.testing.assert_close(proj[:, j], (flat[:, sl] @ w[:, sl].T).norm(dim=-1), atol=1e-4, rtol=1e-4)
    # the heads' contributions add up to the projection (no bias)
    contrib = sum(flat[:, j * hd:(j + 1) * hd] @ w[:, j * hd:(j + 1) * hd].T for j in range(h))
    torch.testing.assert_close(contrib, flat @ w.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("label", ["output", "projected"])
def test_calibrate_trains_on_the_dense_pass(monkeypatch, label):
    """What calibrate hands the trainer, per layer: the attention input of a dense forward
    and, as labels, the top label_heads heads of the per-head norms computed here by hand
    from the input of o_proj (the last 5 % of the tokens held back)."""
    from sparsebench.attention import head_sparsity as hs

    model = build_tiny_model("llama", num_layers=2, num_heads=4)
    batches = calibration_batches(n=2, batch=2, seq=20)  # 80 tokens: 76 train, 4 held back
    seen, grabbed, hooks = [], {}, []
    for i, attn in enumerate(attention_modules(model)):
        hooks.append(attn.register_forward_pre_hook(
            lambda m, a, k, i=i: grabbed.setdefault(("x", i), []).append(k["hidden_states"].reshape(-1, 64)),
            with_kwargs=True))
        hooks.append(o_proj(attn).register_forward_pre_hook(
            lambda m, a, i=i: grabbed.setdefault(("o", i), []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for b in batches:
            model(b)
    for hk in hooks:
        hk.remove()
    real = hs.train_head_predictor
    monkeypatch.setattr(hs, "train_head_predictor", lambda X, Y, *a, **k: seen.append((X, Y)) or real(X, Y, *a, **k))
    method = build_attention(make_cfg(dense_layers=[], label=label, label_heads=0.5, steps=2))
    session = AttentionSparsity(method).attach(model)  # calibrate runs the model dense itself
    with session:
        method.calibrate(model, session, batches)
    assert len(seen) == 2
    for i, (X, Y) in enumerate(seen):
        x = torch.cat(grabbed[("x", i)])
        o = torch.cat(grabbed[("o", i)])
        w = o_proj(attention_modules(model)[i]).weight
        hd = o.shape[-1] // 4
        norms = torch.stack([(o[:, j * hd:(j + 1) * hd] @ w[:, j * hd:(j + 1) * hd].T).norm(dim=-1)
                             if label == "projected" else o[:, j * hd:(j + 1) * hd].norm(dim=-1)
                             for j in range(4)], -1)
        top2 = norms.argsort(-1, descending=True)[:, :2]
        labels = torch.zeros(norms.shape, dtype=torch.bool).scatter_(-1, top2, True)
        assert X.shape == (76, 64) and torch.equal(X, x[:76])
        assert torch.equal(Y, labels[:76])


def test_loss_is_the_reference_weighting():
    from sparsebench.attention.head_sparsity import predictor_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=gen)
    y = (torch.rand(6, 4, generator=gen) > 0.7).float()
    w = float(y.mean())
    p = torch.sigmoid(logits)
    by_hand = sum(-(1.0 if y[i, j] else w) * (torch.log(p[i, j]) if y[i, j] else torch.log(1 - p[i, j]))
                  for i in range(6) for j in range(4)) / 24
    torch.testing.assert_close(predictor_loss(logits, y), by_hand)


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("over", [dict(heads=0.0), dict(heads=1.5), dict(unit="group"), dict(label="attn"),
                                  dict(steps=0), dict(rank=2.0), dict(label_heads=0), dict(prefill="all"),
                                  dict(dense_layers=[-1]), dict(heads="half")])
def test_bad_options_are_refused(over):
    with pytest.raises(ConfigError):
        build_attention(make_cfg(**over))


def test_key_summary_and_selection_bytes():
    model = build_tiny_model("llama", num_layers=2, num_heads=4)
    method = build_attention(make_cfg(heads=0.5))
    key = method.calibration_key()
    assert "heads" not in key and "unit" not in key and key["label_heads"] == 0.3
    state = random_state(model, rank=5)
    method.load_state({**state, "train_recall": torch.rand(2, 4), "holdout_recall": torch.rand(2, 4),
                       "train_recall_kv": torch.rand(2, 2), "holdout_recall_kv": torch.rand(2, 2)})
    assert method.selection_bytes(100, 2, 16, 2) == (5 * 64 + 4 * 5) * 2
    s = method.summary()
    assert s["rank"] == 5 and len(s["holdout_recall_per_layer"]) == 1  # layer 0 is dense by default
    assert s["holdout_recall"] == pytest.approx(float(method.report["holdout_recall"][1, 1]))
