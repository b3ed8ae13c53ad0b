"""Resumable sweeps: reuse finished points, record failed ones, list them at the end.

A point is *finished* when its output folder holds a ``results.json`` with status ``ok``
whose configuration equals the one being run (keys that cannot change a result, such as
the W&B mode, are ignored) and whose code is today's: every source file it recorded
(``code.files``, the import closure of the modules that computed it) still has the
recorded sha256. A results.json without that record, or made by other code, is rerun.
Rerunning the same sweep command therefore runs only the missing or changed points;
``rerun=true`` forces every point.

A point that raises is recorded in ``failed.json`` beside where its results would be and
the sweep goes on; the multirun callback lists the failures and the command exits 1.
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

from .store.cache import atomic_write_json
from .store.provenance import files_unchanged
from .reporting.results import RESULTS_FILE

FAILED_FILE = "failed.json"
# Config keys that do not change what a run measures: where the cache lives, how W&B
# logs, what is printed, and the rerun switch itself.
VOLATILE_KEYS = ("logger", "cache_dir", "print_per_layer", "rerun", "figures", "dense_cache")


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    # attention=none is what every run was before the attention group existed: dense attention
    if (out.get("attention") or {}).get("name", "none") == "none":
        out.pop("attention", None)
    return out


def finished_run(output_dir: Path, config: dict[str, Any]) -> dict | None:
    """The results of an earlier successful run of exactly this config in ``output_dir``."""
    path = Path(output_dir) / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text())
    except ValueError:
        return None  # unreadable: run again (results.json is written atomically, so this is rare)
    if previous.get("status") != "ok":
        return None
    if comparable_config(previous.get("config") or {}) != comparable_config(config):
        return None
    files = (previous.get("code") or {}).get("files")
    if not files or not files_unchanged(files):
        return None
    return previous


# Settings a sparsifier ignores: points of a sweep that differ only in them compute the same
# thing, so the sweep runs the first and says so for the rest.
IGNORED_SETTINGS = {"none": ("sparsity",)}


def _without_ignored(config: dict[str, Any]) -> dict[str, Any]:
    config = comparable_config(config)
    sp = dict(config.get("sparsifier") or {})
    for key in IGNORED_SETTINGS.get(sp.get("name"), ()):
        sp.pop(key, None)
    return config | {"sparsifier": sp}


def equivalent_point(sweep_dir: Path, output_dir: Path, config: dict[str, Any]) -> Path | None:
    """Another finished point of this sweep that computed exactly what ``config`` would,
    up to settings its sparsifier ignores (e.g. the sparsity of ``sparsifier=none``)."""
    if not IGNORED_SETTINGS.get((config.get("sparsifier") or {}).get("name")):
        return None
    target = _without_ignored(config)
    for path in sorted(Path(sweep_dir).rglob(RESULTS_FILE)):
        if path.parent.resolve() == Path(output_dir).resolve():
            continue
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            continue
        if previous.get("status") != "ok" or _without_ignored(previous.get("config") or {}) != target:
            continue
        files = (previous.get("code") or {}).get("files")
        if files and files_unchanged(files):
            return path.parent
    return None


def record_failure(output_dir: Path, exc: BaseException, overrides: str) -> Path:
    path = Path(output_dir) / FAILED_FILE
    atomic_write_json(path, {
        "status": "failed", "overrides": overrides, "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc)),
    })
    return path


def clear_failure(output_dir: Path) -> None:
    (Path(output_dir) / FAILED_FILE).unlink(missing_ok=True)


def failed_points(sweep_dir: Path) -> list[dict]:
    """Failures recorded under ``sweep_dir`` whose point has not succeeded since."""
    out = []
    for f in sorted(Path(sweep_dir).rglob(FAILED_FILE)):
        if (f.parent / RESULTS_FILE).exists() and f.stat().st_mtime < (f.parent / RESULTS_FILE).stat().st_mtime:
            continue
        try:
            info = json.loads(f.read_text())
        except ValueError:
            info = {"overrides": f.parent.name, "error": "unreadable failed.json"}
        out.append(info | {"dir": str(f.parent)})
    return out
