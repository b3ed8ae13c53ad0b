"""Hydra callbacks: print one combined table when a multirun ends."""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback

from .results import combined_table, load_results, print_tables


class MultirunSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results = load_results([sweep_dir])
        if results:
            print_tables(combined_table(results, title=f"sweep {sweep_dir} ({len(results)} runs)"))
        else:
            print(f"[sparsebench] no results.json under {sweep_dir}")
