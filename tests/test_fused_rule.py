"""The mask rule inside the fused kernel, in a model run: on a single-token decode step CATS's
|act(gate)| > t and TEAL's |x| > t are applied by the kernel (no mask tensor), checked
against brute force — the same thresholds applied in torch, and the dense mask-multiply
with the kernel's own masks replayed."""
import copy
import functools

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ARCHS, make_tiny, random_ids
from sparsebench.backends import BACKENDS
from sparsebench.backends.fused import _ptr
from sparsebench.evaluators.decode import greedy_decode, replaying_masks
from sparsebench.models.patching import PrefillPolicy, SparsityController
from sparsebench.sparsifiers import SPARSIFIERS
from sparsebench.sparsifiers.base import ThresholdRule, TopKRule

GATED = [a for a in ARCHS if a != "opt"]


def sparsifier(method):
    from test_sparsifiers import DEFAULTS

    return SPARSIFIERS.get(method)(OmegaConf.create({"name": method, "sparsity": 0.5, **DEFAULTS[method]}))


@functools.cache
def calibrated(arch, method):
    """The method's state calibrated on the dense backend (once per module: WINA's greedy is slow)."""
    dense_model = make_tiny(arch)
    dense = SparsityController(sparsifier(method), BACKENDS.get("dense")(None)).attach(dense_model)
    return dense.sparsifier.calibrate(dense, dense_model, [random_ids(batch=2, seq=16, seed=9)])


def controller(arch, method, backend, state=None, **ctl_kw):
    model = make_tiny(arch)
    sp = sparsifier(method)
    ctl = SparsityController(sp, BACKENDS.get(backend)(OmegaConf.create({"name": backend, "threads": 2})),
                             **ctl_kw).attach(model)
    if state is None:  # calibrated once on the dense backend, loaded everywhere (a copy: tests may alter it)
        state = copy.deepcopy(calibrated(arch, method))
    sp.load_state(state)
    return model, ctl, state


class Calls:
    """Counts the sparsifier's mask/input_mask calls whose mask a rule describes (the rule
    path makes none of them; TEAL's dense projections, t < 0, have no rule)."""

    def __init__(self, sp, monkeypatch):
        self.n = 0
        for name, rule in (("mask", sp.mask_rule), ("input_mask", sp.input_mask_rule)):
            monkeypatch.setattr(sp, name, self._counting(getattr(sp, name), rule))

    def _counting(self, fn, rule):
        def wrapped(inp):
            self.n += rule(inp) is not None
            return fn(inp)
        return wrapped


def step(model, ids):
    """Prefill ``ids[:, :-1]`` then decode the last token; return its logits."""
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
        return model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits


def observe(ctl, mlp, linear, acts=None):
    def on_mlp(inp, mask):
        mlp.append(mask)
        if acts is not None and inp.x.numel() == inp.x.shape[-1]:
            acts.append((inp.layer_idx, inp.act.detach().clone(), mask))
    ctl.mask_observer, ctl.linear_mask_observer = on_mlp, lambda _, mask: linear.append(mask)


