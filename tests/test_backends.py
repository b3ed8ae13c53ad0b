"""Every sparse backend returns what the dense mask-multiply returns for the same mask."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ARCHS, make_tiny, random_ids
from sparsebench.backends import BACKENDS
from sparsebench.models.patching import LinearInput, MLPInput, SparsityController
from sparsebench.sparsifiers import SPARSIFIERS

SPARSE_BACKENDS = [("index_select", {}), ("index_select", {"union": True}),
                   ("cached", {"threads": 2}), ("cached", {"union": True, "threads": 1}),
                   # every token through the kernel (prefill too), AVX2 and portable loops
                   ("fused", {"threads": 2, "prefill": "per_token"}),
                   ("fused", {"threads": 1, "prefill": "per_token", "simd": "portable"}),
                   ("fused", {"threads": 2})]  # multi-token calls: dense GEMM + mask


def backend(name, **cfg):
    return BACKENDS.get(name)(OmegaConf.create({"name": name, **cfg}))


def assert_close(y, ref, rel=1e-5):
    """Within ``rel`` of the reference's scale (the issue's fp32 bar)."""
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= rel * max(ref.float().abs().max().item(), 1e-30), err


def sites_of(arch, **kw):
    drelu = kw.pop("drelu", False)
    model = make_tiny(arch, **kw)
    if drelu:  # TurboSparse's dReLU: relu on gate and on up
        from sparsebench.models.activations import ReLUOutputLinear

        for layer in model.model.layers:
            layer.mlp.up_proj.__class__ = ReLUOutputLinear
    ctl = SparsityController(SPARSIFIERS.get("none")(OmegaConf.create({"name": "none"})), backend("dense"))
    ctl.attach(model)
    return model, ctl.sites


def random_mask(shape, density, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < density


def computed_input(site, x, computed):
    """An MLPInput on which the sparsifier already computed act (CATS) or h (CETT)."""
    inp = MLPInput(site, x)
    if computed == "act":
        inp.act
    elif computed == "h":
        inp.h
    return inp


@pytest.mark.parametrize("arch", ARCHS + ["drelu"])
@pytest.mark.parametrize("computed", ["x", "act", "h"])
@pytest.mark.parametrize("name,cfg", SPARSE_BACKENDS)
def test_mlp_matches_dense_mask(arch, computed, name, cfg):
    kw = {"hidden_act": "relu", "drelu": True} if arch == "drelu" else {}
    _, sites = sites_of("mistral" if arch == "drelu" else arch, **kw)
    dense, sparse = backend("dense"), backend(name, **cfg)
    for site in sites:
        hidden, inter = site.up.in_features, site.intermediate_size
        for step, (batch, seq, density) in enumerate([(1, 1, 0.3), (1, 1, 0.35), (3, 1, 0.2), (2, 5, 0.5),
                                                      (1, 1, 0.0), (1, 1, 1.0), (1, 1, 0.1)]):
            gen = torch.Generator().manual_seed(100 * site.layer_idx + step)
            x = torch.randn(batch, seq, hidden, generator=gen)
            mask = random_mask((batch, seq, inter), density, seed=step)
            with torch.no_grad():
                ref = dense.mlp(site, computed_input(site, x, computed), mask)
                y = sparse.mlp(site, computed_input(site, x, computed), mask)
            assert y.shape == ref.shape
            assert_close(y, ref)


@pytest.mark.parametrize("name,cfg", SPARSE_BACKENDS)
def test_linear_inputs_match_dense_mask(name, cfg):
    _, sites = sites_of("opt")  # biases on every projection
    dense, sparse = backend("dense"), backend(name, **cfg)
    for step, (batch, seq, density) in enumerate([(1, 1, 0.4), (1, 1, 0.45), (2, 3, 0.3), (1, 1, 1.0)]):
        for proj in ("q", "o", "up", "down"):
            lin = sites[0].projection(proj)
            x = torch.randn(batch, seq, lin.in_features, generator=torch.Generator().manual_seed(step))
            mask = random_mask(x.shape, density, seed=step)
            inp = LinearInput(sites[0], proj, x)
            with torch.no_grad():
                assert_close(sparse.linear(inp, lin, mask), dense.linear(inp, lin, mask))


def test_cache_copies_only_changed_rows_and_stays_compact():
    """Brute force: after each update the cached rows equal the weights' rows of exactly
    the active set, and the copy count equals entered neurons plus the moves a shrinking
    set needs (at most the neurons that left)."""
    from sparsebench.backends.cached import RowCache

    torch.manual_seed(0)
    n, width = 64, 7
    a, b = torch.randn(n, width), torch.randn(n, width)
    cache = RowCache([[a, b]], n, threads=2)
    prev = torch.zeros(n, dtype=torch.bool)
    gen = torch.Generator().manual_seed(1)
    for density in [0.3, 0.3, 0.5, 0.1, 0.1, 0.0, 0.9, 1.0, 0.2]:
        mask = torch.rand(n, generator=gen) < density
        copied = cache.update(mask)
        entered = int((mask & ~prev).sum())
        left = int((prev & ~mask).sum())
        assert cache.k == int(mask.sum())
        assert entered <= copied <= entered + left
        held = cache.neurons
        assert sorted(held.tolist()) == mask.nonzero().squeeze(1).tolist()
        assert torch.equal(cache.rows(0)[:, 0], a[held]) and torch.equal(cache.rows(0)[:, 1], b[held])
        assert torch.equal(cache.slot_of[held].long(), torch.arange(cache.k))
        prev = mask


def test_unchanged_mask_copies_nothing():
    from sparsebench.backends.cached import RowCache

    w = torch.randn(32, 5)
    cache = RowCache([[w]], 32, threads=1)
    mask = random_mask((32,), 0.5, seed=3)
    assert cache.update(mask) == int(mask.sum())
    assert cache.update(mask) == 0
    swapped = mask.clone()
    on, off = mask.nonzero()[0, 0], (~mask).nonzero()[0, 0]
    swapped[on], swapped[off] = False, True
    assert cache.update(swapped) == 1  # one neuron out, one in: one row into the freed slot


def test_bf16_cache_is_bit_exact_and_output_matches():
    from sparsebench.backends.cached import RowCache

    _, sites = sites_of("llama")
    site = sites[0]
    for mod in (site.gate, site.up, site.down):
        mod.to(torch.bfloat16)
    w = site.up.weight.detach()
    cache = RowCache([[w.contiguous()]], w.shape[0], threads=2)
    mask = random_mask((w.shape[0],), 0.4, seed=5)
    cache.update(mask)
    assert torch.equal(cache.rows(0)[:, 0].view(torch.int16), w[cache.neurons].view(torch.int16))
    x = torch.randn(1, 1, site.up.in_features).to(torch.bfloat16)
    m = random_mask((1, 1, site.intermediate_size), 0.4, seed=6)
    with torch.no_grad():
        ref = backend("dense").mlp(site, MLPInput(site, x), m)
        y = backend("cached", threads=1).mlp(site, MLPInput(site, x), m)
    assert_close(y, ref, rel=2e-2)  # bf16 accumulation order


def test_union_density_grows_with_batch():
    _, sites = sites_of("llama")
    site = sites[0]
    densities = []
    for batch in (1, 2, 8):
        be = backend("index_select", union=True)
        x = torch.randn(batch, 1, site.up.in_features)
        with torch.no_grad():
            be.mlp(site, MLPInput(site, x), random_mask((batch, 1, site.intermediate_size), 0.2, seed=batch))
        densities.append(be.stats()["union_density"])
    assert densities[0] < densities[1] < densities[2]


def test_unsupported_dtype_is_refused():
    from sparsebench.core.errors import ConfigError

    _, sites = sites_of("llama")
    site = sites[0]
    for mod in (site.gate, site.up, site.down):
        mod.to(torch.float64)
    x = torch.randn(1, 1, site.up.in_features, dtype=torch.float64)
    with pytest.raises(ConfigError, match="supports"):
        backend("cached").mlp(site, MLPInput(site, x), random_mask((1, 1, site.intermediate_size), 0.5, 0))


def test_bad_thread_count_is_refused():
    from sparsebench.core.errors import ConfigError

    with pytest.raises(ConfigError, match="threads"):
        backend("cached", threads=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["cats", "teal"])
def test_whole_model_logits_match_across_backends(arch, method):
    """A real sparsifier inside a full forward: same logits on every backend. One
    calibrated state is loaded everywhere (as the on-disk cache does): calibration itself
    runs layers through the backend, and an order-statistic threshold can move by one
    float ulp with the summation order, which would compare two different sparsifiers."""
    from test_sparsifiers import DEFAULTS

    ids = random_ids(batch=2, seq=6)
    outs, state = {}, None
    for name, cfg in [("dense", {})] + SPARSE_BACKENDS:
        model = make_tiny(arch)
        sp = SPARSIFIERS.get(method)(OmegaConf.create({"name": method, "sparsity": 0.5, **DEFAULTS[method]}))
        ctl = SparsityController(sp, backend(name, **cfg)).attach(model)
        if state is None:
            state = sp.calibrate(ctl, model, [random_ids(batch=2, seq=16, seed=9)])
        sp.load_state(state)
        with torch.no_grad():
            outs[(name, str(cfg))] = model(ids).logits
    ref = outs[("dense", "{}")]
    for key, logits in outs.items():
        assert_close(logits, ref, rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_index_select_on_cuda_matches_dense(arch):
    """GPU check (runs where a GPU is present): index_select equals the dense mask-multiply
    on the device, and the CPU-only cached backend refuses it with a clear error."""
    from sparsebench.core.errors import ConfigError

    _, sites = sites_of(arch)
    for site in sites:
        site.layer.to("cuda")
        x = torch.randn(2, 3, site.up.in_features, device="cuda")
        mask = random_mask((2, 3, site.intermediate_size), 0.3, seed=site.layer_idx).cuda()
        with torch.no_grad():
            ref = backend("dense").mlp(site, MLPInput(site, x), mask)
            assert_close(backend("index_select").mlp(site, MLPInput(site, x), mask), ref)
            with pytest.raises(ConfigError, match="CPU"):
                backend("cached").mlp(site, MLPInput(site, x), mask)


def test_cache_update_fuzz():
    """Random shapes, densities and mask sequences (hypothesis): after every update the
    cache holds exactly the active rows, bit for bit, in fp32 and bf16."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from sparsebench.backends.cached import RowCache

    @settings(max_examples=60, deadline=None)
    @given(n=st.integers(1, 300), width=st.integers(1, 40), bf16=st.booleans(), seed=st.integers(0, 2**31 - 1),
           densities=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6))
    def check(n, width, bf16, seed, densities):
        gen = torch.Generator().manual_seed(seed)
        dtype = torch.bfloat16 if bf16 else torch.float32
        a = torch.randn(n, width, generator=gen).to(dtype)
        b = torch.randn(n, width, generator=gen).to(dtype)
        cache = RowCache([[a, b], [a]], n, threads=2)
        for d in densities:
            mask = torch.rand(n, generator=gen) < d
            cache.update(mask)
            held = cache.neurons
            assert sorted(held.tolist()) == mask.nonzero().flatten().tolist()
            bits = torch.int16 if bf16 else torch.int32
            assert torch.equal(cache.rows(0)[:, 0].view(bits), a[held].view(bits))
            assert torch.equal(cache.rows(0)[:, 1].view(bits), b[held].view(bits))
            assert torch.equal(cache.rows(1)[:, 0].view(bits), a[held].view(bits))

    check()


