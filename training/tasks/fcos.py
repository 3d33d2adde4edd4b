"""torchvision FCOS's training loss for the whole batch at once, with no host sync.

torchvision's `FCOS.compute_loss` matches anchors to boxes image by image and selects with boolean masks: about
75 ops and 2 host syncs an image, then an `.item()` and a dozen more selections by mask. On a GPU each sync
waits for the work queued before it, so the GPU idles while Python launches the next few small kernels. Here
the batch's boxes are padded to its largest count and matched in one pass, and the background anchors are
masked out of the sums instead of indexed away.
The rules and the losses are torchvision's: centre sampling, a scale range per FPN level, the smallest box for
an anchor inside several; focal, GIoU and centre-ness losses, each over the foreground count.
tests/test_detect.py checks the losses and their gradients against torchvision's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import sigmoid_focal_loss

from training.tasks.boxes import giou_loss


def match_anchors(anchors: torch.Tensor, boxes: torch.Tensor, real: torch.Tensor, per_level: list[int],
                  radius: float) -> torch.Tensor:
    """(B, A): for each image and anchor, the index of its box, or -1 for background; anchors (A, 4) are one
    image's (all images of a batch are the same size), boxes and real as `padded_targets` gives them."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    sizes = anchors[:, 2] - anchors[:, 0]
    box_centres = (boxes[..., :2] + boxes[..., 2:]) / 2
    # centre sampling: the anchor's point near the box's centre
    near = (centres[None, :, None] - box_centres[:, None]).abs().amax(dim=-1) < radius * sizes[:, None]
    x, y = centres[None, :, None].unbind(dim=-1)  # (1, A, 1)
    x0, y0, x1, y1 = boxes[:, None].unbind(dim=-1)  # (B, 1, M)
    sides = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=-1)  # (B, A, M, 4)
    # each level answers for one range of object sizes: the first takes the smallest, the last the largest
    lower, upper = sizes * 4, sizes * 8
    lower[:per_level[0]] = 0
    upper[-per_level[-1]:] = float("inf")
    reach = sides.amax(dim=-1)
    inside = sides.amin(dim=-1) > 0
    match = near & inside & (reach > lower[:, None]) & (reach < upper[:, None]) & real[:, None]
    # the smallest box wins where an anchor is inside several
    areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    best, index = (match.to(torch.float32) * (1e8 - areas[:, None])).max(dim=-1)
    return torch.where(best < 1e-5, -1, index)


def batch_loss(head: FCOSHead, outputs: dict[str, torch.Tensor], anchors: torch.Tensor, boxes: torch.Tensor,
               labels: torch.Tensor, real: torch.Tensor, per_level: list[int], radius: float
               ) -> dict[str, torch.Tensor]:
    """The anchors matched, then the losses: what `train.compile` compiles (training/tasks/detect.py)."""
    matched = match_anchors(anchors, boxes, real, per_level, radius)
    return fcos_losses(head, outputs, anchors, boxes, labels, matched)


def fcos_losses(head: FCOSHead, outputs: dict[str, torch.Tensor], anchors: torch.Tensor, boxes: torch.Tensor,
                labels: torch.Tensor, matched: torch.Tensor) -> dict[str, torch.Tensor]:
    """FCOSHead.compute_loss's three losses, summed over the foreground anchors and divided by their count."""
    foreground = matched >= 0
    index = matched.clamp(min=0)
    gt_labels = labels.gather(1, index)
    gt_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))
    count = foreground.sum().clamp(min=1)
    weight = foreground.to(torch.float32)

    cls_logits = outputs["cls_logits"]
    # scatter, not F.one_hot: on CUDA, one_hot reads the labels' range back to check it
    one_hot = torch.zeros_like(cls_logits).scatter_(-1, gt_labels[..., None],
                                                    foreground[..., None].to(cls_logits.dtype))
    loss_cls = sigmoid_focal_loss(cls_logits, one_hot, reduction="sum")

    all_anchors = anchors.expand(len(boxes), -1, -1)
    # in float32: torchvision decodes in the head's dtype, whose bf16 under autocast rounds coordinates near 640
    # to 4 px
    pred_boxes = head.box_coder.decode(outputs["bbox_regression"].float(), all_anchors)
    # a background pair is its anchor against itself: masked out below, but never NaN (whose gradient would be)
    on_fg = foreground[..., None]
    giou = giou_loss(torch.where(on_fg, pred_boxes, all_anchors), torch.where(on_fg, gt_boxes, all_anchors))
    loss_giou = (giou * weight).sum()

    targets = head.box_coder.encode(all_anchors, gt_boxes)
    left_right, top_bottom = targets[..., 0::2], targets[..., 1::2]  # slices: an index list is a copy to the device
    centreness = torch.sqrt((left_right.amin(dim=-1) / left_right.amax(dim=-1))
                            * (top_bottom.amin(dim=-1) / top_bottom.amax(dim=-1)))
    centreness = torch.where(foreground, centreness, 0.0)  # background's is 0/0 or negative under the root
    bce = F.binary_cross_entropy_with_logits(outputs["bbox_ctrness"].squeeze(dim=2), centreness, reduction="none")
    loss_centreness = (bce * weight).sum()

    return {"classification": loss_cls / count, "bbox_regression": loss_giou / count,
            "bbox_ctrness": loss_centreness / count}
