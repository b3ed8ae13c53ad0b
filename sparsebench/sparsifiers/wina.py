"""WINA (Chen et al. 2025, "WINA: Weight Informed Neuron Activation for Accelerating
Large Language Model Inference").

For every linear y = W x of the block (q, k, v, o, gate, up, down), per token keep the
k = round((1−s_p)·d_in) input channels with the largest |x_i|·‖W[:, i]‖₂ and zero the
rest: the input's magnitude weighted by how much the weight column can amplify it.
Each linear has its own mask and its own sparsity s_p.

What the reference does (github.com/microsoft/wina; ``scripts/wina/*.bash`` run
``wina/grab_acts.py --transform``, ``wina/greedyopt.py --transform`` and
``eval.py --greedy --transform --mask_by topk`` at s = 0.25, 0.4, 0.5, 0.65):
- Transform (``utils/tensor_transform.py``, ``tensor_transform`` = ``fuse_layernorm``
  then ``rotate_sequential``): fold every RMSNorm scale into the linears it feeds
  (``fuse_ln_linear``); per layer, Q_a = V of the SVD W_k = U S Vᵀ (``svd``: W_k after
  folding) and Q_m = V of W_gate; rotate the residual stream into Q_a before attention
  and Q_m before the MLP: W_q, W_k, W_v ← W Q_a, W_o ← Q_mᵀ W_o, W_gate, W_up ← W Q_m,
  W_down ← Q_nextᵀ W_down, with shortcut matrices Q_aᵀQ_m, Q_mᵀQ_next on the residual
  adds (``wina/decoder_layer.py``), embeddings · Q_a of layer 0, head · Q of the last.
  Then W_k Q_a = U S and W_gate Q_m are column-orthogonal.
- Score (``wina/self_attn.py``, ``wina/mlp.py``): ``k_norm_by_column`` and
  ``gate_norm_by_column`` are the column norms (recomputed after the transform); those
  of q, v, o, up and down are 1, so those five use |x| alone.
- Allocation (``wina/greedyopt.py``, ``process_layer``): TEAL's greedyopt with WINA's
  score, per decoder layer (block) and per projection: on the dense (transformed)
  model's inputs to the layer (``grab_acts.py``: 20 alpaca samples, ``--sample_size``),
  each of the seven projections has its own level (``set_layer_sparsities``); a trial
  masks by a threshold on that projection's score (``SparsifyFn``, ``mask_by=
  'threshold'``: ``Distribution.icdf(s)`` of the score's histogram, one per projection,
  built by ``ActivationModule.find_histogram`` from the unique fp16 values, i.e. exact
  order statistics); the projection whose step ``base_step_size / weight[p]`` (0.025;
  ``weight``: parameters relative to q_proj, hard-coded per model in ``weight_dict``)
  gives the least layer-output error (TEAL's ``calculate_activation_error``: norm along
  the sequence over the last quarter of positions, summed over the samples) is raised,
  until the parameter-weighted sparsity reaches ``--target_sparsity`` 0.66.
- Inference (``eval.py --greedy``, ``utils.get_layer_greedy_sparsities``): each
  projection at the level of the greedy row whose effective sparsity is closest to s,
  masked per token by top-k of the score (``SparsifyFn``, ``mask_by='topk'``).

What we do (defaults in conf/sparsifier/wina.yaml = the authors' setting):
- ``allocation: greedy`` — the same greedy through the function TEAL uses
  (``teal.greedy_path`` / ``teal.greedy_trajectory``): per linear, thresholds on the
  WINA score from exact quantile tables of the score per projection during the search,
  per-token top-k at the found levels at inference. ``greedy_step``, ``greedy_max``,
  ``greedy_sequences``, ``greedy_error`` mean what they mean for TEAL (see teal.py);
  the path is cached per model (``wina-greedy``). ``allocation: uniform`` (named option,
  ablation): every linear at s, no calibration.
- ``orthogonalize: true`` — the transform. We fold the RMSNorm scales the same way and
  rotate the *normalized block input* instead of the residual stream (x' = RMSNorm(h) Q,
  W' = W Q for q/k/v with Q_a and gate/up with Q_m): since the folded RMSNorm commutes
  with a rotation, the sparsified linears see exactly the reference's x' and W', o and
  down see the same inputs and column norms as in the reference (rotating a weight's
  output side leaves its column norms unchanged), and the layer-output error the greedy
  measures is the same (a rotation keeps norms). It costs one d×d product per block
  input and leaves the residual path alone. Dense logits are unchanged (tested).
  ``orthogonalize: false`` (named option, ablation). RMSNorm models with gated MLPs only
  (Llama, Mistral, Qwen2, Gemma 3; Gemma's (1 + w) scale is folded too).

Score: ``score: reference`` (default) scores only k and gate with their column norms
and the other linears by |x_i|, as the released code does (``*_norm_by_column``);
``score: paper`` (named option) uses every linear's own column norms, the paper's text.

Remaining deviations:
- The reference's ``fuse_layernorm`` also subtracts each embedding row's mean (a
  LayerNorm step that changes an RMSNorm model's outputs); we don't (no option).
- Greedy: a 1001-point quantile table per projection (linear interpolation) instead of
  the histogram of every fp16 value; interpolation between steps instead of the closest
  step; levels capped at 1; the error on ``greedy_sequences`` (1) calibration sequences
  of ``data.calibration.seq_len`` tokens instead of 20 samples (CPU cost); the path up
  to ``greedy_max`` 0.8 instead of 0.66 (so 0.7 can be requested); P from the model's
  linears instead of ``weight_dict``.
- keep = round((1 − s_p)·d) (the reference floors); the reference's first 1% of a
  sequence stays dense (here: ``prefill.policy``, one setting for every method).
"""
from __future__ import annotations

