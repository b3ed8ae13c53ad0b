"""Every command in README.md and docs/*.md works as written.

Each shell command of a fenced ``bash`` block (and each ``$ `` line of a plain block) is
extracted (``# comments`` stripped, ``\\`` continuations joined, ``&&`` split) and checked by
what it is:

* ``sparsebench …``: Hydra composes it the way the real command would, without running it:
  the CLI's own ``check_group_overrides`` first, then every point of a ``-m`` sweep (the
  experiment's ``hydra.sweeper.params`` crossed with the command line, as Hydra's BasicSweeper
  does) is composed with Hydra's config loader and validated by ``build_components`` (the
  checks a run makes before it loads a model). The first point (the run itself, for a single
  run) also goes through the real command with ``--cfg job``, whose printout must equal the
  composition here. The cheap ones (``RUN_ON_TINY``) also run for real on the tiny offline
  model.
* ``sparsebench-bench …``: ``--help``, then the command itself with small shapes and steps.
* ``sparsebench-plot``, ``sparsebench-report``, ``python -m sparsebench.experiments.tables``
  ``…offload_figure`` and ``…long_context_figure``: run for real in a scratch folder holding a copy of the committed
  comparison under ``multirun/fig4_accuracy_vs_sparsity`` and the tiny sweeps; ``tables docs``
  and ``tables artifacts`` (which write into the repository) run in-process on copies.
* ``lm_eval …``: parsed by lm-eval's own CLI parser; model folder, task names, task folder,
  limit and batch size checked against sparsebench's config and cache layout (running it
  needs the registry model and eval-set package).
* setup commands (``pip install -e .``, venv, ``pytest``): covered by CI (``.ci/run``); the
  test checks ``.ci/run`` holds them.

The inline commands of docs/reliability.md's bad-input table are checked to be the cases
tests/test_reliability.py runs (tests/bad_input_cases.py). Other inline commands in prose are
not extracted.

A command of any other kind, a fenced block of an unknown kind, a placeholder without a
substitution below or a stale entry in the tables below fails the test.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from test_cli import TINY

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
COMPARISON = REPO / "experiments" / "results" / "comparison"
FIG4 = "multirun/fig4_accuracy_vs_sparsity"  # where the README's sweep writes; here: a copy of the committed one

# ------------------------------------------------------------------ what the pages hold

COMMAND_LANGS = {"bash", "sh", "shell"}
# fenced blocks that are files to write, not commands
CODE_LANGS = {"python": "a module to add (docs/extending.md)", "yaml": "a config file to add"}
# plain ``` blocks by (page, first line): printed output and diagrams; their `$ ` lines are commands
PLAIN_BLOCKS = {
    ("docs/experiments.md", "sparsebench: 1 point(s) failed; rerun the same command to retry only these:"):
        "what a sweep with a failed point prints (tests/test_sweeps.py)",
    ("docs/experiments.md", "wandb sync --project sparsebench multirun/…/wandb/offline-run-… … && "
                            "sparsebench-report multirun/… --wandb online"):
        "the line sparsebench-report --wandb prints offline (tests/test_wandb_report.py)",
    ("docs/getting-started.md", "$ sparsebench sparsifier=catz"): "a transcript (checked below)",
    ("docs/getting-started.md", "model (HF, fp32) ──► adapter finds each layer's MLP ──► SparseMLP: "
                                "sparsifier.mask(x) ──► backend.mlp(x, mask)"): "a diagram",
}

# placeholders in commands and what they stand for here
SUBSTITUTIONS = {
    "D:C": "0.5:0.4",              # --points density:churn
    "PART": "debug",               # a SLURM partition
    "DIR1": FIG4,                  # sparsebench-plot DIR1 DIR2
    "DIR2": "multirun/tiny_sweep",  # the tiny sweep run below
    "RUNS_DIR": FIG4,              # tables export RUNS_DIR --out DIR
    "DIR": "exported",
}
PLACEHOLDER = re.compile(r"(?<![\w.$/-])[A-Z][A-Z0-9_]*(?::[A-Z][A-Z0-9_]*)?(?![\w.-])|…")

# setup commands run by CI (.ci/run, in a fresh venv), not here: command -> line of .ci/run that does it
CI_COVERED = {
    "pip install -e .": r"pip install -e \.",
    "pytest": r"pytest",
    "python3 -m venv .venv": r"python3 -m venv \S+",
    ". .venv/bin/activate": r"\. \S+/bin/activate",
}

# sparsebench commands that also run for real, on the tiny model (keys: the command as documented)
SMALL_DECODE = ["evaluator.decode.prompt_tokens=8", "evaluator.decode.new_tokens=4", "evaluator.decode.repeats=1"]
FEW_WINDOWS = ["evaluator.perplexity.num_windows=4", "evaluator.sparsity.num_windows=2"]
RUN_ON_TINY = {
    # the README's first command: all three default evaluators, lm-eval on a local 4-item task
    "sparsebench": [*TINY, *FEW_WINDOWS, "evaluator.lm_eval.include_path=tasks", "evaluator.lm_eval.tasks=[tiny_mc]",
                    "evaluator.lm_eval.limit=2", "hydra.run.dir=runs/sparsebench"],
    "sparsebench -m sparsifier=none,cats sparsifier.sparsity=0.3,0.5,0.7 evaluator=perplexity":
        [*TINY, FEW_WINDOWS[0], "hydra.sweep.dir=multirun/tiny_sweep"],
    # experiments: the first method of each sweep (the others' calibrations take minutes)
    "sparsebench -m experiment=mask_churn model=smollm2-135m":
        [*TINY, "sparsifier=cats", "evaluator.churn.num_windows=2", "evaluator.sparsity.num_windows=2"],
    "sparsebench -m experiment=decode_speed model=smollm2-135m": [*TINY, "sparsifier=cats", *SMALL_DECODE],
    "sparsebench -m experiment=decode_fused model=smollm2-135m":
        [*TINY, "sparsifier=cats", *SMALL_DECODE, "evaluator.step_overhead.prompt_tokens=8",
         "evaluator.step_overhead.new_tokens=4", "evaluator.step_overhead.repeats=1"],
    "sparsebench -m experiment=offload_cache model=smollm2-135m": [*TINY, "sparsifier=cats"],
    "sparsebench -m experiment=long_context model=smollm2-135m":
        [*TINY, "attention=quest", "attention.dense_layers=[]", "evaluator.passkey.contexts=[200]",
         "evaluator.passkey.per_context=2", "evaluator.passkey.question_chars=40", "evaluator.passkey.budgets=[16,64]",
         "evaluator.long_perplexity.seq_lens=[128]", "evaluator.long_perplexity.num_windows=1",
         "evaluator.long_decode.contexts=[128]", "evaluator.long_decode.new_tokens=3", "evaluator.long_decode.repeats=1",
         "evaluator.long_decode.budgets=[16,64]", "threads=1"],
}

# sparsebench-bench: small sizes appended to each documented invocation
BENCH_SMALL = {
    "weight-selection": ["--shapes", "16x64", "--steps", "2"],
    "mlp-step": ["--shapes", "16x64", "--densities", "0.5", "--steps", "2"],
    "mlp-step-cold": ["--shapes", "16x64", "--densities", "0.5", "--steps", "2", "--layers", "1"],
}
BENCH_GRID = ["--densities", "0.5", "--churns", "0.1"]  # weight-selection without --points
BENCH_CSV = {"weight-selection": "weight_selection.csv", "mlp-step": "mlp_step.csv", "mlp-step-cold": "mlp_step_cold.csv"}

TABLES = "sparsebench.experiments.tables"
OFFLOAD_FIGURE = "sparsebench.experiments.offload_figure"
LONG_CONTEXT_FIGURE = "sparsebench.experiments.long_context_figure"


# ------------------------------------------------------------------ extraction

@dataclass
class DocCommand:
    page: str
    line: int
    text: str                                   # as documented, comment stripped
    argv: list[str] = field(default_factory=list)
    kind: str = "unknown"
    problem: str = ""
    expected_output: list[str] = field(default_factory=list)  # transcripts

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}:{self.text[:70]}"


def strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def fenced_blocks(path: Path):
    """(language, first line number, lines) of each fenced block."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(?:```|~~~)\s*(.*?)\s*$", lines[i])
        if m:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not re.match(r"^\s*(?:```|~~~)\s*$", lines[i]):
                body.append(lines[i])
                i += 1
            yield m.group(1), start + 1, body
        i += 1


