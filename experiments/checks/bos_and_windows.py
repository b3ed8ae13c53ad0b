"""Dense perplexity of the registry models with and without the tokenizer's BOS, and with
the old window selection (consecutive windows from the start of the joined held-out text)
vs the current one (spread evenly over every held-out work).

    python -m sparsebench.experiments.checks.bos_and_windows --model gemma3-270m --windows 20

Scores the same text tokens every way (the first text token of each window is context
only, so the with/without-BOS numbers cover identical targets); prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
from importlib import resources

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sparsebench.data.corpus import heldout_windows, load_corpus, prefix_tokens, text_ids
from sparsebench.models.loader import load_model


@torch.no_grad()
def ppl(model, rows: torch.Tensor, first_scored: int) -> float:
    nll, n = 0.0, 0
    for batch in rows.split(4):
        logits = model(input_ids=batch).logits[:, first_scored - 1 : -1].float()
        target = batch[:, first_scored:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        n += target.numel()
    return math.exp(nll / n)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    conf = resources.files("sparsebench.conf")
    model, tok, _ = load_model(OmegaConf.load(conf / "model" / f"{a.model}.yaml"))
    splits = load_corpus(OmegaConf.load(conf / "data" / "shakespeare.yaml"))
    prefix = prefix_tokens(tok)
    span = a.seq_len - 1  # text tokens per window; +1 BOS where the tokenizer adds one
    spread = heldout_windows(tok, splits, a.windows, span + len(prefix)).ids[:, len(prefix):]
    joined = text_ids(tok, splits.heldout)
    n = min(a.windows, joined.numel() // span)
    first = joined[: n * span].view(n, span)  # the old selection: the start of Hamlet
    head = torch.tensor([prefix] * a.windows, dtype=torch.long).view(a.windows, len(prefix))
    out = {"model": a.model, "prefix_tokens": prefix, "windows": a.windows, "text_tokens_per_window": span,
           "scored_tokens_per_window": span - 1}
    for name, rows in (("spread", spread), ("first", first)):
        out[f"{name}_without_prefix"] = ppl(model, rows, 1)
        if prefix:  # the same targets (text tokens 2..), the BOS in front
            out[f"{name}_with_prefix"] = ppl(model, torch.cat([head[: len(rows)], rows], 1), 1 + len(prefix))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
