"""The input-sparse MLP kernel (TEAL, WINA: a whole MLP in one call, ``mlp_inputs_token``) against
brute force: each linear's input channels selected in torch (the threshold, or an exact sort for
the top-k), the MLP in float64 from the same dtype-rounded weights."""
import pytest
import torch

from conftest import ARCHS, random_ids
from test_fused import ACTS
from test_fused_rule import controller, step
from sparsebench.backends.fused import FusedKernel, activation_code
from sparsebench.sparsifiers.base import MLPInputRules, ThresholdRule, TopKRule


def exact_selection(rule, v: torch.Tensor) -> torch.Tensor:
    """The channels ``rule`` keeps of fp32 ``v``: |v_j| > t, or the first ``keep`` of an exact
    sort by (−|v_j|·w_j, j) (scores in float32, as the kernel forms them); None keeps all."""
    if rule is None:
        return torch.ones(v.numel(), dtype=torch.bool)
    if isinstance(rule, ThresholdRule):
        return v.abs() > rule.threshold
    score = v.abs() * (1 if rule.weights is None else rule.weights)
    mask = torch.zeros(v.numel(), dtype=torch.bool)
    mask[sorted(range(v.numel()), key=lambda j: (-float(score[j]), j))[:rule.keep]] = True
    return mask


def brute_force(x, w, rules, act, up_act, down_kept):
    """y in float64 with x's selections exact and down on the kernel's own channels of h (h is
    the kernel's float32 computation; its selection is checked separately). Also returns h."""
    d = {k: None if v is None else v.double() for k, v in w.items()}
    x64 = x.double()
    u = (x64 * exact_selection(rules.up, x)) @ d["up_t"] + (0 if d["up_bias"] is None else d["up_bias"])
    if d["gate_t"] is None:
        h = act(u)
    else:
        g = (x64 * exact_selection(rules.gate, x)) @ d["gate_t"] + (0 if d["gate_bias"] is None else d["gate_bias"])
        h = act(g) * (u if up_act is None else up_act(u))
    keep = torch.zeros(h.numel(), dtype=torch.bool)
    keep[down_kept.long()] = True
    return (h * keep) @ d["down_t"] + (0 if d["down_bias"] is None else d["down_bias"]), h


def magnitude(x, w, rules, down_kept):
    """The same MLP on absolute values (|act(z)| <= |z| for every activation here): the scale a
    float32 sum's rounding error is proportional to. A dot product that cancels (a small u from
    large terms) is only accurate relative to this, not to its own small result. |x| keeps x's
    selections (every rule scores |x_j|)."""
    absolute = {k: None if v is None else v.abs() for k, v in w.items()}
    return brute_force(x.abs(), absolute, rules, torch.nn.Identity(), None, down_kept)[0]


def check_down_selection(rule, h: torch.Tensor, kept: torch.Tensor):
    """The kernel's channels of h are ``rule``'s on the float64 h, up to values within float32
    rounding of the boundary (the kernel's h is its own float32 computation)."""
    n = h.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[kept.long()] = True
    if rule is None:
        assert bool(mask.all())
        return
    eps = 1e-5 * float(h.abs().max()) + 1e-30
    if isinstance(rule, ThresholdRule):
        near = (h.abs() - rule.threshold).abs() <= eps
        assert torch.equal(mask[~near], (h.abs() > rule.threshold)[~near])
        return
    assert int(mask.sum()) == min(rule.keep, n)
    if 0 < rule.keep < n:
        score = h.abs() * (1 if rule.weights is None else rule.weights.double())
        eps = eps * (1 if rule.weights is None else float(rule.weights.max()))
        assert float(score[mask].min()) >= float(score[~mask].max()) - eps


def random_weights(hidden, inter, gated, biases, dtype, gen):
    t = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    w = dict(gate_t=t(hidden, inter) / hidden ** 0.5 if gated else None, up_t=t(hidden, inter) / hidden ** 0.5,
             down_t=t(inter, hidden) / inter ** 0.5, gate_bias=t(inter) if biases and gated else None,
             up_bias=t(inter) if biases else None, down_bias=t(hidden) if biases else None)
    return {k: v if v is None or k.endswith("bias") else v.to(dtype).contiguous() for k, v in w.items()}


def run_kernel(kern, w, x, rules, act_name, act_param, up_act_name):
    return kern.mlp_inputs(w["gate_t"], w["up_t"], w["down_t"], x, rules, gate_bias=w["gate_bias"],
                           up_bias=w["up_bias"], down_bias=w["down_bias"], act=act_name, act_param=act_param,
                           up_act=up_act_name)


