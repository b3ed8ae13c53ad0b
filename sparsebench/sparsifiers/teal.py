"""TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models"),
and the greedy per-matrix sparsity allocation that TEAL and WINA share.

What the reference does (github.com/FasterDecoding/TEAL):
- ``teal/self_attn.py`` / ``teal/mlp.py``: every linear has its own ``SparsifyFn``
  (``utils/utils.py``: keep |x| > icdf(0.5 + s/2) of a signed histogram); q, k and v
  read one distribution (the attention input, ``h1``), gate and up another (the MLP
  input), o and down their own. Each SparsifyFn holds its *own* sparsity level, so q, k
  and v (and gate, up) get their own thresholds from a shared distribution.
  ``gpt-fast/model.py`` (``_new_attn_forward``, ``_new_ffn_forward``) likewise takes
  ``thresh_q``, ``thresh_k``, ``thresh_v``, ``thresh_gate``, ``thresh_up`` apart
  (``gpt-fast/generate.py`` fills them from one uniform s: its kernels are for uniform
  sparsity; greedy levels are evaluated through the HF path, ``teal/ppl_test.py``).
- ``teal/greedyopt.py`` (``process_layer``): per decoder layer, on the dense model's
  input to that layer (``grab_acts.py``: 10 sequences × 2048 tokens), start all seven
  projections at 0 and repeatedly raise the one projection whose step gives the least
  block-output error until the parameter-weighted sparsity ``f`` reaches
  ``--target_sparsity`` (0.9 in ``scripts/greedyopt.bash``). Projection p steps by
  ``base_step_size / weight[p]`` where ``weight`` is p's parameter count relative to
  q_proj (hard-coded per model in ``weight_dict``), so every step adds
  ``base_step_size / Σ weight`` of block sparsity (``base_step_size`` 0.025 in the
  script, 0.05 the argparse default). The error (``calculate_activation_error``) is
  ``‖Y_dense − Y_sparse‖₂`` taken *along the sequence axis* over the last quarter of the
  positions, averaged over batch and hidden channels. Each step is a CSV row; a
  requested sparsity takes the row with the closest effective sparsity
  (``utils.get_layer_greedy_sparsities``), the same s for every layer.

What we do (defaults in conf/sparsifier/teal.yaml = the reference):
- ``greedy_units: projection`` — the greedy raises each of the seven linears on its own,
  as the reference; thresholds come from one |x| table per *input* (q/k/v share one
  table, gate/up one), each linear at its own level. ``greedy_units: group`` (named
  option, our earlier variant): q/k/v share one level, gate/up one, o and down their
  own, a greedy over four groups.
- ``greedy_step`` = the reference's ``base_step_size``: the level step of a linear with
  q_proj's parameter count; linear (or group) u steps by ``greedy_step · P_q / P_u``, so
  one step adds ``greedy_step · P_q / P_block`` of block sparsity (≈0.0023 on SmolLM2:
  the path to 0.8 has ≈340 steps × 7 trial forwards of one decoder layer, per layer).
  The reference takes P from a hard-coded table (its Llama-2 entries give k/v 1/8 of q
  although Llama-2-7B has no GQA); we count each linear's parameters.
- ``greedy_error: reference`` — the reference's error above. ``token`` (named option):
  the mean over tokens of each token's ‖ΔY‖₂ over all positions.
- ``allocation: uniform`` (named option): every linear at the requested sparsity.

Remaining deviations (no option unless named):
- Thresholds: exact order statistics of |x| (a 1001-point quantile table per input,
  linear interpolation between points) instead of the reference's histograms.
- The greedy path runs once per model up to ``greedy_max`` (0.8) and is cached; a
  request s is read off it by linear interpolation between the two steps around s
  (the reference takes the closest step, ± half a step).
- ``greedy_sequences`` (default 1) calibration sequences of ``data.calibration.seq_len``
  tokens for the greedy's error, instead of 10 × 2048 (CPU cost).
- Levels are capped at 1 (the reference may step a projection past 1).
- The reference's SparsifyFn leaves the first half of every multi-token sequence dense
  (greedy included); here ``prefill.policy`` decides, one setting for every method, and
  calibration sees every position sparse.
- Thresholds are then calibrated layer by layer with the layers below already sparse
  (TEAL uses the dense model throughout), and within a block each input's table is
  refitted on the inputs the sparse block gives it (o sees sparse q/k/v, down sees sparse
  gate/up): fitting on the dense block overshoots the requested sparsity at high
  sparsity. The greedy itself runs on the dense model's layer inputs, as the reference.

Sparsity is counted as the parameter-weighted fraction of dropped input channels over
the block's linears (``sparsity_unit = linear_inputs``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..core.errors import ConfigError
from . import SPARSIFIERS
from .base import BLOCK_INPUT_STAGES, LayerProbe, MLPInputRules, Sparsifier, ThresholdRule, calibrate_layerwise

PROJ_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
PROJ_INDEX = {p: i for i, p in enumerate(PROJ_NAMES)}
# linears that read one tensor (one |x| table each)
INPUTS = {"qkv": ("q", "k", "v"), "o": ("o",), "gateup": ("gate", "up"), "down": ("down",)}
INPUT_OF = {p: g for g, ps in INPUTS.items() for p in ps}
INPUT_NAMES = tuple(INPUTS)
# what the greedy raises: each linear (the reference) or each input group (ours)
UNITS = {"projection": {p: (p,) for p in PROJ_NAMES}, "group": INPUTS}
LINEARS_OF = {**UNITS["projection"], **INPUTS}  # a unit's name → its linears
# The columns of ``thresholds`` / ``levels``: one per linear. (Older names, kept for callers.)
GROUP_NAMES = PROJ_NAMES
GROUP_OF = {p: p for p in PROJ_NAMES}

# the table's sparsity levels: a CPU constant (indices into a table are moved to its device)
LEVELS = torch.linspace(0, 1, 1001, device="cpu")
MAX_VALUES = 1 << 20  # |x| samples per table: quantile error ~1e-3, a 1M sort per table
GREEDY_ERRORS = ("reference", "token")
TAIL_FRACTION = 0.25  # greedyopt.py's last_fraction


def quantile_table(values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """|x| at sparsity levels LEVELS (exact order statistics of a sample of ≤ 1M values)."""
    flat = values.reshape(-1).float().abs()
    if flat.numel() > MAX_VALUES:  # ``gen`` is a CPU generator: the same sample on every device
        flat = flat[torch.randint(flat.numel(), (MAX_VALUES,), generator=gen, device="cpu").to(flat.device)]
    srt = flat.sort().values
    idx = (LEVELS * (srt.numel() - 1)).round().long().to(srt.device)
    table = srt[idx]
    table[0] = -1.0  # sparsity 0 keeps everything, zeros included
    return table


def interp_threshold(table: torch.Tensor, s: float) -> float:
    """Threshold for sparsity ``s`` by linear interpolation in a quantile table."""
    if s <= 0:
        return -1.0
    pos = min(s, 1.0) * (LEVELS.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, LEVELS.numel() - 1)
    w = pos - lo
    return float(table[lo] * (1 - w) + table[hi] * w)


def _group_input(inp):
    """|x| of the first projection of each input group (q, o, gate, down; fc1 for OPT)."""
    first = {"q", "o", "gate", "down"} | ({"up"} if "gate" not in inp.site.slots else set())
    return inp.x.detach().reshape(-1).abs().float() if inp.proj in first else None


def levels_at(effective: torch.Tensor, levels: torch.Tensor, s: float) -> torch.Tensor:
    """Levels at block sparsity ``s`` on a greedy path (linear between steps);
    ``effective`` is non-decreasing, one entry per row of ``levels``."""
    k = int(torch.searchsorted(effective, torch.tensor(s, dtype=effective.dtype, device=effective.device),
                               right=True)) - 1
    k = max(0, min(k, effective.numel() - 1))
    if k + 1 >= effective.numel() or effective[k + 1] <= effective[k]:
        return levels[k]
    w = float((s - effective[k]) / (effective[k + 1] - effective[k]))
    return levels[k] * (1 - w) + levels[k + 1] * w


# ------------------------------------------------------------------ greedy (TEAL and WINA)

def linear_params(site) -> dict[str, int]:
    """Parameter count of each of the block's linears present in ``site`` (OPT: no gate)."""
    out = {}
    for p in PROJ_NAMES:
        if p in site.slots:
            lin = site.projection(p)
            out[p] = lin.in_features * lin.out_features
    return out


