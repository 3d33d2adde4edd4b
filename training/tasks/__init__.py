"""Tasks behind one small interface, so the loop does not care what it trains.

A task holds what differs between classification, DINO and detection:
- `build_model() -> nn.Module`
- `train_loss(model, batch) -> Tensor` (a scalar; may transform the batch first, e.g. mixup)
- `evaluate(model, loader) -> dict[str, float]` (metrics over the whole split, same on every rank)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from training.config import RunConfig, TrainError
from training.dist import World


class Task(Protocol):
    def build_model(self) -> torch.nn.Module: ...

    def train_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module, loader: Any) -> dict[str, float]: ...


def build_task(cfg: RunConfig, classes: list[str], world: World, cache_dir: Path) -> Task:
    if cfg.task == "classify":
        from training.tasks.classify import ClassifyTask

        return ClassifyTask(cfg, classes, world, cache_dir)
    raise TrainError(f"task {cfg.task} is not available yet in training/ (only classify is)")
