"""``sparsebench-plot DIR... [--figure NAME] [--out DIR]``: redraw figures from results.json.

Reads every ``results.json`` under the given folders (a multirun folder, or several), and
for each figure the runs feed (their experiment's ``figures:``, or ``--figure``) writes
``NAME.png``, ``NAME.pdf`` and ``NAME.csv`` into ``--out`` (default: ``DIR/figures`` of the
first folder). Nothing is rerun.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from sparsebench.reporting.results import load_results

from .figures import CAPTIONS, FIGURES, figures_for


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def results_or_exit(parser: argparse.ArgumentParser, dirs: list[Path]) -> list[dict]:
    """Every results.json under ``dirs``; a one-line usage error when there are none."""
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    results = load_results(dirs)
    if not results:
        parser.error(f"no results.json under {', '.join(map(str, dirs))}; run the sweep first")
    return results


def draw(results: list[dict], out: Path, names: list[str] | None = None) -> dict[str, dict]:
    """Draw ``names`` (default: every figure the results feed); return name -> file paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names or figures_for(results):
        fig, rows = FIGURES[name](results)
        if not rows:
            print(f"[sparsebench-plot] {name}: no runs with the metrics it needs; skipped", file=sys.stderr)
            continue
        paths = {"png": out / f"{name}.png", "pdf": out / f"{name}.pdf", "csv": out / f"{name}.csv"}
        if fig.get_layout_engine() is None:  # a figure that chose its own layout keeps it
            fig.tight_layout()
        fig.savefig(paths["png"], dpi=150)
        fig.savefig(paths["pdf"])
        import matplotlib.pyplot as plt

        plt.close(fig)
        write_csv(paths["csv"], rows)
        written[name] = {k: str(v) for k, v in paths.items()} | {"caption": CAPTIONS[name], "points": len(rows)}
        print(f"[sparsebench-plot] {name}: {paths['png']} (+ .pdf, .csv; {len(rows)} rows)")
    return written


def draw_dirs(argv=None) -> dict:
    """The command's work; returns what it wrote (``main`` is the console entry point)."""
    p = argparse.ArgumentParser(prog="sparsebench-plot", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="folders holding results.json files (searched recursively)")
    p.add_argument("--figure", action="append", choices=sorted(FIGURES),
                   help="draw this figure (repeatable); default: the figures the runs' experiments name")
    p.add_argument("--out", type=Path, help="output folder (default: FIRST_DIR/figures)")
    a = p.parse_args(argv)
    results = results_or_exit(p, a.dirs)
    names = a.figure or figures_for(results)
    if not names:
        p.error("these runs feed no known figure; name one with --figure (" + ", ".join(sorted(FIGURES)) + ")")
    written = draw(results, a.out or a.dirs[0] / "figures", names)
    if not written:
        sys.exit(1)
    return written


def main(argv=None) -> None:
    draw_dirs(argv)


if __name__ == "__main__":
    main()
