"""Model inputs as the tokenizer makes them, held-out text from every work, and
provenance: no cached state or finished sweep point is reused once its code changed."""
import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import make_tiny
from sparsebench.backends.dense import DenseBackend
from sparsebench.models.calibration import calibration_key, load_or_calibrate
from sparsebench.data.corpus import (
    TINY_TEXT,
    TextSplits,
    calibration_windows,
    even_starts,
    heldout_windows,
    load_tiny,
    prefix_tokens,
    text_ids,
)
from sparsebench.evaluators import RunContext
from sparsebench.evaluators.perplexity import Perplexity
from sparsebench.models.loader import tiny_tokenizer
from sparsebench.models.patching import SparsityController
from sparsebench.store.provenance import file_digest, files_unchanged, forget_hashes, source_files
from sparsebench.sparsifiers.cats import CATS
from sparsebench.sweep import finished_run

BOS = 1  # "<s>" in the tiny tokenizer


@pytest.fixture(scope="module", params=[False, True], ids=["no-bos", "bos"])
def tok(request):
    return tiny_tokenizer(add_bos=request.param)


def test_prefix_is_what_the_tokenizer_adds_by_default(tok):
    default = tok(TINY_TEXT[:80]).input_ids
    assert prefix_tokens(tok) == default[: len(default) - len(tok(TINY_TEXT[:80], add_special_tokens=False).input_ids)]
    assert prefix_tokens(tok) == ([BOS] if tok("a").input_ids[0] == BOS else [])


def test_calibration_and_heldout_windows_start_as_the_tokenizer_starts_text(tok):
    splits = load_tiny(None)
    prefix = prefix_tokens(tok)
    calib = calibration_windows(tok, splits, 4, 16, seed=0)
    held = heldout_windows(tok, splits, 3, 16)
    for ids in (calib, held.ids):
        assert ids.shape[1] == 16
        assert ids[:, : len(prefix)].tolist() == [prefix] * ids.shape[0]
        assert not (ids[:, len(prefix):] == BOS).any()  # no BOS inside the text
    assert held.context == max(len(prefix), 1)


def test_perplexity_scores_every_text_token_and_never_the_bos(tok):
    """Brute force: sum -log p(token_t | tokens_<t) over the text positions, one by one."""
    model = make_tiny("llama")
    ctl = SparsityController(CATS(OmegaConf.create({"sparsity": 0.0})), DenseBackend()).attach(model)
    splits = load_tiny(None)
    ev = Perplexity(OmegaConf.create({"num_windows": 2, "seq_len": 12, "batch_size": 2}))
    res = ev.evaluate(RunContext(model=model, tokenizer=tok, controller=ctl, splits=splits, cfg=None))
    windows = heldout_windows(tok, splits, 2, 12)
    first = max(len(prefix_tokens(tok)), 1)
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in windows.ids:
            for t in range(first, row.numel()):
                logp = F.log_softmax(model(input_ids=row[None, :t]).logits[0, -1].float(), -1)
                nll -= float(logp[row[t]])
                count += 1
    assert res.metrics["perplexity/tokens"] == count == 2 * (12 - first)
    assert res.metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert sum(res.items["perplexity"]["nll"]) == pytest.approx(nll, rel=1e-4)


def test_decode_prompt_starts_with_the_bos_when_the_tokenizer_adds_one(tok):
    from sparsebench.evaluators import decode

    seen = []
    model = make_tiny("llama")
    orig = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"].clone())
        return orig(*args, **kwargs)

    model.forward = spy
    prompt = heldout_windows(tok, load_tiny(None), 1, 10).ids
    decode.greedy_decode(model, prompt, 2)
    assert (seen[0][0, 0].item() == BOS) == bool(prefix_tokens(tok))


def test_calibration_key_changes_with_the_tokenizers_prefix():
    dcfg = OmegaConf.create({"corpus": "tiny", "calibration": {"num_sequences": 2, "seq_len": 16, "batch_size": 2}})
    cats = CATS(OmegaConf.create({"sparsity": 0.5}))
    with_bos = calibration_key("m", dcfg, cats, 0, tiny_tokenizer(add_bos=True))
    without = calibration_key("m", dcfg, cats, 0, tiny_tokenizer())
    assert with_bos != without and with_bos["prefix_tokens"] == [BOS] and without["prefix_tokens"] == []


def _three_works():
    import random

    words = TINY_TEXT.split()
    rng = random.Random(0)  # random word order: no slice of a work repeats
    works = {f"work{i}": " ".join(rng.choice(words) for _ in range(150 * (3 - i))) for i in range(3)}
    return TextSplits("toy", "", works, [])


