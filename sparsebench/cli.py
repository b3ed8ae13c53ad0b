"""The ``sparsebench`` command: ``@hydra.main`` over the configs shipped in sparsebench.conf."""
from __future__ import annotations

import hashlib
import sys
from importlib import resources
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .core.errors import SparsebenchError

CONFIG_MODULE = "sparsebench.conf"
MAX_DIRNAME_BYTES = 200  # filesystems allow 255 bytes per name


def point_dirname(overrides: str) -> str:
    """A sweep point's folder name: its overrides, or for long ones a prefix plus a hash of
    all of them (deterministic, so a rerun of the sweep finds the point again)."""
    if len(overrides.encode()) <= MAX_DIRNAME_BYTES:
        return overrides
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:12]
    return f"{overrides.encode()[:MAX_DIRNAME_BYTES - 14].decode(errors='ignore')}__{digest}"


# Registered when this entry module is imported (also in submitit's job processes, which
# unpickle hydra_main from here): Hydra resolves hydra.sweep.subdir before our code runs.
OmegaConf.register_new_resolver("point_dirname", point_dirname, replace=True)


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
    check_composes(overrides)


def check_composes(overrides) -> None:
    """Compose the config once (the first value of every sweep) so a misspelt setting fails
    here in one line instead of in Hydra's multi-line report."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    first = []
    for ov in overrides:
        if ov.is_sweep_override():
            value = next(iter(ov.sweep_string_iterator()), None)
            if value is None:
                continue
            first.append(f"{ov.get_key_element()}={value}")
        else:
            first.append(ov.input_line)
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            compose(config_name="config", overrides=first, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        text = f"{exc}\n{exc.__cause__ or ''}"  # Hydra keeps the reason in the cause
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        why = next((line for line in lines if "not in struct" in line), "")
        head = lines[0].rstrip(".") if lines else type(exc).__name__
        hint = ("; check the spelling (sparsebench --cfg job lists every setting) or add a new key with +KEY=VALUE"
                if why else "")
        _fail(f"{head}{': ' + why if why else ''}{hint}")


# Libraries whose messages go to the run folder's library log instead of the console: lm-eval's
# "`pretrained` model kwarg is not of type `str`" and "metric acc is defined, but aggregation is
# not", transformers' deprecation notes, datasets' "Map" bars, Python warnings, and pip's output
# when a registry package is fetched (store.cache logs it line by line at INFO).
LIBRARY_LOGGERS = ("lm-eval", "lm_eval", "transformers", "datasets", "huggingface_hub", "accelerate", "urllib3",
                   "filelock", "hydra_plugins", "py.warnings", "pip")
LIBRARY_LOG = "libraries.log"


def route_library_output(output_dir: Path) -> Path:
    """Send third-party log records and Python warnings to ``output_dir/libraries.log`` (no
    console), switch off datasets' and transformers' own progress bars (our phases keep
    theirs), and return the log's path."""
    import logging

    path = Path(output_dir) / LIBRARY_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if isinstance(old, logging.FileHandler) and Path(old.baseFilename).name == LIBRARY_LOG:
                logger.removeHandler(old)  # a previous sweep point's file
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("pip").setLevel(logging.INFO)  # its lines are only worth having in the file
    try:
        import transformers

        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.add_handler(handler)
        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except (ImportError, AttributeError):
        pass
    return path


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


def check_attention_applies(cfg: DictConfig) -> None:
    """Refuse ``attention=<method>`` with an evaluator that would measure dense attention:
    today only the long-context evaluators (``applies_attention``) install the method."""
    from .core.errors import ConfigError
    from .evaluators import EVALUATORS

    attention = cfg.get("attention") or {}
    if attention.get("name", "none") == "none":
        return
    from .run import evaluator_configs

    ignoring = [e.name for e in evaluator_configs(cfg)
                if not getattr(EVALUATORS.get(e.name), "applies_attention", False)]
    if ignoring:
        raise ConfigError(f"attention={attention.name} is applied by the passkey, long_perplexity and long_decode "
                          f"evaluators only; {', '.join(ignoring)} would measure dense attention "
                          "(e.g. evaluator=[passkey,long_perplexity])")


@hydra.main(version_base="1.3", config_path="pkg://sparsebench.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from .core.faults import checkpoint
    from .reporting.results import RESULTS_FILE
    from .run import run
    from .sweep import clear_failure, equivalent_point, finished_run, record_failure

    output_dir, name, group = _output_dir_and_name()
    checkpoint("job_start")
    config = OmegaConf.to_container(cfg, resolve=True)
    if not cfg.get("rerun", False):
        if finished_run(output_dir, config) is not None:
            print(f"[sparsebench] {name if group else output_dir}: finished earlier with this config and code, "
                  "reusing its results.json (rerun=true to run it again)")
            return
        if group is not None:
            from hydra.core.hydra_config import HydraConfig

            same = equivalent_point(Path(HydraConfig.get().sweep.dir), output_dir, config)
            if same is not None:
                print(f"[sparsebench] {name}: not run, sparsifier={cfg.sparsifier.name} ignores its sparsity "
                      f"(same as {same.relative_to(Path(HydraConfig.get().sweep.dir).resolve()) if same.is_absolute() else same})")
                return
        if (output_dir / RESULTS_FILE).is_file():  # not reusable: another config, or not ok
            print(f"[sparsebench] {output_dir}: holds results of a different config or made by other code; "
                  "running again")
    log = route_library_output(output_dir)
    if group is None:
        print(f"[sparsebench] library messages (lm-eval, transformers, warnings) go to {log}")
    try:
        check_attention_applies(cfg)
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