def unit_params(site, units: str) -> dict[str, int]:
    """Parameter count of each greedy unit of ``site`` (``units``: projection | group)."""
    per = linear_params(site)
    out = {}
    for u, projs in UNITS[units].items():
        n = sum(per.get(p, 0) for p in projs)
        if n:
            out[u] = n
    return out


def block_step(site, greedy_step: float) -> float:
    """Block-sparsity increment of one greedy step: the reference's ``base_step_size`` is
    the level step of a linear with q_proj's parameter count, so a step adds
    ``greedy_step · P_q / P_block``."""
    per = linear_params(site)
    return greedy_step * per["q"] / sum(per.values())


def greedy_error(dense: torch.Tensor, sparse: torch.Tensor, kind: str) -> float:
    """Block-output error of one probe batch ``[batch, seq, hidden]``."""
    diff = dense.float() - sparse.float()
    if kind == "reference":  # greedyopt.py: norm along the sequence, last quarter of positions
        start = int(diff.shape[1] * (1 - TAIL_FRACTION))
        return float(diff[:, start:].norm(dim=1).mean())
    return float(diff.norm(dim=-1).mean())


@torch.no_grad()
def greedy_path(params: dict[str, int], apply: Callable[[dict[str, float]], None], probe: LayerProbe,
                step: float, top: float, error: str = "reference") -> list[dict[str, float]]:
    """The block-wise greedy of TEAL's (and WINA's) ``greedyopt.py`` for one layer.

    ``params``: parameter count per unit (a linear or a group of linears); ``apply(levels)``
    sets the layer's masks for a level per unit; ``probe`` re-runs the layer on its dense
    inputs. Starting from 0, each step tries raising every unit by ``step · P_block / P_u``
    (so any step adds ``step`` of parameter-weighted block sparsity; levels are capped at
    1) and keeps the one with the least block-output error, until the block reaches
    ``top``. Returns the levels after each step, the all-zero start first.
    """
    total = sum(params.values())
    dense = probe.outputs(sparse=False)
    levels = {u: 0.0 for u in params}
    path = [dict(levels)]

    def effective(lv):
        return sum(params[u] * lv[u] for u in params) / total

    while effective(levels) < top - 1e-9:
        best = None
        for u in params:
            if levels[u] >= 1.0 - 1e-9:
                continue
            trial = dict(levels)
            trial[u] = min(1.0, levels[u] + step * total / params[u])
            apply(trial)
            err = sum(greedy_error(d, s, error) for d, s in zip(dense, probe.outputs(sparse=True)))
            if best is None or err < best[0]:
                best = (err, trial)
        if best is None:
            break
        levels = best[1]
        path.append(dict(levels))
    return path


