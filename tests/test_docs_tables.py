"""Generated tables in the README and docs/: every marked block equals what its generator makes
from the committed result files, and the machinery that fills the blocks touches nothing else."""
import re
import shutil
from pathlib import Path

import pytest

from sparsebench.experiments import tables
from sparsebench.experiments.figures import TASKS
from sparsebench.experiments.tables import (GENERATED_FILES, NO_COMPARISON, REPO, backend_blocks, committed_results,
                                            fill_blocks, generated_blocks, update_docs)

BACKENDS = REPO / "experiments" / "results" / "backends"
BLOCK = re.compile(r"<!-- table:([\w-]+) -->\n(.*?)\n<!-- /table:\1 -->", re.S)


def _blocks_in(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in BLOCK.finditer(text)}


def _md_rows(body: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``body`` as dicts keyed by its header."""
    lines = [line for line in body.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    header, rows = cells[0], cells[2:]
    return [dict(zip(header, r)) for r in rows]


def _brute_csv(path: Path) -> list[dict[str, str]]:
    """Plain comma split (the committed backend CSVs hold no quoted fields)."""
    lines = path.read_text().splitlines()
    keys = lines[0].split(",")
    return [dict(zip(keys, line.split(","))) for line in lines[1:] if line]


def _num(cell: str) -> float:
    return float(re.match(r"-?[\d.]+", cell).group(0))


def _copy_repo_docs(dst: Path) -> None:
    for rel in GENERATED_FILES:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, dst / rel)


# ------------------------------------------------------------------ (a) the repository is up to date

def test_committed_docs_match_the_committed_results():
    stale = update_docs(check=True)
    assert stale == [], (f"generated tables out of date in {stale}: run "
                         "`python -m sparsebench.experiments.tables docs` and commit the result")


def test_every_page_with_a_block_is_generated_and_every_block_has_a_generator():
    known = generated_blocks(committed_results())
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    for page in pages:
        text = re.sub(r"`[^`\n]*`", "", page.read_text())  # markers quoted in prose are not blocks
        if "<!-- table:" not in text:
            continue
        rel = page.relative_to(REPO).as_posix()
        assert rel in GENERATED_FILES, f"{rel} holds a generated block but is not in GENERATED_FILES"
        names = re.findall(r"<!-- table:([\w-]+) -->", text)
        assert names and set(names) <= set(known), f"{rel}: blocks without a generator: {set(names) - set(known)}"
        assert len(names) == len(_blocks_in(text)), f"{rel}: a block is not closed by its <!-- /table:NAME -->"
    for rel in GENERATED_FILES:
        assert (REPO / rel).exists(), rel


def test_comparison_blocks_without_results_say_how_to_make_them():
    blocks = generated_blocks([])
    assert blocks["comparison-accuracy"] == blocks["comparison-perplexity"] == NO_COMPARISON
    assert "\n" not in NO_COMPARISON
    assert "sparsebench -m experiment=fig4_accuracy_vs_sparsity" in NO_COMPARISON
    assert "hydra.sweep.dir=experiments/results/comparison" in NO_COMPARISON


def test_comparison_blocks_with_results_are_tables(tmp_path):
    """With a committed result the empty-set note gives way to the paired tables, and the
    docs are rewritten once and then up to date."""
    from sparsebench.core.stats import paired_accuracy_tasks, paired_perplexity

    a = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    b = [1, 0, 0, 1, 0, 1, 0, 0, 1, 1]
    acc = paired_accuracy_tasks({t: (a, b) for t in TASKS})
    per_task = acc.pop("tasks")
    nll_a, nll_b, tokens = [10.0, 12.0, 11.0], [11.0, 12.5, 11.5], [5, 5, 5]
    paired = {f"lm_eval/{t}/acc": r for t, r in per_task.items()} | {
        "lm_eval/avg_acc": acc, "perplexity": paired_perplexity(nll_a, nll_b, tokens),
        "perplexity/lambada": paired_perplexity(nll_a, nll_b, tokens)}
    result = {"model": {"id": "org/tiny-model"}, "sparsifier": {"name": "cats", "sparsity": 0.5},
              "metrics": {"sparsity/mean": 0.5}, "data": {"corpus": "shakespeare"}, "config": {}, "paired": paired}

    blocks = generated_blocks([result])
    assert NO_COMPARISON not in blocks.values()
    acc_rows = _md_rows(blocks["comparison-accuracy"])
    assert acc_rows[0][next(iter(acc_rows[0]))] == "cats"
    assert _num(acc_rows[0]["0.5"]) == pytest.approx(100 * acc["delta"], abs=0.05)
    assert "shakespeare / lambada" in blocks["comparison-perplexity"]
    # the status names what of the planned grid is there and what is missing
    from sparsebench.experiments.tables import planned_grid

    models, methods, levels = planned_grid()
    status = blocks["comparison-status"]
    assert f"0 of {len(methods) * len(levels)} planned points" in status and f"cats@{levels[0]:g}" in status

    _copy_repo_docs(tmp_path)
    stale = update_docs(check=False, repo=tmp_path, results=[result])
    assert "README.md" in stale and "docs/results.md" in stale
    assert update_docs(check=True, repo=tmp_path, results=[result]) == []
    assert blocks["comparison-accuracy"] in (tmp_path / "README.md").read_text()


# ------------------------------------------------------------------ (b) fill_blocks

def test_fill_blocks_replaces_only_block_bodies():
    text = ("# Title\n\nProse with 1.23 in it.\n"
            "<!-- table:one -->\nold body\nmore old\n<!-- /table:one -->\n"
            "Between | a | table-like | line |\n"
            "<!-- table:two -->\n<!-- /table:two -->\ntail\n")
    new = fill_blocks(text, {"one": "| x |\n|---|\n| 1 |", "two": "body two", "unused": "never placed"})
    assert new == ("# Title\n\nProse with 1.23 in it.\n"
                   "<!-- table:one -->\n| x |\n|---|\n| 1 |\n<!-- /table:one -->\n"
                   "Between | a | table-like | line |\n"
                   "<!-- table:two -->\nbody two\n<!-- /table:two -->\ntail\n")
    assert fill_blocks(new, {"one": "| x |\n|---|\n| 1 |", "two": "body two"}) == new  # idempotent
    assert fill_blocks("no blocks here\n", {"one": "x"}) == "no blocks here\n"


def test_fill_blocks_refuses_an_unknown_block_name():
    text = "<!-- table:one -->\n<!-- /table:one -->\n<!-- table:nosuch -->\nx\n<!-- /table:nosuch -->\n"
    with pytest.raises(SystemExit, match="nosuch"):
        fill_blocks(text, {"one": "body"})


# ------------------------------------------------------------------ (c) backend blocks = the CSVs

def test_backend_blocks_are_in_the_docs_and_name_their_csv():
    blocks = backend_blocks()
    assert set(blocks) == {"backend-churn", "backend-weight-selection", "backend-weight-selection-grid",
                           "backend-mlp-step", "backend-decode", "backend-mlp-step-cold", "backend-decode-fused",
                           "backend-offload"}
    docs = _blocks_in((REPO / "docs" / "backends.md").read_text())
    for name, body in blocks.items():
        assert docs[name] == body
        assert "experiments/results/" in body or body.startswith("_No ")


def test_cold_mlp_step_block_equals_the_benchmark_csv(tmp_path):
    """The cold MLP-step table reads back what the benchmark wrote (brute force over the CSV)."""
    from sparsebench.backends.bench import mlp_step_cold
    from sparsebench.experiments.tables import backend_mlp_step_cold_block

    assert backend_mlp_step_cold_block(tmp_path).startswith("_No ")
    mlp_step_cold([(16, 64), (8, 32)], [0.25, 0.5], 0.1, [1, 2], steps=2, out=tmp_path, layers=2)
    rows = _md_rows(backend_mlp_step_cold_block(tmp_path))
    csv_rows = _brute_csv(tmp_path / "mlp_step_cold.csv")
    assert len(rows) == 4 and len(csv_rows) == 8
    for x in csv_rows:
        (row,) = [r for r in rows if r["MLP shape"] == f"{x['hidden']}×{x['intermediate']}"
                  and r["threads"] == x["threads"]]
        same = sorted(float(y["dense_ms"]) for y in csv_rows if (y["hidden"], y["threads"]) == (x["hidden"], x["threads"]))
        assert _num(row["dense torch fp32 ms (median over densities)"]) == pytest.approx(sum(same) / 2, rel=1e-2)
        d = float(x["density"])
        cell = row[f"density {d:g}: fused (fraction of {1 / d:.3g}×) / fused bf16 / cached / index_select"]
        fused, bf16, cached, naive = (_num(c.split("(")[0]) for c in cell.split(" / "))
        assert fused == pytest.approx(float(x["fused_speedup"]), abs=0.006)
        assert bf16 == pytest.approx(float(x["fused_bf16_speedup"]), abs=0.006)
        assert cached == pytest.approx(float(x["cached_speedup"]), abs=0.006)
        assert naive == pytest.approx(float(x["index_select_speedup"]), abs=0.006)
        assert float(cell.split("(")[1].split(")")[0]) == pytest.approx(float(x["fused_fraction_of_limit"]), abs=0.006)
        own = sorted(float(y["dense_ms"]) / float(y["fused_dense_ms"]) for y in csv_rows
                     if (y["hidden"], y["threads"]) == (x["hidden"], x["threads"]))
        assert _num(row["fused fp32 dense path"]) == pytest.approx(sum(own) / 2, abs=0.006)


def test_decode_block_equals_the_csv():
    rows = _md_rows(backend_blocks()["backend-decode"])
    csv_rows = _brute_csv(BACKENDS / "decode.csv")
    assert len(rows) == len(csv_rows)
    for x in csv_rows:
        (row,) = [r for r in rows if (r["model"], r["method"], r["backend"]) == (x["model"], x["method"], x["backend"])]
        assert _num(row["tok/s"]) == pytest.approx(float(x["tok_s"]), abs=0.05)
        assert _num(row["tok/s HF dense"]) == pytest.approx(float(x["tok_s_hf"]), abs=0.05)
        assert _num(row["bytes limit"]) == pytest.approx(float(x["amdahl_limit"]), abs=0.005)
        assert row["identical tokens (replayed masks)"] == ("yes" if float(x["identical"]) == 1 else "no")


def test_churn_block_equals_the_csv():
    rows = _md_rows(backend_blocks()["backend-churn"])
    for x in _brute_csv(BACKENDS / "churn.csv"):
        (row,) = [r for r in rows if (r["model"], r["method"]) == (x["model"], x["method"])]
        churn = row["churn (min–max over layers)"]
        assert _num(churn) == pytest.approx(float(x["churn"]), abs=0.005)
        lo, hi = re.search(r"\(([\d.]+)–([\d.]+)\)", churn).groups()
        assert float(lo) == pytest.approx(float(x["churn_min_layer"]), abs=0.005)
        assert float(hi) == pytest.approx(float(x["churn_max_layer"]), abs=0.005)
        assert _num(row["rows entering / token"]) == pytest.approx(float(x["swaps_per_token"]), abs=0.5)


def test_mlp_step_and_weight_selection_cells_equal_the_csvs():
    rows = _md_rows(backend_blocks()["backend-mlp-step"])
    x = next(r for r in _brute_csv(BACKENDS / "mlp_step_churn0.4.csv")
             if (r["hidden"], r["threads"], r["density"]) == ("2048", "2", "0.5"))
    (row,) = [r for r in rows if (r["MLP shape"], r["churn"], r["threads"]) == ("2048×8192", "0.4", "2")]
    cell = next(v for k, v in row.items() if k.startswith("density 0.5"))
    cached, naive = (float(v.strip().rstrip("×")) for v in cell.split("/"))
    assert cached == pytest.approx(float(x["cached_speedup"]), abs=0.005)
    assert naive == pytest.approx(float(x["index_select_speedup"]), abs=0.005)

    rows = _md_rows(backend_blocks()["backend-weight-selection"])
    for name, threads in (("smol_t1", 1), ("smol_t2", 2), ("gemma_t2", 2)):
        for x in _brute_csv(BACKENDS / f"weight_selection_measured_{name}.csv"):
            (row,) = [r for r in rows if r["MLP shape"] == f"{x['hidden']}×{x['intermediate']}"
                      and float(r["density"]) == float(x["density"]) and float(r["churn"]) == float(x["churn"])]
            assert _num(row[f"speedup, {threads} thread" + ("s" if threads > 1 else "")]) == pytest.approx(
                float(x["speedup"]), abs=0.005)
            assert row["method"] != "—"  # every measured point is matched to its method in churn.csv

    rows = _md_rows(backend_blocks()["backend-weight-selection-grid"])
    x = next(r for r in _brute_csv(BACKENDS / "weight_selection_t2.csv")
             if (r["hidden"], r["density"], r["churn"]) == ("3072", "0.3", "0.01"))
    (row,) = [r for r in rows if (r["MLP shape"], r["density"]) == ("3072×8192", "0.3")]
    assert _num(row["churn 0.01"]) == pytest.approx(float(x["speedup"]), abs=0.005)


# ------------------------------------------------------------------ (d) a hand edit is reported

def test_a_hand_edit_inside_a_block_is_reported_and_repaired(tmp_path):
    _copy_repo_docs(tmp_path)
    results = committed_results()
    assert update_docs(check=True, repo=tmp_path, results=results) == []

    page = tmp_path / "docs" / "backends.md"
    original = page.read_text()
    body = _blocks_in(original)["backend-decode"]
    edited_body = body.replace("| yes |", "| no |", 1)
    assert edited_body != body
    page.write_text(original.replace(body, edited_body))
    assert update_docs(check=True, repo=tmp_path, results=results) == ["docs/backends.md"]
    assert page.read_text() != original  # check wrote nothing
    assert update_docs(check=False, repo=tmp_path, results=results) == ["docs/backends.md"]
    assert page.read_text() == original

    readme = tmp_path / "README.md"
    text = readme.read_text()
    readme.write_text(text.replace("<!-- /table:comparison-accuracy -->",
                                   "| gemma3-270m | 0.636 |\n<!-- /table:comparison-accuracy -->"))
    assert update_docs(check=True, repo=tmp_path, results=results) == ["README.md"]
    readme.write_text(text + "\nA sentence outside every block.\n")
    assert update_docs(check=True, repo=tmp_path, results=results) == []


def test_the_check_command_exits_nonzero_on_a_stale_block(tmp_path, monkeypatch):
    _copy_repo_docs(tmp_path)
    page = tmp_path / "docs" / "results.md"
    page.write_text(page.read_text().replace("<!-- /table:comparison-perplexity -->",
                                             "typed by hand\n<!-- /table:comparison-perplexity -->"))
    monkeypatch.setattr(tables, "update_docs", lambda check=False: update_docs(check=check, repo=tmp_path))
    with pytest.raises(SystemExit, match="docs/results.md"):
        tables.main(["docs", "--check"])


def test_offload_block_equals_the_committed_results():
    """Each cell of the offload table is read back against the metrics of its results.json."""
    from sparsebench.experiments.figures import method, model_name
    from sparsebench.experiments.tables import OFFLOAD, backend_offload_block
    from sparsebench.reporting.results import load_results

    results = [r for r in load_results([OFFLOAD]) if "offload/none/ms_per_token" in r["metrics"]]
    rows = _md_rows(backend_offload_block())
    assert len(rows) == len(results)
    for r in results:
        (row,) = [x for x in rows if (x["model"], x["method"]) == (model_name(r), method(r))]
        m = r["metrics"]
        assert _num(row["dense from slow tier ms"]) == pytest.approx(m["offload/none/ms_per_token"], abs=0.05)
        for policy in ("lru", "hot"):
            for c in (0.1, 0.25, 0.5):
                hit, ms = row[f"{policy.upper() if policy == 'lru' else policy} C={c:g}: hit / ms"].split(" / ")
                assert float(hit) == pytest.approx(m[f"offload/{policy}/c{c:g}/hit_rate"], abs=0.005)
                assert float(ms) == pytest.approx(m[f"offload/{policy}/c{c:g}/ms_per_token"], abs=0.05)


def test_decode_fused_block_reads_back_its_runs(tmp_path):
    """The fused-decode table from a tiny sweep: every cell equals its results.json metric,
    and the bf16-weights row carries no accuracy from the (fp32) comparison."""
    from test_cli import TINY, sparsebench

    from sparsebench.experiments.tables import backend_decode_fused_block
    from sparsebench.reporting.results import load_results

    small = ["evaluator.decode.new_tokens=6", "evaluator.decode.prompt_tokens=6", "evaluator.decode.repeats=1",
             "evaluator.step_overhead.new_tokens=6", "evaluator.step_overhead.prompt_tokens=6",
             "evaluator.step_overhead.repeats=1", "evaluator.sparsity.num_windows=1", "threads=1"]
    for extra in (["sparsifier=cats"], ["sparsifier=cats", "backend.weights=bfloat16"]):
        proc = sparsebench(["-m", "experiment=decode_fused", *extra, *small, *TINY,
                            f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert backend_decode_fused_block(tmp_path / "nothing").startswith("_No ")
    fake_comparison = [{"sparsifier": {"name": "cats", "sparsity": 0.5}}]  # no paired data: no row
    rows = _md_rows(backend_decode_fused_block(tmp_path / "sweep", comparison=fake_comparison))
    results = load_results([tmp_path / "sweep"])
    assert len(rows) == len(results) == 2
    for r in results:
        bf16 = r["config"]["backend"]["weights"] == "bfloat16"
        (row,) = [x for x in rows if ("bfloat16" in x["sparsity"]) == bf16]
        m = r["metrics"]
        assert _num(row["tok/s fused"]) == pytest.approx(m["decode/tokens_per_s"], abs=0.05)
        assert _num(row["Amdahl limit"]) == pytest.approx(m["decode/amdahl_limit"], abs=0.005)
        assert _num(row["fraction of limit"]) == pytest.approx(m["decode/fraction_of_limit"], abs=0.005)
        assert _num(row["bytes limit (fraction of it)"]) == pytest.approx(m["decode/bytes_limit"], abs=0.005)
        assert _num(row["overhead ms/token (share of step)"]) == pytest.approx(m["overhead/ms_per_token"], abs=0.005)
        assert _num(row["overhead without the clock's own cost"]) == pytest.approx(m["overhead/net_ms_per_token"],
                                                                                   abs=0.005)
        assert "‡" not in row["overhead without the clock's own cost"]  # measured with the clock's floor
        assert row["identical (replayed masks)"] == "yes"
        assert row["mask rule in kernel"] == ("yes" if m["decode/mask_rule_in_kernel"] == 1.0 else "no")
        assert row["Δ avg acc, points [95% CI] (comparison)"] == "—"


def test_calibration_memory_block_reads_back_every_committed_measurement():
    import json

    from sparsebench.experiments.tables import CALIBRATION_MEMORY, calibration_memory_block

    block = calibration_memory_block()
    runs = [json.loads(f.read_text()) for f in sorted(CALIBRATION_MEMORY.glob("*.json"))]
    assert runs and block.count("\n| ") == len(runs)  # one row per file (after the header and |---|)
    for r in runs:
        row = next(line for line in block.splitlines()
                   if line.startswith(f"| {r['model']} (") and f"| {r['calibration_peak_added_mib']:,.1f} |" in line)
        assert f"| {r['one_layer_of_hidden_states_mib']:,.1f} |" in row
    assert block in (REPO / "docs" / "gpu.md").read_text()


def test_readme_timings_block_states_every_step(tmp_path):
    """The README's timing line is made from the record experiments/checks/readme_timings.py
    writes: every step with its time as minutes and seconds, and a failed step says so."""
    import json

    from sparsebench.experiments.tables import readme_timings_block

    steps = [{"command": "pip install -e .", "seconds": 125.4, "returncode": 0},
             {"command": "sparsebench", "seconds": 59.6, "returncode": 0},
             {"command": "pytest", "seconds": 901.0, "returncode": 1}]
    record = {"commit": "0123456789abcdef", "date": "2026-11-30", "pip_cache": "off (...)",
              "sparsebench_cache": "empty at start", "steps": steps,
              "machine": {"cpus": 2, "memory_gib": 23, "python": "3.11.2"}}
    path = tmp_path / "readme-timings.json"
    path.write_text(json.dumps(record))
    line = readme_timings_block(path)
    for s in steps:
        t = round(s["seconds"])
        assert f"`{s['command']}` {t // 60} min {t % 60:02d} s" in line
    assert "`pip install -e .` 2 min 05 s" in line and "`sparsebench` 1 min 00 s" in line
    assert "failed, exit 1" in line and "commit `0123456789`" in line and "2 CPU cores" in line


def test_readme_timings_script_records_each_step(tmp_path, monkeypatch):
    """experiments/checks/readme_timings.py on a fresh clone, its README commands swapped for
    two trivial ones (the real ones take half an hour): one record with every step, its exit
    code and time, that the README block renders; a failing step stops the run."""
    import importlib.util
    import json

    from sparsebench.experiments.tables import REPO, readme_timings_block

    spec = importlib.util.spec_from_file_location("readme_timings", REPO / "experiments/checks/readme_timings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "STEPS", [("test -f README.md", None), ("false", None), ("true", None)])
    mod.main(["--out", str(tmp_path)])
    record = json.loads((tmp_path / "readme-timings.json").read_text())
    assert [s["command"] for s in record["steps"]] == ["test -f README.md", "false"]  # stopped at the failure
    assert [s["returncode"] for s in record["steps"]] == [0, 1]
    assert all(s["seconds"] >= 0 for s in record["steps"]) and len(record["commit"]) == 40
    line = readme_timings_block(tmp_path / "readme-timings.json")
    assert "`test -f README.md` 0 s" in line and "`false` 0 s (failed, exit 1)" in line


def _fake_run(model, name, sparsity=0.5, metrics=None, paired=None, **sparsifier):
    return {"status": "ok", "model": {"id": f"org/{model}", "hidden_size": 8, "intermediate_size": 32,
                                      "model_type": "llama"},
            "sparsifier": {"name": name, "sparsity": sparsity},
            "config": {"sparsifier": {"name": name, "sparsity": sparsity, **sparsifier}, "backend": {"name": "fused"}},
            "metrics": metrics or {}, "paired": paired or {}}


def test_best_predictor_is_the_lowest_perplexity_ratio_and_meets_its_own_decode():
    """Per model, the predictor row with the smallest ppl/dense (brute force: min over the
    runs) is joined to the fused decode of the same method label and sparsity, not another's."""
    import random

    from sparsebench.experiments.figures import method

    rng = random.Random(0)
    runs, ratios = [], {}
    for model in ("m1", "m2"):
        for rank in (0.1, 0.25):
            ratio = rng.uniform(1.0, 3.0)
            runs.append(_fake_run(model, "dejavu", rank=rank,
                                  metrics={"mask_quality/recall": 0.7, "perplexity": 40 * ratio, "sparsity/mean": 0.5},
                                  paired={"perplexity": {"ratio": ratio, "ci_low": ratio - 0.1, "ci_high": ratio + 0.1,
                                                         "significant": True}}))
            ratios[(model, method(runs[-1]))] = ratio
    decode = [_fake_run(model, "dejavu", rank=rank,
                        metrics={"decode/speedup_vs_hf": 1 + rank, "decode/tokens_per_s_hf": 10.0,
                                 "decode/tokens_per_s": 10 * (1 + rank), "decode/amdahl_limit": 1.5,
                                 "decode/fraction_of_limit": (1 + rank) / 1.5})
              for model in ("m1", "m2") for rank in (0.1, 0.25)]
    rows = tables.best_predictor_decode_rows(runs, decode)
    assert [x["model"] for x in rows] == ["m1", "m2"]
    for x in rows:
        expected = min((k for k in ratios if k[0] == x["model"]), key=ratios.get)
        assert x["predictor"] == expected[1] and x["ppl_vs_dense"] == ratios[expected]
        rank = 0.25 if "rank=0.25" in x["predictor"] else 0.1
        assert x["decode"]["decode/speedup_vs_hf"] == 1 + rank
        p = x["ppl_paired"]
        assert (p["ci_low"], p["ci_high"]) == (x["ppl_vs_dense"] - 0.1, x["ppl_vs_dense"] + 0.1) and x["compared"] == 2
    assert tables.best_predictor_decode_rows(runs, [])[0]["decode"] is None  # not timed yet: shown as —


def test_best_predictor_block_shows_the_comparison_accuracy_of_the_same_predictor(tmp_path):
    """The accuracy column is the comparison point of the same method label and sparsity."""
    import json

    from sparsebench.core.stats import paired_accuracy_tasks

    ppl = {"ratio": 1.5, "ci_low": 1.4, "ci_high": 1.6, "significant": True}
    for model in ("m1", "m2"):
        run = _fake_run(model, "dejavu", rank=0.25, metrics={"mask_quality/recall": 0.7, "perplexity": 60.0,
                                                             "sparsity/mean": 0.5}, paired={"perplexity": ppl})
        (tmp_path / "pred" / model).mkdir(parents=True)
        (tmp_path / "pred" / model / "results.json").write_text(json.dumps(run))
    acc = paired_accuracy_tasks({t: ([1, 1, 0, 1, 1, 0, 1, 1], [1, 0, 0, 1, 0, 0, 1, 1]) for t in TASKS})
    per_task = acc.pop("tasks")
    point = _fake_run("m1", "dejavu", rank=0.25, paired={"lm_eval/avg_acc": acc}
                      | {f"lm_eval/{t}/acc": r for t, r in per_task.items()})
    block = tables.best_predictor_decode_block(tmp_path / "pred", tmp_path / "none", comparison=[point])
    cells = {r["model"]: r["Δ avg acc, points [95% CI] (comparison)"] for r in _md_rows(block)}
    assert _num(cells["m1"]) == pytest.approx(100 * acc["delta"], abs=0.05) and cells["m2"] == "—"


@pytest.mark.parametrize("seed", range(6))
def test_predictor_verdict_names_exactly_the_models_within_five_percent(seed):
    """The plain statement under the table: "no predictor" exactly when every model's best
    ratio is above 1.05, otherwise the models whose best is within it, and no others."""
    import random

    rng = random.Random(seed)
    rows = [{"model": f"m{i}", "predictor": "dejavu", "sparsity_requested": 0.5,
             "ppl_vs_dense": rng.choice([1.01, 1.05, 1.0501, 1.4])} for i in range(3)]
    text = tables.predictor_verdict(rows)
    within = {x["model"] for x in rows if x["ppl_vs_dense"] <= 1.05}
    assert text.startswith("**No predictor") == (not within)
    if within:
        named = text.split(";")[0]
        assert {m for m in ("m0", "m1", "m2") if m in named} == within
    for x in rows:  # every model's best is quoted with its ratio
        assert f"{x['model']} dejavu ×{x['ppl_vs_dense']:.3f}" in text


def test_cett_budget_block_reads_back_every_committed_run():
    """Each row's mean / min / max layer sparsity is the brute-force statistic of the run's
    per-layer sparsities, and its perplexity ratios are the run's paired ones."""
    from sparsebench.experiments.tables import CETT_BUDGET, cett_budget_block
    from sparsebench.reporting.results import load_results

    results = load_results([CETT_BUDGET])
    assert results, "figure 1's runs are committed"
    rows = _md_rows(cett_budget_block())
    assert len(rows) == len(results)
    for r in results:
        (row,) = [x for x in rows if x["model"] == r["model"]["id"].rstrip("/").split("/")[-1]]
        sp = [layer["sparsity"] for layer in r["per_layer"]]
        assert _num(row["mean layer sparsity"]) == pytest.approx(sum(sp) / len(sp), abs=5e-4)
        lo, hi = (float(v) for v in row["min – max over layers"].split(" – "))
        assert (lo, hi) == (pytest.approx(min(sp), abs=5e-4), pytest.approx(max(sp), abs=5e-4))
        assert _num(row["ppl ratio (plays) [95% CI]"].lstrip("x")) == pytest.approx(r["paired"]["perplexity"]["ratio"], abs=5e-4)


def test_versus_best_picks_the_most_accurate_method_and_pairs_on_shared_documents():
    """Three methods on random per-document outcomes (one ran fewer documents): the best is
    the highest average accuracy, and each other cell is the Δ over the documents both ran,
    task-averaged, with an exact McNemar star, checked by brute force."""
    import random

    from scipy.stats import binomtest

    from sparsebench.experiments.pairwise import versus_best_markdown

    rng = random.Random(3)
    docs = list(range(60))
    outcome = {name: {t: [int(rng.random() < p) for _ in docs] for t in TASKS}
               for name, p in (("cats", 0.7), ("teal", 0.45), ("wina", 0.68))}

    def run(name, n_docs):
        items = {"lm_eval": {t: {"doc_id": docs[:n_docs], "acc": outcome[name][t][:n_docs]} for t in TASKS}}
        avg = sum(sum(outcome[name][t][:n_docs]) / n_docs for t in TASKS) / len(TASKS)
        return _fake_run("tiny", name, paired={"lm_eval/avg_acc": {"acc_b": avg}}) | {"items": {"sparse": items}}

    runs = [run("cats", 60), run("teal", 60), run("wina", 40)]
    rows = _md_rows(versus_best_markdown(runs))
    cells = {r[next(iter(r))]: r["0.5"] for r in rows}
    best = max(runs, key=lambda r: r["paired"]["lm_eval/avg_acc"]["acc_b"])["sparsifier"]["name"]
    assert best == "cats" and cells["cats"].startswith("**best**")
    for name, n in (("teal", 60), ("wina", 40)):
        delta = sum(sum(outcome[name][t][:n]) - sum(outcome["cats"][t][:n]) for t in TASKS) / n / len(TASKS)
        assert _num(cells[name]) == pytest.approx(100 * delta, abs=0.051)
        # exact McNemar over the task-pooled discordant documents, as the table's star
        pairs = [(outcome["cats"][t][d], outcome[name][t][d]) for t in TASKS for d in range(n)]
        b, c = sum(x > y for x, y in pairs), sum(x < y for x, y in pairs)
        p = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
        assert cells[name].endswith("*") == (p < 0.05)


@pytest.mark.parametrize("lost,n", [(0, 5), (0, 20), (3, 20), (7, 40), (20, 20)])
def test_loss_bound_is_the_exact_one_sided_binomial_bound(lost, n):
    """The bound u solves P(X ≤ lost | n, u) = 0.05 (enumerated binomial sum), so a loss
    rate above u would give this few losses less than 5% of the time."""
    from math import comb

    from sparsebench.experiments.tables import loss_upper_bound, min_prompts_for

    u = loss_upper_bound(lost, n)
    cdf = lambda q: sum(comb(n, k) * q ** k * (1 - q) ** (n - k) for k in range(lost + 1))  # noqa: E731
    if lost == n:
        assert u == 1.0
    else:
        assert cdf(u) == pytest.approx(0.05, abs=1e-9) and cdf(u + 1e-3) < 0.05 < cdf(u - 1e-3)
    m = min_prompts_for(0.02)
    assert loss_upper_bound(0, m) <= 0.02 < loss_upper_bound(0, m - 1)


def test_budget_rows_pool_contexts_and_meet_the_longest_decode():
    from sparsebench.experiments.tables import attention_budget_rows, loss_upper_bound

    base = {"model": "m", "method": "quest", "mlp": "dense MLP"}
    rows = [base | {"kind": "passkey", "context": c, "budget": b, "budget_label": str(b), "n": n, "lost": lost,
                    "gained": g}
            for c, b, n, lost, g in [(1024, 64, 10, 3, 1), (2048, 64, 10, 4, 0), (1024, 512, 10, 0, 0),
                                     (2048, 512, 150, 0, 2)]]
    rows += [base | {"kind": "decode", "context": c, "budget": b, "budget_label": str(b), "value": v}
             for c, b, v in [(2048, 64, 1.1), (8192, 64, 1.4), (8192, 256, 1.3)]]
    # a method without a token budget (head sparsity) pools under its own setting
    heads = {"model": "m", "method": "head_sparsity", "mlp": "dense MLP", "budget": None,
             "budget_label": "0.5 of heads"}
    rows += [heads | {"kind": "passkey", "context": c, "n": 5, "lost": 1, "gained": 0} for c in (1024, 2048)]
    pooled = attention_budget_rows(rows)
    out = {x["budget"]: x for x in pooled if x["method"] == "quest"}
    assert [x["budget_label"] for x in pooled] == ["0.5 of heads", "64", "512"]
    assert (pooled[0]["n"], pooled[0]["lost"], pooled[0]["speedup"]) == (10, 2, None)
    assert (out[64]["n"], out[64]["lost"], out[64]["gained"]) == (20, 7, 1)
    assert out[64]["delta"] == pytest.approx(-6 / 20) and out[64]["loss_bound"] == loss_upper_bound(7, 20)
    assert (out[64]["speedup"], out[64]["decode_context"]) == (1.4, 8192) and not out[64]["within"]
    assert out[512]["n"] == 160 and out[512]["within"] and out[512]["speedup"] is None
