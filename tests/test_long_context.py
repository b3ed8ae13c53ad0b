"""Long-context evaluators (passkey, long_perplexity, long_decode) and the passkey generator."""
import json

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sparsebench.data.passkey import NEEDLE, QUESTION, answer_key, passkey_items

LONG_EVALS = ["passkey", "long_perplexity", "long_decode"]
SMALL = ["evaluator.passkey.contexts=[200,400]", "evaluator.passkey.per_context=2",
         "evaluator.passkey.question_chars=40", "evaluator.passkey.answer_tokens=4",
         "evaluator.long_perplexity.seq_lens=[256]", "evaluator.long_perplexity.num_windows=2",
         "evaluator.long_decode.contexts=[128,256]", "evaluator.long_decode.new_tokens=3",
         "evaluator.long_decode.repeats=1", "evaluator.long_decode.warmup=1"]


def small(*evaluators):
    return [o for o in SMALL if o.split(".")[1] in evaluators]


def compose_cfg(overrides, tmp_path):
    with initialize_config_module(config_module="sparsebench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny-llama", "data=tiny", "sparsifier=none",
                                                       "logger.mode=disabled", "threads=1",
                                                       f"cache_dir={tmp_path / 'cache'}", *overrides])
    return cfg


def run_point(overrides, tmp_path):
    from sparsebench.run import run

    cfg = compose_cfg(overrides, tmp_path)
    return run(cfg, tmp_path / "out")


def test_passkey_prompts_fit_and_hold_the_key(tiny_tokenizer):
    items = passkey_items(tiny_tokenizer, [300, 600], 3, seed=1, question_chars=40, answer_tokens=5)
    again = passkey_items(tiny_tokenizer, [300, 600], 3, seed=1, question_chars=40, answer_tokens=5)
    assert [i.key for i in items] == [i.key for i in again]
    for it in items:
        assert it.prompt_tokens + 5 <= it.context
        assert it.prompt_tokens > 0.8 * (it.context - 5)  # the filler fills the window
        text = tiny_tokenizer.decode(it.prefill.tolist() + it.decode.tolist())
        assert NEEDLE.format(key=it.key) in text and text.rstrip().endswith(QUESTION)
    assert [i.depth for i in items[:3]] == [1 / 3, 2 / 3, 1.0]
    assert answer_key(" 4213. Remember") == 4213 and answer_key(" none") is None


def test_attention_with_an_evaluator_that_ignores_it_is_refused(tmp_path):
    from sparsebench.cli import check_attention_applies
    from sparsebench.core.errors import ConfigError

    check_attention_applies(compose_cfg(["attention=quest", "evaluator=[passkey,long_decode]"], tmp_path))
    check_attention_applies(compose_cfg(["evaluator=perplexity"], tmp_path))
    with pytest.raises(ConfigError, match="perplexity would measure dense attention"):
        check_attention_applies(compose_cfg(["attention=quest", "evaluator=[passkey,perplexity]"], tmp_path))


def test_attention_none_compares_equal_to_a_run_without_the_group():
    from sparsebench.sweep import comparable_config

    old = {"model": {"name": "m"}, "seed": 0}
    assert comparable_config(old | {"attention": {"name": "none"}}) == comparable_config(old)
    assert comparable_config(old | {"attention": {"name": "quest"}}) != comparable_config(old)


def test_full_budget_gives_the_dense_numbers_item_by_item(tmp_path):
    res = run_point(["attention=quest", "attention.dense_layers=[]", "attention.budget_fraction=1.0",
                     f"evaluator=[{','.join(LONG_EVALS)}]", *small(*LONG_EVALS)], tmp_path)
    m = res["metrics"]
    items = res["items"]["sparse"]
    for c in (200, 400):
        assert items[f"passkey/method/ctx={c}"] == items[f"passkey/dense/ctx={c}"]
        assert res["data"]["passkey"]["paired_vs_dense"][f"method/ctx={c}"]["delta"] == 0
    for corpus in ("tiny", "tiny_prose"):
        key = f"long_perplexity/{corpus}/len=256"
        assert items[key] == items[f"{key}/dense"] and m[key] == m[f"{key}/dense"]
    for c in (128, 256):
        assert m[f"long_decode/ctx={c}/method/argmax_agreement"] == 1.0
    assert res["per_layer"] and "attn_ms/dense" in res["per_layer"][0]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["status"] == "ok"


def test_small_budget_reads_fewer_keys_and_reports_paired_statistics(tmp_path):
    res = run_point(["attention=quest", "attention.dense_layers=[]", "attention.budget=32", "attention.page_size=8",
                     "evaluator=[passkey,long_perplexity]", "evaluator.passkey.budgets=[16,64]",
                     *small("passkey", "long_perplexity")], tmp_path)
    m = res["metrics"]
    assert m["passkey/budget=16/kv_read_fraction"] < m["passkey/budget=64/kv_read_fraction"] < 1
    # per context too: a fixed budget is a smaller share of a longer context, the pooled share between
    short, long = (m[f"passkey/budget=16/ctx={c}/kv_read_fraction"] for c in (200, 400))
    assert 0 < long < m["passkey/budget=16/kv_read_fraction"] < short < 1
    paired = res["data"]["passkey"]["paired_vs_dense"]
    assert {"budget=16", "budget=64", "budget=16/ctx=200"} <= set(paired)
    assert "ci_low" in paired["budget=16"] or "ci" in json.dumps(paired["budget=16"])
    lp = res["data"]["long_perplexity"]["paired_vs_dense"]["long_perplexity/tiny/len=256"]
    assert lp["n_windows"] == 2 and lp["ratio"] != 1.0
    assert 0 < m["long_perplexity/tiny/len=256/kv_read_fraction"] < 1


