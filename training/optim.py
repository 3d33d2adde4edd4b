"""Optimizer (timm's create_optimizer_v2), the step plan (accumulation and its ramp), the LR schedule."""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import create_optimizer_v2, get_optimizer_info
from timm.scheduler import CosineLRScheduler

from training.config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule: lr * global_batch / lr_base_batch when lr_base_batch is set."""
    return cfg.lr * global_batch / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr the schedule is at: the largest group's. With optim.layer_decay the groups' lrs are it scaled down
    layer by layer (timm's lr_scale), and the first group is the most decayed."""
    return max(group["lr"] for group in optimizer.param_groups)


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    extra: dict[str, Any] = {"momentum": cfg.momentum} if cfg.name == "sgd" else {}
    if cfg.fused and fusable(cfg.name, model):
        extra["fused"] = True  # one kernel updates every parameter, not a chain of foreach kernels per group
    return create_optimizer_v2(model, opt=cfg.name, lr=lr, weight_decay=cfg.weight_decay,
                               layer_decay=cfg.layer_decay, **extra)


def fusable(name: str, model: torch.nn.Module) -> bool:
    """Whether the optimizer has a fused CUDA kernel (torch's SGD, Adam, AdamW...) and the model is on a GPU."""
    opt_class = get_optimizer_info(name).opt_class
    on_gpu = all(p.is_cuda for p in model.parameters())
    return on_gpu and callable(opt_class) and "fused" in inspect.signature(opt_class).parameters


@dataclass(frozen=True)
class StepPlan:
    """How many micro-batches make one optimizer step in each epoch, and so the steps per epoch; where the schedules
    are at a point of the data, and where the run ends.

    The schedules count the steps this plan takes to the data's position (`step_at`): the optimizer steps done,
    unless an earlier part of the run had another process count, whose steps took other batches. So a resume on
    another count goes on from the same fraction of the data."""

    batches_per_epoch: int
    accum_steps: int
    batch_ramp: int
    epochs: int
    max_steps: int | None

    def accum(self, epoch: int) -> int:
        # Batch-size ramp-up through accumulation: a smaller effective batch for the first epochs.
        return max(1, math.ceil(self.accum_steps * (epoch + 1) / (self.batch_ramp + 1))) if epoch < self.batch_ramp \
            else self.accum_steps

    def steps_in(self, epoch: int) -> int:
        return math.ceil(self.batches_per_epoch / self.accum(epoch))

    @property
    def total_steps(self) -> int:
        total = sum(self.steps_in(e) for e in range(self.epochs))
        return min(total, self.max_steps) if self.max_steps else total

    @property
    def by_steps(self) -> bool:
        """Whether train.max_steps ends the run before train.epochs do."""
        return self.total_steps < sum(self.steps_in(e) for e in range(self.epochs))

    def step_at(self, epoch: int, batch: int) -> int:
        """The optimizer steps this plan takes from the start to batch `batch` of `epoch` (a group begun counts once
        done)."""
        before = sum(self.steps_in(e) for e in range(epoch))
        return before + (self.steps_in(epoch) if batch >= self.batches_per_epoch else batch // self.accum(epoch))

    def steps_left(self, step: int, epoch: int, batch: int) -> int:
        """The optimizer steps the run has left with `step` done and the data at batch `batch` of `epoch`
        (train.max_steps caps the steps done in any case)."""
        left = self.total_steps - self.step_at(epoch, batch)
        return max(0, min(left, self.max_steps - step) if self.max_steps else left)

    @property
    def epochs_run(self) -> int:
        """The epochs the run covers: train.epochs, or fewer where max_steps ends it sooner."""
        return self.epochs_from(0, 0, 0)

    def epochs_from(self, step: int, epoch: int, batch: int) -> int:
        """`epochs_run` for a run resumed there."""
        end = self.step_at(epoch, batch) + self.steps_left(step, epoch, batch)
        epoch, steps = 0, 0
        while epoch < self.epochs and steps < end:
            steps += self.steps_in(epoch)
            epoch += 1
        return epoch


def schedule_origin(cfg: OptimConfig, plan: StepPlan) -> int:
    """The step (as StepPlan.step_at counts them) where the lr schedule begins: optim.schedule_start_epoch's first.
    The scheduler is stepped with the steps since."""
    return plan.step_at(cfg.schedule_start_epoch, 0)


def schedule_steps(cfg: OptimConfig, plan: StepPlan) -> int:
    """The lr schedule's length: the run's steps from its origin."""
    return plan.total_steps - schedule_origin(cfg, plan)


def warmup_steps(cfg: OptimConfig, plan: StepPlan) -> int:
    return round(cfg.warmup_epochs * plan.steps_in(cfg.schedule_start_epoch))


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, plan: StepPlan) -> CosineLRScheduler:
    """Warmup then cosine to min_lr over the epochs from optim.schedule_start_epoch to the run's end, stepped per
    optimizer step (a pure function of the steps since schedule_origin)."""
    warmup = warmup_steps(cfg, plan)
    cosine = max(1, schedule_steps(cfg, plan) - warmup)
    # A run its warmup covers (a nightly night of one epoch with warmup_epochs 1) gets a cosine of one step, which
    # timm warns "will have no effect": meant here, and the run's log says it plainly (Trainer.announce).
    timm_log = logging.getLogger("timm.scheduler.cosine_lr")
    level = timm_log.level
    timm_log.setLevel(logging.ERROR if cosine == 1 else level)
    try:
        return CosineLRScheduler(optimizer, t_initial=cosine, lr_min=cfg.min_lr, warmup_t=warmup,
                                 warmup_lr_init=cfg.min_lr, warmup_prefix=True, t_in_epochs=False)
    finally:
        timm_log.setLevel(level)
