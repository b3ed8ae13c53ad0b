"""How well a predicted mask matches its oracle, per layer, on held-out text.

For sparsifiers that predict masks (Deja Vu) and can also compute the mask they
imitate (``oracle_mask``): recall = |pred ∧ oracle| / |oracle| (of the neurons that
matter, how many are kept), precision = |pred ∧ oracle| / |pred|, F1.
"""
from __future__ import annotations

import torch

from ..data.corpus import heldout_windows
from ..core.errors import ConfigError
from ..core.device import model_device
from . import EVALUATORS
from .base import EvalResult, Evaluator


@EVALUATORS.register("mask_quality")
class MaskQuality(Evaluator):
    @torch.no_grad()
    def evaluate(self, ctx):
        sp = ctx.controller.sparsifier
        if not hasattr(sp, "oracle_mask"):
            raise ConfigError(f"evaluator mask_quality needs a predicting sparsifier (e.g. dejavu); {sp.name} has no oracle mask")
        counts: dict[int, list[float]] = {}

        def observe(inp, mask):
            oracle = sp.oracle_mask(inp)
            pred = torch.ones_like(oracle) if mask is None else mask
            c = counts.setdefault(inp.layer_idx, [0.0, 0.0, 0.0])
            c[0] += float((pred & oracle).sum())
            c[1] += float(pred.sum())
            c[2] += float(oracle.sum())

        windows = heldout_windows(ctx.tokenizer, ctx.splits, int(self.cfg.num_windows), int(self.cfg.seq_len)).ids
        device = model_device(ctx.model)  # held-out windows come on the CPU
        prev, ctx.controller.mask_observer = ctx.controller.mask_observer, observe
        try:
            for batch in windows.split(int(self.cfg.batch_size)):
                ctx.model(input_ids=batch.to(device), logits_to_keep=1)
        finally:
            ctx.controller.mask_observer = prev
        if not counts:  # a dense run (controller.dense()) has nothing to compare
            return EvalResult()
        layers = sorted(counts)
        recall = [counts[i][0] / max(counts[i][2], 1) for i in layers]
        precision = [counts[i][0] / max(counts[i][1], 1) for i in layers]
        f1 = [2 * p * r / max(p + r, 1e-12) for p, r in zip(precision, recall)]
        tp, pr, orc = (sum(counts[i][k] for i in layers) for k in range(3))
        return EvalResult(
            metrics={"mask_quality/recall": tp / max(orc, 1), "mask_quality/precision": tp / max(pr, 1),
                     "mask_quality/min_layer_recall": min(recall)},
            per_layer={"recall": recall, "precision": precision, "f1": f1},
        )
