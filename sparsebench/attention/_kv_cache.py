"""A KV cache that appends in place, as serving engines' caches do.

transformers' ``DynamicCache`` grows each layer by ``torch.cat`` of the whole cache with the new
token's K/V, so every decode step copies the entire cache (at 8k tokens on SmolLM2-135M that is
~750 MB of memory traffic per token, about half the step): a cost no serving engine pays and one
that would be charged equally to dense and sparse attention, hiding what attention itself costs.
``preallocated_cache`` returns a ``DynamicCache`` whose full-attention layers write each new
token into a buffer grown by doubling and hand attention a view of the filled part. Values are
bit-identical to ``DynamicCache``'s; sliding-window layers keep their own class.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """K/V of one layer in [batch, heads, capacity, head_dim] buffers; ``keys``/``values`` are
    views of the first ``length`` positions."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None
        self.length = 0

    def _grow(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        cap = max(needed, 2 * (self._k.shape[2] if self._k is not None else 0), 256)
        b, h, _, d = like_k.shape
        k = like_k.new_empty(b, h, cap, d)
        v = like_v.new_empty(b, h, cap, like_v.shape[-1])
        if self.length:
            k[:, :, :self.length] = self._k[:, :, :self.length]
            v[:, :, :self.length] = self._v[:, :, :self.length]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[2]
        if self._k is None or self.length + new > self._k.shape[2]:
            self._grow(self.length + new, key_states, value_states)
        self._k[:, :, self.length:self.length + new] = key_states
        self._v[:, :, self.length:self.length + new] = value_states
        self.length += new
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each sequence ``repeats`` times in the batch (one prefill continued several ways),
        the spare capacity kept so decode steps still append in place."""
        if self._k is None:
            return
        self._k = self._k.repeat_interleave(repeats, dim=0)
        self._v = self._v.repeat_interleave(repeats, dim=0)
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None
        self.length = 0


def preallocated_cache(model) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose full-attention layers append in place."""
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = PreallocatedLayer()
    return cache
