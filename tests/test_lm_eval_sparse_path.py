"""The sparse path fires on every token of lm-eval's loglikelihood requests.

A tiny local multiple-choice task (no download) is evaluated through the real
evaluator; the controller counts, for every MLP call made during the lm-eval run,
how many token positions it saw and how many had a CATS mask applied.
"""
import json

import pytest
from omegaconf import OmegaConf

from conftest import make_tiny
from sparsebench.backends.dense import DenseBackend
from sparsebench.data.corpus import TINY_TEXT, load_tiny
from sparsebench.evaluators.base import RunContext
from sparsebench.evaluators.lm_eval import LMEvalAccuracy
from sparsebench.models.patching import SparsityController
from sparsebench.sparsifiers.cats import CATS

DOCS = [
    {"q": "The quality of mercy is", "choices": ["not strained", "a stage", "the question"], "label": 0},
    {"q": "All the world's a", "choices": ["sea", "stage", "sun"], "label": 1},
    {"q": "To be, or not to be, that is the", "choices": ["winter", "question", "ocean"], "label": 1},
    {"q": "Friends, Romans, countrymen, lend me your", "choices": ["ears", "house", "clouds"], "label": 0},
]


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "output_type: multiple_choice\n"
        "validation_split: validation\n"
        "doc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    return tmp_path


def test_every_lm_eval_token_goes_through_the_mask(task_dir, tiny_tokenizer):
    model = make_tiny("llama")
    cats = CATS(OmegaConf.create({"sparsity": 0.5}))
    ctl = SparsityController(cats, DenseBackend()).attach(model)
    calib = tiny_tokenizer(TINY_TEXT, return_tensors="pt").input_ids[:, :64]
    cats.load_state(cats.calibrate(ctl, model, [calib]))
    ctx = RunContext(model=model, tokenizer=tiny_tokenizer, controller=ctl, splits=load_tiny(None), cfg=None)
    ev = LMEvalAccuracy(OmegaConf.create({"tasks": ["tiny_mc"], "include_path": str(task_dir), "package": None,
                                          "limit": None, "batch_size": 2, "num_fewshot": 0}))
    sparse = ev.evaluate(ctx).metrics
    with ctl.dense():
        dense = ev.evaluate(ctx).metrics

    # Lower bound on token positions lm-eval must feed: context + continuation − 1 per request.
    min_positions = 0
    for d in DOCS:
        ctx_ids = tiny_tokenizer(d["q"], add_special_tokens=False).input_ids
        for c in d["choices"]:
            cont_ids = tiny_tokenizer(" " + c, add_special_tokens=False).input_ids
            min_positions += len(ctx_ids) + len(cont_ids) - 1
    n_layers = len(ctl.sites)
    assert sparse["lm_eval/mlp_token_calls"] >= n_layers * min_positions > 0
    assert sparse["lm_eval/masked_token_fraction"] == 1.0  # every position, every layer
    assert sparse["lm_eval/mlp_sparsity"] == pytest.approx(0.5, abs=0.15)
    assert dense["lm_eval/masked_token_fraction"] == 0.0 and dense["lm_eval/mlp_sparsity"] == 0.0
    assert dense["lm_eval/mlp_token_calls"] == sparse["lm_eval/mlp_token_calls"]


