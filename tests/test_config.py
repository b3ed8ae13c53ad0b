"""Every config group option composes, with the configs shipped inside the package."""
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sparsebench.cli import config_groups
from sparsebench.run import build_components, evaluator_configs, unselected_evaluator_settings

GROUPS = config_groups()


def _compose(overrides):
    with initialize_config_module(config_module="sparsebench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=False)


def test_groups_exist():
    for group in ("model", "data", "sparsifier", "backend", "evaluator", "logger", "experiment"):
        assert GROUPS.get(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    OmegaConf.resolve(cfg) if group != "model" or option != "local" else None
    if group == "evaluator":
        assert option in cfg.evaluator and cfg.evaluator[option].name == option
    elif group == "experiment":
        assert cfg.sparsifier.name
    else:
        assert cfg[group] is not None


def test_default_is_smollm2_cats_half():
    cfg = _compose([])
    assert cfg.model.name == "smollm2-135m"
    assert cfg.sparsifier.name == "cats" and cfg.sparsifier.sparsity == 0.5
    assert [e.name for e in evaluator_configs(cfg)] == ["sparsity", "perplexity", "lm_eval"]
    assert cfg.logger.mode == "offline"


@pytest.mark.parametrize("sparsifier", GROUPS["sparsifier"])
def test_components_build(sparsifier):
    cfg = _compose([f"sparsifier={sparsifier}", "model=tiny-llama"])
    sp, backend, evs = build_components(cfg)
    assert sp.name == sparsifier and backend.name == "dense" and len(evs) == 3


def test_evaluator_list_override():
    cfg = _compose(["evaluator=[perplexity,sparsity]"])
    assert sorted(cfg.evaluator) == ["perplexity", "sparsity"]


def test_experiment_settings_for_an_evaluator_left_out_are_skipped(capsys):
    """experiment=decode_fused configures evaluator.decode; selecting other evaluators on the
    command line leaves that node without a name: skipped with a note, not a crash."""
    cfg = _compose(["experiment=decode_fused", "evaluator=[sparsity]", "model=tiny-llama"])
    assert [e.name for e in evaluator_configs(cfg)] == ["sparsity"]
    assert unselected_evaluator_settings(cfg) == ["decode"]
    _, _, evs = build_components(cfg)
    assert [e.name for e in evs] == ["sparsity"]
    assert "evaluator.decode: settings for an evaluator that is not selected" in capsys.readouterr().out
