"""Attention sparsity: which keys (or heads) each query attends to.

Methods live in ``sparsebench/attention/<name>.py`` and register with
``@ATTENTION_METHODS.register("<name>")``; ``attention=<name>`` selects one (``attention=none``
leaves attention dense). They compose with any MLP sparsifier: the MLP masks and the
attention selection are installed by independent hooks.
"""
from ..core.registry import Registry
from .base import AttentionCall, AttentionMethod, AttentionSparsity, Selection

ATTENTION_METHODS: Registry[AttentionMethod] = Registry("attention method", __name__)


def build_attention(cfg) -> AttentionMethod | None:
    """The configured method, or None for ``attention=none`` / no attention group."""
    from ..core.config_check import check_option

    if cfg is None or cfg.get("name", "none") == "none":
        return None
    # Imported here by name so the provenance closure of whatever builds a method covers
    # every implementation (the registry alone imports them dynamically, unseen by it).
    from . import head_sparsity, lightning_indexer, quest  # noqa: F401

    check_option("attention", cfg)
    return ATTENTION_METHODS.get(cfg.name)(cfg)


__all__ = ["ATTENTION_METHODS", "AttentionCall", "AttentionMethod", "AttentionSparsity", "Selection",
           "build_attention"]
