"""LaRoSA (Liu, Xu et al., ICML 2025, "La RoSA: Enhancing LLM Efficiency via Layerwise
Rotated Sparse Activation").

Per decoder layer l an orthogonal Q_l (the eigenvectors of the calibration inputs'
second-moment matrix, i.e. PCA) rotates the input x of the attention block and of the
MLP; per token the k = round((1 − s_rot)·d) rotated channels with the largest |xQ| are
kept and the rest zeroed. The rotation is folded into the weights the rotated input
feeds (y = x Wᵀ = (xQ)(WQ)ᵀ), so a linear reads only the kept columns of W' = W Q:

    y = ((xQ) ⊙ m) (W Q)ᵀ + b,     m = top-k of |xQ| per token.

The inputs of o_proj and down_proj are not rotated: per token top-k of |x| at s_out.

What the reference does (github.com/alibaba/EfficientAI, ``larosa/``):
- Q (``gen_act/grab_acts_rotate_diff_Q_{llama,qwen}.py``): the dense model runs over
  10 × 2048 tokens of WikiText-2 train; per layer ``H = Σ XᵀX`` (fp64, the *uncentred*
  second moment, called the covariance) of the attention input (``input_layernorm``
  output: what q/k/v read) and, separately, of the MLP input (what gate/up read);
  ``perform_eigen_decomp`` adds 0.01·mean(diag H) to the diagonal and takes
  ``torch.linalg.eigh`` in fp64; the eigenvectors (columns) are Q, saved as
  ``self_attn/D.pt`` and ``mlp/D.pt``. Layer inputs propagate densely.
- Inference (``inference/modeling_llama_larosa.py``, ``modeling_qwen2_larosa.py``, run by
  ``scripts/ppl_test_larosa_*.py`` and the lm-eval script): ``LlamaDecoderLayer.__init__``
  loads only ``self_attn/D.pt`` and hands the same Q to attention and MLP
  (``self.mlp.Q = self.Q``). Attention: ``top_k_new(h @ Q, sparse_level_h1) @ Qᵀ`` feeds
  q/k/v; MLP: ``top_k_new(x @ Q, sparse_level_h1) @ Qᵀ`` feeds gate/up; o_proj's input
  ``top_k_new(attn_output, sparse_level_h2)`` and down_proj's ``top_k_new(act(gate)·up,
  sparse_level_h2)``, unrotated. ``top_k_new``: k = int((1 − s)·d) per token, keep |x| ≥
  the k-th largest. Rotations in fp64, rotated back before dense linears (the released
  code simulates; the paper folds Q into the weights and rotates the residual stream,
  with residual adapters Q_lᵀQ_{l+1} between layers).
- Levels: ``sparse_level_h1 = 0.8·s`` (q/k/v/gate/up), ``sparse_level_h2 = 1.2·s``
  (o/down), hard-coded, the same for every layer and model. The paper lists a grid
  search for these coefficients ("Algorithm 1, Grid Search for Optimal Sparsity
  Coefficients"); the released code has no search, only the two constants.
- Every position of every sequence is sparsified (no dense prefill).

What we do (defaults in conf/sparsifier/larosa.yaml):
- ``rotation: layer`` (default, the released code): one Q_l per layer from the attention
  input, applied to the attention input (q/k/v) and the MLP input (gate/up; OPT: fc1).
  ``rotation: block`` (named option): the MLP input gets its own Q from its own
  second moment (the ``mlp/D.pt`` the reference computes but does not load).
  ``rotation: none`` (named option, ablation): plain per-token top-k of |x| everywhere.
  Q is computed as the reference (Σ XᵀX in fp64 on the dense model, the same damping,
  fp64 ``eigh``), sorted by descending eigenvalue (the paper's order; the mask does not
  depend on it), and stored in fp32. As in the released code, the rotated x is the
  linear's actual input (the norm's scale γ applied; the paper's residual-stream form
  would fold γ into the weights instead).
- ``coefficients: [0.8, 1.2]`` (the released code's h1/h2 factors), normalised per layer
  by ``coefficient_norm``: both levels are one factor t times the coefficients
  (s_rot = c_rot·t, s_out = c_out·t, the authors' ratio kept); levels are capped at 1
  (under ``effective`` and ``params`` the excess moves to the other group):

  - ``none`` (default, the released code): t = s, the literal levels 0.8·s / 1.2·s, as the
    authors run it (≈0.92·s of channels dropped, parameter-weighted, on Llama-2-7B; 0.469
    at s = 0.5 on SmolLM2-135M). The rotations' dense cost is not counted against s, so the
    sparsity evaluator's ``sparsity/mean`` (channels dropped minus that cost) lands well
    below s (≈0.28 at s = 0.5 on SmolLM2-135M): it is reported beside every result.
  - ``effective`` (named deviation, our stricter accounting): the parameter-weighted
    fraction of channels dropped over the layer's masked linears, *minus* the rotations'
    dense cost C_l (below), equals ``sparsity``: t = (s·P + C_l) / (c_rot·P_rot +
    c_out·P_out), which is ``sparsity/mean`` (R-Sparse's budget (1 − s)·d_in·d_out includes
    its dense low-rank factors in the same way). At s = 0.5 on SmolLM2-135M it runs o/down
    at 88% and q/k/v/gate/up at 59%, harder than the method as published. Where
    s + C_l/P > 1 for some layer (dropping every channel would not pay for the
    rotations), attaching raises a ConfigError naming the largest reachable sparsity,
    min_l (1 − C_l/P_l) (≈0.81 on SmolLM2-135M, ≈0.78 on tiny-llama).
  - ``params`` (named option; the paper's own unit, TEAL's "effective sparsity" of the
    channels alone): the parameter-weighted fraction of channels dropped equals
    ``sparsity``, t = s·P / (c_rot·P_rot + c_out·P_out); the rotation cost is ignored, so
    ``sparsity/mean`` lands C_l/P below s (≈0.19 below on SmolLM2-135M: 2·576² / 3,538,944).
- ``coefficient_search: none`` (default, the released code). ``grid`` (named option, our
  reading of the paper's Algorithm 1, whose text we could not check): each c in
  ``coefficient_grid`` gives the pair (c, 2 − c) (mean 1, like 0.8/1.2), levels as
  above; the pair with the lowest perplexity on the last quarter of the calibration
  batches is kept (one pair for the model, like the released constants).
- Folding: W' = W Q (fp64 product, stored in the weight's dtype) is kept beside the
  model's W (the dense path and ``controller.dense()`` still use W), one copy for
  q/k/v/gate/up: ≈70% of a Llama-shaped decoder's linear weights again in memory. The backend
  gathers the kept columns of W' (every backend: dense, index_select, cached, fused).
- Keep counts are rounded (the reference floors) and exactly k channels are kept (the
  reference's ``≥`` keeps ties). xQ is computed in fp32 (the reference: fp64) and cast
  to the model dtype for the linear. The rotation of one input is computed once and
  shared by q/k/v (and by gate/up).
- Calibration text, sequence count and length: ``data.calibration`` (the same for every
  method) instead of 10 × 2048 WikiText-2 tokens; ``prefill.policy`` decides which
  positions are sparse (default: all, as the reference).

Cost accounting (``dense_cost``): each rotated input costs a dense d×d product per
token, xQ, whatever the mask: d² weights charged to the first rotated linear of the
attention block (q) and of the MLP (gate; OPT: fc1), so ``sparsity/mean`` reports the
dropped channels minus 2d²/P_block (C_l above; ``coefficient_norm: effective`` drops
more channels to pay for it). (The paper's residual-stream form pays one d×d
adapter per layer instead of two rotations; this per-input form needs no change to the
model's forward.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ..core.errors import ConfigError
from ..models.patching import LinearInput
from . import SPARSIFIERS
from .base import Sparsifier, calibration_perplexity
from .teal import PROJ_NAMES
from .base import topk_mask

# linears that read one rotated input, per group; o and down read unrotated inputs
ROTATED_GROUPS = {"attn": ("q", "k", "v"), "mlp": ("gate", "up")}
GROUP_OF = {p: g for g, ps in ROTATED_GROUPS.items() for p in ps}
OUT_PROJS = ("o", "down")
ROTATIONS = ("layer", "block", "none")
NORMS = ("effective", "params", "none")  # the first is the default
SEARCHES = ("none", "grid")
DAMP = 0.01  # the reference's damping: H + 0.01·mean(diag H)·I (eigenvectors unchanged)
ROTATION_VERSION = 1  # bump when the computation of Q changes


def _as_list(v):
    if OmegaConf.is_list(v) or isinstance(v, (list, tuple)):
        return list(v)
    return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def eigenbasis(h: torch.Tensor) -> torch.Tensor:
    """Q for one second-moment matrix H = Σ xᵀx: the eigenvectors of H + 0.01·mean(diag H)·I
    (fp64 ``eigh``, the reference's ``perform_eigen_decomp``), by descending eigenvalue."""
    h = h.double()
    h = h + DAMP * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    evals, evecs = torch.linalg.eigh(h)
    return evecs[:, evals.argsort(descending=True)]


def block_levels(c_rot: float, c_out: float, s: float, p_rot: float, p_out: float, norm: str,
                 cost: float = 0.0) -> tuple[float, float]:
    """(s_rot, s_out) for one block: coefficient·s (``norm == "none"``), or scaled by one
    factor so that the parameter-weighted fraction of channels dropped,
    (p_rot·s_rot + p_out·s_out) / (p_rot + p_out), equals s (``"params"``) or s plus the
    dense ``cost`` (weights read whatever the mask) over p_rot + p_out (``"effective"``:
    dropped channels minus cost equal s). Levels capped at 1, the excess moved to the
    other group; a target beyond 1 (unreachable) gives (1, 1)."""
    if s <= 0.0:
        return 0.0, 0.0
    if norm == "none":
        return min(c_rot * s, 1.0), min(c_out * s, 1.0)
    total = p_rot + p_out
    if norm == "effective" and total > 0:
        s = s + cost / total
    s = min(s, 1.0)
    if p_rot == 0 or p_out == 0:
        return s, s  # one group only: the whole budget is that group's
    t = s * total / (c_rot * p_rot + c_out * p_out)
    s_rot, s_out = c_rot * t, c_out * t
    if s_out > 1.0:
        s_out, s_rot = 1.0, (s * total - p_out) / p_rot
    elif s_rot > 1.0:
        s_rot, s_out = 1.0, (s * total - p_rot) / p_out
    return min(s_rot, 1.0), min(s_out, 1.0)


class FoldedLinear(nn.Module):
    """A linear with the rotation folded in (weight W Q, the original bias): what a
    backend reads for a rotated input (``weight``, ``bias``; callable for the dense path).
    Not part of the model (its bytes are not counted as the model's weights)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def in_features(self):
        return self.weight.shape[1]

    @property
    def out_features(self):
        return self.weight.shape[0]

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


@SPARSIFIERS.register("larosa")
class LaRoSA(Sparsifier):
    needs_calibration = True
    sparsity_unit = "linear_inputs"
    calibration_version = 1

    def __init__(self, cfg):
        super().__init__(cfg)
        self.input_projections = tuple(p for p in PROJ_NAMES if p in self._projections())
        self.q: dict[str, torch.Tensor] = {}  # "attn" / "mlp" -> [layers, d, d] (fp32)
        self.coefficients: tuple[float, float] = self._cfg_coefficients()
        self.search: dict[float, float] = {}
        self._sites = []
        self._reset_caches()

    # ------------------------------------------------------------ config
    def _projections(self) -> list[str]:
        return _as_list(self.cfg.get("projections", list(PROJ_NAMES))) or []

    def _cfg_coefficients(self) -> tuple[float, float]:
        c = _as_list(self.cfg.get("coefficients", [0.8, 1.2]))
        return float(c[0]), float(c[1])

    @property
    def rotation(self) -> str:
        return self.cfg.get("rotation", "layer")

    @property
    def norm(self) -> str:
        return self.cfg.get("coefficient_norm", NORMS[0])

    @property
    def search_mode(self) -> str:
        return self.cfg.get("coefficient_search", "none")

    def _grid(self) -> list[float]:
        return [float(c) for c in _as_list(self.cfg.get("coefficient_grid", [0.6, 0.7, 0.8, 0.9, 1.0]))]

    @property
    def calibration_params(self) -> tuple[str, ...]:
        # Q depends on the rotation only; the searched pair also on the sparsity and the grid
        base = ("rotation", "projections", "coefficient_search")
        return base + (("sparsity", "coefficient_grid", "coefficient_norm") if self.search_mode == "grid" else ())

    def validate(self):
        super().validate()
        projs = _as_list(self.cfg.get("projections", list(PROJ_NAMES)))
        if projs is None or not projs or any(p not in PROJ_NAMES for p in projs) or len(set(projs)) != len(projs):
            raise ConfigError(f"sparsifier.projections={self.cfg.get('projections')} must be a non-empty list of "
                              f"distinct names from {', '.join(PROJ_NAMES)}, e.g. sparsifier.projections=[q,k,v,o,gate,up,down]")
        for key, allowed in (("rotation", ROTATIONS), ("coefficient_norm", NORMS), ("coefficient_search", SEARCHES)):
            v = self.cfg.get(key, allowed[0])
            if v not in allowed:
                raise ConfigError(f"sparsifier.{key}={v} is unknown; use one of: {', '.join(allowed)}")
        c = _as_list(self.cfg.get("coefficients", [0.8, 1.2]))
        if c is None or len(c) != 2 or not all(_number(x) and 0 < x <= 10 for x in c):
            raise ConfigError(f"sparsifier.coefficients={self.cfg.get('coefficients')} must be two numbers in (0, 10] "
                              "(rotated inputs, o/down inputs), e.g. sparsifier.coefficients=[0.8,1.2]")
        g = _as_list(self.cfg.get("coefficient_grid", [0.6, 0.7, 0.8, 0.9, 1.0]))
        if g is None or not g or not all(_number(x) and 0 < x < 2 for x in g):
            raise ConfigError(f"sparsifier.coefficient_grid={self.cfg.get('coefficient_grid')} must be a non-empty list "
                              "of numbers in (0, 2) (each c gives the pair (c, 2 − c)), e.g. sparsifier.coefficient_grid=[0.7,0.8,0.9]")

    # ------------------------------------------------------------ state
    def _reset_caches(self):
        self._levels: dict[int, tuple[float, float]] = {}
        self._folded: dict[tuple[int, str], tuple[tuple, FoldedLinear]] = {}
        self._q_dev: dict[tuple[str, int, torch.device], torch.Tensor] = {}
        self._rot: dict[str, tuple[int, torch.Tensor, int, torch.Tensor]] = {}  # group -> (layer, x, version, xQ)

    def attach(self, controller, model):
        self._sites = controller.sites
        self._reset_caches()
        self.check_reachable()

    def max_sparsity(self) -> float:
        """The largest ``sparsity`` ``coefficient_norm: effective`` reaches on the attached
        model: every channel dropped, less the rotations, min over layers of 1 − C_l/P_l."""
        reach = []
        for site in self._sites:
            params = sum(site.projection(p).in_features * site.projection(p).out_features for p in self._wrapped(site))
            if params:
                reach.append(1.0 - self.rotation_cost(site.layer_idx) / params)
        return min(reach, default=1.0)

    def check_reachable(self):
        """Under ``coefficient_norm: effective``, refuse (one line) a sparsity the rotations'
        dense cost puts out of reach on this model."""
        if self.norm != "effective" or self.sparsity <= 0.0 or not self._sites:
            return
        top = self.max_sparsity()
        if self.sparsity > top + 1e-9:
            top_s = math.floor(top * 1000) / 1000
            raise ConfigError(
                f"sparsifier.sparsity={self.sparsity:g} is out of reach for larosa on this model under "
                f"sparsifier.coefficient_norm=effective: the rotations xQ cost {1 - top:.3f} of the masked linears' "
                f"weights, so the largest reachable sparsity is {top_s:.3f} (every channel dropped); use "
                f"sparsifier.sparsity≤{top_s:.3f}, or sparsifier.coefficient_norm=params (channels dropped, rotations not counted)")

    def load_state(self, state):
        self.q = {g: state[f"q_{g}"] for g in ("attn", "mlp") if f"q_{g}" in state}
        if "coefficients" in state:
            self.coefficients = tuple(float(c) for c in state["coefficients"].tolist())
            self.search = dict(zip(state["search_c"].tolist(), state["search_ppl"].tolist()))
        else:
            self.coefficients, self.search = self._cfg_coefficients(), {}
        self._reset_caches()

    # ------------------------------------------------------------ calibration
    def _leaders(self, site) -> dict[str, torch.nn.Module]:
        """The module whose input is each rotated group's input (hooked to capture it)."""
        return {"attn": site.attention["q"], "mlp": site.gate if site.kind == "gated" else site.up}

    @torch.no_grad()
    def second_moments(self, controller, model, batches) -> dict[str, list[torch.Tensor]]:
        """H = Σ xᵀx (fp64) of the attention input and of the MLP input per layer, on the
        dense model (every calibration token)."""
        groups = ("attn", "mlp") if self.rotation == "block" else ("attn",)
        h: dict[str, list] = {g: [None] * len(controller.sites) for g in groups}
        hooks = []

        def hook(g, i):
            def fn(_mod, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                h[g][i] = x.T @ x if h[g][i] is None else h[g][i] + x.T @ x
            return fn

        for site in controller.sites:
            for g, mod in self._leaders(site).items():
                if g in groups:
                    hooks.append(mod.register_forward_pre_hook(hook(g, site.layer_idx)))
        try:
            with controller.recording(None):
                for b in batches:
                    model(input_ids=b, use_cache=False, logits_to_keep=1)
        finally:
            for hk in hooks:
                hk.remove()
        return h

    def rotations(self, controller, model, batches) -> dict[str, torch.Tensor]:
        h = self.second_moments(controller, model, batches)
        return {f"q_{g}": torch.stack([eigenbasis(m).float().cpu() for m in ms]) for g, ms in h.items()}

    def calibrate(self, controller, model, batches):
        from tqdm.auto import tqdm

        batches = list(batches)
        self.attach(controller, model)
        state: dict[str, torch.Tensor] = {}
        if self.rotation != "none":
            state.update(self.artifacts.get("larosa-rotation", {"rotation": self.rotation, "version": ROTATION_VERSION},
                                            lambda: self.rotations(controller, model, batches)))
        if self.search_mode == "grid" and self.sparsity > 0:
            if len(batches) < 2:
                raise ConfigError("the LaRoSA coefficient search needs ≥ 2 calibration batches "
                                  "(data.calibration.num_sequences ≥ 2·batch_size)")
            self.load_state(state)
            val = batches[max(1, (3 * len(batches)) // 4):]
            search = {}
            for c in tqdm(sorted(set(self._grid())), desc="LaRoSA coefficient search", leave=False):
                self.coefficients = (c, 2.0 - c)
                self._levels = {}
                search[c] = calibration_perplexity(model, val)
            best = min(search, key=search.get)
            f64 = torch.float64  # the grid's values exactly (0.7 stays 0.7)
            cpu = "cpu"  # Python numbers of the saved state (read back as floats by load_state)
            state.update(coefficients=torch.tensor([best, 2.0 - best], dtype=f64, device=cpu),
                         search_c=torch.tensor(list(search), dtype=f64, device=cpu),
                         search_ppl=torch.tensor(list(search.values()), dtype=f64, device=cpu))
        return state

    # ------------------------------------------------------------ levels and costs
    def _wrapped(self, site) -> list[str]:
        return [p for p in self.input_projections if p in site.slots]

    def _rotated(self, proj: str) -> bool:
        return self.rotation != "none" and proj in GROUP_OF

    def levels(self, layer: int) -> tuple[float, float]:
        """(level of the rotated inputs q/k/v/gate/up, level of o/down) for one layer."""
        if layer not in self._levels:
            site = self._sites[layer]
            p_rot = p_out = 0
            for p in self._wrapped(site):
                lin = site.projection(p)
                n = lin.in_features * lin.out_features
                if p in GROUP_OF:
                    p_rot += n
                else:
                    p_out += n
            self._levels[layer] = block_levels(*self.coefficients, self.sparsity, p_rot, p_out, self.norm,
                                               cost=self.rotation_cost(layer))
        return self._levels[layer]

    def level(self, layer: int, proj: str) -> float:
        s_rot, s_out = self.levels(layer)
        return s_rot if proj in GROUP_OF else s_out

    def _first_rotated(self, site) -> dict[str, str]:
        """Per rotated group present in the layer: the first wrapped linear reading it."""
        first: dict[str, str] = {}
        if self.rotation != "none":
            for p in self._wrapped(site):
                if p in GROUP_OF:
                    first.setdefault(GROUP_OF[p], p)
        return first

    def rotation_cost(self, layer: int) -> int:
        """Weights read per token by the layer's rotations when sparse: d² per rotated input."""
        site = self._sites[layer]
        return sum(site.projection(p).in_features ** 2 for p in self._first_rotated(site).values())

    def dense_cost(self, layer: int, proj: str) -> int:
        """The per-token rotation xQ (d² weights) of each rotated input, charged to the
        first rotated linear reading it."""
        if not self._rotated(proj) or self.level(layer, proj) <= 0.0:
            return 0
        site = self._sites[layer]
        if self._first_rotated(site).get(GROUP_OF[proj]) != proj:
            return 0
        d = site.projection(proj).in_features
        return d * d

    # ------------------------------------------------------------ rotation
    def _group_q(self, group: str, layer: int, device) -> torch.Tensor:
        key = (group, layer, device)
        if key not in self._q_dev:
            source = self.q["mlp" if group == "mlp" and self.rotation == "block" else "attn"]
            self._q_dev[key] = source[layer].to(device=device, dtype=torch.float32)
        return self._q_dev[key]

    def rotated_input(self, inp) -> torch.Tensor:
        """xQ in fp32 for a rotated linear's input, computed once per input tensor and
        shared by the linears of its group (q/k/v, gate/up)."""
        group, x = GROUP_OF[inp.proj], inp.x
        hit = self._rot.get(group)
        if hit is not None and hit[0] == inp.layer_idx and hit[1] is x and hit[2] == x._version:
            return hit[3]
        xr = x.float() @ self._group_q(group, inp.layer_idx, x.device)
        self._rot[group] = (inp.layer_idx, x, x._version, xr)
        return xr

    def folded(self, layer: int, proj: str, linear) -> FoldedLinear:
        """W Q for a rotated linear (cached; rebuilt if the weight changed)."""
        w = linear.weight
        src = (w.data_ptr(), w._version, w.device, w.dtype)
        hit = self._folded.get((layer, proj))
        if hit is not None and hit[0] == src:
            return hit[1]
        q = self._group_q(GROUP_OF[proj], layer, w.device).double()
        fl = FoldedLinear((w.detach().double() @ q).to(w.dtype), linear.bias)
        self._folded[(layer, proj)] = (src, fl)
        return fl

    # ------------------------------------------------------------ inference
    def input_mask(self, inp):
        s = self.level(inp.layer_idx, inp.proj)
        if s <= 0.0:
            return None
        keep = int(round((1.0 - s) * inp.x.shape[-1]))
        score = self.rotated_input(inp).abs() if self._rotated(inp.proj) else inp.x.abs()
        return topk_mask(score, keep)

    def masked_linear(self, inp, linear, mask, backend):
        """y = ((xQ) ⊙ m)(W Q)ᵀ + b for the rotated inputs, through the backend on the
        folded weight; x ⊙ m through W for o/down."""
        if not self._rotated(inp.proj):
            return backend.linear(inp, linear, mask)
        xr = self.rotated_input(inp).to(inp.x.dtype)
        return backend.linear(LinearInput(inp.site, inp.proj, xr), self.folded(inp.layer_idx, inp.proj, linear), mask)

    # ------------------------------------------------------------ reporting
    def summary(self):
        out = {"coefficients": list(self.coefficients)}
        if self.search:
            out["coefficient_search_ppl"] = {f"{c:g}": p for c, p in self.search.items()}
        return out

    def describe(self):
        if not self._sites:
            return {}
        lv = [self.levels(i) for i in range(len(self._sites))]
        return {"larosa_level/rotated": [a for a, _ in lv], "larosa_level/out": [b for _, b in lv]}
