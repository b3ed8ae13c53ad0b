"""One timing run per machine at a time.

Latency measured while another job computes on the same cores is meaningless, and a
parallel launcher (submitit local, or several SLURM jobs landing on one node) would do
exactly that. Evaluators that time (``Evaluator.timing = True``) therefore hold a lock
named after the host (on a GPU: after the GPU) for their whole measurement; a second one
waits and says so.
"""
from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Iterator

from filelock import FileLock, Timeout

from .cache import cache_root


def timing_lock_path(cache_dir=None, device=None):
    """The host's lock, or on a GPU that GPU's (by UUID, which is the same whatever
    CUDA_VISIBLE_DEVICES numbers it): jobs timing on different GPUs of a node don't wait."""
    name = f"timing-{socket.gethostname()}"
    if device is not None and device.type == "cuda":
        import torch

        name += f"-gpu-{torch.cuda.get_device_properties(device).uuid}"
    return cache_root(cache_dir) / "locks" / f"{name}.lock"


@contextlib.contextmanager
def exclusive_timing(cache_dir=None, what: str = "timing", device=None) -> Iterator[dict]:
    """Yield ``{"waited_s": seconds spent waiting for another timing run}``."""
    path = timing_lock_path(cache_dir, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    info = {"waited_s": 0.0}
    t0 = time.perf_counter()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[sparsebench] {what}: another timing run holds {path}; waiting so the two do not share cores",
              file=sys.stderr, flush=True)
        lock.acquire()
    info["waited_s"] = round(time.perf_counter() - t0, 3)
    try:
        yield info
    finally:
        lock.release()
