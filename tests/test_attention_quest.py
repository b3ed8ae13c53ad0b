"""Quest and the attention plumbing against brute-force references on random inputs."""
import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import DynamicCache

from conftest import make_tiny, random_ids
from sparsebench.attention import AttentionCall, AttentionSparsity, build_attention
from sparsebench.attention.base import gathered_attention, index_to_keep, masked_attention
from sparsebench.attention.quest import page_bound

QUEST = dict(name="quest", budget=1024, budget_fraction=None, page_size=8, min_pages=3, dense_layers=[],
             prefill="sparse", group="query", sink_tokens=0, recent_tokens=0)


def quest(**kw):
    return build_attention(OmegaConf.create(QUEST | kw))


def tiny(arch, **kw):
    # gemma3's pattern is five sliding layers, then a global one: six layers reach a global layer
    return make_tiny(arch, num_layers=6 if arch == "gemma3" else 2, **kw)


@torch.no_grad()
def decode_logits(model, ids):
    cache = DynamicCache(config=model.config)
    return torch.cat([model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                      for t in range(ids.shape[1])], 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3", "opt"])
def test_full_budget_is_the_dense_model_exactly(arch):
    model = tiny(arch)
    ids = random_ids(batch=1, seq=70)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        ref_dec = decode_logits(model, ids)
    session = AttentionSparsity(quest(budget_fraction=1.0)).attach(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
        assert torch.equal(decode_logits(model, ids), ref_dec)
    session.detach()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)


@pytest.mark.parametrize("arch,group,sinks", [("llama", "query", 0), ("qwen2", "kv", 0), ("qwen2", "query", 3),
                                              ("gemma3", "kv", 2), ("opt", "query", 0)])
def test_teacher_forced_selection_equals_token_by_token_decode(arch, group, sinks):
    """prefill: sparse scores each query's pages from the keys up to itself only, so a
    multi-token forward equals decoding the same tokens one at a time (the gather path)."""
    model = tiny(arch)
    ids = random_ids(batch=1, seq=90, seed=3)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    session = AttentionSparsity(quest(budget=24, group=group, sink_tokens=sinks, recent_tokens=sinks)).attach(model)
    with torch.no_grad():
        forced = model(input_ids=ids).logits
    session.reset()
    stepped = decode_logits(model, ids)
    session.detach()
    assert (forced - dense).abs().max() > 1e-3  # the budget drops keys
    torch.testing.assert_close(forced, stepped, atol=1e-4, rtol=1e-4)


def brute_force_pages(q, keys, page, k_pages):
    """Top pages per query head by the Quest bound, computed channel by channel."""
    hq, d = q.shape
    hkv, n, _ = keys.shape
    g = hq // hkv
    chosen = []
    for h in range(hq):
        bounds = []
        for p in range(math.ceil(n / page)):
            block = keys[h // g, p * page:(p + 1) * page]
            lo, hi = block.min(0).values, block.max(0).values
            bounds.append(sum(max(q[h, c] * lo[c], q[h, c] * hi[c]).item() for c in range(d)))
        order = sorted(range(len(bounds)), key=lambda p: -bounds[p])
        chosen.append(set(order[:k_pages]))
    return chosen


def random_call(b=1, hq=4, hkv=2, n=61, d=8, q_len=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, q_len, d, generator=gen)
    k = torch.randn(b, hkv, n, d, generator=gen)
    v = torch.randn(b, hkv, n, d, generator=gen)
    return AttentionCall(2, q, k, v, None, None, d ** -0.5, {})


@pytest.mark.parametrize("seed", range(3))
def test_decode_selection_is_the_top_pages_of_the_bound(seed):
    call = random_call(seed=seed)
    method = quest(budget=24)  # 24 // 8 = 3 pages
    sel = method.select(call)
    expected = brute_force_pages(call.query[0, :, 0], call.key[0], 8, 3)
    for h in range(4):
        got = {int(i) // 8 for i in sel.index[0, h] if i >= 0}
        assert got == expected[h]
        # every token of a chosen page is read, nothing beyond the cache
        idx = sel.index[0, h]
        assert set(idx[idx >= 0].tolist()) == {t for p in expected[h] for t in range(p * 8, min(p * 8 + 8, 61))}


def test_page_bound_bounds_every_key_of_the_page():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(5, 16, generator=gen)
    keys = torch.randn(12, 8, 16, generator=gen)  # 12 pages of 8
    bound = page_bound(q, keys.amin(1), keys.amax(1))  # [5, 12]
    exact = torch.einsum("qd,pkd->qpk", q, keys).amax(-1)
    assert (bound >= exact - 1e-5).all()
    # and it is tight for a page of one key
    one = keys[:, :1]
    torch.testing.assert_close(page_bound(q, one.amin(1), one.amax(1)), torch.einsum("qd,pd->qp", q, one[:, 0]))


@pytest.mark.parametrize("heads", ["kv", "query"])
def test_gathered_attention_equals_dense_attention_over_the_chosen_keys(heads):
    call = random_call(n=40, seed=5)
    b, hq, _, d = call.query.shape
    hkv = call.key.shape[1]
    h = hkv if heads == "kv" else hq
    gen = torch.Generator().manual_seed(2)
    index = torch.stack([torch.randperm(40, generator=gen)[:12].sort().values for _ in range(h)])[None]
    index[0, 0, -3:] = -1  # padding
    out = gathered_attention(call.query, call.key, call.value, index, call.scaling)
    # brute force: softmax over the chosen keys of each query head, by hand
    for qh in range(hq):
        row = index[0, qh // (hq // hkv) if heads == "kv" else qh]
        keys = [int(i) for i in row if i >= 0]
        kh = qh // (hq // hkv)
        s = torch.stack([call.query[0, qh, 0] @ call.key[0, kh, j] for j in keys]) * call.scaling
        p = torch.softmax(s, 0)
        ref = sum(p[i] * call.value[0, kh, j] for i, j in enumerate(keys))
        torch.testing.assert_close(out[0, 0, qh], ref, atol=1e-5, rtol=1e-5)
    keep = index_to_keep(index, 40)
    keep = keep.repeat_interleave(hq // h, dim=1) if h != hq else keep
    torch.testing.assert_close(out, masked_attention(call.query, call.key, call.value, keep, call.scaling),
                               atol=1e-5, rtol=1e-5)


def test_kv_group_reads_one_set_of_pages_per_kv_head():
    call = random_call(seed=7)
    sel = quest(budget=16, group="kv").select(call)
    assert sel.index.shape[1] == 2  # kv heads
    # the group's score is the max bound over its query heads
    from sparsebench.attention.quest import Quest

    kmin, kmax = Quest._page_bounds(quest(budget=16, group="kv"), random_call(seed=7))
    bounds = page_bound(call.query[0, :, 0][:, None], kmin[0].repeat_interleave(2, 0), kmax[0].repeat_interleave(2, 0))
    group = bounds[:, 0].view(2, 2, -1).amax(1)
    for h in range(2):
        pages = {int(i) // 8 for i in sel.index[0, h] if i >= 0}
        assert pages == set(group[h].topk(3).indices.tolist())


def test_budget_rules():
    method = quest(budget=40)
    assert method.pages_for(1000) == 5  # 40 // 8
    assert quest(budget=8).pages_for(1000) == 3  # min_pages
    assert quest(budget_fraction=0.5).pages_for(160) == 10
    assert quest(budget=4096).pages_for(100) == 13  # a budget over the context reads all of it
    with pytest.raises(Exception, match="budget_fraction"):
        quest(budget_fraction=1.5)
    with pytest.raises(Exception, match="dense_layers"):
        quest(dense_layers=3)


def test_dense_layers_and_stats():
    model = make_tiny("llama", num_layers=3)
    ids = random_ids(batch=1, seq=64)
    session = AttentionSparsity(quest(budget=16, dense_layers=[0])).attach(model)
    with torch.no_grad():
        model(input_ids=ids)
    density = session.density()
    assert density[0] == 1.0 and session.stats[0].calls == 0
    assert all(0 < x < 1 for x in density[1:])
    # brute force for layer 1: sum over queries of the keys each kv head reads
    assert session.stats[1].keys_allowed == sum(range(1, 65)) * 2
    session.detach()


def test_state_snapshot_restores_a_prefilled_sequence():
    model = tiny("llama")
    ids = random_ids(batch=1, seq=50, seed=4)
    session = AttentionSparsity(quest(budget=16, prefill="dense")).attach(model)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :40], past_key_values=cache, use_cache=True)
        import copy

        snap, saved = session.snapshot(), copy.deepcopy(cache)
        outs = []
        for _ in range(2):
            c = copy.deepcopy(saved)
            session.restore(snap)
            outs.append(torch.cat([model(input_ids=ids[:, t:t + 1], past_key_values=c, use_cache=True).logits
                                   for t in range(40, 50)], 1))
    assert torch.equal(outs[0], outs[1])
    session.detach()


def test_every_combination_of_options_validates():
    for group, prefill in itertools.product(["query", "kv"], ["dense", "sparse"]):
        assert quest(group=group, prefill=prefill).summary()["group"] == group


def test_gather_rows_reads_views_of_a_preallocated_buffer():
    from sparsebench.attention.base import gather_rows

    gen = torch.Generator().manual_seed(0)
    buf = torch.randn(2, 3, 50, 8, generator=gen)
    view = buf[:, :, :37]
    index = torch.randint(0, 37, (2, 3, 11), generator=gen)
    expected = torch.stack([torch.stack([view[b, h, index[b, h]] for h in range(3)]) for b in range(2)])
    assert torch.equal(gather_rows(view, index), expected)
    assert torch.equal(gather_rows(view.contiguous(), index), expected)
    assert torch.equal(gather_rows(view.transpose(2, 3).contiguous().transpose(2, 3), index), expected)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_preallocated_cache_decodes_exactly_as_dynamic_cache(arch):
    import copy

    from sparsebench.attention._kv_cache import PreallocatedLayer, preallocated_cache

    model = tiny(arch)
    ids = random_ids(batch=1, seq=40, seed=9)
    session = AttentionSparsity(quest(budget=16, prefill="dense")).attach(model)
    outs = []
    for make in (lambda: DynamicCache(config=model.config), lambda: preallocated_cache(model)):
        cache = make()
        session.reset()
        with torch.no_grad():
            logits = [model(input_ids=ids[:, :300 // 10], past_key_values=cache, use_cache=True).logits[:, -1:]]
            cache = copy.deepcopy(cache)
            logits += [model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                       for t in range(30, 40)]
        outs.append(torch.cat(logits, 1))
    session.detach()
    assert any(isinstance(layer, PreallocatedLayer) for layer in preallocated_cache(model).layers)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_per_row_variants_equal_separate_continuations(arch):
    """One prefill continued as a batch whose rows attend as dense, budget 8 and budget 24
    equals continuing three copies of it one variant at a time: logits and key reads."""
    import copy

    from sparsebench.attention._kv_cache import preallocated_cache
    from sparsebench.attention._runtime import attention_variant

    model = tiny(arch)
    ids = random_ids(batch=1, seq=60, seed=11)
    session = AttentionSparsity(quest(budget=16, prefill="dense", min_pages=1)).attach(model)
    variants = ["dense", 8, 24]
    with torch.no_grad():
        cache = preallocated_cache(model)
        model(input_ids=ids[:, :45], past_key_values=cache, use_cache=True)
        snap, saved = session.snapshot(), copy.deepcopy(cache)
        separate, reads = [], []
        for v in variants:
            c = copy.deepcopy(saved)
            session.restore(snap)
            session.reset_stats()
            with attention_variant(session, v):
                separate.append(torch.cat([model(input_ids=ids[:, t:t + 1], past_key_values=c, use_cache=True).logits
                                           for t in range(45, 60)], 1))
            reads.append([(s.keys_attended, s.keys_allowed) for s in session.stats])
        batch = copy.deepcopy(saved)
        batch.batch_repeat_interleave(len(variants))
        with session.per_row([lambda v=v: attention_variant(session, v) for v in variants], snap) as rows:
            batched = torch.cat([model(input_ids=ids[:, t:t + 1].expand(len(variants), 1), past_key_values=batch,
                                       use_cache=True).logits for t in range(45, 60)], 1)
    assert session.rows is None
    assert not torch.allclose(separate[0], separate[1])  # the budgets do change the output
    for r in range(len(variants)):
        torch.testing.assert_close(batched[r:r + 1], separate[r], rtol=1e-5, atol=1e-5)
        assert [(s.keys_attended, s.keys_allowed) for s in rows[r].stats] == reads[r]
    attended = [sum(a for a, _ in r) for r in reads]
    assert attended[0] == 0 < attended[1] < attended[2] < sum(n for _, n in reads[1])  # dense: nothing recorded
    session.detach()
