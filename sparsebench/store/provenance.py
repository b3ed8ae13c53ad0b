"""Which code made a number: source digests for results, caches and resumed sweeps.

A result, a calibration state or a cached dense baseline is only as good as the code that
computed it. Rather than a hand-bumped version number, each is tied to the sha256 of every
sparsebench source file it depends on: the *import closure* of the modules that compute
it, found by reading their ``import`` statements (function-level imports included). Editing
any file in that closure changes the digest, so the state is recomputed or the sweep point
rerun; editing an unrelated file (another sparsifier, a plotting script) does not.

Modules that only format or log numbers (tables, W&B) are left out of closures, so a
change of presentation does not discard hours of measurements; ``code_version()`` still
records a digest of the whole package with every result.

A Python file is hashed by its syntax tree without docstrings (``semantic_source``): an
edit of wording — a comment, a docstring, a blank line — does not discard hours of
measurements, an edit of code does. Other files (Cython sources) are hashed byte for byte.

A file is hashed once per process (the first time any closure includes it, which
``run`` does before it computes anything): a multirun imports its modules once, so an
edit made on disk while the sweep runs must not be recorded as the code its later
points ran with.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import subprocess
from collections.abc import Iterable
from functools import cache
from pathlib import Path

ROOT_PACKAGE = "sparsebench"
# Presentation and logging only: they compute no number that a cache or a result holds.
PRESENTATION_MODULES = frozenset({"sparsebench.reporting.results", "sparsebench.reporting.wandb_logger", "sparsebench.reporting.wandb_report",
                                  "sparsebench.callbacks"})


def _spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def module_file(name: str) -> Path | None:
    """The source file of a module: its .py, or for a compiled extension its .pyx in the
    checkout's ext/ when there is one (else the built library)."""
    spec = _spec(name)
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return None
    origin = Path(spec.origin)
    if origin.suffix in (".so", ".pyd"):
        pyx = package_dir().parent / "ext" / f"{name.rsplit('.', 1)[-1]}.pyx"
        return pyx if pyx.exists() else origin
    return origin


def package_dir() -> Path:
    return Path(_spec(ROOT_PACKAGE).origin).parent


def _imported_modules(name: str, path: Path) -> set[str]:
    """Modules of the project that ``name`` imports anywhere in its source."""
    if path.suffix != ".py":
        return set()
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.add(module)
            # `from .pkg import mod` names a submodule; `from .mod import func` does not
            out.update(f"{module}.{a.name}" for a in node.names if _spec_is_module(f"{module}.{a.name}"))
    return {m for m in out if m == ROOT_PACKAGE or m.startswith(ROOT_PACKAGE + ".")}


def _spec_is_module(name: str) -> bool:
    return name.startswith(ROOT_PACKAGE + ".") and _spec(name) is not None


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(package_dir().parent.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _resolve(display: str) -> Path:
    p = Path(display)
    return p if p.is_absolute() else package_dir().parent / p


_HASHED: dict[Path, str] = {}  # path -> sha256, fixed for the life of the process


def forget_hashes() -> None:
    """Hash every file afresh from now on (what a new process does; for tests)."""
    _HASHED.clear()


def semantic_source(path: Path) -> bytes:
    """What a file's behaviour depends on: for Python, its syntax tree without docstrings
    (comments and layout never reach the tree); for anything else, its bytes."""
    if path.suffix != ".py":
        return path.read_bytes()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


def file_digest(path: Path) -> str:
    path = path.resolve()
    if path not in _HASHED:
        _HASHED[path] = hashlib.sha256(semantic_source(path)).hexdigest()
    return _HASHED[path]


def source_files(modules: Iterable[str]) -> dict[str, str]:
    """sha256 of every source file in the import closure of ``modules`` (project modules
    only, presentation modules left out), keyed by path relative to the checkout."""
    todo, seen, files = list(modules), set(), {}
    while todo:
        name = todo.pop()
        if name in seen or name in PRESENTATION_MODULES:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue
        files[_display(path)] = file_digest(path)
        todo += _parents(name) + sorted(_imported_modules(name, path))
    return dict(sorted(files.items()))


def digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:20]


def code_digest(modules: Iterable[str]) -> str:
    return digest(source_files(modules))


def files_unchanged(files: dict[str, str]) -> bool:
    """Whether every recorded file still has the recorded sha256 (as this process sees
    it: the code it runs, for files it already loaded)."""
    for display, sha in files.items():
        path = _resolve(display)
        if not path.is_file() or file_digest(path) != sha:
            return False
    return True


@cache
def code_version() -> dict:
    """What produced a result: the package version, a digest of all its sources, and the
    git commit with a dirty flag when it runs from a checkout (dirty: a tracked file that
    can change a number — the package, configs, extension sources, build files — differs
    from the commit; reporting scripts under experiments/ do not count)."""
    from .. import __version__

    root = package_dir()
    sources = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".pyx") and "__pycache__" not in p.parts)
    conf = module_file(f"{ROOT_PACKAGE}.conf")
    if conf is not None:
        sources += sorted(conf.parent.rglob("*.yaml"))
    h = hashlib.sha256()
    for p in sources:
        h.update(_display(p).encode() + b"\0" + p.read_bytes())
    out = {"package_version": __version__, "source_sha256": h.hexdigest()[:20], "git_commit": None, "git_dirty": None}
    checkout = root.parent
    if (checkout / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10, check=True).stdout.strip()
            status = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no",
                                     "--", "sparsebench", "conf", "ext", "setup.py", "pyproject.toml"],
                                    capture_output=True, text=True, timeout=10, check=True).stdout
            out.update(git_commit=commit, git_dirty=bool(status.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    return out
