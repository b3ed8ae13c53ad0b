"""Every relative link in README.md and docs/*.md points at something that exists.

A link ``[text](path#anchor)`` must name a file or folder of the repository (relative to the
page that holds it), and an anchor into a Markdown page must be one of that page's headings as
GitHub slugs them. A figure listed in the docs but never drawn, or a heading renamed under a
link, fails here rather than on the rendered page. Links with a scheme (https:, mailto:) are
not followed: nothing here may reach the network.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) and ![alt](target), not inside inline code; the target ends at whitespace or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str, keep_code: bool = False):
    """Lines outside fenced code blocks, with inline code removed unless ``keep_code``."""
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield line if keep_code else INLINE_CODE.sub("", line)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link keeps its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)                       # \w keeps letters, digits, _
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(page.read_text(), keep_code=True):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")            # repeated headings get -1, -2, …
    return out


def links(page: Path) -> list[str]:
    return [m.group(1) for line in _prose_lines(page.read_text()) for m in LINK.finditer(line)]


def test_slug_matches_githubs_rule():
    assert github_slug("Benchmark 2b — one MLP step, weights cold") == "benchmark-2b--one-mlp-step-weights-cold"
    assert github_slug("`fused`: in place") == "fused-in-place"
    assert github_slug("Where things live") == "where-things-live"


def test_pages_have_links():
    # guards the extraction itself: the front page links into docs/
    assert any(t.startswith("docs/") for t in links(ROOT / "README.md"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):          # https:, mailto:, …
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
