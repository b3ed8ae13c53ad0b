"""No sparsification: every neuron runs (the dense baseline)."""
from . import SPARSIFIERS
from .base import Sparsifier


@SPARSIFIERS.register("none")
class NoSparsifier(Sparsifier):
    def mask(self, inp):
        return None
