"""backend=triton: its decode kernels equal a brute-force masked dense computation.

The kernels run on CUDA when there is a device, else in Triton's interpreter
(TRITON_INTERPRET=1, CPU tensors), else those tests are skipped. The checks that need no
kernel (config, device refusal, import without triton) always run.

Reference: float64 from the same inputs (weights, x, and the act/h a sparsifier handed
over), masked, then compared to the backend's output. Tolerances, relative to the
largest reference value: fp32 accumulates in another order, so 1e-5 (the repo's fp32
bar); bf16 inputs are exact in fp32 and the kernels keep fp32 until one final cast to
bf16, whose rounding is at most half an ulp (2^-9 of the value) — 2^-8 leaves room for
the fp32 sums.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import make_tiny, random_ids
from sparsebench.core.errors import ConfigError
from sparsebench.models.activations import FATReLU, ReLUOutputLinear
from sparsebench.models.adapters import MLPSite
from sparsebench.models.patching import LinearInput, MLPInput, SparsityController
from test_backends import backend, computed_input, random_mask

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8}
DENSITIES = [0.0, 0.1, 0.5, 1.0]
# small tiles so every kernel loops over the hidden dimension and splits the input
# channels over several programs; 70 and 75 are multiples of none of them
SMALL_BLOCKS = {"block_neurons": 8, "block_hidden": 32, "block_in": 16, "block_out": 32, "num_warps": 2}
HIDDEN, INTER = 70, 75


@pytest.fixture(scope="module")
def kernels_run():
    """Where the kernels can run: CUDA, or the interpreter on CPU tensors."""
    if ON_CUDA:
        yield
        return
    if importlib.util.find_spec("triton") is None:
        pytest.skip("no CUDA device and triton is not installed (pip install triton runs the interpreter)")
    with pytest.MonkeyPatch.context() as mp:
        # read when the kernels are built (on first use), so set before any test builds them
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def make_site(variant: str, seed: int = 0) -> MLPSite:
    """A random MLP: SwiGLU, GeGLU with biases, dReLU, FATReLU, or plain fc1/act/fc2 (OPT-style)."""
    torch.manual_seed(seed)
    gated = not variant.startswith("plain")
    bias = variant in ("geglu_bias", "plain_relu", "plain_gelu")
    act = {"swiglu": nn.SiLU(), "geglu_bias": nn.GELU(approximate="tanh"), "drelu": nn.ReLU(),
           "fatrelu": FATReLU(0.05), "plain_relu": nn.ReLU(), "plain_gelu": nn.GELU()}[variant]
    up = nn.Linear(HIDDEN, INTER, bias=bias)
    up_act = None
    if variant == "drelu":  # ReLU on the up branch too
        up.__class__ = ReLUOutputLinear
        up_act = ReLUOutputLinear.output_activation
    return MLPSite(layer_idx=0, layer=None, kind="gated" if gated else "plain", up=up,
                   down=nn.Linear(INTER, HIDDEN, bias=bias), act=act,
                   gate=nn.Linear(HIDDEN, INTER, bias=bias) if gated else None, up_act=up_act)


def to(site: MLPSite, dtype) -> MLPSite:
    for lin in (site.gate, site.up, site.down):
        if lin is not None:
            lin.to(device=DEVICE, dtype=dtype)
    return site


def f64(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ lin.weight.double().t() + (0 if lin.bias is None else lin.bias.double())


def reference_mlp(site: MLPSite, inp: MLPInput, mask: torch.Tensor) -> torch.Tensor:
    """down(h · mask) in float64, from what the backend is handed: x, and act or h if computed."""
    x, computed = inp.x.double(), inp.computed
    if computed == "h":
        h = inp.h.double()
    elif site.kind == "plain":
        h = inp.act.double() if computed == "act" else site.act(f64(site.up, x))
    else:
        a = inp.act.double() if computed == "act" else site.act(f64(site.gate, x))
        u = f64(site.up, x)
        h = a * (u if site.up_act is None else site.up_act(u))
    return f64(site.down, h * mask)


def assert_close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.double() - ref).abs().max().item()
    assert err <= TOLERANCE[dtype] * max(ref.abs().max().item(), 1e-30), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("computed", ["x", "act", "h"])
@pytest.mark.parametrize("variant", ["swiglu", "geglu_bias", "drelu", "fatrelu", "plain_relu", "plain_gelu"])
def test_mlp_decode_matches_brute_force(kernels_run, variant, computed, dtype):
    site = to(make_site(variant), dtype)
    for blocks in ({}, SMALL_BLOCKS):
        be = backend("triton", **blocks)
        for step, density in enumerate(DENSITIES):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(1, 1, HIDDEN, generator=gen).to(device=DEVICE, dtype=dtype)
            mask = random_mask((1, 1, INTER), density, seed=step).to(DEVICE)
            with torch.no_grad():
                inp = computed_input(site, x, computed)
                y = be.mlp(site, inp, mask)
                # nothing dense was computed into the input (a plain MLP's h is its act: an alias)
                assert inp.computed == computed or (site.kind, computed) == ("plain", "act")
                assert_close(y, reference_mlp(site, inp, mask), dtype)
        assert be.stats() == {"kernel": len(DENSITIES), "dense": 0}


def test_hidden_is_the_masked_h(kernels_run):
    """The neuron kernel's h is h · mask: zero at inactive neurons even where act(fc1 bias) is not."""
    from sparsebench.backends.triton import Blocks, kernel_activations, neuron_hidden
    from sparsebench.backends.weights import mlp_weights

    site = to(make_site("plain_gelu"), torch.float32)
    w = mlp_weights(site, {})
    x = torch.randn(HIDDEN, device=DEVICE)
    keep = random_mask((INTER,), 0.3, seed=4).to(DEVICE)
    with torch.no_grad():
        h = neuron_hidden(w, kernel_activations(w), x, keep, None, Blocks(**SMALL_BLOCKS))
        ref = site.act(f64(site.up, x.double())) * keep
    assert (h[~keep] == 0).all() and (ref[~keep] == 0).all() and (site.act(site.up.bias[~keep]) != 0).any()
    assert_close(h, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(HIDDEN, INTER), (INTER, HIDDEN)])
