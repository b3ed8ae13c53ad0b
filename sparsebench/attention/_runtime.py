"""Build, calibrate (cached) and attach the run's attention method for an evaluator.

The long-context evaluators apply ``cfg.attention`` themselves and compare it with dense
attention on the same items in the same process (the MLP sparsifier of the run stays
active in both). A trained method's state is cached like a sparsifier's: keyed by the
model, its tokenizer's prefix, the calibration text settings, the MLP sparsifier the
hidden states went through, the method's training settings and the sources of the code.
"""
from __future__ import annotations

import contextlib

import torch
from omegaconf import OmegaConf

from . import build_attention
from .base import AttentionSparsity

# Modules a trained attention state depends on besides the method's own.
ATTENTION_CALIBRATION_MODULES = ("sparsebench.attention._runtime", "sparsebench.attention.base",
                                 "sparsebench.models.patching", "sparsebench.models.loader", "sparsebench.data.corpus")


def attention_key(ctx, method) -> dict:
    from ..data.corpus import prefix_tokens
    from ..store.provenance import code_digest

    cfg = ctx.cfg
    params = next(ctx.model.parameters())
    return {"model": OmegaConf.to_container(cfg.model, resolve=True),
            "device": params.device.type, "dtype": str(params.dtype),
            "prefix_tokens": prefix_tokens(ctx.tokenizer),
            "data": OmegaConf.to_container(cfg.data, resolve=True), "seed": int(cfg.seed),
            "mlp_sparsifier": OmegaConf.to_container(cfg.sparsifier, resolve=True),
            "code": code_digest([type(method).__module__, *ATTENTION_CALIBRATION_MODULES]),
            **method.calibration_key()}


@contextlib.contextmanager
def attached_attention(ctx, record_stats: bool = True):
    """The run's attention session attached to ``ctx.model`` inside (None for attention=none)."""
    method = build_attention(ctx.cfg.get("attention"))
    if method is None:
        yield None
        return
    with AttentionSparsity(method, record_stats=record_stats).attach(ctx.model) as session:
        if method.needs_calibration:
            session.calibration_info = calibrate_attention(ctx, session)
        yield session


def calibrate_attention(ctx, session) -> dict:
    from ..store.cache import cache_root
    from ..models.calibration import ArtifactCache, committed_artifacts
    from ..data.corpus import calibration_windows

    method = session.method
    dcfg = ctx.cfg.data
    cache = ArtifactCache(cache_root(ctx.cache_dir) / "attention", attention_key(ctx, method),
                          seed=committed_artifacts())
    computed = []

    def compute():
        windows = calibration_windows(ctx.tokenizer, ctx.splits, int(dcfg.calibration.num_sequences),
                                      int(dcfg.calibration.seq_len), int(ctx.cfg.seed))
        torch.manual_seed(int(ctx.cfg.seed))
        computed.append(int(windows.numel()))
        return method.calibrate(ctx.model, session, list(windows.split(int(dcfg.calibration.batch_size))))

    state = cache.get(f"attention-{method.name}", {}, compute)
    method.load_state(state)
    session.reset()
    return {"calibration": "computed" if computed else "cached",
            **({"calibration_tokens": computed[0]} if computed else {})}


@contextlib.contextmanager
def attention_budget(session, budget: int | None):
    """The method's token budget set to ``budget`` inside (None: as configured)."""
    if session is None or budget is None:
        yield
        return
    cfg = session.method.cfg
    if "budget" not in cfg:
        from ..core.errors import ConfigError

        raise ConfigError(f"attention={cfg.name} has no token budget; sweep its own setting from the shell instead")
    old_budget, old_fraction = cfg.budget, cfg.get("budget_fraction")
    with _writable(cfg):
        cfg.budget, cfg.budget_fraction = int(budget), None
    try:
        yield
    finally:
        with _writable(cfg):
            cfg.budget, cfg.budget_fraction = old_budget, old_fraction


@contextlib.contextmanager
def _writable(cfg):
    from omegaconf import open_dict, read_write

    with read_write(cfg), open_dict(cfg):
        yield


def attention_variants(session, budgets) -> list:
    """What an evaluator compares: ``"dense"`` attention, then the method at each of
    ``budgets`` (token counts), or at its own setting (``None``) when no budgets are given or
    the method has no token budget (head_sparsity); only ``"dense"`` for attention=none."""
    if session is None:
        return ["dense"]
    if budgets and "budget" in session.method.cfg:
        return ["dense", *(int(b) for b in budgets)]
    return ["dense", None]


def attention_variant(session, variant):
    """A context in which attention runs as ``variant`` (an entry of ``attention_variants``)."""
    if session is None:
        return contextlib.nullcontext()
    return session.dense() if variant == "dense" else attention_budget(session, variant)