def classify(cmd: DocCommand) -> None:
    try:
        lexer = shlex.shlex(cmd.text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv = list(lexer)
    except ValueError as exc:
        cmd.problem = f"cannot be parsed as a shell command: {exc}"
        return
    ops = [t for t in argv if t and set(t) <= set("();<>|&")]
    if ops:
        cmd.problem = f"shell operator {ops[0]!r}: no check knows such a command"
        return
    cmd.argv = argv
    prog = argv[0]
    if cmd.text in CI_COVERED:
        cmd.kind = "ci"
    elif prog == "sparsebench":
        cmd.kind = "sparsebench"
    elif prog == "sparsebench-bench":
        cmd.kind = "bench"
    elif prog in ("sparsebench-plot", "sparsebench-report"):
        cmd.kind = "tool"
    elif prog in ("python", "python3") and argv[1:2] == ["-m"] \
            and argv[2] in (TABLES, OFFLOAD_FIGURE, LONG_CONTEXT_FIGURE):
        cmd.kind = "tool"
    elif prog == "lm_eval":
        cmd.kind = "lm_eval"
    else:
        cmd.problem = "no check knows this command: add one to tests/test_docs_commands.py"


def doc_commands() -> tuple[list[DocCommand], list[str]]:
    """Every documented command, and the fenced blocks no rule classifies."""
    commands, unknown_blocks = [], []
    for path in PAGES:
        page = path.relative_to(REPO).as_posix()
        for lang, first, body in fenced_blocks(path):
            if lang in CODE_LANGS:
                continue
            if lang == "":
                head = body[0].strip() if body else ""
                if (page, head) not in PLAIN_BLOCKS:
                    unknown_blocks.append(f"{page}:{first}: plain block starting {head!r}: "
                                          "name it in PLAIN_BLOCKS (or mark it ```bash if it holds commands)")
                for j, line in enumerate(body):
                    if line.startswith("$ "):
                        out = []
                        for nxt in body[j + 1:]:
                            if nxt.startswith("$ "):
                                break
                            out.append(nxt)
                        commands.append(DocCommand(page, first + j, line[2:].strip(), kind="transcript",
                                                   expected_output=out))
                continue
            if lang not in COMMAND_LANGS:
                unknown_blocks.append(f"{page}:{first}: a ```{lang} block: no rule says whether it holds commands")
                continue
            pending, pending_line = "", None
            for j, raw in enumerate(body):
                if pending_line is None:
                    pending_line = first + j
                if raw.rstrip().endswith("\\"):
                    pending += raw.rstrip()[:-1] + " "
                    continue
                text = strip_comment(pending + raw)
                pending, line_no, pending_line = "", pending_line, None
                if not text.strip():
                    continue
                for part in re.split(r"\s+&&\s+", text.strip()):
                    commands.append(DocCommand(page, line_no, part.strip()))
    for cmd in commands:
        if cmd.kind == "transcript":
            lexer = shlex.shlex(cmd.text, posix=True)
            lexer.whitespace_split = True
            cmd.argv = list(lexer)
        else:
            classify(cmd)
    return commands, unknown_blocks


COMMANDS, UNKNOWN_BLOCKS = doc_commands()


def substituted(argv: list[str]) -> list[str]:
    """argv with every placeholder replaced; fails on one without a substitution."""
    out = []
    for token in argv:
        missing = [m.group(0) for m in PLACEHOLDER.finditer(token) if m.group(0) not in SUBSTITUTIONS]
        assert not missing, f"placeholder {missing[0]!r} in {token!r} has no substitution: add it to SUBSTITUTIONS"
        out.append(PLACEHOLDER.sub(lambda m: SUBSTITUTIONS[m.group(0)], token))
    return out


# ------------------------------------------------------------------ the scratch folder and the tiny runs

def _env(ws: Path) -> dict[str, str]:
    return {**os.environ, "SPARSEBENCH_CACHE": str(ws / "cache"), "WANDB_MODE": "disabled", "MPLBACKEND": "Agg",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _program(name: str) -> str:
    if name in ("python", "python3"):
        return sys.executable
    path = BIN / name
    assert path.exists(), f"{name} is not installed beside {sys.executable} (pyproject [project.scripts])"
    return str(path)


def execute(argv: list[str], ws: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([_program(argv[0]), *argv[1:]], cwd=ws, env=_env(ws), capture_output=True, text=True,
                          timeout=timeout)


def _local_lm_eval_task(folder: Path) -> None:
    from test_lm_eval_sparse_path import DOCS

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in DOCS))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {folder / 'docs.jsonl'}\n"
        "output_type: multiple_choice\nvalidation_split: validation\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")


