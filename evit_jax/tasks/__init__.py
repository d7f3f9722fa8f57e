"""Tasks: what to train on and how to score it. See `evit_jax/tasks/base.py` for the interface and
`evit_jax/tasks/config.py` for every config key. Light to import: each task loads on first use."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evit_jax.tasks.base import Task

# name -> "module:Class", imported lazily so a task's dependencies load only when used.
TASKS = {
    "classification": "evit_jax.tasks.classification:ClassificationTask",
    "segmentation": "evit_jax.tasks.segmentation:SegmentationTask",
    "detection": "evit_jax.tasks.detection:DetectionTask",
}


def get_task(config) -> "Task":
    """Instantiates the task named by ``config.task``."""
    name = config.task
    if name not in TASKS:
        raise ValueError(f"config.task={name!r} is unknown; use one of {sorted(TASKS)}.")
    module_name, class_name = TASKS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise ValueError(f"task {name!r} is not available ({module_name} is missing).") from e
        raise
    return getattr(module, class_name)(config)


__all__ = ["TASKS", "get_task"]