def test_heldout_windows_come_evenly_from_every_work():
    tok = tiny_tokenizer()
    splits = _three_works()
    w = heldout_windows(tok, splits, 7, 20)
    assert w.sources == ["work0"] * 3 + ["work1"] * 2 + ["work2"] * 2
    assert w.tokens_per_source() == {"work0": 3 * 19, "work1": 2 * 19, "work2": 2 * 19}
    for name in splits.heldout_works:  # each window is a slice of its own work's tokens
        ids = text_ids(tok, splits.heldout_sources[name]).tolist()
        rows = [r for r, s in zip(w.ids.tolist(), w.sources) if s == name]
        starts = [next(i for i in range(len(ids)) if ids[i:i + 20] == r) for r in rows]
        assert starts == sorted(starts) and all(b - a >= 20 for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("length,span,n", [(100, 10, 3), (100, 10, 10), (101, 7, 4), (50, 10, 9), (37, 5, 1)])
def test_even_starts_are_centred_disjoint_and_in_range(length, span, n):
    starts = even_starts(length, span, n)
    assert len(starts) == min(n, length // span)
    assert all(0 <= s <= length - span for s in starts)
    assert all(b - a >= span for a, b in zip(starts, starts[1:]))
    seg = length / len(starts)  # each window overlaps its own segment's centre
    assert all(s <= (i + 0.5) * seg <= s + span for i, s in enumerate(starts))


# ------------------------------------------------------------------ provenance

def _copied_sparsifier(tmp_path, name):
    """A copy of the CATS module under another name, importable from tmp_path."""
    import importlib

    src = (__import__("sparsebench.sparsifiers.cats").sparsifiers.cats).__file__
    text = open(src).read().replace('@SPARSIFIERS.register("cats")', "")  # used directly, not by name
    text = text.replace("from . import SPARSIFIERS", "from sparsebench.sparsifiers import SPARSIFIERS")
    text = text.replace("from .base import", "from sparsebench.sparsifiers.base import")
    text = text.replace("from ..", "from sparsebench.")
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
    return path, module


def test_editing_a_sparsifier_module_recomputes_its_calibration(tmp_path):
    import importlib

    path, module = _copied_sparsifier(tmp_path, "cats_copy_for_provenance")
    sys.path.insert(0, str(tmp_path))  # for the reload below
    tok = tiny_tokenizer()
    dcfg = OmegaConf.create({"corpus": "tiny", "calibration": {"num_sequences": 2, "seq_len": 16, "batch_size": 2}})

    def calibrate():
        model = make_tiny("llama")
        sp = module.CATS(OmegaConf.create({"sparsity": 0.5}))
        ctl = SparsityController(sp, DenseBackend()).attach(model)
        return load_or_calibrate(sp, ctl, model, tok, load_tiny(None), "tiny-llama", dcfg, 0, tmp_path / "cache")[1]

    assert calibrate()["calibration"] == "computed"
    assert calibrate()["calibration"] == "cached"
    path.write_text(path.read_text() + "\nEDITED = True  # a code edit (it could change the thresholds)\n")
    # this process still runs the module it loaded: its state is still the right one
    assert calibrate()["calibration"] == "cached"
    # a new process loads the edited module: the old state is not reused
    importlib.reload(module)
    forget_hashes()
    assert calibrate()["calibration"] == "computed"
    assert calibrate()["calibration"] == "cached"
    # a new process after an edit of wording only (a comment) reuses it
    path.write_text(path.read_text() + "\n# wording only\n")
    importlib.reload(module)
    forget_hashes()
    assert calibrate()["calibration"] == "cached"


def test_source_files_follow_imports_and_skip_presentation():
    files = source_files(["sparsebench.sparsifiers.cats"])
    assert {"sparsebench/sparsifiers/cats.py", "sparsebench/sparsifiers/base.py", "sparsebench/core/registry.py"} <= set(files)
    assert not any("teal" in f for f in files)  # another method's module is not a dependency
    run_files = source_files(["sparsebench.run"])
    assert "sparsebench/models/patching.py" in run_files and "sparsebench/reporting/results.py" not in run_files


def test_a_sweep_point_made_by_other_code_is_not_reused(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("x = 1\n")
    config = {"model": "m", "logger": {"mode": "disabled"}}
    files = {str(module): file_digest(module)}
    results = {"status": "ok", "config": config, "code": {"files": files}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert files_unchanged(files) and finished_run(tmp_path, config) is not None
    module.write_text("x = 2\n")
    forget_hashes()  # as a new process sees the edited file
    assert finished_run(tmp_path, config) is None
    # a results.json without a code record (made before provenance existed) is rerun too
    (tmp_path / "results.json").write_text(json.dumps({"status": "ok", "config": config}))
    assert finished_run(tmp_path, config) is None


def test_committed_artifacts_are_used_only_with_the_same_key(tmp_path):
    from sparsebench.models.calibration import ArtifactCache

    seed, calls = tmp_path / "committed", []

    def compute(v):
        def f():
            calls.append(v)
            return {"path": torch.tensor([v])}
        return f

    ArtifactCache(seed, {"code": "a"}).get("teal-greedy", {"step": 1}, compute(1.0))  # as committed
    fresh = ArtifactCache(tmp_path / "cache", {"code": "a"}, seed=seed)
    assert float(fresh.get("teal-greedy", {"step": 1}, compute(2.0))["path"]) == 1.0 and calls == [1.0]
    other_code = ArtifactCache(tmp_path / "cache2", {"code": "b"}, seed=seed)
    assert float(other_code.get("teal-greedy", {"step": 1}, compute(3.0))["path"]) == 3.0 and calls == [1.0, 3.0]


def test_wording_edits_keep_the_hash_code_edits_change_it(tmp_path):
    from sparsebench.store.provenance import semantic_source

    f = tmp_path / "m.py"
    base = 'def f(x):\n    """Double."""\n    return 2 * x  # why\n'
    f.write_text(base)
    ref = semantic_source(f)
    for wording in ('def f(x):\n    """Twice x."""\n    return 2 * x\n', 'def f(x):\n\n    return 2 * x  # other\n',
                    '"""A module."""\n' + base):
        f.write_text(wording)
        assert semantic_source(f) == ref
    for code in ('def f(x):\n    return 3 * x\n', 'def f(y):\n    return 2 * y\n', base + "g = 1\n"):
        f.write_text(code)
        assert semantic_source(f) != ref


def test_results_json_carries_tokens_per_work_both_corpora_code_and_paired_stats(tmp_path):
    """The real command on a tiny model whose tokenizer adds a BOS, with a local lm-eval task."""
    from test_cli import sparsebench
    from test_lm_eval_sparse_path import DOCS

    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "output_type: multiple_choice\nvalidation_split: validation\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    proc = sparsebench(["model=tiny-gemma3", "data=tiny", "logger.mode=disabled", "sparsifier=cats",
                        "evaluator=[sparsity,perplexity,lm_eval]", f"evaluator.lm_eval.include_path={tmp_path}",
                        "evaluator.lm_eval.tasks=[tiny_mc]", "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["data"]["prefix_tokens"] == [BOS]
    assert r["data"]["heldout_tokens"] == {"tiny": {"tiny[half:]": r["metrics"]["perplexity/tokens"]},
                                           "tiny_prose": {"tiny_prose": r["metrics"]["perplexity/tiny_prose/tokens"]}}
    assert {"perplexity", "perplexity/tiny_prose"} <= set(r["metrics"]) <= set(r["dense_metrics"])
    assert r["code"]["source_sha256"] and "sparsebench/sparsifiers/cats.py" in r["code"]["files"]
    assert r["code"]["git_commit"] is None or len(r["code"]["git_commit"]) == 40
    for key in ("lm_eval/tiny_mc/acc", "lm_eval/avg_acc"):
        res = r["paired"][key]
        assert res["n"] == len(DOCS) and res["ci_low"] <= res["delta"] <= res["ci_high"] and 0 <= res["p_mcnemar"] <= 1
        assert res["acc_b"] == pytest.approx(r["metrics"]["lm_eval/avg_acc"])
    for key in ("perplexity", "perplexity/tiny_prose"):
        res = r["paired"][key]
        assert res["ppl_b"] == pytest.approx(r["metrics"][key]) and res["ppl_a"] == pytest.approx(r["dense_metrics"][key])
        assert res["ci_low"] <= res["ratio"] <= res["ci_high"]
    assert len(r["items"]["sparse"]["lm_eval"]["tiny_mc"]["acc"]) == len(DOCS)
    assert "paired Δ" in proc.stdout  # the terminal table shows Δ with its CI


def test_only_artifacts_of_todays_code_are_committed(tmp_path):
    from sparsebench.models.calibration import CALIBRATION_MODULES, ArtifactCache
    from sparsebench.experiments.tables import commit_artifacts
    from sparsebench.store.provenance import code_digest
    from sparsebench.run import DENSE_MODULES

    today = code_digest(["sparsebench.sparsifiers.teal", *CALIBRATION_MODULES])
    calib = tmp_path / "cache" / "calibration"
    ArtifactCache(calib, {"method": "teal", "code": today}).get("teal-greedy-layer", {"layer": 0}, lambda: {"x": torch.ones(1)})
    ArtifactCache(calib, {"method": "teal", "code": "old"}).get("teal-greedy-layer", {"layer": 1}, lambda: {"x": torch.ones(1)})
    dense = code_digest(["sparsebench.evaluators.perplexity", *DENSE_MODULES])
    ArtifactCache(tmp_path / "cache" / "dense_baselines", {"code": dense}).get("dense-perplexity", {}, lambda: {"m": 1})
    tiny = {"code": dense, "model_cfg": {"source": "tiny"}}  # today's code, but a tiny random model
    ArtifactCache(tmp_path / "cache" / "dense_baselines", tiny).get("dense-perplexity", {}, lambda: {"m": 2})
    copied = commit_artifacts(tmp_path / "cache", tmp_path / "out")
    assert sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in copied) == ["dense-perplexity", "teal-greedy"]
    assert all((p.with_suffix(".json")).exists() for p in copied)