@pytest.fixture(scope="module")  # module: its SPARSEBENCH_CACHE must not outlive this file
def workspace(tmp_path_factory):
    """A scratch folder standing in for a checkout after the documented sweeps: the committed
    comparison copied to multirun/fig4_accuracy_vs_sparsity, a local lm-eval task, a cache."""
    ws = tmp_path_factory.mktemp("docs_commands")
    for src in COMPARISON.rglob("results.json"):  # written atomically, so a copy is whole
        dst = ws / FIG4 / src.relative_to(COMPARISON)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    assert list((ws / FIG4).rglob("results.json")), f"no committed results under {COMPARISON}"
    _local_lm_eval_task(ws / "tasks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSEBENCH_CACHE", str(ws / "cache"))  # what in-process composition resolves cache_dir to
        yield ws


@pytest.fixture(scope="module")
def tiny_runs(workspace):
    """The RUN_ON_TINY commands, run once, two at a time (mostly single-threaded Python on a tiny
    model; the cache's locks keep shared calibrations whole); the tables, figures and
    artifacts commands read what they write."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {command: pool.submit(execute, [*shlex.split(command), *extra], workspace)
                   for command, extra in RUN_ON_TINY.items()}
    return {command: f.result() for command, f in futures.items()}


# ------------------------------------------------------------------ sparsebench: compose every point

def hydra_args(argv: list[str]) -> tuple[list[str], bool, str | None]:
    """(overrides, multirun, --cfg value) of a sparsebench command line."""
    overrides, multirun, cfg, rest = [], False, None, list(argv)
    while rest:
        a = rest.pop(0)
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in ("-c", "--cfg"):
            cfg = rest.pop(0)
        elif a.startswith("-"):
            pytest.fail(f"sparsebench flag {a!r}: no check knows it")
        else:
            overrides.append(a)
    return overrides, multirun, cfg


@functools.lru_cache(maxsize=None)
def composed_points(overrides: tuple[str, ...], multirun: bool) -> list[tuple[list[str], dict, dict]]:
    """Every run the command makes: (its overrides, its config as --cfg job prints it, resolved).

    Composed by Hydra's own config loader the way ``sparsebench`` would; each one validated
    by ``build_components``, the checks a run makes before it loads anything."""
    from hydra import initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from hydra.utils import get_class
    from omegaconf import OmegaConf, open_dict, read_write

    from sparsebench.cli import CONFIG_MODULE
    from sparsebench.run import build_components

    points = []
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        master = loader.load_configuration("config", list(overrides), run_mode=mode, from_shell=True)
        get_class(master.hydra.launcher._target_)  # the launcher's plugin is installed
        if multirun:
            sweeper = master.hydra.sweeper
            assert sweeper._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", (
                f"sweeper {sweeper._target_}: enumerate its points here")
            params = [f"{k}={v}" for k, v in (sweeper.params or {}).items()]
            task = OmegaConf.to_container(master.hydra.overrides.task)
            batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params + task),
                                                   sweeper.max_batch_size)
            runs = [(point, loader.load_sweep_config(master, point)) for batch in batches for point in batch]
        else:
            runs = [(list(overrides), master)]
        for point, cfg in runs:
            where = {"_launcher": OmegaConf.to_container(cfg.hydra.launcher, resolve=True),
                     "_run_dir": cfg.hydra.run.dir, "_sweep_dir": cfg.hydra.sweep.dir,
                     "_subdir": cfg.hydra.sweep.subdir if multirun else None}
            with read_write(cfg), open_dict(cfg):
                del cfg["hydra"]
            printed = OmegaConf.to_container(cfg, resolve=False)
            try:
                resolved = OmegaConf.to_container(cfg, resolve=True)  # as hydra_main resolves it
                build_components(cfg)
            except Exception as exc:  # noqa: BLE001 - name the point that fails
                raise AssertionError(f"sweep point {' '.join(point)}: {type(exc).__name__}: {exc}") from exc
            points.append((point, printed, resolved | where))
    return points


def check_sparsebench(cmd: DocCommand, ws: Path) -> None:
    from sparsebench.cli import check_group_overrides

    overrides, multirun, cfg_flag = hydra_args(substituted(cmd.argv[1:]))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            check_group_overrides(substituted(cmd.argv[1:]))  # what the command checks first
    except SystemExit:
        pytest.fail(f"{cmd.text}: refused: {err.getvalue().strip()}")
    points = composed_points(tuple(overrides), multirun)
    assert points, f"{cmd.text}: the sweep has no point"
    # the real command prints the same config for its first run
    first = points[0][0]
    proc = execute(["sparsebench", *first, "--cfg", "job"], ws, timeout=120)
    assert proc.returncode == 0, f"sparsebench {' '.join(first)} --cfg job: {proc.stderr[-2000:]}"
    assert yaml.safe_load(proc.stdout) == points[0][1], f"--cfg job differs from the composition of {first}"
    if cfg_flag not in (None, "job") or (cfg_flag == "job" and multirun):  # as written too, when not just done
        proc = execute(["sparsebench", *substituted(cmd.argv[1:])], ws, timeout=120)
        assert proc.returncode == 0 and "sparsifier:" in proc.stdout, proc.stderr[-2000:]


def check_tiny_run(command: str, proc: subprocess.CompletedProcess, ws: Path) -> None:
    """The run on the tiny model finished, with one folder per point Hydra's sweep makes."""
    assert proc.returncode == 0, f"{command} (tiny): {proc.stderr[-3000:]}"
    overrides, multirun, _ = hydra_args([*shlex.split(command)[1:], *RUN_ON_TINY[command]])
    points = composed_points(tuple(overrides), multirun)
    if not multirun:
        r = json.loads((ws / points[0][2]["_run_dir"] / "results.json").read_text())
        assert r["status"] == "ok", r
        return
    sweep_dir = ws / points[0][2]["_sweep_dir"]
    made = {p.name for p in sweep_dir.iterdir() if p.is_dir()} - {".submitit", "figures", "report"}
    assert made == {p[2]["_subdir"] for p in points}, (made, [p[2]["_subdir"] for p in points])
    finished = [json.loads(f.read_text()) for f in sweep_dir.glob("*/results.json")]
    assert all(r["status"] == "ok" for r in finished)
    not_run = proc.stdout.count("not run, sparsifier=none ignores its sparsity")
    assert len(finished) + not_run == len(points), (len(finished), not_run, len(points))


