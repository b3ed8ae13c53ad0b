"""Passkey retrieval prompts, generated locally (seeded; nothing is downloaded).

The task of Mohtashami & Jaggi (2023, "Landmark attention") as Quest's evaluation runs it
(mit-han-lab/Quest evaluation/passkey/passkey.py): a task line, repetitive filler, the
needle "The pass key is K. Remember it. K is the pass key." at a depth of the filler, more
filler, and "What is the pass key? The pass key is"; lines joined by newlines; the key an
integer in [1, 50000]; depths (i + 1)/n for the n items of a length. The model answers by
greedy decoding; the first integer in its answer must equal the key.

As there, the prompt is split: all but its last ``question_chars`` characters are
prefilled, the rest (the question and some filler) is fed one token at a time as decode
steps, so the queries that must find the needle are decode queries, which a decode-time
method (Quest) sparsifies. The prefill part is tokenized as the model's tokenizer does by
default (BOS where it adds one); the decode part without special tokens.
``haystack_text`` replaces the filler by other text (e.g. held-out prose). The items' token
ids are CPU tensors; the evaluator (``sparsebench.evaluators.passkey``) moves them to the
model's device.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyItem:
    prefill: torch.Tensor  # [n] token ids, the tokenizer's prefix included
    decode: torch.Tensor  # [m] the prompt's tail, fed one token at a time
    key: int
    depth: float  # where the needle sits, as a fraction of the filler
    context: int  # the requested context length in tokens

    @property
    def prompt_tokens(self) -> int:
        return self.prefill.numel() + self.decode.numel()


def prompt_text(n_chars: int, depth: float, key: int, haystack_text: str | None = None) -> str:
    hay = haystack_text if haystack_text is not None else " ".join([FILLER] * (n_chars // len(FILLER) + 2))
    prefix_chars = int(n_chars * depth)
    lines = [INTRO, hay[:prefix_chars], NEEDLE.format(key=key), hay[:n_chars - prefix_chars], QUESTION]
    return "\n".join(lines)


def answer_key(text: str) -> int | None:
    """The first integer in a decoded answer (the reference's rule)."""
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def passkey_item(tokenizer, context: int, depth: float, key: int, question_chars: int = 400,
                 answer_tokens: int = 10, haystack_text: str | None = None) -> PasskeyItem:
    """One prompt of at most ``context - answer_tokens`` tokens with the needle at ``depth``."""
    def split(n_chars: int) -> tuple[list[int], list[int]]:
        text = prompt_text(n_chars, depth, key, haystack_text)
        return (tokenizer(text[:-question_chars]).input_ids,
                tokenizer(text[-question_chars:], add_special_tokens=False).input_ids)

    def n_tokens(n_chars: int) -> int:  # as fed: the two parts tokenized apart
        head, tail = split(n_chars)
        return len(head) + len(tail)

    limit = context - answer_tokens
    lo, hi = 0, 8 * context  # no tokenizer packs more than ~8 characters of this text per token
    if haystack_text is not None:
        hi = min(hi, len(haystack_text))
    while lo < hi:  # the most filler characters that fit
        mid = (lo + hi + 1) // 2
        if n_tokens(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    text = prompt_text(lo, depth, key, haystack_text)
    if len(text) <= 2 * question_chars:
        from ..core.errors import ConfigError

        raise ConfigError(f"a {context}-token passkey prompt has only {len(text)} characters; lower "
                          f"question_chars ({question_chars}) or raise the context")
    head, tail = split(lo)
    prefill, decode = torch.tensor(head, dtype=torch.long), torch.tensor(tail, dtype=torch.long)
    return PasskeyItem(prefill, decode, key, depth, context)


def passkey_items(tokenizer, contexts: list[int], per_context: int, seed: int, question_chars: int = 400,
                  answer_tokens: int = 10, haystack_text: str | None = None) -> list[PasskeyItem]:
    """``per_context`` items per context length, keys seeded, depths (i + 1)/per_context."""
    rng = random.Random(seed)
    return [passkey_item(tokenizer, ctx, (i + 1) / per_context, rng.randint(1, 50000), question_chars,
                         answer_tokens, haystack_text)
            for ctx in contexts for i in range(per_context)]
