"""Every bad input sparsebench is expected to refuse, with the message it must give.

The reliability tests run each case through the real command (``sparsebench …`` in a
subprocess) and check: exit status 2, exactly one ``sparsebench: error:`` line containing
the expected text, and no results.json written. ``python tests/bad_input_cases.py``
reruns them all and prints the table kept in docs/reliability.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = ["model=tiny-llama", "data=tiny", "logger.mode=disabled", "evaluator=[sparsity]"]


def _tokenizer():
    from sparsebench.models.loader import tiny_tokenizer

    return tiny_tokenizer()


def _save(tmp: Path, name: str, edit=None, tokenizer_vocab=None, hidden_act="silu") -> Path:
    from sparsebench.models.loader import build_tiny_model, tiny_tokenizer

    model = build_tiny_model("llama", hidden_act=hidden_act)
    folder = tmp / name
    model.save_pretrained(folder)
    tiny_tokenizer(tokenizer_vocab or model.config.vocab_size).save_pretrained(folder)
    if edit:
        cfg = json.loads((folder / "config.json").read_text())
        edit(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _bert(tmp: Path) -> list[str]:
    from transformers import BertConfig

    BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp / "bert")
    return ["model=local", f"model.path={tmp / 'bert'}", "data=tiny", "logger.mode=disabled"]


def _gpt2(tmp: Path) -> list[str]:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp / "gpt2")
    return ["model=local", f"model.path={tmp / 'gpt2'}", "data=tiny", "logger.mode=disabled"]


def _fatrelu_stock(tmp: Path) -> list[str]:
    def edit(cfg):
        cfg.update(model_type="sparsellama", hidden_act="fatrelu", hidden_act_param=0.05,
                   architectures=["SparseLlamaForCausalLM"])
    folder = _save(tmp, "prosparse", edit, hidden_act="relu")
    return ["model=local", f"model.path={folder}", "model.activation=stock", "data=tiny", "logger.mode=disabled"]


def _vocab_mismatch(tmp: Path) -> list[str]:
    folder = _save(tmp, "mismatch", tokenizer_vocab=400)  # the tiny model has 320 embedding rows
    return ["model=local", f"model.path={folder}", "data=tiny", "logger.mode=disabled", "evaluator=[sparsity]"]


def _poisoned(tmp: Path) -> list[str]:
    import torch

    from sparsebench.models.loader import build_tiny_model

    model = build_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp / "nan")
    _tokenizer().save_pretrained(tmp / "nan")
    return ["model=local", f"model.path={tmp / 'nan'}", "data=tiny", "logger.mode=disabled", "evaluator=[sparsity]"]


# (case, arguments or a function of a scratch folder returning them, text the one error line must hold)
CASES = [
    ("unknown group option", ["sparsifier=catz", *TINY], "unknown sparsifier 'catz'; choose one of: cats, cett"),
    ("unknown option inside a sweep", ["-m", "sparsifier=cats,catz", *TINY], "unknown sparsifier 'catz'"),
    ("unknown evaluator in a list", ["evaluator=[sparsity,bogus]", *TINY[:3]], "unknown evaluator 'bogus'"),
    ("sparsity ≥ 1", ["sparsifier.sparsity=1.5", *TINY], "sparsifier.sparsity=1.5 is out of range; use a number in [0, 1)"),
    ("sparsity < 0", ["sparsifier.sparsity=-0.1", *TINY], "sparsifier.sparsity=-0.1 is out of range"),
    ("sparsity of the wrong type", ["sparsifier.sparsity=abc", *TINY], "sparsifier.sparsity='abc' must be a finite number"),
    ("CETT budget ≤ 0", ["sparsifier=cett", "sparsifier.budget=0", *TINY], "sparsifier.budget=0 is out of range; use a number in (0, 1)"),
    ("Deja Vu rank above the hidden size", ["sparsifier=dejavu", "sparsifier.rank=2", *TINY],
     "sparsifier.rank=2 is out of range; it is a fraction of the hidden size in (0, 1]"),
    ("an integer setting given a fraction", ["sparsifier=dejavu", "sparsifier.steps=0.5", *TINY],
     "sparsifier.steps=0.5 must be a positive integer, e.g. sparsifier.steps=400"),
    ("a boolean setting given a word", ["backend=cached", "backend.union=maybe", *TINY],
     "backend.union='maybe' must be true or false"),
    ("a data setting of the wrong type", ["data.calibration.num_sequences=many", *TINY],
     "data.calibration.num_sequences='many' must be a positive integer"),
    ("an evaluator count ≤ 0", ["evaluator.sparsity.num_windows=0", *TINY], "evaluator.sparsity.num_windows=0 must be a positive integer"),
    ("a broken interpolation", ["backend.union=${", *TINY], "Error parsing override 'backend.union=${'"),
    ("unsupported dtype", lambda tmp: ["model=local", f"model.path={_save(tmp, 'm')}", "model.dtype=float64",
                                       "data=tiny", "logger.mode=disabled"],
     "model.dtype=float64 is not supported; use auto, float32, bfloat16, float16"),
    ("a misspelt setting", ["sparsifier.sparsty=0.5", *TINY],
     "Could not override 'sparsifier.sparsty': Key 'sparsty' is not in struct; check the spelling"),
    ("local model without a path", ["model=local", "data=tiny", "logger.mode=disabled"], "model=local needs a folder: pass model.path="),
    ("model path that does not exist", ["model=local", "model.path=/does/not/exist", "data=tiny", "logger.mode=disabled"],
     "model.path=/does/not/exist does not exist"),
    ("a folder that is not a causal LM (BERT)", _bert, "architecture 'bert' is not supported"),
    ("an unsupported architecture (GPT-2)", _gpt2, "architecture 'gpt2' is not supported; supported model types: gemma3"),
    ("relufied (FATReLU) checkpoint forced to its stock activation", _fatrelu_stock, "would silently compute a different function"),
    ("tokenizer from another model (vocabulary larger than the embedding)", _vocab_mismatch,
     "has 400 tokens but the model's embedding has 320 rows"),
    ("NaN in the weights (NaN/inf activations)", _poisoned, "NaN/inf in the MLP output of layer 1"),
]


def run_case(args, workdir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPARSEBENCH_CACHE": str(workdir / "cache"), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-c", "from sparsebench.cli import main; main()", *args,
           "hydra.run.dir=out", f"hydra.sweep.dir={workdir}/sweep"]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("sparsebench: error:")]


def main() -> None:
    print("| bad input | command (tiny model) | exit | the one line it prints |\n|---|---|---|---|")
    for case, args, _ in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            argv = args(tmp) if callable(args) else args
            proc = run_case(argv, tmp)
            shown = " ".join(a.replace(str(tmp), "DIR") for a in argv)
            line = (error_lines(proc) or ["(none)"])[0].replace(str(tmp), "DIR")
            print(f"| {case} | `sparsebench {shown}` | {proc.returncode} | `{line}` |")


if __name__ == "__main__":
    main()