# ------------------------------------------------------------------ the other kinds

def check_bench(cmd: DocCommand, ws: Path) -> None:
    argv = substituted(cmd.argv)
    sub = argv[1]
    assert sub in BENCH_SMALL, f"sparsebench-bench {sub}: no small settings for it in BENCH_SMALL"
    from sparsebench.backends.bench import main as bench_main

    helped = io.StringIO()
    with contextlib.redirect_stdout(helped), pytest.raises(SystemExit) as exit_:
        bench_main([sub, "--help"])
    assert exit_.value.code == 0 and f"sparsebench-bench {sub}" in helped.getvalue()
    extra = BENCH_SMALL[sub] + (BENCH_GRID if sub == "weight-selection" and "--points" not in argv else [])
    out = ws / (argv[argv.index("--out") + 1] if "--out" in argv else "bench")  # bench.py's default
    (out / BENCH_CSV[sub]).unlink(missing_ok=True)
    proc = execute([*argv, *extra], ws, timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv + extra)}: {proc.stderr[-2000:]}"
    assert (out / BENCH_CSV[sub]).read_text().count("\n") >= 2


def _roots_and_opts(args: list[str]) -> tuple[list[str], dict[str, str]]:
    roots, opts, rest = [], {}, list(args)
    while rest:
        a = rest.pop(0)
        if a.startswith("--"):
            opts[a] = rest.pop(0) if rest and not rest[0].startswith("--") and a != "--check" else ""
        else:
            roots.append(a)
    return roots, opts


