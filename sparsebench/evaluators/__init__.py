"""Evaluators: get the patched model, return metrics."""
from ..registry import Registry
from .base import Evaluator, EvalResult, RunContext

EVALUATORS: Registry[Evaluator] = Registry("evaluator", __name__)

__all__ = ["EVALUATORS", "Evaluator", "EvalResult", "RunContext"]