def test_backend_equivalence_fuzz():
    """Hypothesis: random MLP shapes, architectures, batch/sequence sizes, densities and
    computed levels; every sparse backend equals the dense mask-multiply on the same mask."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=40, deadline=None, derandomize=True)  # CI runs the same examples every time
    @given(arch=st.sampled_from(ARCHS), hidden=st.sampled_from([16, 32, 48]), inter=st.integers(8, 96),
           batch=st.integers(1, 3), seq=st.integers(1, 5), density=st.floats(0.0, 1.0),
           computed=st.sampled_from(["x", "act", "h"]), which=st.integers(0, len(SPARSE_BACKENDS) - 1),
           seed=st.integers(0, 2**31 - 1))
    def check(arch, hidden, inter, batch, seq, density, computed, which, seed):
        _, sites = sites_of(arch, hidden_size=hidden, intermediate_size=inter)
        name, cfg = SPARSE_BACKENDS[which]
        dense, sparse = backend("dense"), backend(name, **cfg)
        gen = torch.Generator().manual_seed(seed)
        for site in sites:
            x = torch.randn(batch, seq, hidden, generator=gen)
            mask = random_mask((batch, seq, inter), density, seed)
            ref = dense.mlp(site, computed_input(site, x, computed), mask)
            for _ in range(2):  # the second call goes through a filled cache
                assert_close(sparse.mlp(site, computed_input(site, x, computed), mask), ref)

    check()