def check_tool(cmd: DocCommand, ws: Path) -> None:
    argv = substituted(cmd.argv)
    if argv[0].startswith("python"):
        module, args = argv[2], argv[3:]
    else:
        module, args = argv[0], argv[1:]
    if module == TABLES and args[0] in ("docs", "artifacts"):
        return check_tables_in_process(args, ws)
    roots, opts = _roots_and_opts(args[1:] if module == TABLES else args)
    for root in roots:
        assert (ws / root).is_dir(), f"{cmd.text}: {root} does not exist here (run the command that makes it first)"
    proc = execute(argv, ws, timeout=180)
    assert proc.returncode == 0, f"{cmd.text}: {proc.stderr[-3000:]}"
    if module == "sparsebench-plot":
        out = ws / opts.get("--out", f"{roots[0]}/figures")
        assert list(out.glob("*.png")) and list(out.glob("*.csv")), proc.stdout
    elif module == "sparsebench-report":
        out = ws / opts.get("--out", f"{roots[0]}/report")
        assert (out / "report.md").read_text().startswith("# ") and (out / "report.html").exists()
    elif module == OFFLOAD_FIGURE:
        assert (ws / opts.get("--out", f"{roots[0]}/figures") / "offload.png").exists(), proc.stdout
    elif module == LONG_CONTEXT_FIGURE:
        assert (ws / opts.get("--out", f"{roots[0]}/figures") / "long_context.csv").read_text().count("\n") >= 2
    elif args[0] == "export":
        from sparsebench.reporting.results import load_results

        ok = [r for r in load_results([ws / r for r in roots]) if r.get("status") == "ok"]
        assert len(list((ws / opts["--out"]).rglob("*.json"))) == len(ok) > 0, proc.stdout
    else:  # a markdown table
        assert any(line.startswith("|---") for line in proc.stdout.splitlines()), proc.stdout
        if "--csv" in opts:
            assert (ws / opts["--csv"]).read_text().count("\n") >= 2


