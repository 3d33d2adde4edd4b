"""Self-supervised DINO (Caron et al. 2021): a student and its EMA teacher on multi-crop views, k-NN eval.

The model the loop trains is `DinoModel`: the student (timm backbone + DINO head), the teacher (timm's
ModelEmaV3 of the student, no gradient) and the center of the teacher's outputs (a buffer). So the
loop's checkpoints, DDP and resume carry the teacher and the center with no extra state; every schedule
(teacher momentum, weight decay, teacher temperature, last-layer freeze) is a function of the step.
It uses the hooks `start`, `before_step` and `after_step` (training/tasks/base.py) and evaluates
through its own `val_loader`: weighted k-NN of the teacher backbone's features on a labeled store.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from pipelines import DataConfig, Loader, build_loader
from training import knn
from training.config import DinoConfig, RunConfig, TrainError
from training.dist import World, sum_tensor
from training.model import build_model
from training.optim import StepPlan, schedule_origin, schedule_steps
from training.preflight import knn_store
from training.tasks.base import Task


class DinoHead(nn.Module):
    """MLP with a bottleneck, L2-normalised, then a weight-normalised prototype layer (no bias)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, layers: int,
                 norm_last_layer: bool) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mlp: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            mlp += [nn.Linear(a, b)] + ([nn.GELU()] if i < layers - 1 else [])
        self.mlp = nn.Sequential(*mlp)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad = not norm_last_layer  # DINO keeps the prototypes unit-norm for stability

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class Encoder(nn.Module):
    """Backbone then head over a list of crops: one backbone pass per run of same-size crops."""

    def __init__(self, backbone: nn.Module, head: DinoHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(head outputs, backbone features), both with the crops' batches concatenated in order."""
        groups = itertools.groupby(crops, key=lambda c: c.shape[-2:])
        features = torch.cat([self.backbone(torch.cat(list(group))) for _, group in groups])
        return self.head(features), features


class DinoModel(nn.Module):
    center: torch.Tensor  # a buffer: the teacher outputs' running mean

    def __init__(self, student: Encoder, out_dim: int, global_crops: int) -> None:
        super().__init__()
        self.global_crops = global_crops
        self.student = student
        self.teacher = ModelEmaV3(student)  # momentum given per step in `update_teacher`
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def train(self, mode: bool = True) -> DinoModel:
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths; its norm layers use the averaged statistics
        return self

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student outputs of every crop, teacher outputs of the global crops, student features of those."""
        student_out, features = self.student(crops)
        with torch.no_grad():
            teacher_out, _ = self.teacher(crops[: self.global_crops])
        return student_out, teacher_out, features[: len(teacher_out)]

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        self.teacher.apply_update_(self.student, momentum)


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, crops: int,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Mean over (global view of the teacher, other view of the student) pairs of the cross-entropy
    between the centered, sharpened teacher distribution and the student's.

    Each teacher view i against every student view but its own, as one product with the sum of the student's
    log-probabilities less one with view i's: two passes over the (crops, batch, out_dim) log-probabilities
    instead of one per pair (22 for 2 + 10 crops)."""
    log_p = (student_out.float() / student_temp).log_softmax(-1).unflatten(0, (crops, -1))  # (crops, B, K)
    q = ((teacher_out.float() - center) / teacher_temp).softmax(-1).unflatten(0, (-1, log_p.shape[1]))  # (G, B, K)
    views = len(q)
    cross = (q * log_p[:views]).sum(-1) - (q * log_p.sum(0)).sum(-1)  # (G, B): summed over the pairs of each i
    return cross.mean(1).sum() / (views * (crops - 1))


def updated_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float, world: World) -> torch.Tensor:
    """EMA of the mean teacher output over the global batch (all ranks)."""
    batch_sum = sum_tensor(world, teacher_out.float().sum(0, keepdim=True))
    return center * momentum + batch_sum / (len(teacher_out) * world.size) * (1 - momentum)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: minus the mean log distance of each L2-normalised row to its nearest other row."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-1)
        nearest = dots.argmax(1)
    return -torch.log(F.pairwise_distance(x, x[nearest], eps=eps) + eps).mean()