@pytest.mark.parametrize("method", ["quest", "lightning_indexer"])
def test_batched_variants_give_the_numbers_of_one_continuation_per_variant(tmp_path, method):
    """evaluator.passkey.batch_variants continues one prefill as a batch with a row per
    variant; the items and key reads are those of continuing a copy per variant."""
    runs = [run_point([f"attention={method}", "attention.dense_layers=[]", "evaluator=[passkey]",
                       "evaluator.passkey.budgets=[16,64]", f"evaluator.passkey.batch_variants={b}",
                       *small("passkey")], tmp_path / str(b)) for b in (True, False)]
    batched, looped = runs
    assert batched["items"]["sparse"] == looped["items"]["sparse"]
    reads = [{k: v for k, v in r["metrics"].items() if k.endswith("kv_read_fraction")} for r in runs]
    assert reads[0] == reads[1] and 0 < reads[0]["passkey/budget=16/kv_read_fraction"] < 1


def test_mlp_sparsifier_composes_with_attention_sparsity(tmp_path):
    """``sparsifier=cats attention=quest``: both are installed at once. The dense-attention
    baseline of the run keeps the MLP sparse (so it differs from an all-dense run), and the
    attention method still reads fewer keys than it."""
    evals = ["evaluator=[long_perplexity]", *small("long_perplexity")]
    quest = ["attention=quest", "attention.dense_layers=[]", "attention.budget=32", "attention.page_size=8"]
    composed = run_point(["sparsifier=cats", "sparsifier.sparsity=0.5", *quest, *evals], tmp_path / "both")
    alone = run_point([*quest, *evals], tmp_path / "attention")
    key = "long_perplexity/tiny/len=256"
    mc, ma = composed["metrics"], alone["metrics"]
    assert mc[f"{key}/dense"] != ma[f"{key}/dense"]  # the MLP masks act in the baseline too
    assert mc[key] != mc[f"{key}/dense"] and 0 < mc[f"{key}/kv_read_fraction"] < 1
    assert composed["config"]["sparsifier"]["name"] == "cats" and composed["config"]["attention"]["name"] == "quest"


def test_attention_none_reports_dense_only(tmp_path):
    res = run_point(["evaluator=[passkey]", *small("passkey")], tmp_path)
    assert set(res["metrics"]) == {"passkey/dense", "passkey/dense/ctx=200", "passkey/dense/ctx=400"}


def test_trained_method_state_is_cached_per_code_and_settings(tmp_path):
    """head_sparsity trains once; a second run with the same settings reuses the state."""
    over = ["attention=head_sparsity", "attention.steps=5", "evaluator=[long_perplexity]", *small("long_perplexity")]
    run_point(over, tmp_path)
    files = sorted((tmp_path / "cache" / "attention").glob("*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    run_point(over, tmp_path)
    assert files[0].stat().st_mtime_ns == mtime
    run_point([*over, "attention.lr=0.01"], tmp_path)
    assert len(list((tmp_path / "cache" / "attention").glob("*.pt"))) == 2


def test_configs_compose_for_every_attention_method(tmp_path):
    from sparsebench.attention import build_attention

    for name in ("none", "quest", "head_sparsity"):
        cfg = compose_cfg([f"attention={name}"], tmp_path)
        method = build_attention(cfg.attention)
        assert (method is None) == (name == "none")
        OmegaConf.to_container(cfg, resolve=True)


def test_attention_doc_blocks_read_back_the_results(tmp_path):
    """The generated docs tables hold exactly the numbers of results.json."""
    from sparsebench.experiments.tables import attention_blocks

    res = run_point(["attention=quest", "attention.dense_layers=[]", "attention.budget=32", "attention.page_size=8",
                     f"evaluator=[{','.join(LONG_EVALS)}]", "evaluator.passkey.budgets=[16]",
                     "evaluator.long_decode.budgets=[16]", *small(*LONG_EVALS)], tmp_path)
    m = res["metrics"]
    blocks = attention_blocks(tmp_path / "out")

    def rows(block):
        return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()
                if line.startswith("| tiny")]

    passkey = rows(blocks["attention-passkey"])
    assert [(r[3], r[4]) for r in passkey] == [("200", "16"), ("400", "16")]
    assert passkey[0][6] == f"{m['passkey/budget=16/ctx=200']:.2f}" and passkey[0][5] == f"{m['passkey/dense/ctx=200']:.2f}"
    decode = rows(blocks["attention-decode"])
    assert [(r[3], r[7]) for r in decode] == [(str(c), f"{m[f'long_decode/ctx={c}/budget=16/speedup']:.2f}")
                                              for c in (128, 256)]
    ppl = rows(blocks["attention-perplexity"])
    assert {(r[3], r[7]) for r in ppl} == {(c, f"{m[f'long_perplexity/{c}/len=256']:.2f}") for c in ("tiny", "tiny_prose")}
