"""Sparsifiers: decide, per token, which MLP neurons run."""
from ..core.registry import Registry
from .base import Sparsifier

SPARSIFIERS: Registry[Sparsifier] = Registry("sparsifier", __name__)

__all__ = ["SPARSIFIERS", "Sparsifier"]
