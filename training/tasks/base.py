"""The interface the Trainer uses: a task builds its model, computes its loss and evaluates.

The loop calls, in order: `build_model` once; `val_loader` once; `start` once, after a resume has
restored every state; then per optimizer step `train_loss` on each micro-batch, `before_step` once
the gradients are reduced (and unscaled when clipped), and `after_step` right after the optimizer
step and the LR schedule's update; `evaluate` at each eval. `model` is the unwrapped model in the
hooks and `step` the schedule's step: the optimizer steps done, or after a resume on another process count
those that count takes to the same point of the data (`StepPlan.step_at`). The hooks do nothing here; a task
overrides what it needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from pipelines import Loader, build_loader
from training.config import RunConfig
from training.dist import World
from training.optim import StepPlan


class Task:
    compiled = "the whole model"  # what `compile` compiles, for the run's log

    def __init__(self, cfg: RunConfig, classes: list[str], world: World, cache_dir: Path) -> None:
        self.cfg, self.classes, self.world, self.cache_dir = cfg, classes, world, cache_dir

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def compile(self, model: nn.Module, **options: Any) -> nn.Module:
        """train.compile: the model `train_loss` is given, compiled where it compiles (here: all of it)."""
        return cast(nn.Module, torch.compile(model, **options))

    def train_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """A scalar loss of one micro-batch (`model` may be DDP- or compile-wrapped)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: Loader) -> dict[str, float]:
        """Metrics over the whole split, the same on every rank; the loop prefixes them with val_."""
        raise NotImplementedError

    def val_loader(self, **loader_args: Any) -> Loader:
        """What `evaluate` reads: the data's val split."""
        return build_loader(self.cfg.data, self.cfg.data.val_split, train=False, **loader_args)

    def start(self, optimizer: torch.optim.Optimizer, plan: StepPlan, step: int) -> None:
        """Once, before the first step of this process."""

    def before_step(self, model: nn.Module, step: int) -> None:
        """Gradients are ready; the optimizer step is next."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Right after the optimizer step."""
