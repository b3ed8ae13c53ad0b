"""Relufied checkpoints: ReLU, FATReLU and dReLU MLPs, in the formats they are published in.

- ReLU (ReluLLaMA, ``SparseLLM/ReluLLaMA-7B``): a stock Llama config with
  ``hidden_act: relu``; transformers runs it as is.
- FATReLU (ProSparse, ``SparseLLM/prosparse-llama-2-7b``): ``model_type: sparsellama``,
  ``hidden_act: fatrelu``, threshold in ``hidden_act_param``; FATReLU(z) = z if z ≥ t else 0,
  applied to the gate. Published with custom modeling code, which we never run: the
  weights are Llama's, so we load them as Llama and install the activation.
- dReLU (TurboSparse, ``PowerInfer/TurboSparse-Mistral-Instruct``): ``model_type: bamboo``,
  ``hidden_act: relu``, and the MLP is down(relu(gate(x)) · relu(up(x))) — ReLU on *both*
  branches, which the config does not say. Loaded as Mistral with the up-branch ReLU
  installed.

Loading a FATReLU or dReLU checkpoint with its stock activation would run without
error and produce garbage, so ``model.activation`` other than ``auto`` that disagrees
with the checkpoint is refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ConfigError, ModelUnavailable

ACTIVATIONS = ("auto", "relu", "fatrelu", "drelu", "stock")


class FATReLU(nn.Module):
    """z if z ≥ threshold else 0 (ProSparse)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * (z >= self.threshold).to(z.dtype)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class ReLUOutputLinear(nn.Linear):
    """An nn.Linear whose output goes through ReLU (dReLU's up branch). Same parameters
    and state-dict keys as the linear it replaces (the class is swapped in place)."""

    output_activation = staticmethod(torch.relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


@dataclass
class RelufiedFormat:
    kind: str  # "relu" | "fatrelu" | "drelu" | "stock"
    base_model_type: str  # what transformers loads the weights as
    threshold: float = 0.0


def detect_format(raw: dict) -> RelufiedFormat:
    """Which activation a checkpoint's config.json really means."""
    model_type, act = raw.get("model_type"), raw.get("hidden_act")
    if model_type == "sparsellama" or act == "fatrelu":
        if "hidden_act_param" not in raw:
            raise ModelUnavailable("FATReLU checkpoint without hidden_act_param (the threshold) in config.json")
        return RelufiedFormat("fatrelu", "llama", float(raw["hidden_act_param"]))
    if model_type == "bamboo":
        return RelufiedFormat("drelu", "mistral")
    if act == "relu":
        return RelufiedFormat("relu", model_type)
    return RelufiedFormat("stock", model_type)


def resolve_activation(fmt: RelufiedFormat, requested: str) -> RelufiedFormat:
    if requested not in ACTIVATIONS:
        raise ConfigError(f"model.activation={requested} is unknown; use one of: {', '.join(ACTIVATIONS)}")
    if requested == "auto" or requested == fmt.kind:
        return fmt
    if fmt.kind in ("fatrelu", "drelu"):
        raise ConfigError(
            f"this checkpoint is a {fmt.kind} model; loading it with model.activation={requested} would silently compute "
            f"a different function (garbage perplexity); use model.activation=auto")
    raise ConfigError(
        f"model.activation={requested} does not match the checkpoint ({fmt.kind}); to replace the activation "
        f"without training use sparsifier=relu sparsifier.swap=true")


def read_config(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelUnavailable(f"{folder}/config.json is unreadable ({exc})") from None


def hf_config_for(folder: Path, fmt: RelufiedFormat, raw: dict):
    """A transformers config for the weights (custom model types mapped to their base)."""
    from transformers import AutoConfig, CONFIG_MAPPING

    if fmt.kind not in ("fatrelu", "drelu"):
        return AutoConfig.from_pretrained(folder)
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "architectures", "hidden_act",
                                                         "hidden_act_param", "transformers_version")}
    return CONFIG_MAPPING[fmt.base_model_type](**fields, hidden_act="relu")


def install_activation(model: nn.Module, fmt: RelufiedFormat) -> None:
    """Make the loaded stock model compute the checkpoint's real MLP."""
    if fmt.kind not in ("fatrelu", "drelu"):
        return
    from .adapters import GatedMLPAdapter

    for layer in GatedMLPAdapter().decoder_layers(model):
        if fmt.kind == "fatrelu":
            layer.mlp.act_fn = FATReLU(fmt.threshold)
        else:
            layer.mlp.act_fn = nn.ReLU()
            layer.mlp.up_proj.__class__ = ReLUOutputLinear
    model.config.sparsebench_activation = fmt.kind
