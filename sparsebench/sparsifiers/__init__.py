"""Sparsifiers: decide, per token, which MLP neurons run."""
from ..registry import Registry
from .base import Sparsifier

SPARSIFIERS: Registry[Sparsifier] = Registry("sparsifier", __name__)

__all__ = ["SPARSIFIERS", "Sparsifier"]
