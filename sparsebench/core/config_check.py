"""Type checks of a group option's settings against the YAML it ships with.

Each shipped YAML is the schema of its option: a setting whose default is a bool must stay
a bool, an int a (positive, if the default is) int, a float a finite number, a string a
string, a list a list of the same kind of items; a null default allows null, a number or a string.
Range rules that depend on the method (sparsity in [0, 1), a rank fraction in (0, 1], …)
stay in each component's ``validate``. A wrong value fails before any model is loaded, in
one line naming the setting and a valid example.
"""
from __future__ import annotations

import math
from functools import cache
from importlib import resources
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

# settings whose default is a number but where null means "no limit"
NULLABLE = {("evaluator", "lm_eval", "limit")}
# Settings whose shipped default is a number that also accept a word (lm-eval's own batch
# size detection, on CUDA; the evaluator refuses it on the CPU).
ALSO_ACCEPTS = {("evaluator", "lm_eval", "batch_size"): "auto"}


@cache
def shipped_defaults(group: str, name: str) -> dict[str, Any]:
    path = resources.files("sparsebench.conf") / group / f"{name}.yaml"
    if not path.is_file():
        return {}
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return _without_interpolations(raw)


def _without_interpolations(raw: dict) -> dict:
    """Interpolated defaults (``${data.heldout.seq_len}``) are checked where they point."""
    return {k: _without_interpolations(v) if isinstance(v, dict) else v for k, v in raw.items()
            if not (isinstance(v, str) and "${" in v)}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _kind(default) -> str:
    if default is None:
        return "null, a number or a string"
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "a positive integer" if default > 0 else "an integer"
    if isinstance(default, float):
        return "a finite number"
    if isinstance(default, str):
        return "a string"
    if isinstance(default, list):
        return "a list of numbers" if all(_is_number(x) for x in default) else "a list"
    return type(default).__name__


def _fits(value, default) -> bool:
    if default is None:
        return value is None or _is_number(value) or isinstance(value, str)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool) and (value > 0 or default <= 0)
    if isinstance(default, float):
        return _is_number(value)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        if not isinstance(value, (list, ListConfig)):
            return False
        return all(_is_number(x) for x in value) if all(_is_number(x) for x in default) else True
    return True


def _override(value) -> str:
    """A value as it is typed in a Hydra override."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_override(v) for v in value) + "]"
    return str(value)


def check_option(group: str, cfg: DictConfig, prefix: str | None = None) -> None:
    """Raise ConfigError for the first setting of ``cfg`` whose type its shipped YAML rules out."""
    name = str(cfg.get("name") or cfg.get("corpus"))  # data options are named by their corpus
    _check_level(group, shipped_defaults(group, name), cfg, prefix or group, name)


def _check_level(group: str, defaults: dict, cfg, where: str, name: str) -> None:
    for key, default in defaults.items():
        if key == "name" or key not in cfg:
            continue
        try:
            value = cfg[key]
            if isinstance(value, (DictConfig, ListConfig)) and not isinstance(default, dict):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as exc:  # e.g. a broken ${...} typed on the command line
            raise ConfigError(f"{where}.{key} cannot be read ({str(exc).splitlines()[0]}); "
                              f"e.g. {where}.{key}={_override(default)}") from None
        if isinstance(default, dict):
            if not isinstance(value, (dict, DictConfig)):
                raise ConfigError(f"{where}.{key}={value!r} must be a group of settings ({', '.join(default)})")
            _check_level(group, default, value, f"{where}.{key}", name)
            continue
        if value is None and (group, name, key) in NULLABLE:
            continue
        if value is not None and value == ALSO_ACCEPTS.get((group, name, key)):
            continue
        if not _fits(value, default):
            raise ConfigError(f"{where}.{key}={value!r} must be {_kind(default)}, e.g. {where}.{key}={_override(default)}")
