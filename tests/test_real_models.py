"""Real registry models (downloaded and converted once into $SPARSEBENCH_CACHE).

Marked ``real_model``; skipped when the cache is cold and the package index is
unreachable. Deselect with ``-m 'not real_model'``.
"""
import importlib.resources

import pytest
import torch
from omegaconf import OmegaConf

from conftest import registry_or_skip
from sparsebench.models.adapters import mlp_sites
from sparsebench.models.loader import load_model

pytestmark = pytest.mark.real_model

EXPECTED = {"smollm2-135m": ("llama", 30, 576, 1536), "gemma3-270m": ("gemma3_text", 18, 640, 2048)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registry_model_loads_with_adapter(name):
    mcfg = OmegaConf.load(importlib.resources.files("sparsebench.conf") / "model" / f"{name}.yaml")
    model, tok, model_id = registry_or_skip(load_model, mcfg)
    model_type, layers, hidden, inter = EXPECTED[name]
    assert model_id == name and model.config.model_type == model_type
    assert not hasattr(model.config, "quantization_config")
    sites = mlp_sites(model)
    assert len(sites) == layers and sites[0].down.out_features == hidden and sites[0].intermediate_size == inter
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    # Gemma's tokenizer puts <bos> before text by default (and the model needs it); SmolLM2's adds nothing
    from sparsebench.data.corpus import prefix_tokens

    assert prefix_tokens(tok) == ([tok.bos_token_id] if name == "gemma3-270m" else [])
