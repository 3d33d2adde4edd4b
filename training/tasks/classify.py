"""Image classification: a timm classifier, (soft-target) cross entropy with mixup/cutmix, top-1/top-5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from training.config import RunConfig, TrainError
from training.dist import World, sum_tensor
from training.model import build_model
from training.tasks.base import Task


class ClassifyTask(Task):
    def __init__(self, cfg: RunConfig, classes: list[str], world: World, cache_dir: Path) -> None:
        if len(classes) < 2:
            raise TrainError(f"data.path: a classify run needs a store with at least 2 classes, found {len(classes)}")
        super().__init__(cfg, classes, world, cache_dir)
        self.num_classes = len(classes)
        t = cfg.train
        self.mixup = None
        if t.mixup > 0 or t.cutmix > 0:
            if cfg.data.batch_size % 2:
                raise TrainError("data.batch_size must be even with train.mixup/train.cutmix "
                                 "(timm's Mixup pairs samples)")
            self.mixup = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, label_smoothing=t.label_smoothing,
                               num_classes=self.num_classes)
            self.criterion: torch.nn.Module = SoftTargetCrossEntropy()
        elif t.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=t.label_smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()

    def build_model(self) -> torch.nn.Module:
        return build_model(self.cfg.model, self.num_classes, self.cache_dir)

    def train_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        if self.mixup is not None and len(images) % 2 == 0:  # a short batch after skipped samples may be odd
            images, labels = self.mixup(images, labels)
        elif self.mixup is not None:
            labels = F.one_hot(labels, self.num_classes).float()
        return self.criterion(model(images), labels)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any) -> dict[str, float]:
        """Loss, top-1 and top-5 over the split: sums over every sample (each once across ranks), then divided."""
        was_training = model.training
        model.eval()
        k = min(5, self.num_classes)
        sums = torch.zeros(4, dtype=torch.float64, device=self.world.device)  # loss, top1, top5, count
        for batch in loader:
            logits = model(batch["image"]).float()
            labels = batch["label"]
            top = logits.topk(k, dim=1).indices
            hits = top.eq(labels[:, None])
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hits[:, :1].sum(),
                                 hits.sum(), torch.tensor(len(labels), device=labels.device)]).double()
        sum_tensor(self.world, sums)
        model.train(was_training)
        loss, top1, top5, n = sums.tolist()
        if n == 0:
            raise TrainError("the validation split yielded no samples (check data.val_split)")
        return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}
