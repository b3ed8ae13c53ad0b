"""TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models").

Every linear of the block gets a magnitude threshold on its *input*: x_i is kept iff
|x_i| > t. Inputs that are the same tensor share a threshold (q/k/v; gate/up), o and
down have their own, so a block has four groups. Thresholds come from the calibration
distribution of |x| per group (a 1001-point quantile table, from which the threshold
for any sparsity level is read by interpolation; TEAL bins signed values into a
histogram and assumes symmetry, the |x| table needs no such assumption).

Allocation of the block's sparsity over the groups:
- ``uniform``: every group at the requested sparsity s.
- ``greedy`` (TEAL's block-wise greedy): start every group at 0; repeatedly try raising
  each group by a step inversely proportional to its parameter count (so every step
  adds ``greedy_step`` of parameter-weighted block sparsity), keep the one whose step
  increases the block-output error least. As in TEAL, this runs once per model on the
  dense model's layer inputs up to ``greedy_max`` and is cached; a requested sparsity s
  reads the groups' levels off that trajectory (interpolated between steps). The error
  is the mean over tokens of ‖Y_dense − Y_sparse‖₂ of the decoder layer's output on
  ``greedy_sequences`` calibration sequences (TEAL's code takes the norm along the
  sequence axis over the last quarter of tokens; we use every token's own norm).
  TEAL's default step is ≈0.004 of block sparsity; ours defaults to 0.025 (CPU cost).

Sparsity is counted as the parameter-weighted fraction of dropped input channels over
the block's linears (``sparsity_unit = linear_inputs``). Thresholds are then
calibrated layer by layer with the layers below already sparse (TEAL uses the dense
model throughout). Within a block each group's table is refitted on the inputs the
sparse block gives it (o sees sparse q/k/v, down sees sparse gate/up): fitting on the
dense block overshot the requested sparsity by 2 points at 65% on SmolLM2.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from . import SPARSIFIERS
from .base import BLOCK_INPUT_STAGES, Sparsifier, calibrate_layerwise

GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gateup": ("gate", "up"), "down": ("down",)}
GROUP_OF = {p: g for g, ps in GROUPS.items() for p in ps}
GROUP_NAMES = tuple(GROUPS)
LEVELS = torch.linspace(0, 1, 1001)
MAX_VALUES = 1 << 20  # |x| samples per table: quantile error ~1e-3, a 1M sort per table


def quantile_table(values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """|x| at sparsity levels LEVELS (exact order statistics of a sample of ≤ 1M values)."""
    flat = values.reshape(-1).float().abs()
    if flat.numel() > MAX_VALUES:
        flat = flat[torch.randint(flat.numel(), (MAX_VALUES,), generator=gen)]
    srt = flat.sort().values
    idx = (LEVELS * (srt.numel() - 1)).round().long()
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
    """Group levels at block sparsity ``s`` on a greedy path (linear between steps)."""
    k = int(torch.searchsorted(effective, torch.tensor(s), right=True)) - 1
    k = max(0, min(k, effective.numel() - 1))
    if k + 1 >= effective.numel():
        return levels[k]
    w = float((s - effective[k]) / (effective[k + 1] - effective[k]))
    return levels[k] * (1 - w) + levels[k + 1] * w


@SPARSIFIERS.register("teal")
class TEAL(Sparsifier):
    needs_calibration = True
    calibration_params = ("sparsity", "allocation", "greedy_step", "greedy_max", "greedy_sequences")
    input_projections = ("q", "k", "v", "o", "gate", "up", "down")
    sparsity_unit = "linear_inputs"
    calibration_version = 2  # 2: thresholds fitted on the sparse block's own inputs (block_refits)
    greedy_version = 1  # bump when greedy_trajectory changes
    ALLOCATIONS = ("greedy", "uniform")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.thresholds: torch.Tensor | None = None  # [layers, groups]
        self.levels: torch.Tensor | None = None  # [layers, groups] sparsity per group
        self._last = (None, None, None)

    def validate(self):
        super().validate()
        if self.cfg.get("allocation", "greedy") not in self.ALLOCATIONS:
            raise ConfigError(f"sparsifier.allocation={self.cfg.allocation} is unknown; use one of: {', '.join(self.ALLOCATIONS)}")
        step = self.cfg.get("greedy_step", 0.025)
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 0.5:
            raise ConfigError(f"sparsifier.greedy_step={step} must be in (0, 0.5]")
        top = self.cfg.get("greedy_max", 0.8)
        if self.cfg.get("allocation", "greedy") == "greedy" and (
                isinstance(top, bool) or not isinstance(top, (int, float)) or not self.sparsity <= top < 1):
            raise ConfigError(f"sparsifier.greedy_max={top} must be in [sparsity, 1): the greedy path is computed up to it")

    # ------------------------------------------------------------ calibration
    @staticmethod
    def group_params(site) -> dict[str, int]:
        out = {}
        for g, projs in GROUPS.items():
            n = sum(site.projection(p).in_features * site.projection(p).out_features for p in projs if p in site.slots)
            if n:
                out[g] = n
        return out

    def calibrate(self, controller, model, batches):
        batches = list(batches)
        n = len(controller.sites)
        self.thresholds = torch.full((n, len(GROUP_NAMES)), -1.0)
        self.levels = torch.zeros(n, len(GROUP_NAMES))
        if self.cfg.get("allocation", "greedy") == "greedy":
            # the path has its own version: a change to the final fit (calibration_version)
            # leaves it valid, and it is the expensive part (minutes per model)
            key = {"version": self.greedy_version, **{k: self.cfg.get(k) for k in ("greedy_step", "greedy_max", "greedy_sequences")}}
            traj = self.artifacts.get("teal-greedy", key, lambda: self.greedy_trajectory(controller, model, batches))
            targets = [levels_at(traj["effective"], traj["levels"][i], self.sparsity) for i in range(n)]
        else:
            targets = [torch.full((len(GROUP_NAMES),), self.sparsity) for _ in range(n)]
        tables = torch.zeros(n, len(GROUP_NAMES), LEVELS.numel())
        gen = torch.Generator().manual_seed(0)

        def fit(i, _values, linear_values, _probe):
            tables[i] = self._tables(linear_values, gen)
            self._set_levels(i, tables[i], dict(zip(GROUP_NAMES, targets[i].tolist())))

        calibrate_layerwise(controller, model, batches, None, fit, linear_fn=_group_input,
                            block_refits=BLOCK_INPUT_STAGES - 1)
        return {"thresholds": self.thresholds.clone(), "levels": self.levels.clone()}

    def _set_levels(self, i, table, levels):
        for g, s in levels.items():
            k = GROUP_NAMES.index(g)
            self.levels[i, k] = s
            self.thresholds[i, k] = interp_threshold(table[k], s)
        self._last = (None, None, None)

    @staticmethod
    def _tables(linear_values, gen) -> torch.Tensor:
        out = torch.zeros(len(GROUP_NAMES), LEVELS.numel())
        for proj, vals in linear_values.items():
            vals = [v for v in vals if v is not None]
            if vals:
                out[GROUP_NAMES.index(GROUP_OF[proj])] = quantile_table(torch.cat(vals), gen)
        return out

    def greedy_trajectory(self, controller, model, batches) -> dict[str, torch.Tensor]:
        """Per layer, the greedy path from 0 to ``greedy_max`` block sparsity on the dense
        model's layer inputs: levels[layer, step, group] at effective[step]."""
        from tqdm.auto import tqdm

        from .base import LayerProbe, capture_layer_inputs, dense_linear_inputs

        step = float(self.cfg.get("greedy_step", 0.025))
        top = float(self.cfg.get("greedy_max", 0.8))
        n_seq = int(self.cfg.get("greedy_sequences", 1))
        run_layer, _ = capture_layer_inputs(controller, model, batches)
        effective = torch.arange(0, top + 1e-9, step)
        levels = torch.zeros(len(controller.sites), effective.numel(), len(GROUP_NAMES))
        gen = torch.Generator().manual_seed(0)
        for i in tqdm(range(len(controller.sites)), desc="TEAL greedy allocation", leave=False):
            table = self._tables(dense_linear_inputs(controller, run_layer, i, _group_input), gen)
            probe = LayerProbe(controller, i, run_layer, [run_layer.dense_input(i, 0)[:n_seq]])
            path = self._greedy(i, table, self.group_params(controller.sites[i]), probe, step, top)
            for k, lv in enumerate(path[: effective.numel()]):
                levels[i, k] = torch.tensor([lv.get(g, 0.0) for g in GROUP_NAMES])
            last = min(len(path), effective.numel()) - 1
            levels[i, last + 1:] = levels[i, last]
        return {"effective": effective, "levels": levels}

    def _greedy(self, i, table, params, probe, step, top):
        """TEAL's block-wise greedy for layer i: the list of group levels after each step."""
        total = sum(params.values())
        dense = [y.float() for y in probe.outputs(sparse=False)]
        levels = {g: 0.0 for g in params}
        path = [dict(levels)]

        def effective(lv):
            return sum(params[g] * lv[g] for g in params) / total

        while effective(levels) < top - 1e-9:
            best = None
            for g in params:
                if levels[g] >= 1.0 - 1e-9:
                    continue
                trial = dict(levels)
                trial[g] = min(1.0, levels[g] + step * total / params[g])
                self._set_levels(i, table, trial)
                sparse = probe.outputs(sparse=True)
                err = sum(float((d - s.float()).norm(dim=-1).mean()) for d, s in zip(dense, sparse))
                if best is None or err < best[0]:
                    best = (err, trial)
            if best is None:
                break
            levels = best[1]
            path.append(dict(levels))
        return path

    def load_state(self, state):
        self.thresholds, self.levels = state["thresholds"], state["levels"]
        self._last = (None, None, None)

    # ------------------------------------------------------------ inference
    def input_mask(self, inp):
        g = GROUP_NAMES.index(GROUP_OF[inp.proj])
        key = (inp.layer_idx, g)
        last_x, last_key, last_mask = self._last
        if last_x is inp.x and last_key == key:  # q/k/v (gate/up) share one input: one compare
            return last_mask
        t = float(self.thresholds[inp.layer_idx, g])
        mask = None if t < 0 else inp.x.abs() > t
        self._last = (inp.x, key, mask)
        return mask

    def describe(self):
        if self.levels is None:
            return {}
        return {f"teal_level/{g}": self.levels[:, k].tolist() for k, g in enumerate(GROUP_NAMES)}
