"""SCAP (Chua, Pan & Jain, ENLSP @ NeurIPS 2024, "Post-Training Statistical Calibration for
Higher Activation Sparsity"): Statistical Calibrated Activation Pruning with Mode-Centering.

For a linear y = W x + b whose input is sparsified, one scalar m (the mode of the input's
distribution over calibration tokens *and* channels) and one threshold t are calibrated
per linear. At inference

    x' = x − m,   keep channel i iff |x'_i| > t,   y = W (x' ⊙ mask) + (b + W·m·1)

so an input whose distribution peaks away from 0 (GELU's negative lobe at the fc2 input)
is pruned around its peak, and the output is exact for any mask on the kept channels and
exact at sparsity 0. W·m·1 is one vector per linear (computed once in float64 and cached),
added like a bias: it reads no weights per token.

What the reference does (github.com/IntelLabs/SCAP at f78b9ea):
- ``calibrate.py`` (``SCAPCalibrationHook``): a pre-forward hook on every configured
  linear, configured by triplets (layer type, demode method, sparsity); layer types from
  ``utils/modules.py`` ``infer_module_name``: q/k/v/o/up/gate/down for Llama, Mistral and
  Gemma, up/down for MPT and Falcon. The released configs (``scripts/01.calibration.bash``,
  README) use the FFN only: Llama-2-7B ``up,zero,0.35,gate,zero,0.35,down,zero,0.55``,
  Mistral-7B ``up,zero,0.3,gate,zero,0.3,down,zero,0.7``, MPT-7B ``down,kde,0.5``,
  Falcon-7B ``down,median,0.5``: attention linears are supported but unused, and
  mode-centering is applied only to the down (fc2) input of the GELU models.
- Calibration: one fp32 forward of 64 C4 samples (≤ 256 tokens). Each hook calibrates on
  its first call and sparsifies its input right away, so every linear is calibrated on
  what the already-sparse model upstream feeds it (the layers below *and* the earlier
  linears of its own block).
- Mode (``_calc_candidate_modes``), one scalar per linear: ``zero`` → 0; ``median`` →
  ``x.median()``; ``kde`` → three candidates, the peak of seaborn's ``kdeplot`` (Gaussian
  KDE, Scott's bandwidth × ``bw_adjust`` 0.5, ``gridsize`` 2000 points over [min, max],
  ``cut`` 0) on strided subsamples of ≈100k, 200k and 300k values; the candidate whose
  sparsified output is closest in L2 to the dense output over all calibration tokens
  (bias excluded) wins (``_calibrate``).
- Threshold (``_calc_threshold``): ``np.quantile`` (linear interpolation) of |x − m| at the
  target sparsity; inference (``evaluate.py`` ``SCAPLinear``) zeroes |x − m| ≤ t and adds
  W·m·1 to the bias.

What we do (defaults in conf/sparsifier/scap.yaml):
- ``projections`` (default gate, up, down: the released Llama-2 / Mistral configs): the
  linears whose inputs are sparsified, each with its own mode and threshold; any of
  q, k, v, o, gate, up, down. Sparsity is parameter-weighted over them
  (``sparsity_unit = linear_inputs``).
- ``center`` (default [down]): the linears that are mode-centred, with ``estimator``
  ``kde`` (default; MPT's setting) or ``median`` (Falcon's); the others use m = 0 (the
  reference's ``zero``). ``center=[]`` is exactly the released Llama-2 / Mistral configs.
  On SiLU/GeLU-gated models h = act(gate x)·up x is centred at 0, and the default differs
  from ``center=[]`` only by a small shift. Measured on SmolLM2-135M (dense model, 2048
  calibration tokens): the three KDE candidates of the down input lie within ±0.025 of 0
  in 28 of 30 layers (thresholds at s = 0.5: 0.015–0.25; the last two layers, whose
  inputs carry massive activations, get a grid too coarse for the peak: up to 0.47), and
  m = 0 gives an output error within 0.4% of the best candidate's in every layer.
- Calibration reproduces the reference's order exactly: layer by layer with the layers
  below sparse, and three refits inside the block (o on the sparse q/k/v, gate/up on the
  sparse attention output, down on the sparse gate/up), ``base.calibrate_layerwise``.

Deviations (no option unless named):
- One ``sparsity`` for every listed linear; the reference sets one level per layer type
  by hand (Llama-2-7B: gate/up 0.35, down 0.55).
- KDE: the same bandwidth, grid and candidates, but the density at each grid point sums
  only the samples within ±6 bandwidths (each dropped term < e⁻¹⁸ of a kernel's peak),
  instead of scipy's full O(samples × grid) sum; the strided step is max(1, n // N) (the
  reference's n // N is 0, an error, below N values).
- Calibration text: ours (``data.calibration``) instead of 64 C4 samples.
- Sparsity 0 keeps every channel (threshold −1); the reference's 0-quantile would still
  drop the smallest |x − m|. The fold-back path runs all the same, so sparsity 0 equals the
  dense model up to float rounding, not bit for bit.
- W·m·1 in float64 (the reference: ``F.linear`` in the model's dtype).
- Which positions are sparse is ``prefill.policy``, one setting for every method
  (``evaluate.py`` sparsifies every position, = ``all``; ``inference_demo.py`` keeps
  multi-token calls dense, = ``decode_only``).
"""
from __future__ import annotations

