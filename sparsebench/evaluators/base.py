"""The evaluator interface and the context every evaluator receives."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunContext:
    """Everything an evaluator may use: the patched model and where its data lives."""

    model: Any
    tokenizer: Any
    controller: Any  # SparsityController; ``controller.dense()`` gives the baseline
    splits: Any  # TextSplits (calibration / held-out text)
    cfg: Any  # the whole run config
    cache_dir: str | None = None


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    # column name -> one value per decoder layer (for the per-layer table / W&B "layer" axis)
    per_layer: dict[str, list[float]] = field(default_factory=dict)
    # per-item outcomes for paired statistics, by metric: lm-eval correctness per document,
    # perplexity NLL per window (the dense baseline has the same items in the same order)
    items: dict[str, Any] = field(default_factory=dict)
    # facts about what was measured that are not metrics (e.g. tokens per held-out work)
    info: dict[str, Any] = field(default_factory=dict)


class Evaluator:
    name: str = "base"
    # Whether run.py repeats this evaluator with every mask off (compare_dense=true);
    # evaluators that carry their own baselines (decode) or need masks (churn) opt out.
    compare_dense: bool = True
    # Whether the evaluator measures time: run.py then holds the per-machine timing lock
    # (sparsebench.store.timing_lock) around it, so parallel sweep jobs never time on shared cores.
    timing: bool = False
    # Device types it runs on (run.py refuses the others before loading the model).
    device_types: tuple[str, ...] = ("cpu", "cuda")

    def __init__(self, cfg):
        self.cfg = cfg

    def evaluate(self, ctx: RunContext) -> EvalResult:
        raise NotImplementedError
