"""Per-architecture adapters: where each decoder layer keeps its MLP and attention.

An adapter only *locates* modules and installs a replacement MLP; it never copies
transformers' modeling code. Two MLP shapes exist:

- ``gated`` (Llama, Mistral, Qwen2, Gemma3): ``down(act(gate(x)) * up(x))``; the
  replacement takes the place of ``layer.mlp``.
- ``plain`` (OPT): ``fc2(act(fc1(x)))`` inlined in the layer's forward. The replacement
  (which computes the whole MLP) is installed as ``fc1`` and ``activation_fn``/``fc2``
  become identities, so the layer's own forward still runs unchanged around it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..core.errors import UnsupportedArchitecture


@dataclass
class MLPSite:
    layer_idx: int
    layer: nn.Module
    kind: str  # "gated" | "plain"
    up: nn.Linear  # gated: up_proj; plain: fc1 (its output goes through the activation)
    down: nn.Linear
    act: Callable
    gate: nn.Linear | None = None
    attention: dict[str, nn.Linear] = field(default_factory=dict)
    install: Callable[[nn.Module], None] = None  # replaces the MLP with a module computing it
    restore: Callable[[], None] = None
    # projection name ("q", "k", "v", "o", "gate", "up", "down") -> (parent module, attribute),
    # so a sparsifier that masks linear *inputs* (TEAL, WINA, R-Sparse) can wrap any of them
    slots: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)
    # dReLU models apply an activation to up(x) too: h = act(gate(x)) * up_act(up(x)).
    # ``up(x)`` already includes it (see models.activations); backends that read
    # ``up.weight`` directly must apply it themselves.
    up_act: Callable | None = None
    installed: nn.Module | None = None  # the module computing the MLP once patched
    # (parent, attribute) of the layer's attention module, for code that stands in for it
    attention_slot: tuple[nn.Module, str] | None = None

    def projection(self, name: str) -> nn.Linear:
        # MLP projections are read from the site: OPT's fc1/fc2 slots hold the installed MLP
        return getattr(self, name) if name in ("gate", "up", "down") else self.attention[name]

    def replace_projection(self, name: str, module: nn.Module) -> None:
        """Swap projection ``name`` in the model and in this site's references."""
        parent, attr = self.slots[name]
        setattr(parent, attr, module)
        if name in ("gate", "up", "down"):
            setattr(self, name, module)
        else:
            self.attention[name] = module

    @property
    def intermediate_size(self) -> int:
        return self.down.in_features

    @property
    def activation_input(self) -> nn.Linear:
        """The projection whose output feeds the activation (gate, or fc1 for OPT)."""
        return self.gate if self.kind == "gated" else self.up


class GatedMLPAdapter:
    model_types = ("llama", "mistral", "qwen2", "gemma3_text", "gemma3")

    def decoder_layers(self, model: nn.Module):
        inner = model.model
        if hasattr(inner, "language_model"):  # Gemma3ForConditionalGeneration
            inner = inner.language_model
        return inner.layers

    def sites(self, model: nn.Module) -> list[MLPSite]:
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            mlp, attn = layer.mlp, layer.self_attn

            def install(new, layer=layer):
                layer.mlp = new

            def restore(layer=layer, mlp=mlp):
                layer.mlp = mlp

            out.append(MLPSite(
                layer_idx=i, layer=layer, kind="gated", gate=mlp.gate_proj, up=mlp.up_proj, down=mlp.down_proj,
                act=mlp.act_fn,
                attention={"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj},
                install=install, restore=restore,
                slots={"q": (attn, "q_proj"), "k": (attn, "k_proj"), "v": (attn, "v_proj"), "o": (attn, "o_proj"),
                       "gate": (mlp, "gate_proj"), "up": (mlp, "up_proj"), "down": (mlp, "down_proj")},
                up_act=getattr(mlp.up_proj, "output_activation", None),
                attention_slot=(layer, "self_attn"),
            ))
        return out


class OPTAdapter:
    model_types = ("opt",)

    def decoder_layers(self, model: nn.Module):
        return model.model.decoder.layers

    def sites(self, model: nn.Module) -> list[MLPSite]:
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            attn = layer.self_attn
            fc1, fc2, act = layer.fc1, layer.fc2, layer.activation_fn

            def install(new, layer=layer):
                layer.fc1, layer.activation_fn, layer.fc2 = new, nn.Identity(), nn.Identity()

            def restore(layer=layer, fc1=fc1, fc2=fc2, act=act):
                layer.fc1, layer.activation_fn, layer.fc2 = fc1, act, fc2

            out.append(MLPSite(
                layer_idx=i, layer=layer, kind="plain", up=fc1, down=fc2, act=act,
                attention={"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.out_proj},
                install=install, restore=restore,
                slots={"q": (attn, "q_proj"), "k": (attn, "k_proj"), "v": (attn, "v_proj"), "o": (attn, "out_proj"),
                       "up": (layer, "fc1"), "down": (layer, "fc2")},
                attention_slot=(layer, "self_attn"),
            ))
        return out


ADAPTERS = (GatedMLPAdapter(), OPTAdapter())
SUPPORTED = sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for_config(config):
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitecture(
        f"architecture '{model_type}' is not supported; supported model types: {', '.join(SUPPORTED)}"
    )


def mlp_sites(model: nn.Module) -> list[MLPSite]:
    return adapter_for_config(model.config).sites(model)
