"""The fused kernels against brute force: masked dense MLPs and linears computed in torch."""
import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.backends import BACKENDS
from sparsebench.backends.fused import FusedKernel, fused_weights
from sparsebench.core.errors import ConfigError
from sparsebench.models.activations import FATReLU


def rel_err(y, ref):
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


ACTS = {"silu": torch.nn.SiLU(), "gelu_tanh": torch.nn.GELU(approximate="tanh"), "gelu": torch.nn.GELU(),
        "relu": torch.nn.ReLU(), "fatrelu": FATReLU(0.05)}


def reference_mlp(x, gate, up, down, act, up_act, mask, gate_bias=None, up_bias=None, down_bias=None):
    """h = act(gate x) * up_act(up x) (or act(up x) without a gate), masked, then down."""
    u = x @ up.t() + (0 if up_bias is None else up_bias)
    if gate is None:
        h = act(u)
    else:
        g = x @ gate.t() + (0 if gate_bias is None else gate_bias)
        h = act(g) * (up_act(u) if up_act is not None else u)
    if mask is not None:
        h = h * mask
    return h @ down.t() + (0 if down_bias is None else down_bias)


def random_case(hidden, inter, gated, biases, seed):
    gen = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(gate=t(inter, hidden) / hidden ** 0.5 if gated else None, up=t(inter, hidden) / hidden ** 0.5,
                down=t(hidden, inter) / inter ** 0.5, gate_bias=t(inter) if biases and gated else None,
                up_bias=t(inter) if biases else None, down_bias=t(hidden) if biases else None), t(hidden)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("threads,simd", [(1, True), (2, True), (3, False)])
