"""``sparsebench-report DIR... [--out DIR] [--wandb MODE]``: one offline report of a set of runs.

Writes ``report.md`` and ``report.html`` (same content; the HTML embeds nothing remote)
into ``--out`` with every figure the runs feed (PNG/PDF/CSV beside them), the method ×
sparsity table, the churn / decode / cache tables when those metrics exist, a list of
the runs, and any failed sweep points. ``--wandb offline|online`` also builds the W&B
comparison report (sparsebench.reporting.wandb_report): saved when online with an API key, else
written as a spec with the ``wandb sync`` command that uploads the runs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import html
from pathlib import Path

from sparsebench.store.cache import atomic_write_bytes
from sparsebench.sweep import failed_points

from .figures import CAPTIONS, method_rows, model_name
from .plot import draw, results_or_exit
from .pairwise import pairwise_markdown, pairwise_rows
from .tables import churn_rows, decode_rows, markdown, methods_markdown, paired_markdown, paired_rows


def _runs_markdown(results: list[dict]) -> str:
    rows = [{"run": r["run"]["name"], "group": r["run"].get("group") or "—", "model": model_name(r),
             "sparsifier": r["sparsifier"]["name"], "backend": r["backend"],
             "wall s": r["run"].get("wall_time_s"), "started": r["run"].get("started_at")} for r in results]
    return markdown(rows)


def build_markdown(results: list[dict], figures: dict[str, dict], out: Path, dirs: list[Path], title: str) -> str:
    lines = [f"# {title}", "",
             f"{len(results)} runs from {', '.join(f'`{d}`' for d in dirs)}; "
             f"generated {dt.datetime.now().isoformat(timespec='minutes')} by `sparsebench-report`.", ""]
    failed = [f for d in dirs for f in failed_points(d)]
    if failed:
        lines += ["## Failed points", "", "Rerun the sweep's command to retry only these.", ""]
        lines += [f"- `{f['overrides']}`: {f['error'].splitlines()[0]}" for f in failed] + [""]
    for name, paths in figures.items():
        rel = Path(paths["png"]).relative_to(out)
        lines += [f"## Figure: {name}", "", f"![{name}]({rel.as_posix()})", "", CAPTIONS[name], "",
                  f"Numbers: [{Path(paths['csv']).name}]({Path(paths['csv']).relative_to(out).as_posix()}), "
                  f"vector: [{Path(paths['pdf']).name}]({Path(paths['pdf']).relative_to(out).as_posix()}).", ""]
    rows = [r for r in method_rows(results) if r["perplexity"] is not None or r["avg_acc"] is not None]
    if rows:
        lines += ["## Method × sparsity", "", methods_markdown(rows), ""]
    paired = paired_rows(results)
    if paired:
        lines += ["## Against dense, paired (same items, same windows)", "",
                  "Accuracy: Δ in points with its 95% paired-bootstrap CI; * = exact McNemar p < 0.05. "
                  "Perplexity: ratio to dense with its 95% paired CI over windows. Critical sparsity: the "
                  "largest tested sparsity such that it and every smaller one have the CI's upper end ≥ −1 point.",
                  "", paired_markdown(paired), ""]
    pairs = pairwise_rows(results)
    if pairs:
        lines += ["## Method against method, paired", "", pairwise_markdown(pairs), ""]
    for heading, fn in (("Mask churn", churn_rows), ("End-to-end decode", decode_rows)):
        rows = fn(results)
        if rows:
            lines += [f"## {heading}", "", markdown(rows), ""]
    lines += ["## Runs", "", _runs_markdown(results), ""]
    return "\n".join(lines)


def to_html(md: str, title: str) -> str:
    from markdown_it import MarkdownIt  # installed with rich; renders tables (GFM)

    body = MarkdownIt("commonmark").enable("table").render(md)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")


def report(argv=None) -> dict:
    """The command's work; returns what it wrote (``main`` is the console entry point)."""
    p = argparse.ArgumentParser(prog="sparsebench-report", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="folders holding results.json files (searched recursively)")
    p.add_argument("--out", type=Path, help="output folder (default: FIRST_DIR/report)")
    p.add_argument("--title", default="sparsebench report")
    p.add_argument("--wandb", choices=("offline", "online"), help="also build the W&B comparison report")
    a = p.parse_args(argv)
    results = results_or_exit(p, a.dirs)
    out = a.out or a.dirs[0] / "report"
    figures = draw(results, out / "figures")
    md = build_markdown(results, figures, out, a.dirs, a.title)
    atomic_write_bytes(out / "report.md", md.encode())
    atomic_write_bytes(out / "report.html", to_html(md, a.title).encode())
    print(f"[sparsebench-report] {out / 'report.md'} and report.html ({len(results)} runs, {len(figures)} figures)")
    written = {"markdown": str(out / "report.md"), "html": str(out / "report.html"), "figures": figures}
    if a.wandb:
        from sparsebench.reporting.wandb_report import publish

        written["wandb"] = publish(results, out, a.wandb)
    return written


def main(argv=None) -> None:
    report(argv)


if __name__ == "__main__":
    main()
