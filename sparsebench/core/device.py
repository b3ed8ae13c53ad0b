"""Where a run computes: the ``device`` setting, the model dtype that goes with it, and
what results.json records about the accelerator.

``device: auto`` is CUDA when torch sees one and the CPU otherwise; ``cpu``, ``cuda`` and
``cuda:N`` name one. ``model.dtype: auto`` is bfloat16 on CUDA (what researchers run
1–8B checkpoints in) and float32 on the CPU (where bf16 matmuls are slow and the
committed results were made). Calibration statistics are accumulated in float32 by
each sparsifier whatever the model dtype; states are kept on the CPU on disk (a cache
is shared by CPU and GPU runs) and moved to the model's device when loaded.
"""
from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from typing import Any

import torch

from .errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(spec: str | None):
    import torch

    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", spec):
        raise ConfigError(f"device={spec} is unknown; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={spec} but torch sees no CUDA device here; use device=cpu (or auto)")
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={spec} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def resolve_dtype(name: str | None, device):
    """``model.dtype`` as a torch dtype; ``auto`` follows the device."""
    import torch

    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name} is not supported; use auto, {', '.join(DTYPES)}")
    return getattr(torch, name)


def check_device_config(cfg) -> None:
    """Refuse a bad ``device`` or ``model.dtype`` before anything is loaded."""
    resolve_dtype(cfg.model.get("dtype", "auto"), resolve_device(cfg.get("device", "auto")))


def move_to(obj: Any, device) -> Any:
    """``obj`` with every tensor in it (through dicts, lists and tuples) on ``device``."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def device_info(device) -> dict:
    """What results.json records: the device, and for CUDA the GPU's name and memory."""
    import torch

    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda}
    return info


# ------------------------------------------------------------------ following a model

def model_device(model) -> torch.device:
    """The device of ``model``'s weights: ``model.device`` (transformers models), else the
    first parameter's, else the CPU (a stand-in callable in tests)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for p in parameters():
            return p.device
    return torch.device("cpu")


def synchronize(device) -> None:
    """Wait for the work queued on a CUDA ``device`` (nothing to do on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clock(device=None) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` is done."""
    synchronize(device)
    return time.perf_counter()


def timer(device=None) -> Callable[[], float]:
    """A clock for timing work on ``device``: ``time.perf_counter`` itself on the CPU (no
    added cost inside a timed span), ``clock(device)`` on CUDA."""
    if device is None or torch.device(device).type != "cuda":
        return time.perf_counter
    return functools.partial(clock, device)


def refuse_cuda(device, what: str) -> None:
    """A one-line ConfigError when ``device`` is CUDA and ``what`` runs on the CPU only."""
    if torch.device(device).type == "cuda":
        raise ConfigError(f"{what} runs on the CPU only; the model is on {device}: use device=cpu")
