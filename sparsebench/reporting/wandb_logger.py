"""Weights & Biases logging. Offline by default, ``disabled`` in tests; a failing
logger must never cost the local results.json, so every call is guarded."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def log_run(lcfg, results: dict, output_dir, group: str | None, name: str) -> str | None:
    mode = lcfg.get("mode", "offline")
    if mode == "disabled":
        return None
    try:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        run = wandb.init(project=lcfg.project, entity=lcfg.get("entity"), mode=mode, dir=str(output_dir),
                         group=group, name=name, job_type=results["sparsifier"]["name"],
                         config=results["config"], reinit="finish_previous")
        run.summary.update({f"sparse/{k}": v for k, v in results["metrics"].items()})
        if results.get("dense_metrics"):
            run.summary.update({f"dense/{k}": v for k, v in results["dense_metrics"].items()})
        for metric, res in (results.get("paired") or {}).items():  # Δ vs dense, its 95% CI and p
            run.summary.update({f"paired/{metric}/{k}": v for k, v in res.items() if isinstance(v, (int, float, bool))})
        run.summary.update({f"code/{k}": v for k, v in (results.get("code") or {}).items() if k != "files"})
        rows = results.get("per_layer") or []
        if rows:
            run.define_metric("layer")
            run.define_metric("per_layer/*", step_metric="layer")
            for r in rows:
                run.log({"layer": r["layer"], **{f"per_layer/{k}": v for k, v in r.items()
                                                  if k != "layer" and isinstance(v, (int, float))}})
            run.log({"per_layer_table": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        run.finish()
        return run.dir
    except Exception as exc:  # noqa: BLE001 - logging is best effort by design
        log.warning("W&B logging failed (%s); results.json is unaffected", exc)
        return None
