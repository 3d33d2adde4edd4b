"""A detection batch's boxes as padded tensors, and the box arithmetic of the detectors' batch losses
(training/tasks/fcos.py, training/tasks/retinanet.py): torchvision's, over a batch at once, with no host sync."""

from __future__ import annotations

import torch

from pipelines.gpu_color import upload

EPS = 1e-7  # torchvision's generalized_box_iou_loss's


def padded_targets(targets: list[dict[str, torch.Tensor]], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes (B, M, 4), labels (B, M) and which are real (B, M), M the batch's largest count (at least 1), on
    `device`. Padded where the targets are (the host, for the training loop's batches), copied without a wait."""
    counts = [len(t["boxes"]) for t in targets]
    home = targets[0]["boxes"].device
    boxes = torch.zeros((len(targets), max(1, *counts), 4), device=home)
    labels = torch.zeros(boxes.shape[:2], dtype=torch.int64, device=home)
    for i, t in enumerate(targets):
        boxes[i, :counts[i]] = t["boxes"]
        labels[i, :counts[i]] = t["labels"]
    real = torch.arange(boxes.shape[1]) < torch.tensor(counts)[:, None]
    return move(boxes, device), move(labels, device), move(real, device)


def move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return upload(t, device) if t.device.type == "cpu" else t.to(device)


def giou_loss(boxes: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """torchvision.ops.generalized_box_iou_loss, elementwise (reduction none), with the intersection clamped
    at 0 instead of assigned through a boolean mask (an index by mask is a host sync on CUDA)."""
    x0, y0, x1, y1 = boxes.unbind(dim=-1)
    gx0, gy0, gx1, gy1 = gt.unbind(dim=-1)
    inter = ((torch.min(x1, gx1) - torch.max(x0, gx0)).clamp(min=0)
             * (torch.min(y1, gy1) - torch.max(y0, gy0)).clamp(min=0))
    union = (x1 - x0) * (y1 - y0) + (gx1 - gx0) * (gy1 - gy0) - inter
    enclosing = (torch.max(x1, gx1) - torch.min(x0, gx0)) * (torch.max(y1, gy1) - torch.min(y0, gy0))
    return 1 - inter / (union + EPS) + (enclosing - union) / (enclosing + EPS)


def box_iou(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(B, M, A): torchvision.ops.box_iou of each image's boxes (B, M, 4) against the anchors (A, 4), with its
    arithmetic in its order (matching compares IoUs for equality)."""
    x0, y0, x1, y1 = boxes[..., None, :].unbind(dim=-1)  # (B, M, 1)
    ax0, ay0, ax1, ay1 = anchors.unbind(dim=-1)  # (A,)
    inter = ((torch.min(x1, ax1) - torch.max(x0, ax0)).clamp(min=0)
             * (torch.min(y1, ay1) - torch.max(y0, ay0)).clamp(min=0))
    union = (x1 - x0) * (y1 - y0) + (ax1 - ax0) * (ay1 - ay0) - inter
    return inter / union
