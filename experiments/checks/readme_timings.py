"""Time the README's commands as a new user meets them: a fresh clone, a fresh virtual
environment, ``pip install -e .``, the first ``sparsebench`` (empty model/data cache, so it
downloads and converts), then ``pytest`` — and write what was measured to a JSON file that
README's generated block is made from.

    python experiments/checks/readme_timings.py --out experiments/results/readme_timings

pip's own download cache is switched off (PIP_NO_CACHE_DIR) so the install fetches its wheels
as a fresh machine would; the package index must be reachable. Run it on an idle machine:
the times are wall-clock and another job on the same cores makes them longer.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The README's commands, in the order it gives them (its install and test blocks).
STEPS = [("python3 -m venv .venv", None), ("pip install -e .", ".venv"), ("sparsebench", ".venv"),
         ("pytest", ".venv")]


def machine() -> dict:
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = 0
    try:
        mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))) // 2**20
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": mem, "python": platform.python_version(),
            "system": platform.system()}


def run_step(command: str, cwd: Path, venv: str | None, env: dict, log: Path) -> dict:
    shell = command if venv is None else f". {venv}/bin/activate && {command}"
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        fh.write(f"\n=== {command}\n".encode())
        fh.flush()
        proc = subprocess.run(["bash", "-c", shell], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return {"command": command, "seconds": round(time.perf_counter() - t0, 1), "returncode": proc.returncode}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON record")
    ap.add_argument("--keep", action="store_true", help="keep the clone, venv and cache (printed)")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="sparsebench-readme-"))
    clone, cache = work / "clone", work / "cache"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env |= {"SPARSEBENCH_CACHE": str(cache), "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    log = work / "commands.log"
    steps = []
    for command, venv in STEPS:
        steps.append(run_step(command, clone, venv, env, log))
        print(f"{command}: {steps[-1]['seconds']:.0f} s (exit {steps[-1]['returncode']})", flush=True)
        if steps[-1]["returncode"] != 0:
            print(f"stopped: see {log}", file=sys.stderr)
            break
    record = {"commit": commit, "date": datetime.date.today().isoformat(), "machine": machine(),
              "pip_cache": "off (PIP_NO_CACHE_DIR=1: wheels downloaded)", "sparsebench_cache": "empty at start",
              "steps": steps}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "readme-timings.json"  # one record, replaced by the next measurement
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
