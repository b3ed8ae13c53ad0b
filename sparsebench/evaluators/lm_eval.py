"""lm-eval accuracy with the sparse path active on every token.

lm-eval's ``HFLM`` wraps the *patched* model object itself, so every loglikelihood
forward goes through the ``SparseMLP``s. The evaluator counts, during the lm-eval
call, how many token positions reached each MLP and how many of them had a mask
applied, and reports both: a sparse run whose masked fraction is not 1.0 did not
measure what it claims.
"""
from __future__ import annotations

import logging

import torch

from ..data.tasks import PREFIX, prepare_tasks
from . import EVALUATORS
from .base import EvalResult, Evaluator


@EVALUATORS.register("lm_eval")
class LMEvalAccuracy(Evaluator):
    def evaluate(self, ctx):
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        if self.cfg.get("include_path"):  # user-supplied task YAMLs, task names used as given
            include_path, tasks = self.cfg.include_path, list(self.cfg.tasks)
        else:
            include_path, tasks = prepare_tasks(list(self.cfg.tasks), self.cfg.package, ctx.cache_dir)
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        lm = HFLM(pretrained=ctx.model, tokenizer=ctx.tokenizer, batch_size=int(self.cfg.batch_size),
                  max_length=self.cfg.get("max_length"))
        with ctx.controller.counting() as stats, torch.no_grad():
            out = simple_evaluate(
                model=lm, tasks=tasks, limit=self.cfg.limit, num_fewshot=self.cfg.get("num_fewshot"),
                task_manager=TaskManager(include_path=str(include_path)), bootstrap_iters=0,
                log_samples=False, random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
                fewshot_random_seed=1234,
            )
        metrics: dict[str, float] = {}
        accs = []
        for task in tasks:
            res = out["results"][task]
            short = task.removeprefix(PREFIX)
            for key in ("acc", "acc_norm"):
                if f"{key},none" in res:
                    metrics[f"lm_eval/{short}/{key}"] = float(res[f"{key},none"])
            accs.append(float(res["acc,none"]))
        metrics["lm_eval/avg_acc"] = sum(accs) / len(accs)
        tokens = sum(s.tokens for s in stats.values())
        metrics["lm_eval/mlp_token_calls"] = tokens
        metrics["lm_eval/masked_token_fraction"] = sum(s.masked_tokens for s in stats.values()) / max(tokens, 1)
        metrics["lm_eval/mlp_sparsity"] = sum(s.zeroed for s in stats.values()) / max(sum(s.neurons for s in stats.values()), 1)
        return EvalResult(metrics=metrics)
