"""Hydra callbacks: when a multirun ends, print one combined table and list failed points."""
from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from .reporting.results import combined_table, load_results, print_tables
from .sweep import failed_points

# Failed points of the last multirun in this process; ``sparsebench`` exits 1 when non-empty.
FAILED: list[dict] = []


class MultirunSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results = load_results([sweep_dir])
        if results:
            print_tables(combined_table(results, title=f"sweep {sweep_dir} ({len(results)} runs)"))
        else:
            print(f"[sparsebench] no results.json under {sweep_dir}")
        FAILED[:] = failed_points(sweep_dir)
        if FAILED:
            print(f"sparsebench: {len(FAILED)} point(s) failed; rerun the same command to retry only these:",
                  file=sys.stderr)
            for f in FAILED:
                print(f"  {f['overrides']}: {f['error'].splitlines()[0] if f['error'] else '?'}  [{f['dir']}]",
                      file=sys.stderr)
