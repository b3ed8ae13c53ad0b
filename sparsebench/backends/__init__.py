"""Execution backends: run an MLP given its weights and a neuron mask."""
from ..core.registry import Registry
from .base import Backend

BACKENDS: Registry[Backend] = Registry("backend", __name__)

__all__ = ["BACKENDS", "Backend"]
