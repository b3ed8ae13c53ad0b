"""Reliability: bad values are refused in one line, never crash elsewhere (fuzzed)."""
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparsebench.backends import BACKENDS
from sparsebench.cli import config_groups
from sparsebench.config_check import check_option, shipped_defaults
from sparsebench.errors import SparsebenchError
from sparsebench.evaluators import EVALUATORS
from sparsebench.sparsifiers import SPARSIFIERS

GROUPS = config_groups()

# what a user can type on the command line, as Hydra would parse it
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-10**6, 10**6), st.booleans(), st.none(),
    st.text(max_size=8), st.lists(st.floats(-2, 2, allow_nan=False), max_size=3),
)


def _yaml(group, name):
    from importlib import resources

    raw = OmegaConf.to_container(OmegaConf.load(resources.files("sparsebench.conf") / group / f"{name}.yaml"))
    # interpolations point into the whole config; a typical resolved value stands in
    return OmegaConf.create({k: 512 if isinstance(v, str) and "${" in v else v for k, v in raw.items()})


def _set(cfg, key, value):
    """Values OmegaConf itself refuses (a broken ``${``) never reach sparsebench: Hydra
    rejects them while composing (see test_cli for what the user sees)."""
    try:
        cfg[key] = value
    except OmegaConfBaseException:
        assume(False)


def _check(group, factory, cfg):
    """What build_components does for one option: the type check, then the component's own."""
    try:
        check_option(group, cfg, prefix=f"evaluator.{cfg.name}" if group == "evaluator" else None)
        factory(cfg)
    except SparsebenchError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, msg  # one line naming the fix
        assert any(k in msg for k in cfg), msg  # it names the offending setting


def _fuzz_group(group, registry):
    cases = []
    for name in GROUPS[group]:
        base = _yaml(group, name)
        keys = [k for k in base if k != "name"]
        for key in keys:
            cases.append((name, key))
    return cases


@pytest.mark.parametrize("name,key", _fuzz_group("sparsifier", SPARSIFIERS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=VALUES)
def test_fuzzed_sparsifier_settings_build_or_fail_in_one_line(name, key, value):
    cfg = _yaml("sparsifier", name)
    _set(cfg, key, value)
    _check("sparsifier", SPARSIFIERS.get(name), cfg)


@pytest.mark.parametrize("name,key", _fuzz_group("backend", BACKENDS))
@settings(max_examples=40, deadline=None)
@given(value=VALUES)
def test_fuzzed_backend_settings_build_or_fail_in_one_line(name, key, value):
    cfg = _yaml("backend", name)
    _set(cfg, key, value)
    _check("backend", BACKENDS.get(name), cfg)


@pytest.mark.parametrize("name,key", _fuzz_group("evaluator", EVALUATORS))
@settings(max_examples=25, deadline=None)
@given(value=VALUES)
def test_fuzzed_evaluator_settings_build_or_fail_in_one_line(name, key, value):
    cfg = _yaml("evaluator", name)
    _set(cfg, key, value)
    _check("evaluator", EVALUATORS.get(name), cfg)


@pytest.mark.parametrize("group,registry", [("sparsifier", SPARSIFIERS), ("backend", BACKENDS),
                                            ("evaluator", EVALUATORS), ("data", None)])
def test_a_wrong_type_is_refused_for_every_setting(group, registry):
    """Every setting of every option refuses a value of the wrong kind (before a model loads)."""
    for name in GROUPS[group]:
        for key, default in _yaml(group, name).items():
            if key in ("name", "corpus") or key not in shipped_defaults(group, name):  # corpus names a data option
                continue  # interpolated: checked where it points (data.heldout.seq_len)
            wrong = "not-a-number" if not isinstance(default, str) else 3.5
            if default is None:
                wrong = [1, 2]
            cfg = _yaml(group, name)
            cfg[key] = wrong
            with pytest.raises(SparsebenchError, match=key):
                check_option(group, cfg, prefix=f"evaluator.{name}" if group == "evaluator" else None)
                if registry is not None:
                    registry.get(name)(cfg)