@pytest.mark.parametrize("arch", GATED)
@pytest.mark.parametrize("method", ["cats", "teal", "cett", "wina"])
def test_rule_step_equals_dense_mask_with_the_kernels_masks(arch, method, monkeypatch):
    ids = random_ids(batch=1, seq=7, seed=3)
    model, ctl, state = controller(arch, method, "fused")
    mlp, linear = [], []
    observe(ctl, mlp, linear)
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
    calls = Calls(ctl.sparsifier, monkeypatch)
    by_rule = []
    for name in ("mlp_by_rule", "linear_by_rule"):
        fn = getattr(ctl.backend, name)
        monkeypatch.setattr(ctl.backend, name, lambda *a, fn=fn: by_rule.append(fn(*a)) or by_rule[-1])
    with torch.no_grad():
        logits = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
    assert calls.n == 0  # the decode step's masks were all made in the kernel
    assert len([r for r in by_rule if r is not None]) >= len(ctl.sites)

    # brute force: the dense mask-multiply with exactly those masks
    ref_model, ref_ctl, _ = controller(arch, method, "dense", state)
    with replaying_masks(ref_ctl.sparsifier, mlp, linear):
        ref = step(ref_model, ids)
    err = (logits - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, float(err)


@pytest.mark.parametrize("arch", GATED)
@pytest.mark.parametrize("method", ["teal", "wina"])
def test_unobserved_input_sparse_decode_equals_the_dense_backend(arch, method, monkeypatch):
    """With no observer or counter, an input-sparse method's decode step takes the short path:
    every linear by its rule and the MLP straight through its masked linears, never a backend's
    MLP (whose dense kernel, ``dense_path: kernel``, would skip the linears' masks). Rules on x
    are exact, so its logits equal the dense backend's masks multiplied in torch."""
    ids = random_ids(batch=1, seq=7, seed=3)
    ref_model, _, state = controller(arch, method, "dense")
    ref = step(ref_model, ids)
    for dense_path in ("torch", "kernel"):
        model, ctl, _ = controller(arch, method, "fused", state)
        ctl.backend.dense_path = dense_path
        mlp_tokens = []
        monkeypatch.setattr(ctl.backend, "mlp", lambda site, inp, mask, mlp=ctl.backend.mlp:
                            mlp_tokens.append(inp.x.shape[-2]) or mlp(site, inp, mask))
        logits = step(model, ids)
        assert 1 not in mlp_tokens, dense_path  # the decode step's MLPs never reached the backend
        assert ctl.backend.calls["rule"] >= len(ctl.sites)
        assert torch.allclose(logits, ref, rtol=1e-5, atol=1e-5), (dense_path, float((logits - ref).abs().max()))


@pytest.mark.parametrize("arch", GATED)
def test_cats_kernel_mask_is_the_threshold_on_act(arch):
    """The kept set equals |act| > t computed in torch, up to neurons within float rounding
    of the threshold (the kernel's gate is its own float32 dot product)."""
    model, ctl, _ = controller(arch, "cats", "fused")
    seen = []
    observe(ctl, [], [], acts=seen)
    step(model, random_ids(batch=1, seq=6, seed=5))
    assert len(seen) == len(ctl.sites)
    for layer, act, mask in seen:
        t = float(ctl.sparsifier.thresholds[layer])
        brute = act.abs() > t
        near = (act.abs() - t).abs() <= 1e-5 * act.abs().max()
        assert torch.equal(mask[~near], brute[~near])
        assert 0 < int(mask.sum()) < mask.numel()


@pytest.mark.parametrize("method", ["cats", "teal", "cett", "wina"])
def test_rule_counts_equal_the_masks(method):
    """Sparsity counted on the rule path equals the zeros of the masks it hands observers."""
    model, ctl, _ = controller("llama", method, "fused")
    mlp, linear = [], []
    observe(ctl, mlp, linear)
    ids = random_ids(batch=1, seq=6, seed=5)
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
    del mlp[:], linear[:]
    with ctl.counting() as stats, torch.no_grad():
        model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    if method in ("cats", "cett"):
        assert sum(s.zeroed for s in stats.values()) == sum(int((~m).sum()) for m in mlp)
        assert all(s.tokens == s.masked_tokens == 1 for s in stats.values())
    else:
        zeroed = sum(s.zeroed for s in ctl.linear_stats.values())
        assert zeroed == sum(int((~m).sum()) for m in linear if m is not None) > 0


@pytest.mark.parametrize("method", ["cats", "teal", "cett", "wina"])
def test_rule_agrees_with_mask(method):
    """A sparsifier's rule is what its mask computes, on random inputs (brute force: the
    threshold, or an exact sort for the top-k, applied in torch)."""
    from sparsebench.models.patching import LinearInput, MLPInput

    model, ctl, _ = controller("llama", method, "dense")
    sp = ctl.sparsifier
    for site in ctl.sites:
        x = torch.randn(1, 1, site.up.in_features)
        if method == "cats":
            inp = MLPInput(site, x)
            rule = sp.mask_rule(inp)
            assert isinstance(rule, ThresholdRule) and rule.on == "act"
            assert torch.equal(sp.mask(inp), inp.act.abs() > rule.threshold)
        elif method == "cett":
            inp = MLPInput(site, x)
            rule = sp.mask_rule(inp)
            assert isinstance(rule, ThresholdRule) and rule.on == "h" and rule.threshold.shape == (site.intermediate_size,)
            assert torch.equal(sp.mask(inp), inp.h.abs() >= rule.threshold)
        elif method == "wina":
            for proj in ("q", "k", "gate", "down"):
                width = site.down.in_features if proj == "down" else site.up.in_features
                inp = LinearInput(site, proj, torch.randn(1, 1, width))
                rule = sp.input_mask_rule(inp)
                assert isinstance(rule, TopKRule)
                score = inp.x.abs().reshape(-1) * (1 if rule.weights is None else rule.weights)
                order = sorted(range(width), key=lambda j: (-float(score[j]), j))  # exact sort, ties to the lower index
                expect = torch.zeros(width, dtype=torch.bool)
                expect[order[:rule.keep]] = True
                assert torch.equal(sp.input_mask(inp).reshape(-1), expect)
        else:
            for proj in ("q", "gate", "down"):
                width = site.down.in_features if proj == "down" else site.up.in_features
                inp = LinearInput(site, proj, torch.randn(1, 1, width))
                rule = sp.input_mask_rule(inp)
                mask = sp.input_mask(inp)
                assert (rule is None) == (mask is None)
                if rule is not None:
                    assert torch.equal(mask, inp.x.abs() > rule.threshold)


def test_rule_path_only_where_it_applies(monkeypatch):
    """Multi-token calls, a plain (non-gated) MLP, a position the prefill policy keeps dense
    and the dense backend all go through the sparsifier's mask."""
    ids = random_ids(batch=1, seq=6, seed=5)
    for arch, backend, policy in [("opt", "fused", PrefillPolicy()),
                                  ("llama", "dense", PrefillPolicy()),
                                  ("llama", "fused", PrefillPolicy("dense_prefix", dense_prefix=64))]:
        model, ctl, _ = controller(arch, "cats", backend, prefill=policy)
        calls = Calls(ctl.sparsifier, monkeypatch)
        step(model, ids)
        assert calls.n == 2 * len(ctl.sites), (arch, backend, policy)  # prefill and the decode step


def test_plans_follow_weights_changed_in_place():
    """The single-token path prepares each layer's kernel call once; a weight modified in
    place (as WINA's transform does) or replaced before the next sequence must be picked up,
    checked against the threshold applied in torch."""
    from sparsebench.models.patching import LinearInput, SparseLinear

    model, ctl, _ = controller("llama", "teal", "fused")
    lin = next(m for m in model.modules() if isinstance(m, SparseLinear) and m.proj == "q")
    x = torch.randn(1, 1, lin.linear.in_features)
    inp = LinearInput(lin.site, lin.proj, x)
    rule = ctl.sparsifier.input_mask_rule(inp)

    def reference():
        return torch.nn.functional.linear(x * (x.abs() > rule.threshold), lin.linear.weight, lin.linear.bias)

    with torch.no_grad():
        for change in (lambda w: w.mul_(3.0), lambda w: setattr(lin.linear, "weight", torch.nn.Parameter(-w))):
            out, idx, k = ctl.backend.linear_by_rule(inp, lin.linear, rule)
            assert torch.allclose(out, reference(), rtol=1e-5, atol=1e-6)
            assert torch.equal(idx[:k].long(), (x.reshape(-1).abs() > rule.threshold).nonzero().reshape(-1))
            change(lin.linear.weight)
            ctl.backend.new_sequence()
        out, _, _ = ctl.backend.linear_by_rule(inp, lin.linear, rule)
        assert torch.allclose(out, reference(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_kernel_is_each_linear_with_its_own_selection(dtype):
    """``linear_group_token`` against brute force: per member, x masked by its own selection —
    |x_j| > threshold, or the first ``keep`` of an exact sort by (−|x_j|·w_j, j) on
    integer-valued x, where equal scores are everywhere — times its (dtype-rounded) weight;
    and bit-equal to the one-linear kernels (``linear_token`` / ``linear_topk_token``)."""
    from sparsebench.backends.fused import KERNEL_DTYPES, FusedKernel

    gen = torch.Generator().manual_seed(11)
    kern = FusedKernel(2)
    n_in = 96
    x = torch.randint(-4, 5, (n_in,), generator=gen).float()
    scratch = [torch.empty(n_in) for _ in range(4)]  # group's scores/work, then the single call's
    single_idx, single_coef = torch.empty(n_in, dtype=torch.int32), torch.empty(n_in)
    weights = torch.randint(1, 4, (n_in,), generator=gen).float()
    # (n_out, threshold, keep, weights): thresholds, a weighted top-k, a plain top-k, keep 0
    cases = [[(100, 0.5, -1, None), (40, 0.0, -1, None), (40, 2.5, -1, None)],
             [(100, 0.0, 30, weights), (40, 1.5, -1, None), (40, 0.0, 50, None)],
             [(64, 0.0, 0, None), (32, 0.0, n_in, weights)]]
    for members_spec in cases:
        members, refs, singles = [], [], []
        for n_out, t, keep, w in members_spec:
            wt = torch.randn(n_in, n_out, generator=gen).to(dtype)
            bias = torch.randn(n_out, generator=gen) if n_out == 40 else None
            idx, coef, y = torch.empty(n_in, dtype=torch.int32), torch.empty(n_in), torch.empty(n_out)
            members.append((wt, bias, idx, coef, y))
            if keep < 0:
                mask = x.abs() > t
                singles.append(kern.linear(wt, bias, x, None, threshold=t)[0].clone())
            else:
                score = x.abs() * (1 if w is None else w)
                mask = torch.zeros(n_in, dtype=torch.bool)
                mask[sorted(range(n_in), key=lambda j: (-float(score[j]), j))[:keep]] = True
                one = torch.empty(n_out)
                kern.ext.linear_topk_token(x.data_ptr(), n_in, n_out, wt.data_ptr(), KERNEL_DTYPES[dtype], _ptr(bias),
                                           _ptr(w), keep, scratch[2].data_ptr(), scratch[3].data_ptr(),
                                           single_idx.data_ptr(), single_coef.data_ptr(), one.data_ptr(), 2, 1)
                singles.append(one)
            refs.append((mask, (x * mask) @ wt.float() + (0 if bias is None else bias)))
        ks = kern.ext.linear_group_token(
            x.data_ptr(), n_in, KERNEL_DTYPES[dtype],
            tuple((wt.data_ptr(), wt.shape[1], _ptr(b), i.data_ptr(), c.data_ptr()) for wt, b, i, c, _ in members),
            tuple((t, keep, _ptr(w)) for _, t, keep, w in members_spec), tuple(y.data_ptr() for *_, y in members),
            scratch[0].data_ptr(), scratch[1].data_ptr(), 2, 1)
        for (wt, b, idx, coef, y), (mask, ref), single, k in zip(members, refs, singles, ks):
            assert k == int(mask.sum())
            assert torch.equal(idx[:k].long(), mask.nonzero().reshape(-1))
            assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4)
            assert torch.equal(y, single)


def shifted_state(method, state):
    """The calibrated state with every linear's selection moved (TEAL: thresholds ×0.7, WINA:
    levels ×0.7, i.e. other keeps)."""
    name = "thresholds" if method == "teal" else "levels"
    return {**state, name: state[name] * 0.7}


@pytest.mark.parametrize("arch,method", [("llama", "teal"), ("qwen2", "teal"), ("gemma3", "teal"),
                                         ("llama", "wina"), ("gemma3", "wina")])
def test_grouped_linears_equal_one_call_per_linear(arch, method):
    """TEAL (thresholds) or WINA (top-k) decoding several tokens on ``fused``: q/k/v and
    gate/up as one kernel call per group (from the second token on, when every member's
    selection is known) give the same logits bit for bit and the same kept channels as one
    call per linear, in fewer kernel calls; selections changed between tokens are honoured
    (a stashed result computed with the old threshold or keep is not served)."""
    ids = random_ids(batch=1, seq=9, seed=4)
    runs = {}
    for grouped in (True, False):
        model, ctl, state = controller(arch, method, "fused", state=runs.get("state"))
        runs["state"] = state
        ctl.backend.group_linears = grouped
        kept = []
        ctl.linear_mask_observer = lambda inp, mask: kept.append((inp.layer_idx, inp.proj, mask.clone()))
        logits = []
        with torch.no_grad():
            out = model(ids[:, :5], use_cache=True)
            for t in range(5, 9):
                if t == 7:  # new selections mid-decode: every stash entry is stale
                    ctl.sparsifier.load_state(shifted_state(method, state))
                out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits)
        runs[grouped] = (torch.cat(logits), kept, ctl.backend.calls["kernel"])
    (lg, kg, ng), (l1, k1, n1) = runs[True], runs[False]
    assert torch.equal(lg, l1)
    assert [(a, b) for a, b, _ in kg] == [(a, b) for a, b, _ in k1]
    assert all(torch.equal(m, n) for (_, _, m), (_, _, n) in zip(kg, k1))
    assert ng < n1


def test_topk_kernel_is_an_exact_sort_with_ties_to_the_lower_index():
    """``linear_topk_token`` on integer-valued inputs, where equal scores are everywhere,
    against brute force: the first ``keep`` of an exact sort by (-score, index), then the
    masked product; with and without per-channel weights, every ``keep`` from 0 to n."""
    from sparsebench.backends.fused import FusedKernel

    gen = torch.Generator().manual_seed(5)
    kern = FusedKernel(2)
    n_in, n_out = 37, 20
    wt = torch.randn(n_in, n_out, generator=gen)
    idx, coef, y = torch.empty(n_in, dtype=torch.int32), torch.empty(n_in), torch.empty(n_out)
    scores, work = torch.empty(n_in), torch.empty(n_in)
    for weights in (None, torch.randint(1, 3, (n_in,), generator=gen).float()):
        x = torch.randint(-3, 4, (n_in,), generator=gen).float()
        score = x.abs() * (1 if weights is None else weights)
        order = sorted(range(n_in), key=lambda j: (-float(score[j]), j))
        for keep in range(n_in + 1):
            k = kern.ext.linear_topk_token(x.data_ptr(), n_in, n_out, wt.data_ptr(), 0, 0,
                                           0 if weights is None else weights.data_ptr(), keep, scores.data_ptr(),
                                           work.data_ptr(), idx.data_ptr(), coef.data_ptr(), y.data_ptr(), 2, 1)
            expect = sorted(order[:keep])
            assert k == keep and idx[:k].tolist() == expect
            mask = torch.zeros(n_in)
            mask[expect] = 1
            assert torch.allclose(y, (x * mask) @ wt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_h_rule_kernel_is_the_threshold_on_h(arch):
    """CETT's rule in the kernel (gate and up of every neuron, |h_i| >= t_i, down of the
    kept) against brute force: h computed in torch, the same per-neuron thresholds, and
    the masked down projection; a plain MLP (OPT) takes h = act(fc1 x)."""
    model, ctl, _ = controller(arch, "cett", "fused")
    from sparsebench.models.patching import MLPInput

    for site in ctl.sites:
        x = torch.randn(1, 1, site.up.in_features)
        inp = MLPInput(site, x)
        with torch.no_grad():
            h = inp.h.reshape(-1)
            t = h.abs().quantile(0.5) * torch.rand(h.numel(), generator=torch.Generator().manual_seed(site.layer_idx)) * 2
            done = ctl.backend.mlp_by_rule(site, MLPInput(site, x), ThresholdRule("h", t.contiguous()))
            out, idx, k = done
            kept = idx[:k]
            keep = h.abs() >= t
            near = ((h.abs() - t).abs() <= 1e-5 * t.abs().clamp_min(1e-6))  # within rounding of the threshold
            kept_mask = torch.zeros_like(keep)
            kept_mask[kept.long()] = True
            assert torch.equal(kept_mask[~near], keep[~near])
            ref = site.down(h * kept_mask)
            assert torch.allclose(out.reshape(-1), ref.reshape(-1), rtol=1e-4, atol=1e-5)


def _same_rule(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, ThresholdRule):
        return isinstance(b, ThresholdRule) and a.on == b.on and a.threshold == b.threshold
    return (isinstance(b, TopKRule) and a.keep == b.keep
            and (a.weights is b.weights or torch.equal(a.weights, b.weights)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["teal", "wina"])
def test_mlp_input_rules_are_the_linear_rules(arch, method):
    """An MLP's input rules at once are what ``input_mask_rule`` gives its gate, up and down
    one by one (no gate on plain MLPs)."""
    from sparsebench.models.patching import LinearInput

    _, ctl, _ = controller(arch, method, "dense")
    sp, seen = ctl.sparsifier, 0
    for site in ctl.sites:
        x = torch.randn(1, 1, site.up.in_features)
        rules = sp.mlp_input_rules(site, x)
        for proj in ("gate", "up", "down"):
            expect = None
            if proj in site.slots:
                width = site.down.in_features if proj == "down" else site.up.in_features
                expect = sp.input_mask_rule(LinearInput(site, proj, torch.randn(1, 1, width)))
            assert _same_rule(getattr(rules, proj), expect), (site.layer_idx, proj)
            seen += expect is not None
    assert seen > 0
    assert sp.mlp_input_rules(ctl.sites[0], torch.randn(1, 1, ctl.sites[0].up.in_features).double()) is (
        None if method == "wina" else sp.mlp_input_rules(ctl.sites[0], torch.randn(1, 1, ctl.sites[0].up.in_features)))


class _TorchInputRules(BACKENDS.get("dense")):
    """Brute force for ``mlp_by_input_rules``: each linear's rule made into a mask in torch
    (the threshold, or an exact stable sort for the top-k) and the model's own linears."""

    calls = 0

    def mlp_by_input_rules(self, site, inp, rules):
        from sparsebench.sparsifiers.base import topk_mask

        def selected(rule, v):
            if rule is None:
                return torch.ones_like(v, dtype=torch.bool)
            if isinstance(rule, ThresholdRule):
                return v.abs() > rule.threshold
            return topk_mask(v.abs() if rule.weights is None else v.abs() * rule.weights, rule.keep)

        def kept(mask):
            idx = mask.reshape(-1).nonzero().reshape(-1)
            return idx, idx.numel()

        self.calls += 1
        linear = lambda proj: site.projection(proj).linear  # the wrapper's own (unmasked) linear
        x = inp.x
        m_gate, m_up = selected(rules.gate, x), selected(rules.up, x)
        if site.kind == "gated":
            h = site.act(linear("gate")(x * m_gate)) * linear("up")(x * m_up)
        else:
            h = site.act(linear("up")(x * m_up))
        m_down = selected(rules.down, h)
        return linear("down")(h * m_down), h.reshape(-1), (kept(m_gate), kept(m_up), kept(m_down))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["teal", "wina"])
def test_mlp_by_input_rules_replaces_the_masked_linears(arch, method):
    """A backend that runs the MLP by its input rules gets every decode-token MLP (none of its
    linears is called on its own) and gives the logits of the linears masked one by one."""
    ids = random_ids(batch=1, seq=7, seed=3)
    ref_model, _, state = controller(arch, method, "dense")
    ref = step(ref_model, ids)
    model = make_tiny(arch)
    sp = sparsifier(method)
    backend = _TorchInputRules(None)
    ctl = SparsityController(sp, backend).attach(model)
    sp.load_state(copy.deepcopy(state))
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
    mlp_linears = []
    for site in ctl.sites:
        for proj in ("gate", "up", "down"):
            if proj in site.slots:
                site.projection(proj).register_forward_hook(lambda *_: mlp_linears.append(1))
    with torch.no_grad():
        logits = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
    assert backend.calls == len(ctl.sites) and not mlp_linears
    assert torch.allclose(logits, ref, rtol=1e-5, atol=1e-5), float((logits - ref).abs().max())


def _kept(rule, v):
    """``v`` with the channels a threshold rule drops set to zero (the rule applied in torch)."""
    return v * (v.abs() > rule.threshold)


@pytest.mark.parametrize("path", ["group", "mlp_inputs", "mlp_rule"])
def test_every_plan_follows_weights_changed_in_place_or_replaced(path):
    """Every single-token call plan — the q/k/v group, TEAL's whole-MLP call, CATS's MLP rule —
    is built once per layer and keeps its pointers in the extension; a weight modified in place
    or replaced before a new sequence begins (a forward from position 0) must be picked up.
    Checked against the same rules applied in torch, and the kernel clock counts one call per
    kernel run (k and v served from the group's stash run none)."""
    from torch.nn.functional import linear

    from sparsebench.backends.fused import _unwrapped
    from sparsebench.models.patching import LinearInput, MLPInput

    model, ctl, _ = controller("llama", "cats" if path == "mlp_rule" else "teal", "fused")
    sp, be, site = ctl.sparsifier, ctl.backend, ctl.sites[0]

    def lin(p):
        return _unwrapped(site.projection(p))

    x = torch.randn(1, 1, lin("up").in_features)

    def run():
        """(kernel output, torch reference, kernel calls made)."""
        calls = be.calls["kernel"]
        if path == "group":
            rules = {p: sp.input_mask_rule(LinearInput(site, p, x)) for p in ("q", "k", "v")}
            assert all(r is not None for r in rules.values())
            outs = {}
            # k and v on their own first (the group learns their rules), then q computes all three
            # and k and v are served from the stash
            for p in ("k", "v", "q", "k", "v"):
                outs[p] = be.linear_by_rule(LinearInput(site, p, x), lin(p), rules[p])[0]
            assert be.calls["kernel"] - calls == 3
            refs = [linear(_kept(rules[p], x), lin(p).weight, lin(p).bias) for p in ("q", "k", "v")]
            return torch.cat([outs[p] for p in ("q", "k", "v")], -1), torch.cat(refs, -1)
        inp = MLPInput(site, x)
        if path == "mlp_inputs":
            rules = sp.mlp_input_rules(site, x)
            out, _, (_, _, (idx_down, k_down)) = be.mlp_by_input_rules(site, inp, rules)
            h = site.act(linear(_kept(rules.gate, x), lin("gate").weight)) * linear(_kept(rules.up, x), lin("up").weight)
            keep = torch.zeros(h.shape[-1], dtype=torch.bool)
            keep[idx_down[:k_down].long()] = True  # the kernel's own down mask (h near t may round either way)
            ref = linear(h * keep, lin("down").weight)
        else:
            rule = sp.mask_rule(inp)
            out, _, _ = be.mlp_by_rule(site, inp, rule)
            act = site.act(linear(x, lin("gate").weight))
            ref = linear(_kept(rule, act) * linear(x, lin("up").weight), lin("down").weight)
        assert be.calls["kernel"] - calls == 1
        return out, ref

    first, last = ("q", "v") if path == "group" else ("gate", "down")
    begun = []
    be.new_sequence = lambda real=be.new_sequence: (begun.append(1), real())[1]
    with torch.no_grad():
        seconds = be.kernel_s
        for change in (None, lambda: lin(first).weight.mul_(3.0),
                       lambda: setattr(lin(last), "weight", torch.nn.Parameter(-lin(last).weight))):
            if change is not None:
                change()
                n = len(begun)
                model(torch.tensor([[1, 2]]))  # a new sequence: the controller tells the backend
                assert len(begun) == n + 1
            out, ref = run()
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), (path, float((out - ref).abs().max()))
        assert be.kernel_s > seconds


def test_plans_check_their_weights_once_per_sequence(monkeypatch):
    """The check of a plan's source weights (a few cache misses per weight while a decode
    streams the model through the caches) runs at the plan's first call in a sequence only:
    a decode of n tokens checks each plan once, and the next sequence checks it again."""
    from sparsebench.backends.fused import _Plan

    model, ctl, _ = controller("llama", "teal", "fused")
    checks = []
    real = _Plan.fresh
    monkeypatch.setattr(_Plan, "fresh", lambda self: (checks.append(id(self)), real(self))[1])
    ids = random_ids(batch=1, seq=5, seed=3)
    with torch.no_grad():
        greedy_decode(model, ids, 6)  # builds the plans
        checks.clear()
        greedy_decode(model, ids, 6)
        first = list(checks)
        greedy_decode(model, ids, 6)
    plans = set(first)
    assert plans and len(first) == len(plans)  # once each in a sequence of 5 decode steps
    assert sorted(checks[len(first):]) == sorted(first)  # and once each again in the next


def _kept_by(rule, v):
    """``v`` with the channels a rule drops set to zero, in torch: a threshold on |v|, or the
    first ``keep`` of an exact sort by (−|v_j|·w_j, j)."""
    if isinstance(rule, TopKRule):
        scores = v.abs().reshape(-1) * rule.weights
        order = torch.sort(-scores, stable=True).indices[:rule.keep]
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[order] = True
        return v * keep.view(v.shape)
    return _kept(rule, v)


@pytest.mark.parametrize("method", ["teal", "wina"])
@pytest.mark.parametrize("given", ["bf16_model", "strided"])
def test_rule_calls_read_inputs_they_convert(method, given):
    """A decode input that is not already a contiguous fp32 vector (a bf16 model's hidden
    state, a strided view) is converted before the kernel reads it, and the converted copy
    must live until the kernel has read it: q/k/v as a group and on their own, o, and the whole
    MLP, against the rules applied in torch on the same values."""
    from torch.nn.functional import linear

    from sparsebench.backends.fused import _unwrapped
    from sparsebench.models.patching import LinearInput, MLPInput

    model, ctl, _ = controller("llama", method, "fused")
    sp, be, site = ctl.sparsifier, ctl.backend, ctl.sites[0]

    def lin(p):
        return _unwrapped(site.projection(p))

    hidden = lin("up").in_features
    gen = torch.Generator().manual_seed(5)
    if given == "bf16_model":
        model.to(torch.bfloat16)
        x = torch.randn(1, 1, hidden, generator=gen).to(torch.bfloat16)
        tol = dict(rtol=2e-2, atol=2e-2)  # bf16 outputs
    else:
        x = torch.randn(1, 1, 2 * hidden, generator=gen)[..., ::2]
        tol = dict(rtol=1e-5, atol=1e-5)
    assert not (x.dtype == torch.float32 and x.is_contiguous())

    def ref(p, v):
        w, b = lin(p).weight.float(), None if lin(p).bias is None else lin(p).bias.float()
        return linear(_kept_by(rules[p], v.float()), w, b)

    rules = {p: sp.input_mask_rule(LinearInput(site, p, x)) for p in ("q", "k", "v", "o")}
    if method == "wina" and x.dtype != torch.float32:
        # WINA scores in fp32 as its reference does: no kernel rule, the masked path instead
        assert set(rules.values()) == {None} and sp.mlp_input_rules(site, x) is None
        return
    assert rules["q"] is not None
    with torch.no_grad():
        for order in (("q", "k", "v", "o"), ("k", "v", "q", "k", "v")):  # on their own, then as a group
            for p in order:
                if rules[p] is None:  # a projection the method leaves dense
                    continue
                out = be.linear_by_rule(LinearInput(site, p, x), lin(p), rules[p])[0]
                assert out.dtype == x.dtype
                assert torch.allclose(out.float(), ref(p, x), **tol), (p, float((out.float() - ref(p, x)).abs().max()))
        mlp_rules = sp.mlp_input_rules(site, x)
        out, h, (_, _, (idx_down, k_down)) = be.mlp_by_input_rules(site, MLPInput(site, x), mlp_rules)
        xf = x.float()
        h_ref = site.act(linear(_kept_by(mlp_rules.gate, xf), lin("gate").weight.float())) * \
            linear(_kept_by(mlp_rules.up, xf), lin("up").weight.float())
        keep = torch.zeros(h_ref.shape[-1], dtype=torch.bool)
        keep[idx_down[:k_down].long()] = True  # the kernel's own down selection (h near t may round either way)
        expect = linear(h_ref * keep, lin("down").weight.float())
        assert torch.allclose(out.float(), expect, **tol), float((out.float() - expect).abs().max())


@pytest.mark.parametrize("hold", ["tensor", "view", "nothing"])
def test_outputs_are_reused_only_when_no_one_holds_them(hold):
    """A call plan hands its output tensor out again at the next token when nothing holds it,
    and never writes over an output that someone kept (the tensor itself or a view of it):
    every kept output still equals its copy taken when it was made."""
    from sparsebench.models.patching import SparseLinear

    model, ctl, _ = controller("llama", "teal", "fused")
    wrappers = [m for m in model.modules() if isinstance(m, SparseLinear) and m.proj in ("q", "k", "o")]
    kept, copies, ptrs = [], [], []

    def keep(_module, _args, out):
        if out.shape[-2] == 1:  # decode steps
            ptrs.append(out.data_ptr())
            copies.append(out.clone())
            kept.append(out if hold == "tensor" else out.view(-1) if hold == "view" else None)

    handles = [m.register_forward_hook(keep) for m in wrappers]
    try:
        with torch.no_grad():
            greedy_decode(model, random_ids(batch=1, seq=5, seed=3), 8)
    finally:
        for h in handles:
            h.remove()
    assert len(copies) == 7 * len(wrappers)
    for t, c in zip(kept, copies):
        if t is not None:
            assert torch.equal(t.reshape(c.shape), c)
    outputs = [o for plan in ctl.backend.plans() for o in plan.outs]
    made = sum(o.made for o in outputs)
    if hold == "nothing":  # one tensor per output; the q/k/v group takes over from k's own plan
        assert made == len(outputs)
    else:  # every output of a kept projection is new (the others': q's group members, the MLP)
        assert len(set(ptrs)) == len(ptrs)


def test_group_follows_a_member_whose_rule_changes():
    """q computes k and v with the rules they had on the previous token; when k's rule changes,
    k's own call must not take the stashed result (it computes its own), and from the next
    token on the group computes k with the new rule — one kernel call for q, k and v again."""
    from torch.nn.functional import linear

    from sparsebench.backends.fused import _unwrapped
    from sparsebench.models.patching import LinearInput

    model, ctl, _ = controller("llama", "teal", "fused")
    sp, be, site = ctl.sparsifier, ctl.backend, ctl.sites[0]

    def lin(p):
        return _unwrapped(site.projection(p))

    x = torch.randn(1, 1, lin("q").in_features, generator=torch.Generator().manual_seed(2))
    rules = {p: sp.input_mask_rule(LinearInput(site, p, x)) for p in ("q", "k", "v")}

    def token():
        """Outputs of q, k, v on ``x`` in the model's order; kernel calls made."""
        calls = be.calls["kernel"]
        outs = {p: be.linear_by_rule(LinearInput(site, p, x), lin(p), rules[p])[0].clone() for p in ("q", "k", "v")}
        for p in ("q", "k", "v"):
            assert torch.allclose(outs[p], linear(_kept(rules[p], x), lin(p).weight, lin(p).bias), atol=1e-5), p
        return be.calls["kernel"] - calls

    with torch.no_grad():
        assert token() == 3  # the first token: each on its own (the group learns the rules)
        assert token() == 1
        rules["k"] = ThresholdRule("x", float(x.abs().median()))  # a new rule for k
        assert token() == 2  # q's group (k's stale result not taken), then k on its own
        assert token() == 1  # the group with k's new rule


def test_output_slot_hands_out_only_what_no_one_holds():
    """The extension's output slot against every way to hold its last output: the tensor, a
    view, a slice, a numpy array on it — a new tensor each time; nothing held — the same one."""
    from sparsebench.backends.fused import kernel

    slot = kernel().OutputSlot(8, torch.empty, torch._C._storage_Use_Count)
    first = slot.take(3)
    assert first.shape == (1, 1, 8) and slot.made == 1
    first_id = id(first)
    del first
    assert id(slot.take(3)) == first_id and slot.made == 1  # nothing held: the same tensor
    for hold in (lambda t: t, lambda t: t.view(-1), lambda t: t[0, 0, 2:5], lambda t: t.numpy()):
        held = hold(slot.take(3))
        made = slot.made
        again = slot.take(3)
        assert slot.made == made + 1 and again.data_ptr() != (held.data_ptr() if hasattr(held, "data_ptr")
                                                               else held.__array_interface__["data"][0])
        del held, again
    assert slot.take(2).shape == (1, 8)  # another rank: a new tensor of that shape
