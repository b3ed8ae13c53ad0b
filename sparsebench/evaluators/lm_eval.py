"""lm-eval accuracy with the sparse path active on every token.

lm-eval's ``HFLM`` wraps the *patched* model object itself, so every loglikelihood
forward goes through the ``SparseMLP``s. The evaluator counts, during the lm-eval
call, how many token positions reached each MLP and how many of them had a mask
applied, and reports both: a sparse run whose masked fraction is not 1.0 did not
measure what it claims. Per-document correctness is kept (``items``) so a sparse run
and its dense baseline — or any two runs — are compared on the same documents.

Devices: HFLM takes its device from the model (``HFLM.device`` is ``model.device`` when
``pretrained`` is a model object), and both scorers feed the model there; log-probabilities
are float32 whatever the model's dtype. ``batch_size: auto`` (CUDA only) is lm-eval's
detection: from ``max_batch_size`` (64) down, halving on out-of-memory, with forwards of
the longest request and full-vocabulary logits; ``score_continuations_only`` keeps fewer
logits than that, so the size found fits its forwards too. The detection's dummy forwards
are not counted in the MLP statistics (with ``score_continuations_only``, the default). A CUDA out-of-memory error while scoring stops the
run with one line naming ``evaluator.lm_eval.batch_size``.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from ..data.tasks import PREFIX, prepare_tasks
from ..core.device import model_device
from ..core.errors import ConfigError
from . import EVALUATORS
from .base import EvalResult, Evaluator


def continuation_scoring_lm(detection_context=contextlib.nullcontext, **kwargs):
    """An lm-eval ``HFLM`` whose loglikelihood requests project to the vocabulary only the
    positions they score.

    HFLM computes [batch, length, vocabulary] logits and a log-softmax over all of them,
    then keeps the continuation's few positions. With Gemma3's 262k vocabulary the head
    and that softmax cost about twice the rest of the model on CPU. Here the decoder runs
    on every position as before (the sparse MLPs see every token; nothing about the
    sparse path changes), and the head runs only on the union of the batch's
    continuation positions (``logits_to_keep`` with an index tensor). Tokenisation,
    truncation and right padding are HFLM's; requests with the same input tokens
    (same context, one-token continuations) share one forward, as HFLM's logits cache does.
    Inputs are built on the CPU and moved to ``self.device`` (the model's); the
    log-softmax is float32. ``batch_size="auto"``: HFLM's detection on the longest input,
    run inside ``detection_context()`` (the evaluator passes one that keeps its dummy
    forwards out of the MLP statistics).
    """
    from lm_eval.models.huggingface import HFLM
    from tqdm.auto import tqdm

    class ContinuationScoringHFLM(HFLM):
        def _detect_batch_size(self, *args, **kw):
            with detection_context():
                return super()._detect_batch_size(*args, **kw)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            model = self.model
            groups: dict[tuple[int, ...], list[int]] = {}
            for n, (_, context, continuation) in enumerate(requests):
                inp = tuple((context + continuation)[-(self.max_length + 1):][:-1])
                groups.setdefault(inp, []).append(n)
            inputs = sorted(groups, key=lambda t: (-len(t), t))  # longest first, like HFLM
            if isinstance(self.batch_size, int):
                size = self.batch_size
            elif override_bs or not inputs:
                size = override_bs or 1
            else:  # "auto": sized on the longest input (the first batch); the rest are shorter
                size = self._detect_batch_size([requests[groups[inputs[0]][0]]], 0)
            answers: list[tuple[float, bool] | None] = [None] * len(requests)
            bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
            for start in range(0, len(inputs), size):
                batch = inputs[start:start + size]
                ids = torch.zeros(len(batch), len(batch[0]), dtype=torch.long, device="cpu")  # moved below
                spans = []  # (row, request, first scored position, continuation tokens)
                for row, inp in enumerate(batch):
                    ids[row, :len(inp)] = torch.tensor(inp, device="cpu")
                    for n in groups[inp]:
                        cont = requests[n][2]
                        spans.append((row, n, len(inp) - len(cont), cont))
                positions = sorted({p for _, _, a, c in spans for p in range(a, a + len(c))})
                with torch.no_grad():
                    logits = model(ids.to(self.device), logits_to_keep=torch.tensor(positions, device=self.device)).logits
                logp = F.log_softmax(logits.float(), dim=-1, dtype=self.softmax_dtype)
                column = {p: k for k, p in enumerate(positions)}
                for row, n, a, cont in spans:
                    lp = logp[row, [column[p] for p in range(a, a + len(cont))]]
                    target = torch.tensor(cont, device=lp.device)
                    answer = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                    answers[n] = answer
                    if requests[n][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[n][0], answer)
                    bar.update(1)
            bar.close()
            return answers

    return ContinuationScoringHFLM(**kwargs)


def lm_eval_batch_size(value, device) -> int | str:
    """``evaluator.lm_eval.batch_size``: a positive integer, or ``auto`` on CUDA (lm-eval's
    detection halves on CUDA out-of-memory; on the CPU it would just take the largest)."""
    if str(value) == "auto":
        if device.type != "cuda":
            raise ConfigError(f"evaluator.lm_eval.batch_size=auto needs a CUDA device (the model is on {device}); "
                              "give a number, e.g. evaluator.lm_eval.batch_size=8")
        return "auto"
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ConfigError(f"evaluator.lm_eval.batch_size={value} must be a positive integer (or auto on CUDA), "
                          "e.g. evaluator.lm_eval.batch_size=8")
    return size


@contextlib.contextmanager
def out_of_memory_names_the_knob(batch_size, device):
    """A CUDA out-of-memory error while scoring, as one line naming the batch size."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        smaller = "4" if batch_size == "auto" else str(max(1, int(batch_size) // 2))
        raise ConfigError(f"evaluator.lm_eval.batch_size={batch_size} ran out of memory on {device} while scoring; "
                          f"use a smaller one, e.g. evaluator.lm_eval.batch_size={smaller}") from None


@EVALUATORS.register("lm_eval")
class LMEvalAccuracy(Evaluator):
    def evaluate(self, ctx):
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        device = model_device(ctx.model)
        batch_size = lm_eval_batch_size(self.cfg.batch_size, device)
        if self.cfg.get("include_path"):  # user-supplied task YAMLs, task names used as given
            include_path, tasks = self.cfg.include_path, list(self.cfg.tasks)
        else:
            include_path, tasks = prepare_tasks(list(self.cfg.tasks), self.cfg.package, ctx.cache_dir)
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        common = dict(pretrained=ctx.model, tokenizer=ctx.tokenizer, batch_size=batch_size,
                      max_length=self.cfg.get("max_length"), softmax_dtype=torch.float32)
        if self.cfg.get("score_continuations_only", True):
            # the detection's dummy forwards are not lm-eval tokens: kept out of the counts
            lm = continuation_scoring_lm(detection_context=ctx.controller.uncounted, **common)
        else:  # lm-eval's own HFLM (its detection's forwards, CUDA + auto only, are counted)
            lm = HFLM(**common)
        with ctx.controller.counting() as stats, torch.no_grad(), out_of_memory_names_the_knob(batch_size, device):
            out = simple_evaluate(
                model=lm, tasks=tasks, limit=self.cfg.limit, num_fewshot=self.cfg.get("num_fewshot"),
                task_manager=TaskManager(include_path=str(include_path)), bootstrap_iters=0,
                log_samples=True, random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
                fewshot_random_seed=1234,
            )
        metrics: dict[str, float] = {}
        accs = []
        per_item = {}
        for task in tasks:
            res = out["results"][task]
            short = task.removeprefix(PREFIX)
            # per-document correctness, for paired comparisons on the same documents
            samples = sorted(out["samples"][task], key=lambda d: d["doc_id"])
            per_item[short] = {"doc_id": [int(d["doc_id"]) for d in samples], "acc": [int(d["acc"]) for d in samples]}
            for key in ("acc", "acc_norm"):
                if f"{key},none" in res:
                    metrics[f"lm_eval/{short}/{key}"] = float(res[f"{key},none"])
            accs.append(float(res["acc,none"]))
        metrics["lm_eval/avg_acc"] = sum(accs) / len(accs)
        tokens = sum(s.tokens for s in stats.values())
        metrics["lm_eval/mlp_token_calls"] = tokens
        metrics["lm_eval/masked_token_fraction"] = sum(s.masked_tokens for s in stats.values()) / max(tokens, 1)
        metrics["lm_eval/mlp_sparsity"] = sum(s.zeroed for s in stats.values()) / max(sum(s.neurons for s in stats.values()), 1)
        return EvalResult(metrics=metrics, items={"lm_eval": per_item})