def test_dense_patched_model_matches_lm_eval_from_path(tmp_path, tiny_tokenizer):
    """sparsebench's dense path gives lm-eval exactly what `lm_eval --model hf
    --model_args pretrained=DIR` computes from the saved folder."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from sparsebench.sparsifiers.none import NoSparsifier

    model = make_tiny("qwen2")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    SparsityController(NoSparsifier(OmegaConf.create({"sparsity": 0.0})), DenseBackend()).attach(model)
    requests = [Instance("loglikelihood", d, (d["q"], " " + c), i) for i, d in enumerate(DOCS) for c in d["choices"]]
    from_path = HFLM(pretrained=str(tmp_path / "m"), batch_size=2, dtype="float32", device="cpu").loglikelihood(requests)
    patched = HFLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=2).loglikelihood(requests)
    assert from_path == patched


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt"])
def test_continuation_scoring_gives_hflm_answers(arch, tiny_tokenizer):
    """The head-only-on-scored-positions LM returns lm-eval HFLM's (log-prob, greedy) for
    random requests of mixed lengths: shared contexts, one- and multi-token continuations,
    batches that mix lengths, with the sparse path on."""
    import random

    from lm_eval.models.huggingface import HFLM

    from sparsebench.evaluators.lm_eval import continuation_scoring_lm

    model = make_tiny(arch)
    cats = CATS(OmegaConf.create({"sparsity": 0.5}))
    ctl = SparsityController(cats, DenseBackend()).attach(model)
    calib = tiny_tokenizer(TINY_TEXT, return_tensors="pt").input_ids[:, :64]
    cats.load_state(cats.calibrate(ctl, model, [calib]))
    rng = random.Random(0)
    vocab = model.config.vocab_size
    requests = []
    for _ in range(12):
        context = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))]
        for _ in range(rng.randint(1, 3)):  # several continuations of one context
            cont = [rng.randrange(3, vocab) for _ in range(rng.choice([1, 1, 2, 5]))]
            requests.append((("c", "x"), context, cont))
    requests.append((("c", "x"), requests[0][1], requests[0][2]))  # an exact duplicate
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_rows.append(o.shape[:-1].numel()))
    ours = continuation_scoring_lm(pretrained=model, tokenizer=tiny_tokenizer, batch_size=3)._loglikelihood_tokens(requests)
    ours_rows, head_rows[:] = sum(head_rows), []
    ref = HFLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=3)._loglikelihood_tokens(requests)
    hook.remove()
    assert ours_rows < sum(head_rows) / 3  # the head ran on a fraction of the positions
    assert len(ours) == len(ref) == len(requests)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(ours, ref):
        assert lp == pytest.approx(lp_ref, rel=1e-4, abs=1e-4) and greedy == greedy_ref
    assert ours[-1] == ours[0]


def test_both_scorers_give_the_same_task_metrics(task_dir, tiny_tokenizer):
    model = make_tiny("llama")
    ctl = SparsityController(CATS(OmegaConf.create({"sparsity": 0.0})), DenseBackend()).attach(model)
    ctx = RunContext(model=model, tokenizer=tiny_tokenizer, controller=ctl, splits=load_tiny(None), cfg=None)
    metrics = {}
    for flag in (True, False):
        ev = LMEvalAccuracy(OmegaConf.create({"tasks": ["tiny_mc"], "include_path": str(task_dir), "package": None,
                                              "limit": None, "batch_size": 2, "num_fewshot": 0,
                                              "score_continuations_only": flag}))
        metrics[flag] = ev.evaluate(ctx).metrics
    assert metrics[True]["lm_eval/avg_acc"] == metrics[False]["lm_eval/avg_acc"]
    assert metrics[True]["lm_eval/tiny_mc/acc"] == metrics[False]["lm_eval/tiny_mc/acc"]


def test_batch_size_detection_forwards_are_not_counted_as_lm_eval_tokens(tiny_tokenizer):
    """batch_size=auto (CUDA) runs lm-eval's detection: its dummy forwards of the longest
    request must not reach the MLP statistics the run reports. Driven directly here (the
    evaluator refuses auto on the CPU), with the controller's ``uncounted`` context, as the evaluator passes it."""
    import torch

    from sparsebench.evaluators.lm_eval import continuation_scoring_lm

    model = make_tiny("llama")
    ctl = SparsityController(CATS(OmegaConf.create({"sparsity": 0.0})), DenseBackend()).attach(model)
    entered = []

    def context():
        entered.append(True)
        return ctl.uncounted()

    lm = continuation_scoring_lm(pretrained=model, tokenizer=tiny_tokenizer, batch_size=1, max_length=16,
                                 max_batch_size=4, detection_context=context)
    requests = [(("c", "x"), [5, 6, 7], [8])]
    with ctl.counting(), torch.no_grad():
        size = lm._detect_batch_size(requests, 0)
        assert entered and size >= 1
        assert sum(s.tokens for s in ctl.stats.values()) == 0  # nothing counted
        model(input_ids=torch.tensor([[5, 6, 7]]))
        assert sum(s.tokens for s in ctl.stats.values()) == 3 * len(ctl.sites)  # a real forward is
