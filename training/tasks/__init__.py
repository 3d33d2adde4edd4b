"""Tasks: what differs between classification, DINO and detection, behind the `Task` interface (tasks/base.py).

A task is a `Task` subclass in a module of this package and one entry in TASKS below, plus its data
side, one entry in `pipelines.tasks.TASKS`. The smallest is training/tasks/classify.py.

TASKS is what the run config knows of each task (its name, the metrics its `evaluate` reports and
its own config section) without importing torch: a task's class is imported when a run builds it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from training.config import RunConfig
    from training.dist import World
    from training.tasks.base import Task


class TaskInfo(NamedTuple):
    cls: str  # "module:Class" of its Task subclass
    metrics: tuple[str, ...]  # higher-is-better results of its evaluate(); eval.metric defaults to val_<the first>
    section: str | None = None  # the RunConfig section of its own settings (`dino:`, `detect:`), if it has one


TASKS: dict[str, TaskInfo] = {
    "classify": TaskInfo("training.tasks.classify:ClassifyTask", ("top1", "top5")),
    "dino": TaskInfo("training.tasks.dino:DinoTask", ("knn_top1",), section="dino"),
    "detect": TaskInfo("training.tasks.detect:DetectTask", ("map", "map50"), section="detect"),
}


def build_task(cfg: RunConfig, classes: list[str], world: World, cache_dir: Path) -> Task:
    module, _, name = TASKS[cfg.task].cls.partition(":")
    return getattr(importlib.import_module(module), name)(cfg, classes, world, cache_dir)
