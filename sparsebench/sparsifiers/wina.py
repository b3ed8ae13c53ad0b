"""WINA (Chen et al. 2025, "WINA: Weight Informed Neuron Activation for Accelerating
Large Language Model Inference").

For every linear y = W x of the block (q, k, v, o, gate, up, down), per token keep the
k = round((1−s)·d_in) input channels with the largest |x_i|·‖W[:, i]‖₂ and zero the
rest: the input's magnitude weighted by how much the weight column can amplify it.
Each linear has its own mask (paper). Deviation note: the reference code scores only
k and gate with their column norms and uses |x| alone for q, v, o, up and down; set
``score: reference`` for that variant.

``orthogonalize: true`` applies WINA's tensor transform first: fold the RMSNorm scale
into the following linears and rotate each block's attention input by Q_a (from the
SVD W_k = U S Vᵀ, Q_a = V) and its MLP input by Q_m (from W_gate), so W_k Q_a and
W_gate Q_m are column-orthogonal, the case in which WINA's criterion is optimal.
WINA rotates the residual stream and adds shortcut matrices between blocks; we rotate
the normalized block input instead (x' = x Q, W' = W Q), which gives the same
x' and W' for the sparsified linears at the same cost (one d×d product per block
input) without touching the residual path. Dense logits are unchanged (tested).
Supported for RMSNorm models (Llama, Mistral, Qwen2, Gemma 3).
"""
from __future__ import annotations

import torch

from . import SPARSIFIERS
from ..errors import ConfigError
from .base import Sparsifier

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest entries along the last dimension."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(-1, scores.topk(keep, dim=-1).indices, True)
    return mask


@SPARSIFIERS.register("wina")
class WINA(Sparsifier):
    input_projections = PROJECTIONS
    sparsity_unit = "linear_inputs"
    SCORES = ("paper", "reference")

    def __init__(self, cfg):
        super().__init__(cfg)
        self._norms: dict[tuple[int, str], torch.Tensor] = {}

    def validate(self):
        super().validate()
        if self.cfg.get("score", "paper") not in self.SCORES:
            raise ConfigError(f"sparsifier.score={self.cfg.score} is unknown; use one of: {', '.join(self.SCORES)}")

    def attach(self, controller, model):
        self._norms = {}
        if self.cfg.get("orthogonalize", False):
            orthogonalize(controller.sites)

    def column_norms(self, inp) -> torch.Tensor | None:
        key = (inp.layer_idx, inp.proj)
        if key not in self._norms:
            use = self.cfg.get("score", "paper") == "paper" or inp.proj in ("k", "gate")
            w = inp.site.projection(inp.proj).weight.detach()
            self._norms[key] = w.float().norm(dim=0).to(w.dtype) if use else None
        return self._norms[key]

    def input_mask(self, inp):
        if self.sparsity == 0.0:
            return None
        x = inp.x
        keep = int(round((1.0 - self.sparsity) * x.shape[-1]))
        c = self.column_norms(inp)
        scores = x.abs() if c is None else x.abs() * c
        return topk_mask(scores, keep)


def _norm_scale(norm: torch.nn.Module) -> tuple[torch.Tensor, callable]:
    """The RMSNorm's effective elementwise scale γ, and a function that makes it 1."""
    w = norm.weight.detach()
    if "Gemma" in type(norm).__name__:  # Gemma's RMSNorm scales by (1 + weight)
        return (1.0 + w.float()), lambda: norm.weight.data.zero_()
    return w.float(), lambda: norm.weight.data.fill_(1.0)


@torch.no_grad()
def orthogonalize(sites) -> None:
    for site in sites:
        if site.kind != "gated":
            raise ConfigError("sparsifier.orthogonalize=true supports RMSNorm models with gated MLPs (llama, mistral, qwen2, gemma3)")
        layer = site.layer
        mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
        for norm, projs, basis in ((layer.input_layernorm, ("q", "k", "v"), "k"),
                                   (mlp_norm, ("gate", "up"), "gate")):
            gamma, reset = _norm_scale(norm)
            for p in projs:  # fold the norm's scale into the linears it feeds
                lin = site.projection(p)
                lin.weight.data = (lin.weight.float() * gamma).to(lin.weight.dtype)
            reset()
            w = site.projection(basis).weight.double()
            q = torch.linalg.svd(w, full_matrices=True).Vh.T  # W V = U S: column-orthogonal
            for p in projs:
                lin = site.projection(p)
                lin.weight.data = (lin.weight.double() @ q).to(lin.weight.dtype)
            rot = q.to(norm.weight.dtype)
            norm.register_forward_hook(lambda _m, _i, out, rot=rot: out @ rot.to(out.dtype))