def check_tables_in_process(args: list[str], ws: Path) -> None:
    """``tables docs`` and ``tables artifacts`` write into the repository: run them in-process
    with their targets redirected to copies."""
    from sparsebench.experiments import tables
    from sparsebench.reporting.results import load_results

    results = load_results([ws / FIG4])  # the committed comparison, as copied
    repo = ws / f"repo_copy_{len(list(ws.glob('repo_copy_*')))}"
    for rel in tables.GENERATED_FILES:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, repo / rel)
    update = functools.partial(tables.update_docs, repo=repo, results=results)
    if args[0] == "artifacts":  # a greedy path made by today's code, as a real TEAL calibration leaves it
        import torch

        from sparsebench.models.calibration import CALIBRATION_MODULES, ArtifactCache
        from sparsebench.store.provenance import code_digest

        today = code_digest(["sparsebench.sparsifiers.teal", *CALIBRATION_MODULES])
        ArtifactCache(ws / "cache" / "calibration", {"method": "teal", "code": today}).get(
            "teal-greedy-layer", {"layer": 0}, lambda: {"x": torch.ones(1)})
    artifacts_out = ws / "artifacts_out"
    out, code, message = io.StringIO(), 0, ""
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(tables, "update_docs", update)
        mp.setattr(tables, "commit_artifacts", functools.partial(tables.commit_artifacts, out=artifacts_out))
        mp.setattr(tables, "ARTIFACTS", artifacts_out)
        try:
            tables.main(args)
        except SystemExit as exc:
            code, message = exc.code, str(exc.code)
    if args[0] == "docs" and "--check" in args:
        # exit 1 naming the stale files when a block differs (documented), else "up to date"
        assert code == 0 and "up to date" in out.getvalue() or "generated tables out of date in" in message, out.getvalue()
    elif args[0] == "docs":
        assert code == 0, message
        assert update(check=True) == [], "tables docs left a block that differs from what it generates"
    else:  # artifacts: the greedy path seeded above is copied, the tiny runs' baselines are not
        assert code == 0 and re.search(r"copied [1-9]\d* artifacts", out.getvalue()), out.getvalue()
        assert list(artifacts_out.glob("teal-greedy-layer-*.pt")), list(artifacts_out.iterdir())


