"""The package's folders are its layers, and imports only go down them.

Brute force: every ``import`` statement of every module (function-level ones included) is
read from its source, resolved to a project module, and checked against the layer table
that docs/extending.md shows a newcomer.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparsebench"

# lowest first; a module may import its own layer and the layers below it
LAYERS = [
    ("core", ["sparsebench.core"]),
    ("store", ["sparsebench.store", "sparsebench.__init__"]),
    ("inputs", ["sparsebench.models", "sparsebench.data", "sparsebench._ext"]),
    ("plug-ins", ["sparsebench.sparsifiers", "sparsebench.backends", "sparsebench.attention",
                  "sparsebench.evaluators"]),
    ("reporting", ["sparsebench.reporting"]),
    ("orchestration", ["sparsebench.run", "sparsebench.sweep", "sparsebench.callbacks", "sparsebench.cli"]),
]


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    if module == "sparsebench":
        return 1  # the package itself only holds __version__
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), is_pkg, path


def imported(name: str, is_pkg: bool, path: Path) -> set[str]:
    package = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("sparsebench"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("sparsebench"):
                target = node.module
            else:
                continue
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names
                       if (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                       or (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).is_dir())
    return out


def test_every_module_is_in_a_layer():
    for name, _, _ in modules():
        layer_of(name)


@pytest.mark.parametrize("name,is_pkg,path", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_only_go_down(name, is_pkg, path):
    own = layer_of(name)
    upward = sorted(t for t in imported(name, is_pkg, path) if t != "sparsebench" and layer_of(t) > own)
    assert not upward, f"{name} ({LAYERS[own][0]}) imports from a higher layer: {upward}"


def test_the_table_is_the_one_the_docs_show():
    text = (PACKAGE.parent / "docs" / "extending.md").read_text()
    for layer, prefixes in LAYERS:
        assert f"**{layer}**" in text
        for p in prefixes:
            if p != "sparsebench.__init__":
                assert f"`{p.removeprefix('sparsebench.').replace('.', '/')}" in text, p