def cosine(start: float, end: float, step: int, total: int) -> float:
    """From `start` at step 0 to `end` at step `total`, along half a cosine."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def epochs_done(plan: StepPlan, step: int) -> float:
    """Epochs (fractional) that `step` optimizer steps cover (epochs differ in steps under a batch ramp)."""
    epoch = 0
    while epoch < plan.epochs and step >= plan.steps_in(epoch):
        step -= plan.steps_in(epoch)
        epoch += 1
    return epoch + (step / plan.steps_in(epoch) if epoch < plan.epochs else 0.0)


def teacher_temp(d: DinoConfig, epochs: float) -> float:
    if epochs >= d.warmup_teacher_temp_epochs:
        return d.teacher_temp
    return d.warmup_teacher_temp + (d.teacher_temp - d.warmup_teacher_temp) * epochs / d.warmup_teacher_temp_epochs


def knn_data(cfg: RunConfig) -> DataConfig:
    """The labeled store the k-NN evaluation reads: eval.knn_path, else the training store when labeled."""
    path, _ = knn_store(cfg)
    # Eval loaders run once an epoch: no workers kept alive beside the training loader's.
    return cfg.data.model_copy(update={"path": path, "persistent_workers": False})


class DinoTask(Task):
    def __init__(self, cfg: RunConfig, classes: list[str], world: World, cache_dir: Path) -> None:
        assert cfg.dino is not None, "the config gives every dino run its dino: section"
        self.dino: DinoConfig = cfg.dino
        if cfg.train.ema_decay:
            raise TrainError("train.ema_decay: a dino run's teacher is the EMA of its student; leave it unset")
        aug = cfg.data.augment
        if aug.global_crops < 1 or aug.global_crops + aug.local_crops < 2:
            raise TrainError("data.augment: task dino needs at least 1 global crop and 2 crops in all")
        if self.dino.weight_decay_end is not None and cfg.optim.weight_decay == 0:
            raise TrainError("dino.weight_decay_end: the schedule starts at optim.weight_decay, which is 0; "
                             "set optim.weight_decay > 0 or dino.weight_decay_end=null")
        super().__init__(cfg, classes, world, cache_dir)
        self.knn_cfg = knn_data(cfg)
        self.crops = aug.global_crops + aug.local_crops
        self.step = 0
        self.plan: StepPlan | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.bank_loader: Loader | None = None
        self.model: DinoModel | None = None

    def build_model(self) -> nn.Module:
        d, aug = self.dino, self.cfg.data.augment
        backbone = build_model(self.cfg.model, 0, self.cache_dir)  # its input sizes: checked by training.preflight
        head = DinoHead(cast(int, backbone.num_features), d.out_dim, d.hidden_dim, d.bottleneck_dim, d.head_layers,
                        d.norm_last_layer)
        self.model = DinoModel(Encoder(backbone, head), d.out_dim, aug.global_crops)
        return self.model

    def start(self, optimizer: torch.optim.Optimizer, plan: StepPlan, step: int) -> None:
        self.optimizer, self.plan = optimizer, plan
        self.set_step(step)

    def before_step(self, model: nn.Module, step: int) -> None:
        """The prototypes stay as initialised during the first dino.freeze_last_layer epochs (DINO's stabiliser)."""
        assert self.plan is not None
        if epochs_done(self.plan, step) < self.dino.freeze_last_layer:
            for p in cast(DinoModel, model).student.head.last_layer.parameters():
                p.grad = None  # not even weight decay or optimizer state, as in DINO

    def after_step(self, model: nn.Module, step: int) -> None:
        assert self.plan is not None
        cast(DinoModel, model).update_teacher(self.cosine_at(self.dino.momentum_teacher, 1.0, step - 1))
        self.set_step(step)

    def cosine_at(self, start: float, end: float, step: int) -> float:
        """`cosine` over the lr schedule's steps (from optim.schedule_start_epoch), `step` counted from the run's
        start: each night of the nightly flow runs the teacher's momentum and the weight decay again with its lr,
        rather than the last sliver of a cosine over all nights, where the teacher barely moves."""
        assert self.plan is not None
        origin = schedule_origin(self.cfg.optim, self.plan)
        return cosine(start, end, step - origin, schedule_steps(self.cfg.optim, self.plan))

    def set_step(self, step: int) -> None:
        """The schedules for the next optimizer step, `step` steps done."""
        assert self.plan is not None and self.optimizer is not None
        self.step = step
        end = self.dino.weight_decay_end
        if end is not None:
            wd = self.cosine_at(self.cfg.optim.weight_decay, end, step)
            for group in self.optimizer.param_groups:
                if group["weight_decay"] > 0:  # the no-decay groups (biases, norms) stay at 0
                    group["weight_decay"] = wd

    def val_loader(self, **loader_args: Any) -> Loader:
        """The k-NN queries (the labeled store's val split); its train split, the bank, is loaded alongside."""
        args = {**loader_args, "task": "classify"}
        self.bank_loader = build_loader(self.knn_cfg, self.knn_cfg.train_split, train=False, **args)
        return build_loader(self.knn_cfg, self.knn_cfg.val_split, train=False, **args)

    def train_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        assert self.model is not None and self.plan is not None
        d, crops = self.dino, batch["crops"]
        student_out, teacher_out, features = model(crops)
        temp = teacher_temp(d, epochs_done(self.plan, self.step))
        loss = dino_loss(student_out, teacher_out, self.model.center, self.crops, d.student_temp, temp)
        self.model.center.copy_(updated_center(self.model.center, teacher_out, d.center_momentum, self.world))
        if d.koleo_weight:
            per_crop = features.chunk(self.cfg.data.augment.global_crops)
            loss = loss + d.koleo_weight * torch.stack([koleo_loss(f) for f in per_crop]).sum()
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Loader) -> dict[str, float]:
        """Weighted k-NN top-1 (%) of the teacher backbone's features, the queries from `loader`
        (the loop names it val_knn_top1)."""
        assert self.bank_loader is not None
        self.bank_loader.set_epoch(0)
        teacher = cast(DinoModel, model).teacher.module.backbone
        top1 = knn.knn_top1(teacher, self.bank_loader, loader, self.world, len(loader.classes), self.cfg.eval.knn_k,
                            self.cfg.eval.knn_temperature)
        return {"knn_top1": top1}