def check_lm_eval(cmd: DocCommand, ws: Path) -> None:
    """Parsed by lm-eval's own parser; what it points at is what sparsebench writes."""
    from hydra import compose, initialize_config_module
    from lm_eval._cli import HarnessCLI

    from sparsebench.data.tasks import PREFIX

    assert (BIN / "lm_eval").exists(), "the lm_eval command is not installed"
    home = ws / "home"
    argv = [a.replace("${HOME}", "$HOME").replace("$HOME", str(home)) for a in substituted(cmd.argv)]
    assert not [a for a in argv if "$" in a], f"{cmd.text}: an environment variable other than $HOME"
    args = HarnessCLI()._parser.parse_args(["run", *argv[1:]])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.delenv("SPARSEBENCH_CACHE", raising=False)
        with initialize_config_module(config_module="sparsebench.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=["evaluator=lm_eval"])
        cache = Path(cfg.cache_dir)  # the default cache folder
    model_args = args.model_args  # lm-eval parses key=value,... into a dict (older versions: a string)
    if isinstance(model_args, str):
        model_args = dict(kv.split("=", 1) for kv in model_args.split(","))
    assert args.model == "hf"
    assert Path(model_args["pretrained"]) == cache / "models" / cfg.model.name  # models.loader.convert_registry_model
    # the dtype sparsebench loads the model in on the CPU (model.dtype auto: float32 there)
    import torch

    from sparsebench.core.device import resolve_dtype

    assert model_args["dtype"] == str(resolve_dtype(cfg.model.dtype, torch.device("cpu"))).removeprefix("torch.")
    ev = cfg.evaluator.lm_eval
    tasks = args.tasks.split(",") if isinstance(args.tasks, str) else [t for arg in args.tasks for t in arg.split(",")]
    assert tasks == [PREFIX + t for t in ev.tasks]
    assert Path(args.include_path) == cache / "tasks" / ev.package.replace("==", "-")  # data.tasks.prepare_tasks
    assert float(args.limit) == ev.limit and int(args.batch_size) == ev.batch_size


def check_ci(cmd: DocCommand) -> None:
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    pattern = CI_COVERED[cmd.text]
    assert any(re.fullmatch(pattern, line.strip()) for line in ci), f"{cmd.text}: .ci/run has no line doing it"


def check_transcript(cmd: DocCommand, ws: Path) -> None:
    assert cmd.argv[0] == "sparsebench", f"{cmd.id}: no check knows this transcript"
    proc = execute(cmd.argv, ws, timeout=120)
    printed = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    documented = [line for line in cmd.expected_output if line.strip()]
    assert proc.returncode == 2 and len(printed) == len(documented) == 1, proc.stderr
    # the refusal, its list of choices and its fix exactly as documented
    assert printed[0] == documented[0], (printed[0], documented[0])


# ------------------------------------------------------------------ tests

def test_every_block_and_command_is_known():
    assert not UNKNOWN_BLOCKS, "\n".join(UNKNOWN_BLOCKS)
    problems = [f"{c.id}: {c.problem}" for c in COMMANDS if c.problem]
    assert not problems, "\n".join(problems)
    documented = {c.text for c in COMMANDS}
    stale = [c for c in RUN_ON_TINY if c not in documented]
    assert not stale, f"RUN_ON_TINY names commands no page documents any more: {stale}"
    used = {m.group(0) for c in COMMANDS for a in c.argv for m in PLACEHOLDER.finditer(a)}
    assert set(SUBSTITUTIONS) <= used, f"unused substitutions: {set(SUBSTITUTIONS) - used}"
    for c in COMMANDS:
        substituted(c.argv)
    plain = {(p.relative_to(REPO).as_posix(), b[0].strip()) for p in PAGES for lang, _, b in fenced_blocks(p)
             if lang == "" and b}
    assert set(PLAIN_BLOCKS) <= plain, f"PLAIN_BLOCKS names blocks no page holds: {set(PLAIN_BLOCKS) - plain}"


def test_reliability_table_commands_are_the_tested_cases(tmp_path):
    """The inline commands of docs/reliability.md's bad-input table are the cases
    tests/test_reliability.py runs through the real command (exit 2, one line, nothing written)."""
    from bad_input_cases import CASES

    rows = re.findall(r"^\| ([^|]+?) \| `(sparsebench [^`]*)` \| (\d+) \|", (REPO / "docs" / "reliability.md").read_text(),
                      re.M)
    cases = {name: args for name, args, _ in CASES}
    assert rows and [r[0] for r in rows] == list(cases), "the table's rows and bad_input_cases.CASES differ"
    for name, command, code in rows:
        args = cases[name](tmp_path) if callable(cases[name]) else cases[name]
        assert command == " ".join(["sparsebench", *args]).replace(str(tmp_path), "DIR"), name
        assert code == "2", name


CHECKED: set[tuple] = set()  # commands documented twice are checked once


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_works(cmd, workspace, request):
    assert not cmd.problem, cmd.problem
    key = (cmd.kind, tuple(cmd.argv))
    if key in CHECKED:
        return
    check_command(cmd, workspace, request)
    CHECKED.add(key)


def check_command(cmd: DocCommand, workspace: Path, request) -> None:
    if cmd.kind == "ci":
        return check_ci(cmd)
    if cmd.kind == "transcript":
        return check_transcript(cmd, workspace)
    if cmd.kind == "sparsebench":
        check_sparsebench(cmd, workspace)
        if cmd.text in RUN_ON_TINY:
            runs = request.getfixturevalue("tiny_runs")
            check_tiny_run(cmd.text, runs[cmd.text], workspace)
        return
    if cmd.kind == "bench":
        return check_bench(cmd, workspace)
    if cmd.kind == "tool":
        request.getfixturevalue("tiny_runs")  # churn / decode / offload folders, cache artifacts
        return check_tool(cmd, workspace)
    if cmd.kind == "lm_eval":
        return check_lm_eval(cmd, workspace)
    pytest.fail(f"{cmd.id}: no check for kind {cmd.kind!r}")