def test_linear_decode_matches_brute_force(kernels_run, shape, bias, dtype):
    torch.manual_seed(1)
    lin = nn.Linear(*shape, bias=bias).to(device=DEVICE, dtype=dtype)
    site = make_site("swiglu")
    for blocks in ({}, SMALL_BLOCKS):
        be = backend("triton", **blocks)
        for step, density in enumerate(DENSITIES):
            gen = torch.Generator().manual_seed(10 + step)
            x = torch.randn(1, 1, shape[0], generator=gen).to(device=DEVICE, dtype=dtype)
            x[..., ::7] = 0  # exact zeros in kept channels are skipped too
            mask = random_mask(x.shape, density, seed=step).to(DEVICE)
            with torch.no_grad():
                y = be.linear(LinearInput(site, "up", x), lin, mask)
            assert_close(y, f64(lin, x.double() * mask), dtype)


def test_more_than_one_row_is_the_dense_mask_multiply(monkeypatch):
    """Prefill, scoring and batched decode: exactly what the dense backend computes (no kernel,
    so this needs neither CUDA nor triton; on CPU the interpreter setting lets the call in)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    site = to(make_site("geglu_bias"), torch.float32)
    lin = site.down
    dense, be = backend("dense"), backend("triton")
    for shape in [(2, 1), (1, 4), (3, 5)]:
        x = torch.randn(*shape, HIDDEN, device=DEVICE)
        mask = random_mask((*shape, INTER), 0.3, seed=shape[1]).to(DEVICE)
        h_in = torch.randn(*shape, INTER, device=DEVICE)
        with torch.no_grad():
            assert torch.equal(be.mlp(site, MLPInput(site, x), mask), dense.mlp(site, MLPInput(site, x), mask))
            inp = LinearInput(site, "down", h_in)
            assert torch.equal(be.linear(inp, lin, mask), dense.linear(inp, lin, mask))
    assert be.stats() == {"kernel": 0, "dense": 6}


def test_cpu_tensors_need_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    site = make_site("swiglu")
    x = torch.randn(1, 1, HIDDEN)
    for call in (lambda be: be.mlp(site, MLPInput(site, x), random_mask((1, 1, INTER), 0.5, 0)),
                 lambda be: be.linear(LinearInput(site, "up", x), site.up, random_mask(x.shape, 0.5, 0))):
        with pytest.raises(ConfigError, match="backend=triton needs CUDA") as err:
            call(backend("triton"))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["block_neurons", "block_hidden", "block_in", "block_out", "num_warps"])
def test_bad_block_sizes_are_refused_in_one_line(key):
    for bad in (0, 3, 48, 4096, -8, 2.0, True, "16"):
        with pytest.raises(ConfigError, match=f"backend.{key}=") as err:
            backend("triton", **{key: bad})
        assert "\n" not in str(err.value)


def test_imports_and_builds_without_triton():
    """CPU installs: importing the module and building the backend never import triton; the
    first kernel call says what to install."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import sparsebench.backends.triton as t\n"
        "from sparsebench.core.errors import ConfigError\n"
        "t.TritonBackend(None)\n"
        "try:\n"
        "    t.kernels()\n"
        "except ConfigError as e:\n"
        "    assert 'pip install triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('kernels() built without triton')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("arch,method", [("llama", "cats"), ("llama", "teal"), ("opt", "cats"), ("opt", "teal")])