# Linears whose output row p depends only on input row p *and* feeds only rows p of the
# layer output (k and v mix positions through attention, so they run on every row).
ROW_LOCAL_LINEARS = ("q", "o")


@contextlib.contextmanager
def scored_rows_only(site, seq_len: int, start: int):
    """While inside, layer ``site``'s MLP and its q and o projections compute only positions
    ``start:`` of each ``seq_len``-token sequence (zeros elsewhere). Exact for the rows
    the reference error reads (``greedy_error`` with ``reference``: the last quarter):
    the MLP and these linears act per position and nothing after them in the layer mixes
    positions, so those output rows are unchanged while most rows cost nothing (≈2× less
    per greedy trial forward). Uses forward hooks; the modules are not modified."""
    if start <= 0:
        yield
        return
    modules = [site.installed] + [site.attention[p] for p in ROW_LOCAL_LINEARS if p in site.attention]
    lead: dict[int, torch.Size] = {}

    def before(module, args):
        if not args:
            return None
        x = args[0]
        lead[id(module)] = x.shape[:-1]
        rows = x.reshape(-1, seq_len, x.shape[-1])[:, start:]  # OPT's MLP sees [batch·seq, hidden]
        return (rows.reshape(-1, x.shape[-1]) if x.dim() == 2 else rows, *args[1:])

    def after(module, _args, out):
        shape = lead.pop(id(module), None)
        if shape is None:
            return None
        rows = out.reshape(-1, seq_len - start, out.shape[-1])
        full = rows.new_zeros(rows.shape[0], seq_len, rows.shape[-1])
        full[:, start:] = rows
        return full.reshape(*shape, out.shape[-1])

    handles = [h for m in modules for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


ATTENTION_LINEARS = frozenset(("q", "k", "v", "o"))
REUSED_ATTENTION_OUTPUTS = 8  # a greedy step tries ≤ 4 attention settings; the winner's is reused next


class _ReusedAttention(torch.nn.Module):
    """Stands in for a layer's attention module while the greedy probes it: one forward per
    setting of the attention linears' levels, served again for the same setting."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.key = None  # the setting of the next forward; None: compute, keep nothing (dense reference)
        self.outputs: dict = {}

    def forward(self, *args, **kwargs):
        key = self.key
        if key is None:
            return self.inner(*args, **kwargs)
        out = self.outputs.pop(key, None)
        if out is None:
            out = self.inner(*args, **kwargs)
            if len(self.outputs) >= REUSED_ATTENTION_OUTPUTS:
                self.outputs.pop(next(iter(self.outputs)))  # least recently used
        self.outputs[key] = out
        return out

    def __getattr__(self, name):  # attributes the decoder layer may read off its attention module
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)


@contextlib.contextmanager
def attention_reuse(site, units):
    """While inside, layer ``site``'s attention module computes once per setting of the
    ``units`` that mask its linears (q, k, v, o) and serves that output again: the greedy's
    trials of an MLP unit (gate, up, down) leave the attention output unchanged (the probe
    feeds the same hidden states every time, and with ``use_cache`` off the module keeps no
    state), so those trials run the MLP alone. Yields ``before(levels)``, to call before each
    sparse forward with the levels it runs at. The module is put back on exit."""
    attention_units = tuple(u for u in units if ATTENTION_LINEARS & set(LINEARS_OF[u]))
    if site.attention_slot is None or not attention_units:
        yield lambda _levels: None
        return
    parent, attr = site.attention_slot
    inner = getattr(parent, attr)
    reused = _ReusedAttention(inner)

    def before(levels):
        reused.key = tuple(levels[u] for u in attention_units)

    setattr(parent, attr, reused)
    try:
        yield before
    finally:
        setattr(parent, attr, inner)


@torch.no_grad()
def greedy_trajectory(controller, model, batches, *, units: str, step: float, top: float,
                      sequences: int, error: str,
                      prepare: Callable[[int, Callable], object],
                      apply: Callable[[int, object, dict[str, float]], None],
                      layer_cache: Callable[[int, Callable], dict] | None = None) -> dict[str, torch.Tensor]:
    """Per layer, the greedy path from 0 to ``top`` block sparsity on the dense model's
    inputs to the layer (first ``sequences`` sequences of the first batch).

    ``prepare(i, run_layer)`` returns what ``apply(i, prepared, levels)`` needs to set
    layer i's masks (e.g. quantile tables). Returns ``levels[layer, step, column]`` (one
    column per linear, PROJ_NAMES) and ``effective[layer, step]`` (block sparsity); a
    layer whose path is shorter repeats its last step. ``layer_cache(i, compute)`` keeps
    each layer's path as it is found (a stopped run resumes from the last finished
    layer); layers are independent (dense inputs). With
    the reference error only the scored rows are computed where that is exact
    (``scored_rows_only``), and a trial of an MLP unit reuses the attention output of its
    setting (``attention_reuse``).
    """
    from tqdm.auto import tqdm

    from .base import capture_layer_inputs

    run_layer, _ = capture_layer_inputs(controller, model, batches)
    paths = []
    def layer_path(i):
        site = controller.sites[i]
        params = unit_params(site, units)
        prepared = prepare(i, run_layer)
        hidden = run_layer.dense_input(i, 0)[:sequences]
        probe = LayerProbe(controller, i, run_layer, [hidden])
        seq_len = hidden.shape[1]
        start = int(seq_len * (1 - TAIL_FRACTION)) if error == "reference" else 0
        with scored_rows_only(site, seq_len, start), attention_reuse(site, params) as before:
            def set_levels(lv):
                before(lv)
                apply(i, prepared, lv)
            path = greedy_path(params, set_levels, probe, block_step(site, step), top, error)
        per = linear_params(site)
        total = sum(per.values())
        # the path is Python floats: CPU bookkeeping (cached as an artifact, read as floats)
        rows = [torch.tensor([next((lv[u] for u in lv if p in LINEARS_OF[u]), 0.0) for p in PROJ_NAMES],
                             device="cpu") for lv in path]
        eff = [sum(per.get(p, 0) * float(r[k]) for k, p in enumerate(PROJ_NAMES)) / total for r in rows]
        return {"levels": torch.stack(rows), "effective": torch.tensor(eff, dtype=torch.float64, device="cpu")}

    for i in tqdm(range(len(controller.sites)), desc="greedy allocation", leave=False):
        one = layer_cache(i, lambda i=i: layer_path(i)) if layer_cache is not None else layer_path(i)
        paths.append((one["levels"], one["effective"]))
    n = max(len(e) for _, e in paths)
    levels = torch.zeros(len(paths), n, len(PROJ_NAMES), device="cpu")  # CPU bookkeeping, as above
    effective = torch.zeros(len(paths), n, dtype=torch.float64, device="cpu")
    for i, (rows, eff) in enumerate(paths):
        levels[i, : len(rows)], levels[i, len(rows):] = rows, rows[-1]
        effective[i, : len(eff)], effective[i, len(eff):] = eff, eff[-1]
    return {"effective": effective, "levels": levels}


def validate_greedy(cfg, sparsity: float, allocation: str, allocations: tuple[str, ...], units: bool = True) -> None:
    """The allocation settings TEAL and WINA share (one-line errors naming the setting)."""
    if allocation not in allocations:
        raise ConfigError(f"sparsifier.allocation={allocation} is unknown; use one of: {', '.join(allocations)}")
    step = cfg.get("greedy_step", 0.025)
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 0.5:
        raise ConfigError(f"sparsifier.greedy_step={step} must be in (0, 0.5], e.g. sparsifier.greedy_step=0.025")
    top = cfg.get("greedy_max", 0.8)
    if allocation == "greedy" and (
            isinstance(top, bool) or not isinstance(top, (int, float)) or not sparsity <= top < 1):
        raise ConfigError(f"sparsifier.greedy_max={top} must be in [sparsity, 1): the greedy path is computed up to it")
    n = cfg.get("greedy_sequences", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"sparsifier.greedy_sequences={n} must be a positive integer, e.g. sparsifier.greedy_sequences=1")
    err = cfg.get("greedy_error", "reference")
    if err not in GREEDY_ERRORS:
        raise ConfigError(f"sparsifier.greedy_error={err} is unknown; use one of: {', '.join(GREEDY_ERRORS)}")
    if units and cfg.get("greedy_units", "projection") not in UNITS:
        raise ConfigError(f"sparsifier.greedy_units={cfg.get('greedy_units')} is unknown; use one of: {', '.join(UNITS)}")


# ------------------------------------------------------------------ TEAL

@SPARSIFIERS.register("teal")
class TEAL(Sparsifier):
    needs_calibration = True
    calibration_params = ("sparsity", "allocation", "greedy_units", "greedy_step", "greedy_max",
                          "greedy_sequences", "greedy_error")
    input_projections = PROJ_NAMES
    sparsity_unit = "linear_inputs"
    # 3: one level and threshold per linear (7 columns), the reference's per-projection greedy
    calibration_version = 3
    greedy_version = 2  # bump when the greedy path changes (2: per-linear units, reference step and error)
    ALLOCATIONS = ("greedy", "uniform")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.thresholds: torch.Tensor | None = None  # [layers, linears]
        self.levels: torch.Tensor | None = None  # [layers, linears] sparsity per linear
        self._last = (None, None, None)
        self._rows = (None, [], [], [])  # (thresholds tensor, its rows as Python floats, their rules, per-MLP rules)

    def validate(self):
        super().validate()
        validate_greedy(self.cfg, self.sparsity, self.cfg.get("allocation", "greedy"), self.ALLOCATIONS)

    @property
    def units(self) -> str:
        return self.cfg.get("greedy_units", "projection")

    @property
    def greedy_error(self) -> str:
        return self.cfg.get("greedy_error", "reference")

    # ------------------------------------------------------------ calibration
    def group_params(self, site) -> dict[str, int]:
        """Parameter count per greedy unit (a linear, or a group with ``greedy_units: group``)."""
        return unit_params(site, self.units)

    def calibrate(self, controller, model, batches):
        batches = list(batches)
        n = len(controller.sites)
        # thresholds, levels, targets and tables are written and read as Python floats, a
        # few per layer: CPU bookkeeping (load_state puts the saved state on the model's device)
        self.thresholds = torch.full((n, len(PROJ_NAMES)), -1.0, device="cpu")
        self.levels = torch.zeros(n, len(PROJ_NAMES), device="cpu")
        if self.cfg.get("allocation", "greedy") == "greedy" and self.sparsity > 0:
            # the path has its own version: a change to the final fit (calibration_version)
            # leaves it valid, and it is the expensive part (minutes per model)
            traj = self.artifacts.get("teal-greedy", self._greedy_key(),
                                      lambda: self.greedy_trajectory(controller, model, batches))
            targets = [levels_at(traj["effective"][i], traj["levels"][i], self.sparsity) for i in range(n)]
        else:
            targets = [torch.full((len(PROJ_NAMES),), self.sparsity, device="cpu") for _ in range(n)]
        tables = torch.zeros(n, len(INPUT_NAMES), LEVELS.numel(), device="cpu")
        gen = torch.Generator().manual_seed(0)

        def fit(i, _values, linear_values, _probe):
            tables[i] = self._tables(linear_values, gen)
            self._set_levels(i, tables[i], dict(zip(PROJ_NAMES, targets[i].tolist())))

        calibrate_layerwise(controller, model, batches, None, fit, linear_fn=_group_input,
                            block_refits=BLOCK_INPUT_STAGES - 1)
        return {"thresholds": self.thresholds.clone(), "levels": self.levels.clone()}

    def _greedy_key(self) -> dict:
        # the path has its own version: a change to the final fit leaves it valid
        return {"version": self.greedy_version, "greedy_units": self.units, "greedy_error": self.greedy_error,
                **{k: self.cfg.get(k) for k in ("greedy_step", "greedy_max", "greedy_sequences")}}

    def _set_levels(self, i, table, levels):
        """Set layer i's levels (keys: linears or groups) and thresholds from its input tables."""
        for u, s in levels.items():
            for p in LINEARS_OF[u]:
                k = PROJ_NAMES.index(p)
                self.levels[i, k] = s
                self.thresholds[i, k] = interp_threshold(table[INPUT_NAMES.index(INPUT_OF[p])], s)
        self._last = (None, None, None)
        self._rows = (None, [], [], [])

    @staticmethod
    def _tables(linear_values, gen) -> torch.Tensor:
        """One |x| quantile table per input (INPUT_NAMES), on the CPU (interp_threshold
        reads a few entries of it as Python floats)."""
        out = torch.zeros(len(INPUT_NAMES), LEVELS.numel(), device="cpu")
        for proj, vals in linear_values.items():
            vals = [v for v in vals if v is not None]
            if vals:
                out[INPUT_NAMES.index(INPUT_OF[proj])] = quantile_table(torch.cat(vals), gen)
        return out

    def greedy_trajectory(self, controller, model, batches) -> dict[str, torch.Tensor]:
        """Per layer, the greedy path from 0 to ``greedy_max`` block sparsity on the dense
        model's layer inputs: levels[layer, step, linear] at effective[layer, step]."""
        from .base import dense_linear_inputs

        gen = torch.Generator().manual_seed(0)
        if self.thresholds is None:
            n = len(controller.sites)
            self.thresholds = torch.full((n, len(PROJ_NAMES)), -1.0, device="cpu")  # CPU bookkeeping (calibrate)
            self.levels = torch.zeros(n, len(PROJ_NAMES), device="cpu")
        return greedy_trajectory(
            controller, model, batches, units=self.units, step=float(self.cfg.get("greedy_step", 0.025)),
            top=float(self.cfg.get("greedy_max", 0.8)), sequences=int(self.cfg.get("greedy_sequences", 1)),
            error=self.greedy_error,
            prepare=lambda i, run_layer: self._tables(dense_linear_inputs(controller, run_layer, i, _group_input), gen),
            apply=self._set_levels,
            layer_cache=lambda i, compute: self.artifacts.get("teal-greedy-layer", {**self._greedy_key(), "layer": i},
                                                              compute))

    def _greedy(self, i, table, params, probe, step, top):
        """The greedy for layer i (``step``: block sparsity per step): levels after each step."""
        return greedy_path(params, lambda lv: self._set_levels(i, table, lv), probe, step, top, self.greedy_error)

    def load_state(self, state):
        self.thresholds, self.levels = state["thresholds"], state["levels"]
        self._last = (None, None, None)
        self._rows = (None, [], [], [])

    # ------------------------------------------------------------ inference
    def threshold(self, layer: int, proj: str) -> float:
        """One linear's threshold as a Python float. The table is read back once per
        thresholds tensor (and after each change), not per call: a per-call read of a
        device tensor would sync the device."""
        return self._per_linear()[0][layer][PROJ_INDEX[proj]]

    def _per_linear(self) -> tuple[list, list]:
        """Per layer, each linear's threshold and its ``ThresholdRule`` (None: dense),
        rebuilt only when the thresholds tensor changes."""
        src, rows, rules, _ = self._rows
        if src is not self.thresholds:
            rows = self.thresholds.tolist()
            rules = [[None if t < 0 else ThresholdRule("x", t) for t in row] for row in rows]
            self._rows = (self.thresholds, rows, rules, [None] * len(rows))
        return rows, rules

    def input_mask(self, inp):
        t = self.threshold(inp.layer_idx, inp.proj)
        key = (inp.layer_idx, t)
        last_x, last_key, last_mask = self._last
        if last_x is inp.x and last_key == key:  # q/k/v (gate/up) read one input: one compare per threshold
            return last_mask
        mask = None if t < 0 else inp.x.abs() > t
        self._last = (inp.x, key, mask)
        return mask

    def input_mask_rule(self, inp):
        src, _, rules, _ = self._rows  # once per linear and decode token: no call it can spare
        if src is not self.thresholds:
            rules = self._per_linear()[1]
        return rules[inp.site.layer_idx][PROJ_INDEX[inp.proj]]

    def mlp_input_rules(self, site, x):
        if self._rows[0] is not self.thresholds:
            self._per_linear()
        _, _, rules, per_mlp = self._rows
        found = per_mlp[site.layer_idx]
        if found is None:  # made once per layer and thresholds tensor
            row = rules[site.layer_idx]
            found = per_mlp[site.layer_idx] = MLPInputRules(
                row[PROJ_INDEX["gate"]] if site.kind == "gated" else None, row[PROJ_INDEX["up"]],
                row[PROJ_INDEX["down"]])
        return found

    def describe(self):
        if self.levels is None:
            return {}
        return {f"teal_level/{p}": self.levels[:, k].tolist() for k, p in enumerate(PROJ_NAMES)}
