"""W&B comparison report for a sweep, built from the local results.json files.

``wandb_logger`` logs one W&B run per sparsebench run (offline by default). This module
turns a set of results into a *report spec*: a plain, deterministic JSON description of
the panels worth looking at (headline metrics against the requested sparsity, one line
per sparsifier; per-layer curves; a runs table). The spec is always written locally, so
nothing depends on reaching W&B. When the runs were logged online and an API key is at
hand, the spec is also rendered with ``wandb_workspaces.reports.v2`` and saved; otherwise
the caller gets the exact ``wandb sync`` command that uploads the offline runs, after
which ``sparsebench-report <dirs> --wandb online`` creates the report.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
from collections import Counter
from pathlib import Path

from ..store.cache import atomic_write_json
from .results import load_results

log = logging.getLogger(__name__)

SPEC_FILE = "wandb_report_spec.json"
# Summary metrics worth a panel, in display order; only those some run has are used.
HEADLINE = ("perplexity", "lm_eval/avg_acc", "sparsity/mean", "churn/fraction", "decode/tokens_per_s")
SPARSITY_X = "config.sparsifier.sparsity"
TITLE_MAX = 128  # wr.Report rejects longer titles


def _most_common(values) -> str | None:
    """Most frequent non-empty value; ties broken alphabetically so the spec is stable."""
    counts = Counter(v for v in values if v)
    return min(counts, key=lambda v: (-counts[v], v)) if counts else None


def _logger_cfg(r: dict) -> dict:
    return (r.get("config") or {}).get("logger") or {}


def _per_layer_columns(runs: list[dict]) -> list[str]:
    # Mirror wandb_logger.log_run: only numeric columns become per_layer/<col> series.
    cols = {k for r in runs for row in (r.get("per_layer") or []) for k, v in row.items()
            if k != "layer" and isinstance(v, (int, float))}
    return sorted(cols)


def _runs_table(runs: list[dict], metrics: list[str]) -> dict:
    cols = ["run", "sparsifier", "sparsity", *metrics]
    rows = [[r["run"]["name"], r["sparsifier"]["name"], r["sparsifier"].get("sparsity"),
             *[r.get("metrics", {}).get(m) for m in metrics]] for r in runs]
    return {"kind": "runs_table", "columns": cols, "rows": rows}


def _section(group: str | None, runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["run"]["name"])
    metrics = [m for m in HEADLINE if any(m in (r.get("metrics") or {}) for r in runs)]
    panels = [{"kind": "scatter", "title": m, "x": SPARSITY_X, "y": f"sparse/{m}", "group_by": "job_type"}
              for m in metrics]
    panels += [{"kind": "line", "title": f"per layer: {c}", "x": "layer", "y": [f"per_layer/{c}"]}
               for c in _per_layer_columns(runs)]
    panels.append(_runs_table(runs, metrics))
    names = [r["run"]["name"] for r in runs]
    return {"group": group, "title": f"sparsebench: {group or 'ungrouped'}",
            "filter": {"group": group, "runs": names, "expr": _filter_expr(group, names)},
            "sparsifiers": sorted({r["sparsifier"]["name"] for r in runs}), "panels": panels}


def build_report(results: list[dict], group: str | None = None) -> dict:
    """Data-only report spec; one section per sweep group (or only ``group``)."""
    by_group: dict[str | None, list[dict]] = {}
    for r in results:
        by_group.setdefault(r["run"].get("group"), []).append(r)
    if group is not None:
        if group not in by_group:
            raise ValueError(f"no results in group {group!r}; have {sorted(map(str, by_group))}")
        by_group = {group: by_group[group]}
    # None sorts last so named sweep groups come first.
    keys = sorted(by_group, key=lambda g: (g is None, g or ""))
    sections = [_section(g, by_group[g]) for g in keys]
    runs = [r for g in keys for r in by_group[g]]
    title = "sparsebench: " + ", ".join(s["title"].removeprefix("sparsebench: ") for s in sections)
    return {"title": title[:TITLE_MAX],
            "project": _most_common(_logger_cfg(r).get("project") for r in runs),
            "entity": _most_common(_logger_cfg(r).get("entity") for r in runs),
            "sections": sections}


def _filter_expr(group: str | None, names: list[str]) -> str:
    """W&B runset filter string. Built with repr() because wandb_workspaces parses it with
    ``ast`` but its own FilterExpr->string conversion does not escape quotes."""
    if group is not None:
        return f"Metric('Group') == {group!r}"
    return f"Metric('Name') in {sorted(names)!r}"  # ungrouped runs can only be picked by name


def _runset(spec: dict, section: dict, job_type: str):
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    flt = section["filter"]
    # One runset per sparsifier: scatter plots cannot group, so the runsets give each
    # sparsifier its own colour and legend entry.
    rs = wr.Runset(project=spec["project"], entity=spec["entity"], name=job_type,
                   filters=f"{flt['expr']} and Metric('JobType') == {job_type!r}")
    # The library rewrites '=', '<', '>' even inside quoted values when it parses the
    # string on save, which mangles Hydra run names like "sparsifier=cats". Stash the
    # exact filter the way Runset._from_model does so _to_model sends it unchanged.
    sel = expr.Metric("Group") == flt["group"] if flt["group"] is not None \
        else expr.Metric("Name").isin(flt["runs"])
    tree = expr.filter_expr_to_filters_tree([sel, expr.Metric("JobType") == job_type])
    rs._stashed_filters_v2 = expr.filters_tree_to_v2(tree)
    rs._stashed_filter_string = rs.filters
    return rs


def _panel(p: dict):
    import wandb_workspaces.reports.v2 as wr

    if p["kind"] == "scatter":
        return wr.ScatterPlot(title=p["title"], x=wr.Config(p["x"].removeprefix("config.")),
                              y=wr.SummaryMetric(p["y"]))
    if p["kind"] == "line":
        return wr.LinePlot(title=p["title"], x=p["x"], y=list(p["y"]))
    return wr.RunComparer(diff_only="split")


def to_wandb_report(spec: dict):
    """Render a spec as an unsaved ``wr.Report``; no network until ``.save()``."""
    import wandb_workspaces.reports.v2 as wr

    if not spec.get("project") or not spec.get("entity"):
        # wr.Report would otherwise ask the W&B API for a default entity.
        raise ValueError("report spec needs both project and entity")
    blocks = []
    for s in spec["sections"]:
        blocks.append(wr.H1(text=s["title"]))
        blocks.append(wr.PanelGrid(runsets=[_runset(spec, s, jt) for jt in s["sparsifiers"]],
                                   panels=[_panel(p) for p in s["panels"]]))
    return wr.Report(project=spec["project"], entity=spec["entity"], title=spec["title"], blocks=blocks)


def _api_key() -> str | None:
    """API key from the environment or ~/.netrc, looked up without any network call."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        from wandb.sdk.lib import wbauth

        return wbauth.read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    except Exception:  # noqa: BLE001 - a broken netrc just means "no key"
        return None