def test_decode_step_in_a_model_matches_the_dense_backend(kernels_run, arch, method):
    """A real sparsifier inside a model: prefill (dense mask-multiply) then one decode token
    (kernels) gives the dense backend's logits; one calibrated state is loaded in both."""
    from omegaconf import OmegaConf

    from sparsebench.sparsifiers import SPARSIFIERS
    from test_sparsifiers import DEFAULTS

    prompt = random_ids(batch=1, seq=6).to(DEVICE)
    logits, state, stats = {}, None, None
    for name in ("dense", "triton"):
        model = make_tiny(arch).to(DEVICE)
        sp = SPARSIFIERS.get(method)(OmegaConf.create({"name": method, "sparsity": 0.5, **DEFAULTS[method]}))
        be = backend(name)
        ctl = SparsityController(sp, be).attach(model)
        if state is None:
            state = sp.calibrate(ctl, model, [random_ids(batch=2, seq=16, seed=9).to(DEVICE)])
        sp.load_state(state)
        with torch.no_grad():
            out = model(prompt[:, :-1], use_cache=True)
            logits[name] = model(prompt[:, -1:], past_key_values=out.past_key_values).logits
        stats = be.stats()
    assert stats["kernel"] > 0  # the decode token really went through the kernels
    ref = logits["dense"]
    err = (logits["triton"] - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err


@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")
def test_cuda_decode_never_syncs_with_the_host():
    """The whole decode call (mask in, y out) runs without a device-to-host sync."""
    site = to(make_site("swiglu"), torch.bfloat16)
    lin = site.up
    be = backend("triton")
    x = torch.randn(1, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    mask = random_mask((1, 1, INTER), 0.4, seed=0).cuda()
    in_mask = random_mask(x.shape, 0.4, seed=1).cuda()
    with torch.no_grad():
        be.mlp(site, MLPInput(site, x), mask)  # first call: weights prepared, kernels compiled
        be.linear(LinearInput(site, "up", x), lin, in_mask)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            be.mlp(site, MLPInput(site, x), mask)
            be.linear(LinearInput(site, "up", x), lin, in_mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")
