"""Evaluators: get the patched model, return metrics."""
from ..core.registry import Registry
from .base import EvalResult, Evaluator, RunContext

EVALUATORS: Registry[Evaluator] = Registry("evaluator", __name__)

__all__ = ["EVALUATORS", "EvalResult", "Evaluator", "RunContext"]
