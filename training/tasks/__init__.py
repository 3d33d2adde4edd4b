"""Tasks behind one small interface, so the loop does not care what it trains.

A task holds what differs between classification, DINO and detection:
- `build_model() -> nn.Module`
- `train_loss(model, batch) -> Tensor` (a scalar; may transform the batch first, e.g. mixup)
- `evaluate(model, loader) -> dict[str, float]` (metrics over the whole split, same on every rank)

Optional hooks, for tasks that keep more than the optimizer's weights in step (DINO's teacher and schedules);
the loop calls those a task defines (`model` is the unwrapped model, `step` the optimizer steps done):
- `val_loader(**loader_args) -> Loader`: the `loader` of `evaluate`, instead of the data's val split
- `start(optimizer, plan, step)`: once before training, after a resume restored the states
- `before_step(model, step)`: gradients are reduced (and unscaled when clipped); the optimizer step is next
- `after_step(model, step)`: right after the optimizer step (and the LR schedule's update)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from training.config import RunConfig, TrainError
from training.dist import World


class Task(Protocol):
    def build_model(self) -> torch.nn.Module: ...

    def train_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module, loader: Any) -> dict[str, float]: ...


def hook(task: Task, name: str) -> Callable[..., None]:
    """The task's optional hook `name`, or a no-op where it has none."""
    return getattr(task, name, lambda *args: None)


def build_task(cfg: RunConfig, classes: list[str], world: World, cache_dir: Path) -> Task:
    if cfg.task == "classify":
        from training.tasks.classify import ClassifyTask

        return ClassifyTask(cfg, classes, world, cache_dir)
    if cfg.task == "detect":
        from training.tasks.detect import DetectTask

        return DetectTask(cfg, classes, world, cache_dir)
    if cfg.task == "dino":
        from training.tasks.dino import DinoTask

        return DinoTask(cfg, classes, world, cache_dir)
    raise TrainError(f"unknown task {cfg.task}")
