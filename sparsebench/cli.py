"""The ``sparsebench`` command: ``@hydra.main`` over the configs shipped in sparsebench.conf."""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .errors import SparsebenchError

CONFIG_MODULE = "sparsebench.conf"


def _fail(message: str) -> None:
    print(f"sparsebench: error: {message}", file=sys.stderr)
    sys.exit(2)


def config_groups() -> dict[str, list[str]]:
    root = resources.files(CONFIG_MODULE)
    return {d.name: sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".yaml"))
            for d in root.iterdir() if d.is_dir() and not d.name.startswith("_") and d.name != "hydra"}


def check_group_overrides(argv: list[str]) -> None:
    """Refuse an unknown group option with one line listing the valid ones.

    Hydra would refuse it too, but with a multi-line report; this check runs first
    and covers sweeps (``sparsifier=cats,catz``) and lists (``evaluator=[a,b]``).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = config_groups()
    candidates = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception as exc:  # noqa: BLE001 - report Hydra's parse error on one line
        _fail(str(exc).splitlines()[0])
    for ov in overrides:
        key = ov.key_or_group
        if key not in groups or ov.is_delete() or ov.package:
            continue
        if ov.is_sweep_override():
            values = [str(v) for v in ov.sweep_iterator()]
        else:
            value = ov.value()
            values = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        for v in values:
            if v not in groups[key] and v != "null":
                _fail(f"unknown {key} '{v}'; choose one of: {', '.join(groups[key])} (e.g. {key}={groups[key][0]})")


def _output_dir_and_name() -> tuple[Path, str, str | None]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    name = hc.job.override_dirname or "default"
    group = None
    if hc.mode == RunMode.MULTIRUN:
        group = sweep_group(hc.sweep.dir)
    return Path(hc.runtime.output_dir), name, group


def sweep_group(sweep_dir: str) -> str:
    """The W&B group of a sweep: its folder, e.g. ``multirun/fig4_accuracy`` → ``multirun_fig4_accuracy``."""
    return Path(sweep_dir).as_posix().strip("/").replace("/", "_")


@hydra.main(version_base="1.3", config_path="pkg://sparsebench.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    from .faults import checkpoint
    from .run import run
    from .sweep import clear_failure, config_differs, finished_run, record_failure

    output_dir, name, group = _output_dir_and_name()
    checkpoint("job_start")
    config = OmegaConf.to_container(cfg, resolve=True)
    if not cfg.get("rerun", False):
        if finished_run(output_dir, config) is not None:
            print(f"[sparsebench] {output_dir}: finished earlier with this config, reusing its results.json "
                  "(rerun=true to run it again)")
            return
        if config_differs(output_dir, config):
            print(f"[sparsebench] {output_dir}: holds results of a different config; running again")
    try:
        run(cfg, output_dir, name=name, group=group)
        clear_failure(output_dir)
    except Exception as exc:  # noqa: BLE001 - in a sweep one failed point must not stop the others
        if group is None:
            if isinstance(exc, SparsebenchError):
                _fail(str(exc))
            raise
        path = record_failure(output_dir, exc, name)
        print(f"sparsebench: error: point {name} failed ({type(exc).__name__}: {exc}); recorded in {path}",
              file=sys.stderr, flush=True)


def main() -> None:
    from . import callbacks

    check_group_overrides(sys.argv[1:])
    hydra_main()
    if callbacks.FAILED:
        sys.exit(1)


if __name__ == "__main__":
    main()