def test_mlp_token_matches_masked_dense(dtype, act, threads, simd):
    """Every activation, gated (with and without dReLU's ReLU on up) and plain with OPT's
    biases; bf16 against the reference computed from the same bf16-rounded weights."""
    kern = FusedKernel(threads, simd)
    for seed, (gated, up_act, biases) in enumerate([(True, None, False), (True, torch.relu, False),
                                                    (False, None, True), (True, None, True)]):
        w, x = random_case(75, 133, gated, biases, seed)
        fw = fused_weights(w["gate"], w["up"], w["down"], gate_bias=w["gate_bias"], up_bias=w["up_bias"],
                           down_bias=w["down_bias"], act=ACTS[act], up_act=up_act, dtype=dtype)
        rounded = {k: (v.to(dtype).float() if k in ("gate", "up", "down") and v is not None else v)
                   for k, v in w.items()}
        for density in (0.0, 0.3, 1.0):
            mask = torch.rand(133, generator=torch.Generator().manual_seed(seed)) < density
            y, k = kern.mlp(fw, x, mask)
            ref = reference_mlp(x, act=ACTS[act], up_act=up_act, mask=mask, **rounded)
            assert k == int(mask.sum())
            assert rel_err(y, ref) <= 1e-5
        y, k = kern.mlp(fw, x, None)  # the dense path through the same kernel
        assert k == 133 and rel_err(y, reference_mlp(x, act=ACTS[act], up_act=up_act, mask=None, **rounded)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_kernel_cats_rule(dtype):
    """mask = |act(gate x)| > t computed in-kernel equals the rule applied in torch."""
    w, x = random_case(64, 200, True, False, 3)
    fw = fused_weights(w["gate"], w["up"], w["down"], act=ACTS["silu"], dtype=dtype)
    r = {k: (v.to(dtype).float() if v is not None else None) for k, v in w.items()}
    act = torch.nn.functional.silu(x @ r["gate"].t())
    for t in (0.0, 0.1, float(act.abs().median()), 10.0):
        mask = act.abs() > t
        y, k = FusedKernel(2).mlp(fw, x, None, threshold=t)
        assert k == int(mask.sum())
        ref = reference_mlp(x, act=ACTS["silu"], up_act=None, mask=mask, **r)
        assert rel_err(y, ref) <= 1e-5 or k == 0 and y.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_token_mask_threshold_and_dense(dtype):
    gen = torch.Generator().manual_seed(0)
    weight, bias, x = torch.randn(37, 90, generator=gen), torch.randn(37, generator=gen), torch.randn(90, generator=gen)
    wt = weight.t().contiguous().to(dtype)
    ref_w = wt.float()
    kern = FusedKernel(2)
    mask = torch.rand(90, generator=gen) < 0.4
    y, k = kern.linear(wt, bias, x, mask)
    assert k == int(mask.sum()) and rel_err(y, (x * mask) @ ref_w + bias) <= 1e-5
    y, k = kern.linear(wt, bias, x, None, threshold=0.8)  # TEAL's rule in-kernel
    keep = x.abs() > 0.8
    assert k == int(keep.sum()) and rel_err(y, (x * keep) @ ref_w + bias) <= 1e-5
    y, k = kern.linear(wt, None, x, None)
    assert k == 90 and rel_err(y, x @ ref_w) <= 1e-5


def test_kernel_fuzz():
    """Hypothesis over shapes (odd widths: vector tails, thread slices), densities, masks,
    thread counts, dtypes and what was given (x, act, h)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=80, deadline=None)
    @given(hidden=st.integers(1, 70), inter=st.integers(1, 90), density=st.floats(0.0, 1.0),
           threads=st.integers(1, 4), bf16=st.booleans(), simd=st.booleans(),
           mode=st.sampled_from(["x", "act", "h"]), seed=st.integers(0, 2**31 - 1))
    def check(hidden, inter, density, threads, bf16, simd, mode, seed):
        from sparsebench._ext import fused_mlp as ext

        dtype = torch.bfloat16 if bf16 else torch.float32
        w, x = random_case(hidden, inter, True, False, seed)
        fw = fused_weights(w["gate"], w["up"], w["down"], act=ACTS["silu"], dtype=dtype)
        r = {k: (v.to(dtype).float() if v is not None else None) for k, v in w.items()}
        mask = torch.rand(inter, generator=torch.Generator().manual_seed(seed)) < density
        g, u = x @ r["gate"].t(), x @ r["up"].t()
        act = torch.nn.functional.silu(g)
        h = act * u
        code, given = {"x": (ext.FROM_X, None), "act": (ext.GIVEN_ACT, act), "h": (ext.GIVEN_H, h)}[mode]
        y, k = FusedKernel(threads, simd).mlp(fw, x, mask, mode=code, given=given)
        ref = (h * mask) @ r["down"].t()
        assert k == int(mask.sum())
        # Per output element, a float32 summation-order bound: a relative 1e-6 (≈ 17 ulp) of
        # the sum of absolute terms of the down product, plus the same of the gate/up dot
        # products the kernel computed itself (mode "x": gate and up; "act": up), carried
        # through h = act·u (|silu'| ≤ 1.1). No bar relative to |y|, which may be near zero.
        ax, down = x.abs(), r["down"].t().abs()
        dh = torch.zeros_like(h)
        if mode in ("x", "act"):
            dh = dh + act.abs() * (ax @ r["up"].t().abs())
        if mode == "x":
            dh = dh + 1.1 * u.abs() * (ax @ r["gate"].t().abs())
        bound = 1e-6 * (((h.abs() + dh) * mask) @ down) + 1e-30
        assert bool(((y - ref).abs() <= bound).all()), float(((y - ref).abs() / bound).max())

    check()


def test_backend_bf16_weights_match_bf16_reference():
    """``weights: bfloat16`` on an fp32 model equals the masked MLP of the bf16-rounded weights."""
    from conftest import make_tiny
    from sparsebench.models.patching import MLPInput, SparsityController
    from sparsebench.sparsifiers import SPARSIFIERS

    model = make_tiny("llama")
    ctl = SparsityController(SPARSIFIERS.get("none")(OmegaConf.create({"name": "none"})),
                             BACKENDS.get("dense")(None)).attach(model)
    fused = BACKENDS.get("fused")(OmegaConf.create({"name": "fused", "weights": "bfloat16", "threads": 2}))
    site = ctl.sites[0]
    x = torch.randn(1, 1, site.up.in_features)
    mask = torch.rand(1, 1, site.intermediate_size) < 0.3
    with torch.no_grad():
        y = fused.mlp(site, MLPInput(site, x), mask)
        r = {n: getattr(site, n).weight.to(torch.bfloat16).float() for n in ("gate", "up", "down")}
        ref = reference_mlp(x, r["gate"], r["up"], r["down"], site.act, None, mask)
    assert rel_err(y, ref) <= 1e-5


def test_backend_dense_path_through_kernel_and_refusals():
    from conftest import make_tiny
    from sparsebench.models.patching import MLPInput, SparsityController
    from sparsebench.sparsifiers import SPARSIFIERS

    model = make_tiny("gemma3")
    ctl = SparsityController(SPARSIFIERS.get("none")(OmegaConf.create({"name": "none"})),
                             BACKENDS.get("dense")(None)).attach(model)
    fused = BACKENDS.get("fused")(OmegaConf.create({"name": "fused", "dense_path": "kernel"}))
    site = ctl.sites[0]
    x = torch.randn(1, 1, site.up.in_features)
    with torch.no_grad():
        y = fused.mlp(site, MLPInput(site, x), None)
        ref = site.down(MLPInput(site, x).h)
    assert fused.stats()["kernel"] == 1 and rel_err(y, ref) <= 1e-5
    for bad in ({"prefill": "gemm"}, {"dense_path": "x"}, {"weights": "fp8"}, {"threads": 0}, {"simd": "avx512"}):
        with pytest.raises(ConfigError):
            BACKENDS.get("fused")(OmegaConf.create({"name": "fused", **bad}))
    site.act = torch.nn.Tanh()  # an activation the kernel does not compute
    fused.forget_weights()
    with pytest.raises(ConfigError, match="activation"):
        fused.mlp(site, MLPInput(site, x), torch.ones(1, 1, site.intermediate_size, dtype=torch.bool))


def test_fatrelu_model_through_fused():
    """ProSparse's FATReLU installed on a Llama: the kernel applies the threshold in-kernel."""
    from test_backends import assert_close, sites_of

    from sparsebench.models.activations import FATReLU as Fat
    from sparsebench.models.patching import MLPInput

    _, sites = sites_of("llama")
    dense = BACKENDS.get("dense")(None)
    fused = BACKENDS.get("fused")(OmegaConf.create({"name": "fused", "threads": 2}))
    for site in sites:
        site.act = Fat(0.02)
        site.layer.mlp.act_fn = site.act
        x = torch.randn(1, 1, site.up.in_features)
        mask = torch.rand(1, 1, site.intermediate_size) < 0.5
        with torch.no_grad():
            assert_close(fused.mlp(site, MLPInput(site, x), mask), dense.mlp(site, MLPInput(site, x), mask))
