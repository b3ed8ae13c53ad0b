"""Registries by name, in the style of lm-eval's task/model registries.

An implementation lives in ``sparsebench/<kind>s/<name>.py`` and registers its class
with ``@REGISTRY.register("<name>")``. Modules are imported lazily on lookup, so
importing sparsebench has no side effects and adding a method needs no edit here.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorator

    def available(self) -> list[str]:
        pkg = importlib.import_module(self.package)
        return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_") and m.name != "base")

    def get(self, name: str) -> type[T]:
        if name not in self._classes:
            if name in self.available():
                importlib.import_module(f"{self.package}.{name}")
            if name not in self._classes:
                raise ConfigError(
                    f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.available())}"
                )
        return self._classes[name]
