"""Dense mask-multiply: the accuracy reference every other backend must match."""
from __future__ import annotations

import torch

from . import BACKENDS
from .base import Backend


@BACKENDS.register("dense")
class DenseBackend(Backend):
    def mlp(self, site, inp, mask: torch.Tensor | None) -> torch.Tensor:
        # Same op order as transformers' MLPs (down(act(gate(x)) * up(x))), so an
        # unmasked call is bit-identical to the unpatched model.
        h = inp.h
        if mask is not None:
            h = h * mask.to(h.dtype)
        return site.down(h)
