"""torchvision RetinaNet's training loss for the whole batch at once, with no host sync.

torchvision's `RetinaNet.compute_loss` matches anchors to boxes image by image (its `Matcher` indexes by
boolean masks) and selects each image's foreground and valid anchors by mask: several host syncs an image.
Here the batch's boxes are padded to its largest count and matched in one pass, and the anchors left out of a
loss are masked out of its sums instead of indexed away.
The rules and the losses are torchvision's: IoU at least `high` is foreground, under `low` background, between
them ignored, and each box's best anchors (ties included) match it whatever their IoU; focal loss over the
anchors not ignored, GIoU over the foreground, each image's divided by its foreground count, then averaged.
tests/test_detect.py checks the losses and their gradients against torchvision's own.
"""

from __future__ import annotations

import torch
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import sigmoid_focal_loss

from training.tasks.boxes import box_iou, giou_loss

BELOW, BETWEEN = -1, -2  # torchvision Matcher's codes: background, ignored


def match_anchors(anchors: torch.Tensor, boxes: torch.Tensor, real: torch.Tensor, high: float, low: float,
                  low_quality: bool) -> torch.Tensor:
    """(B, A): for each image and anchor, the index of its box, BELOW or BETWEEN; anchors (A, 4) are one image's,
    boxes and real as `padded_targets` gives them."""
    iou = torch.where(real[..., None], box_iou(boxes, anchors), -1.0)  # padding never matches
    best, index = iou.max(dim=1)
    matched = torch.where(best < low, BELOW, torch.where(best < high, BETWEEN, index))
    if low_quality:
        tops = (iou == iou.amax(dim=2, keepdim=True)) & real[..., None]  # each box's best anchors
        matched = torch.where(tops.any(dim=1), index, matched)
    return matched


def batch_loss(head: RetinaNetHead, outputs: dict[str, torch.Tensor], anchors: torch.Tensor, boxes: torch.Tensor,
               labels: torch.Tensor, real: torch.Tensor, high: float, low: float, low_quality: bool
               ) -> dict[str, torch.Tensor]:
    """The anchors matched, then the losses: what `train.compile` compiles (training/tasks/detect.py)."""
    matched = match_anchors(anchors, boxes, real, high, low, low_quality)
    return retinanet_losses(head, outputs, anchors, boxes, labels, matched)


def retinanet_losses(head: RetinaNetHead, outputs: dict[str, torch.Tensor], anchors: torch.Tensor,
                     boxes: torch.Tensor, labels: torch.Tensor, matched: torch.Tensor) -> dict[str, torch.Tensor]:
    """RetinaNetHead.compute_loss's two losses (its regression head's GIoU, as training/tasks/detect.py builds it),
    each image's over its foreground count, averaged over the batch."""
    foreground = matched >= 0
    index = matched.clamp(min=0)
    count = foreground.sum(dim=1).clamp(min=1)  # (B,)
    weight = foreground.to(torch.float32)

    cls_logits = outputs["cls_logits"]
    gt_labels = labels.gather(1, index)
    # scatter, not F.one_hot: on CUDA, one_hot reads the labels' range back to check it
    one_hot = torch.zeros_like(cls_logits).scatter_(-1, gt_labels[..., None],
                                                    foreground[..., None].to(cls_logits.dtype))
    focal = sigmoid_focal_loss(cls_logits, one_hot, reduction="none").sum(dim=-1)
    loss_cls = ((focal * (matched != BETWEEN)).sum(dim=1) / count).sum() / len(boxes)

    gt_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))
    all_anchors = anchors.expand(len(boxes), -1, -1)
    # in float32, as FCOS's (training/tasks/fcos.py): bf16 rounds coordinates near 640 to 4 px
    pred_boxes = head.regression_head.box_coder.decode_single(
        outputs["bbox_regression"].float().flatten(0, 1), all_anchors.flatten(0, 1)).view_as(all_anchors)
    # a background pair is its anchor against itself: masked out below, but never NaN (whose gradient would be)
    on_fg = foreground[..., None]
    giou = giou_loss(torch.where(on_fg, pred_boxes, all_anchors), torch.where(on_fg, gt_boxes, all_anchors))
    loss_giou = ((giou * weight).sum(dim=1) / count).sum() / len(boxes)
    return {"classification": loss_cls, "bbox_regression": loss_giou}