import math

import torch
from omegaconf import OmegaConf

from ..core.errors import ConfigError
from ..models.patching import LinearInput
from . import SPARSIFIERS
from .base import BLOCK_INPUT_STAGES, Sparsifier, calibrate_layerwise
from .teal import PROJ_NAMES

ESTIMATORS = ("kde", "median")
KDE_SAMPLES = (100_000, 200_000, 300_000)  # the reference's three subsample sizes
KDE_BW_ADJUST = 0.5  # seaborn kdeplot(bw_adjust=0.5)
KDE_GRIDSIZE = 2000  # seaborn kdeplot(gridsize=2000, cut=0): grid over [min, max]
KDE_TRUNCATE = 6.0  # kernel support in bandwidths
KDE_CHUNK = 1 << 22  # kernel evaluations per tensor op


def strided_sample(values: torch.Tensor, n: int) -> torch.Tensor:
    """Every (len // n)-th value (≥ n values), as the reference subsamples for its KDE."""
    flat = values.reshape(-1)
    return flat[:: max(1, flat.numel() // n)]


@torch.no_grad()
def kde_mode(samples: torch.Tensor, bw_adjust: float = KDE_BW_ADJUST, gridsize: int = KDE_GRIDSIZE) -> float:
    """The grid point of highest density of a Gaussian KDE of ``samples``: bandwidth
    std(ddof=1)·n^(−1/5)·bw_adjust (scipy's Scott factor, as seaborn uses it), evaluated
    on ``gridsize`` points spanning [min, max]; each sample contributes to the grid points
    within ±KDE_TRUNCATE bandwidths."""
    x = samples.reshape(-1).double()
    n = x.numel()
    lo, hi = float(x.min()), float(x.max())
    if n < 2 or hi <= lo:
        return lo
    bw = float(x.std()) * n ** (-0.2) * bw_adjust
    step = (hi - lo) / (gridsize - 1)
    grid = torch.linspace(lo, hi, gridsize, dtype=torch.float64, device=x.device)
    reach = int(math.ceil(KDE_TRUNCATE * bw / step))
    offsets = torch.arange(-reach, reach + 1, device=x.device)
    nearest = ((x - lo) / step).round().long()
    density = torch.zeros(gridsize, dtype=torch.float64, device=x.device)
    chunk = max(1, KDE_CHUNK // offsets.numel())
    for start in range(0, n, chunk):  # [samples × offsets] at a time: few, large tensor ops
        j = nearest[start:start + chunk, None] + offsets
        inside = (j >= 0) & (j < gridsize)
        j = j.clamp_(0, gridsize - 1)
        z = (grid[j] - x[start:start + chunk, None]) / bw
        density.index_add_(0, j.reshape(-1), (torch.exp(-0.5 * z * z) * inside).reshape(-1))
    return float(grid[int(density.argmax())])


def kde_candidates(values: torch.Tensor) -> list[float]:
    """The reference's three KDE modes (subsamples of ≈100k, 200k, 300k values; below
    100k values the three subsamples are all the values, and one KDE is computed)."""
    flat = values.reshape(-1)
    steps = [max(1, flat.numel() // n) for n in KDE_SAMPLES]
    modes = {step: kde_mode(flat[::step]) for step in dict.fromkeys(steps)}
    return [modes[step] for step in steps]


def linear_quantile(values: torch.Tensor, q: float) -> float:
    """``np.quantile(values, q)`` (linear interpolation between order statistics)."""
    flat = values.reshape(-1)
    n = flat.numel()
    pos = q * (n - 1)
    k = int(math.floor(pos))
    frac = pos - k
    a = float(flat.kthvalue(k + 1).values)
    if frac == 0.0 or k + 1 >= n:
        return a
    b = float(flat.kthvalue(k + 2).values)
    return a + frac * (b - a)


def centred_threshold(x: torch.Tensor, mode: float, sparsity: float) -> float:
    """t such that |x − mode| ≤ t holds for a fraction ``sparsity`` of the values; −1
    (keep everything) at sparsity 0."""
    if sparsity <= 0.0:
        return -1.0
    return linear_quantile((x - mode).abs(), sparsity)


def dropped_output_error(x: torch.Tensor, weight: torch.Tensor, mode: float, threshold: float) -> float:
    """‖W x − W(sparse(x − m) + m)‖₂ over all rows: the reference's KDE candidate score
    (bias excluded), computed as ‖W((x − m) ⊙ dropped)‖."""
    xc = x - mode
    dropped = xc * (xc.abs() <= threshold).to(xc.dtype)
    return float((dropped @ weight.t().to(dropped.dtype)).norm())


def _as_list(v) -> list:
    if OmegaConf.is_list(v) or isinstance(v, (list, tuple)):
        return list(v)
    return v


@SPARSIFIERS.register("scap")
class SCAP(Sparsifier):
    needs_calibration = True
    calibration_params = ("sparsity", "projections", "center", "estimator")
    input_projections = ("gate", "up", "down")  # the default; each instance sets its own
    sparsity_unit = "linear_inputs"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.input_projections = tuple(_as_list(cfg.get("projections", ["gate", "up", "down"])))
        self.center = frozenset(_as_list(cfg.get("center", ["down"])))
        self.modes: torch.Tensor | None = None  # [layers, 7] (PROJ_NAMES columns)
        self.thresholds: torch.Tensor | None = None
        self._sites = []
        self._fold: dict[tuple[int, str], tuple[float, torch.Tensor]] = {}
        self._params: dict[tuple[int, str], tuple[float, float]] = {}  # (mode, threshold) as floats
        self._last = (None, None, None)

    def validate(self):
        super().validate()
        projs = _as_list(self.cfg.get("projections", ["gate", "up", "down"]))
        if not isinstance(projs, list) or not projs or any(p not in PROJ_NAMES for p in projs) or len(set(projs)) != len(projs):
            raise ConfigError(f"sparsifier.projections={projs} must be a non-empty list of distinct names from "
                              f"{', '.join(PROJ_NAMES)}, e.g. sparsifier.projections=[gate,up,down]")
        center = _as_list(self.cfg.get("center", ["down"]))
        if not isinstance(center, list) or any(p not in projs for p in center):
            raise ConfigError(f"sparsifier.center={center} must list projections from sparsifier.projections={projs} "
                              "(the linears whose input is mode-centred), e.g. sparsifier.center=[down] or []")
        if self.cfg.get("estimator", "kde") not in ESTIMATORS:
            raise ConfigError(f"sparsifier.estimator={self.cfg.get('estimator')} is unknown; use one of: {', '.join(ESTIMATORS)}")

    def attach(self, controller, model):
        self._sites = controller.sites
        self._reset()

    def _reset(self):
        self._fold, self._params, self._last = {}, {}, (None, None, None)

    # ------------------------------------------------------------ calibration
    def fit_linear(self, x: torch.Tensor, weight: torch.Tensor, centred: bool) -> tuple[float, float]:
        """(mode, threshold) of one linear from its calibration inputs ``x`` [tokens, d_in]."""
        x = x.float()
        if not centred:
            candidates = [0.0]
        elif self.cfg.get("estimator", "kde") == "median":
            candidates = [float(x.reshape(-1).median())]
        else:
            candidates = kde_candidates(x)
        if len(set(candidates)) == 1:
            mode = candidates[0]
        else:  # the reference: the candidate whose sparse output is closest to the dense one
            w = weight.detach().float()
            scored = sorted((dropped_output_error(x, w, m, centred_threshold(x, m, self.sparsity)), m)
                            for m in candidates)
            mode = scored[0][1]
        return mode, centred_threshold(x, mode, self.sparsity)

    def calibrate(self, controller, model, batches):
        self.attach(controller, model)
        n = len(controller.sites)
        # written and read as Python floats (``params``): CPU bookkeeping; load_state puts
        # the saved state on the model's device
        self.modes = torch.zeros(n, len(PROJ_NAMES), dtype=torch.float64, device="cpu")
        self.thresholds = torch.full((n, len(PROJ_NAMES)), -1.0, dtype=torch.float64, device="cpu")

        def fit(i, _values, linear_values, _probe):
            site = controller.sites[i]
            for proj, vals in linear_values.items():
                k = PROJ_NAMES.index(proj)
                mode, t = self.fit_linear(torch.cat(vals), site.projection(proj).weight, proj in self.center)
                self.modes[i, k], self.thresholds[i, k] = mode, t
            self._reset()

        rows = lambda inp: inp.x.detach().reshape(-1, inp.x.shape[-1]).float()
        calibrate_layerwise(controller, model, list(batches), None, fit, linear_fn=rows,
                            block_refits=BLOCK_INPUT_STAGES - 1)
        return {"mode": self.modes.clone(), "threshold": self.thresholds.clone()}

    def load_state(self, state):
        self.modes, self.thresholds = state["mode"].double(), state["threshold"].double()
        self._reset()
        for site in self._sites:  # W·m·1 once per linear, before the first token
            for proj in self.input_projections:
                if proj in site.slots:
                    self.fold_vector(site.layer_idx, proj, site.projection(proj))

    # ------------------------------------------------------------ inference
    def params(self, layer: int, proj: str) -> tuple[float, float]:
        """(mode, threshold) of one linear, as Python floats (looked up once)."""
        hit = self._params.get((layer, proj))
        if hit is None:
            k = PROJ_NAMES.index(proj)
            hit = self._params[(layer, proj)] = (float(self.modes[layer, k]), float(self.thresholds[layer, k]))
        return hit

    def mode(self, layer: int, proj: str) -> float:
        return self.params(layer, proj)[0]

    def fold_vector(self, layer: int, proj: str, linear) -> torch.Tensor:
        """W·m·1 for this linear (float64 product, kept in the weight's dtype and device)."""
        m = self.mode(layer, proj)
        w = linear.weight
        hit = self._fold.get((layer, proj))
        if hit is None or hit[0] != m or hit[1].device != w.device or hit[1].dtype != w.dtype:
            vec = (w.detach().double().sum(dim=1) * m).to(dtype=w.dtype, device=w.device)
            hit = (m, vec)
            self._fold[(layer, proj)] = hit
        return hit[1]

    def centred(self, inp) -> torch.Tensor:
        """x − m for this linear (reused by the mask and the product; q/k/v and gate/up
        read one tensor, so a repeated (input, mode) pair is computed once)."""
        m = self.mode(inp.layer_idx, inp.proj)
        if m == 0.0:
            return inp.x
        last_x, last_m, last = self._last
        if last_x is inp.x and last_m == m:
            return last
        xc = inp.x - m
        self._last = (inp.x, m, xc)
        return xc

    def input_mask(self, inp):
        return self.centred(inp).abs() > self.params(inp.layer_idx, inp.proj)[1]

    def masked_linear(self, inp, linear, mask, backend):
        m = self.mode(inp.layer_idx, inp.proj)
        if m == 0.0:
            return backend.linear(inp, linear, mask)
        y = backend.linear(LinearInput(inp.site, inp.proj, self.centred(inp)), linear, mask)
        return y + self.fold_vector(inp.layer_idx, inp.proj, linear)

    def describe(self):
        if self.modes is None:
            return {}
        out = {}
        for p in self.input_projections:
            k = PROJ_NAMES.index(p)
            out[f"scap_mode/{p}"] = self.modes[:, k].tolist()
            out[f"scap_threshold/{p}"] = self.thresholds[:, k].tolist()
        return out