def _save_online(spec: dict) -> str:
    if not spec.get("entity"):
        import wandb

        spec = {**spec, "entity": wandb.Api().default_entity}
    report = to_wandb_report(spec)
    report.save()
    return report.url


def _run_dir(r: dict) -> Path:
    out = r.get("run", {}).get("output_dir")
    if out and Path(out).is_dir():
        return Path(out)
    return Path(r["_path"]).parent  # results moved/copied: trust where the file is now


def offline_run_dirs(results: list[dict]) -> list[str]:
    dirs = {str(p) for r in results for p in _run_dir(r).glob("wandb/offline-run-*") if p.is_dir()}
    return sorted(dirs)


def _sync_command(spec: dict, run_dirs: list[str], result_dirs: list[str], group: str | None) -> str:
    sync = ["wandb", "sync", "--project", spec["project"] or "sparsebench"]
    if spec["entity"]:
        sync += ["--entity", spec["entity"]]
    report = ["sparsebench-report", *result_dirs, "--wandb", "online"]
    report += ["--group", group] if group is not None else []
    return f"{shlex.join(sync + run_dirs)} && {shlex.join(report)}"


def publish(results: list[dict], out_dir, mode: str | None = None, group: str | None = None) -> dict:
    """Save the report online if possible, else write the spec and say how to upload."""
    spec = build_report(results, group)
    if group is not None:  # only this group's runs need uploading
        results = [r for r in results if r["run"].get("group") == group]
    mode = mode or _most_common(_logger_cfg(r).get("mode") for r in results) or "offline"
    spec_path = Path(out_dir) / SPEC_FILE
    atomic_write_json(spec_path, spec)  # always kept: the report survives a failed upload
    out = {"spec": str(spec_path), "sync_command": None, "url": None, "mode": mode}
    if mode == "online" and _api_key():
        try:
            return out | {"url": _save_online(spec)}
        except Exception as exc:  # noqa: BLE001 - W&B being unreachable must not fail the sweep
            log.warning("W&B report upload failed (%s); falling back to offline spec", exc)
    run_dirs = offline_run_dirs(results)
    if not run_dirs:
        out["note"] = "no offline W&B run dirs found (logger disabled?); nothing to sync"
    else:
        result_dirs = sorted({str(Path(r["_path"]).parent) for r in results if r.get("_path")})
        out["sync_command"] = _sync_command(spec, run_dirs, result_dirs, group)
        out["note"] = f"report spec written; to upload {len(run_dirs)} offline run(s) and build the report run:"
    print(f"[sparsebench] {out['note']}" + (f"\n  {out['sync_command']}" if out["sync_command"] else ""))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build a W&B comparison report from sparsebench results.")
    ap.add_argument("dirs", nargs="+", type=Path, help="folders searched for results.json")
    ap.add_argument("--group", default=None, help="only this sweep group")
    ap.add_argument("--mode", choices=("online", "offline", "disabled"), default=None)
    ap.add_argument("--out", type=Path, default=None, help="where the spec goes (default: first dir)")
    args = ap.parse_args(argv)
    results = load_results(args.dirs)
    if not results:
        ap.error(f"no results.json under {', '.join(map(str, args.dirs))}")
    out = publish(results, args.out or args.dirs[0], args.mode, args.group)
    if out["url"]:
        print(f"[sparsebench] report: {out['url']}")


if __name__ == "__main__":
    main()