def check_case(hidden, inter, gated, biases, dtype, act_name, up_relu, rule_kinds, density, threads, simd, seed):
    gen = torch.Generator().manual_seed(seed)
    w = random_weights(hidden, inter, gated, biases, dtype, gen)
    x = torch.randn(hidden, generator=gen)
    act = ACTS[act_name]
    name, param = activation_code(act)
    up_act = torch.nn.ReLU() if up_relu and gated else None

    def rule(kind, v):
        n = v.numel()
        if kind == "dense":
            return None
        if kind == "threshold":
            return ThresholdRule("x", float(v.abs().float().quantile(1.0 - density)) if n > 1 else 0.0)
        weights = torch.rand(n, generator=gen) + 0.5 if kind == "topk_w" else None
        return TopKRule(int(round(density * n)), weights)

    # the down rule's threshold is set from the float64 h of the x-selected gate/up
    head = MLPInputRules(rule(rule_kinds[0], x) if gated else None, rule(rule_kinds[1], x), None)
    _, h_ref = brute_force(x, w, head, act, up_act, torch.arange(inter))
    rules = MLPInputRules(head.gate, head.up, rule(rule_kinds[2], h_ref.float()))
    y, (kept_gate, kept_up, kept_down) = run_kernel(FusedKernel(threads, simd), w, x, rules, name, param,
                                                    activation_code(up_act)[0])
    if gated:
        assert torch.equal(kept_gate.long(), exact_selection(rules.gate, x).nonzero().reshape(-1))
    assert torch.equal(kept_up.long(), exact_selection(rules.up, x).nonzero().reshape(-1))
    ref, h = brute_force(x, w, rules, act, up_act, kept_down)
    check_down_selection(rules.down, h, kept_down)
    err = float((y.double() - ref).abs().max() / magnitude(x, w, rules, kept_down).max().clamp_min(1e-30))
    assert err <= 1e-5, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_name", list(ACTS))
@pytest.mark.parametrize("gated,up_relu,biases", [(True, False, False), (True, True, True), (False, False, True)])
@pytest.mark.parametrize("threads,simd", [(1, True), (2, True), (3, False)])
def test_mlp_inputs_kernel_matches_brute_force(dtype, act_name, gated, up_relu, biases, threads, simd):
    """Every activation (and dReLU's ReLU on up, OPT's biases), both weight dtypes, threads and
    the portable loops; thresholds, top-k with and without weights, and dense members."""
    for seed, kinds in enumerate([("threshold", "threshold", "threshold"), ("topk_w", "topk", "topk_w"),
                                  ("dense", "threshold", "topk"), ("threshold", "dense", "dense")]):
        check_case(96, 200, gated, biases, dtype, act_name, up_relu, kinds, 0.4, threads, simd, seed)


def test_mlp_inputs_kernel_fuzz():
    """Hypothesis over shapes (odd widths: vector tails, thread slices), densities (keep 0 and
    all included), rule kinds per linear, gated or plain, dtypes, threads and SIMD."""
    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    kinds = st.sampled_from(["dense", "threshold", "topk", "topk_w"])

    @settings(max_examples=80, deadline=None)
    @given(hidden=st.integers(1, 70), inter=st.integers(1, 90), density=st.floats(0.0, 1.0),
           gated=st.booleans(), bf16=st.booleans(), threads=st.integers(1, 4), simd=st.booleans(),
           rule_kinds=st.tuples(kinds, kinds, kinds), seed=st.integers(0, 2**31 - 1))
    # found by CI: u is a 14-term dot product that cancels, so only its magnitude bounds the error
    @example(hidden=33, inter=1, density=0.4375, gated=False, bf16=False, threads=1, simd=True,
             rule_kinds=("dense", "topk_w", "dense"), seed=28077)
    def check(hidden, inter, density, gated, bf16, threads, simd, rule_kinds, seed):
        check_case(hidden, inter, gated, gated, torch.bfloat16 if bf16 else torch.float32, "silu" if gated else "relu",
                   False, rule_kinds, density, threads, simd, seed)

    check()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["teal", "wina"])
def test_decode_step_runs_each_mlp_in_one_kernel_call(arch, method, monkeypatch):
    """On ``fused``, an unobserved TEAL/WINA decode step runs every MLP through
    ``mlp_by_input_rules`` (none of its linears separately) and gives the dense backend's
    logits (x's selections are exact; down's is on the kernel's float32 h)."""
    ids = random_ids(batch=1, seq=7, seed=3)
    ref_model, _, state = controller(arch, method, "dense")
    ref = step(ref_model, ids)
    model, ctl, _ = controller(arch, method, "fused", state)
    whole = []
    fn = ctl.backend.mlp_by_input_rules
    monkeypatch.setattr(ctl.backend, "mlp_by_input_rules", lambda *a: whole.append(fn(*a)) or whole[-1])
    alone = []
    monkeypatch.setattr(ctl.backend, "linear_by_rule", lambda inp, *a, fn=ctl.backend.linear_by_rule:
                        alone.append(inp.proj) or fn(inp, *a))
    logits = step(model, ids)
    assert len(whole) == len(ctl.sites) and all(out is not None for out in whole)
    assert not {"gate", "up", "down"} & set(alone)
    assert torch.allclose(logits, ref, rtol=1e-5, atol=1e-5), float((logits - ref).abs().max())