import torch

from ..core.errors import ConfigError
from . import SPARSIFIERS
from .base import MLPInputRules, Sparsifier, TopKRule, topk_mask
from .teal import (
    LINEARS_OF,
    PROJ_NAMES,
    greedy_trajectory,
    interp_threshold,
    levels_at,
    quantile_table,
    validate_greedy,
)

PROJECTIONS = PROJ_NAMES


@SPARSIFIERS.register("wina")
class WINA(Sparsifier):
    input_projections = PROJECTIONS
    sparsity_unit = "linear_inputs"
    SCORES = ("paper", "reference")
    ALLOCATIONS = ("greedy", "uniform")
    # every key that changes the levels: the greedy runs on the transformed weights' scores
    calibration_params = ("sparsity", "allocation", "score", "orthogonalize", "greedy_step", "greedy_max",
                          "greedy_sequences", "greedy_error")
    greedy_version = 1  # bump when the greedy path changes

    def __init__(self, cfg):
        super().__init__(cfg)
        self._norms: dict[tuple[int, str], torch.Tensor | None] = {}
        self.levels: torch.Tensor | None = None  # [layers, linears] (greedy allocation)
        self._level_rows = (None, [])  # (levels tensor, its rows as Python floats)
        self._search: dict[tuple[int, str], float] | None = None  # thresholds while the greedy runs
        self._rules: dict = {}  # (layer, proj) → (levels tensor, its TopKRule; False: dense)
        self._mlp_rules: dict = {}  # layer → (levels tensor, its MLPInputRules)

    @property
    def allocation(self) -> str:
        # A config without the key predates the greedy allocation (uniform); every shipped
        # config (conf/sparsifier/wina.yaml) sets it, to greedy.
        return self.cfg.get("allocation", "uniform")

    @property
    def needs_calibration(self) -> bool:
        return self.allocation == "greedy"

    def validate(self):
        super().validate()
        if self.cfg.get("score", "reference") not in self.SCORES:
            raise ConfigError(f"sparsifier.score={self.cfg.score} is unknown; use one of: {', '.join(self.SCORES)}")
        validate_greedy(self.cfg, self.sparsity, self.allocation, self.ALLOCATIONS, units=False)

    def attach(self, controller, model):
        self._norms, self._search, self._rules, self._mlp_rules = {}, None, {}, {}
        if self.cfg.get("orthogonalize", False):
            orthogonalize(controller.sites)

    # ------------------------------------------------------------ score
    def column_norms(self, site, proj: str) -> torch.Tensor | None:
        key = (site.layer_idx, proj)
        if key not in self._norms:
            use = self.cfg.get("score", "reference") == "paper" or proj in ("k", "gate")
            w = site.projection(proj).weight.detach()
            self._norms[key] = w.float().norm(dim=0).to(w.dtype) if use else None
        return self._norms[key]

    def score(self, inp) -> torch.Tensor:
        """|x_i|·‖W[:, i]‖₂ (|x_i| where the score ignores the weights)."""
        c = self.column_norms(inp.site, inp.proj)
        return inp.x.abs() if c is None else inp.x.abs() * c

    def level(self, layer: int, proj: str) -> float:
        """One linear's level as a Python float; the levels are read back once per tensor,
        not per call (a per-call read of a device tensor would sync the device)."""
        if self.levels is None:
            return self.sparsity
        src, rows = self._level_rows
        if src is not self.levels:
            src, rows = self.levels, self.levels.tolist()
            self._level_rows = (src, rows)
        return rows[layer][PROJ_NAMES.index(proj)]

    # ------------------------------------------------------------ calibration (greedy)
    def calibrate(self, controller, model, batches):
        n = len(controller.sites)
        if self.sparsity == 0.0:  # levels are read as Python floats: CPU bookkeeping
            return {"levels": torch.zeros(n, len(PROJ_NAMES), device="cpu")}
        key = {"version": self.greedy_version, "score": self.cfg.get("score", "reference"),
               "orthogonalize": bool(self.cfg.get("orthogonalize", False)),
               "greedy_error": self.cfg.get("greedy_error", "reference"),
               **{k: self.cfg.get(k) for k in ("greedy_step", "greedy_max", "greedy_sequences")}}
        traj = self.artifacts.get("wina-greedy", key,
                                  lambda: self.greedy_trajectory(controller, model, list(batches), key))
        levels = torch.stack([levels_at(traj["effective"][i], traj["levels"][i], self.sparsity) for i in range(n)])
        return {"levels": levels}

    def greedy_trajectory(self, controller, model, batches, key: dict | None = None) -> dict[str, torch.Tensor]:
        """TEAL's per-linear greedy with WINA's score: levels[layer, step, linear] at
        effective[layer, step] (block sparsity), on the dense model's layer inputs; with
        ``key`` each layer's path is cached as it is found."""
        from .base import dense_linear_inputs

        gen = torch.Generator().manual_seed(0)  # CPU: the same subsample on every device

        def prepare(i, run_layer):  # a quantile table of the score per projection
            vals = dense_linear_inputs(controller, run_layer, i, lambda inp: self.score(inp).detach().reshape(-1).float())
            # on the CPU: the greedy reads a few entries per trial as Python floats
            return {p: quantile_table(torch.cat(v), gen).cpu() for p, v in vals.items()}

        def apply(i, tables, levels):
            for u, s in levels.items():
                for p in LINEARS_OF[u]:
                    if p in tables:
                        self._search[(i, p)] = interp_threshold(tables[p], s)

        self._search = {}
        try:
            return greedy_trajectory(
                controller, model, batches, units="projection", step=float(self.cfg.get("greedy_step", 0.025)),
                top=float(self.cfg.get("greedy_max", 0.8)), sequences=int(self.cfg.get("greedy_sequences", 1)),
                error=self.cfg.get("greedy_error", "reference"), prepare=prepare, apply=apply,
                layer_cache=None if key is None else
                lambda i, compute: self.artifacts.get("wina-greedy-layer", {**key, "layer": i}, compute))
        finally:
            self._search = None

    def load_state(self, state):
        self.levels = state.get("levels")

    # ------------------------------------------------------------ inference
    def input_mask(self, inp):
        if self._search is not None:  # the greedy's trials: a threshold on the score (greedyopt.py)
            t = self._search.get((inp.layer_idx, inp.proj), -1.0)
            return None if t < 0 else self.score(inp) > t
        s = self.level(inp.layer_idx, inp.proj)
        if s <= 0.0:
            return None
        keep = int(round((1.0 - s) * inp.x.shape[-1]))
        return topk_mask(self.score(inp), keep)

    def input_mask_rule(self, inp):
        """The top-k of the score as a rule a kernel applies in place (fp32 inputs: the kernel
        scores in float32, as ``score`` does then); None during the greedy's trials (a
        threshold on the score) and for dense linears."""
        if self._search is not None or inp.x.dtype != torch.float32:
            return None
        levels, rule = self._rules.get((inp.site.layer_idx, inp.proj), (None, None))
        if levels is not self.levels or rule is None:
            rule = self._linear_rule(inp.site, inp.proj)
        return rule or None

    def _linear_rule(self, site, proj: str) -> TopKRule | bool:
        """One linear's ``TopKRule`` (False: dense), made once per linear and levels tensor."""
        s = self.level(site.layer_idx, proj)
        c = self.column_norms(site, proj)
        rule = False if s <= 0.0 else TopKRule(int(round((1.0 - s) * site.projection(proj).in_features)),
                                               None if c is None else c.float().contiguous())
        self._rules[(site.layer_idx, proj)] = (self.levels, rule)
        return rule

    def mlp_input_rules(self, site, x):
        if self._search is not None or x.dtype != torch.float32:
            return None
        levels, found = self._mlp_rules.get(site.layer_idx, (None, None))
        if found is None or levels is not self.levels:
            projs = ("gate", "up", "down") if site.kind == "gated" else (None, "up", "down")
            found = MLPInputRules(*[None if p is None else self._linear_rule(site, p) or None for p in projs])
            self._mlp_rules[site.layer_idx] = (self.levels, found)
        return found

    def describe(self):
        if self.levels is None:
            return {}
        return {f"wina_level/{p}": self.levels[:, k].tolist() for k, p in enumerate(PROJ_NAMES)}


def _norm_scale(norm: torch.nn.Module) -> tuple[torch.Tensor, callable]:
    """The RMSNorm's effective elementwise scale γ, and a function that makes it 1."""
    w = norm.weight.detach()
    if "Gemma" in type(norm).__name__:  # Gemma's RMSNorm scales by (1 + weight)
        return (1.0 + w.float()), lambda: norm.weight.data.zero_()
    return w.float(), lambda: norm.weight.data.fill_(1.0)


@torch.no_grad()
def orthogonalize(sites) -> None:
    """WINA's tensor transform on the block inputs (see the module docstring): fold each
    RMSNorm's scale into the linears it feeds, then rotate q/k/v by Q_a (SVD of the folded
    W_k) and gate/up by Q_m (SVD of the folded W_gate), the norm's output by the same Q."""
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
