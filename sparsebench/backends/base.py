"""The backend interface."""
from __future__ import annotations

import torch


class Backend:
    """Executes one MLP call.

    ``mlp(site, inp, mask)`` gets the layer's modules (``site``), the call's input
    (``inp.x``, with ``inp.act`` if the sparsifier already computed it) and a boolean
    neuron mask of shape ``[..., intermediate]`` (True = keep) or ``None`` for dense.
    Every backend must return what the dense mask-multiply returns for the same mask.
    """

    name: str = "base"

    def __init__(self, cfg=None):
        self.cfg = cfg

    def mlp(self, site, inp, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError
