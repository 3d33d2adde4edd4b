"""Object detection: torchvision's FCOS or RetinaNet on a timm `features_only` backbone with an FPN; COCO mAP.

The pipeline's detect preset already letterboxes every image to `data.image_size` square and normalises it,
so the detector's own GeneralizedRCNNTransform is replaced by `Letterboxed`, which only stacks the images.
Boxes stay in letterboxed pixels end to end; `training/predict.py` maps them back to the original image.
A batch's boxes and labels stay on the host (pipelines/tasks.py): torchvision checks them for degenerate boxes
there, and the loss (training/tasks/fcos.py, training/tasks/retinanet.py) pads and copies them in one go, so a
training step waits for the GPU nowhere.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.models import FeatureInfo
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from training import dist
from training.config import DetectConfig, RunConfig, TrainError
from training.dist import World
from training.model import build_model as build_timm_model
from training.tasks import fcos, retinanet
from training.tasks.base import Task
from training.tasks.boxes import padded_targets


class TimmFPN(nn.Module):
    """A timm `features_only` body and torchvision's FPN: the backbone FCOS/RetinaNet expect
    (a module returning an OrderedDict of feature maps, with `out_channels`)."""

    def __init__(self, body: nn.Module, out_channels: int, p6p7: bool) -> None:
        super().__init__()
        self.body = body
        info = cast(FeatureInfo, body.feature_info)  # a timm features_only model's
        self.fpn = FeaturePyramidNetwork(info.channels(), out_channels,
                                         extra_blocks=LastLevelP6P7(out_channels, out_channels) if p6p7 else None)
        self.out_channels = out_channels
        reductions = info.reduction()
        self.strides = reductions + ([reductions[-1] * 2, reductions[-1] * 4] if p6p7 else [])

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


class Letterboxed(GeneralizedRCNNTransform):
    """The detectors' input transform for images the pipeline letterboxed and normalised: stacked, and padded to
    a multiple of 32 as torchvision's transform pads. Its resize by 1.0 and normalisation by (0, 1) changed
    nothing but cost 4 host syncs an image (it makes the box scale factors as tensors on the device)."""

    def __init__(self) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=[0.0] * 3, image_std=[1.0] * 3)

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
                ) -> tuple[ImageList, list[dict[str, torch.Tensor]] | None]:
        batch = torch.stack(images)
        height, width = batch.shape[-2:]
        pad = (0, -width % self.size_divisible, 0, -height % self.size_divisible)
        return ImageList(F.pad(batch, pad) if any(pad) else batch, [(height, width)] * len(images)), targets

    def postprocess(self, result: list[dict[str, torch.Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        return result


class SizedAnchors(AnchorGenerator):
    """torchvision's AnchorGenerator, whose anchors depend on the image and feature map sizes only: made once per
    size (about 125 small ops a step otherwise), the same tensor for every image of a batch, as torchvision's
    are equal copies."""

    def __init__(self, sizes: tuple[tuple[int, ...], ...], aspect_ratios: tuple[tuple[float, ...], ...]) -> None:
        super().__init__(sizes, aspect_ratios)
        self.made: dict[tuple, torch.Tensor] = {}

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        first = feature_maps[0]
        key = (tuple(image_list.tensors.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in feature_maps),
               first.dtype, first.device)
        if key not in self.made:
            one = ImageList(image_list.tensors[:1], image_list.image_sizes[:1])
            self.made[key] = super().forward(one, feature_maps)[0]
        return [self.made[key]] * len(image_list.image_sizes)


def group_norm_channels_last(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """GroupNorm of a channels_last (N, C, H, W) map that keeps its layout, forward and backward: statistics in
    fp32 over an NHWC view, the output in `x`'s dtype."""
    n, c, h, w = x.shape
    grouped = x.permute(0, 2, 3, 1).reshape(n, h * w, groups, c // groups)
    var, mean = torch.var_mean(grouped.float(), dim=(1, 3), keepdim=True, correction=0)
    y = ((grouped - mean) * torch.rsqrt(var + eps)).reshape(n, h, w, c) * weight + bias
    return y.to(x.dtype).permute(0, 3, 1, 2)


class HeadGroupNorm(nn.GroupNorm):
    """The head towers' GroupNorm. torch's returns a channels_last map and its gradient in NCHW on CUDA, so each
    channels_last tower convolution copied both back in its backward: 120 whole-map copies an FCOS step, gone
    with `group_norm_channels_last` (bench/RESULTS.md, stop 40). Only under torch.compile, which fuses it into
    one reduction and one pointwise kernel; eager, its several kernels would keep fp32 maps for backward (more
    memory; the speed not measured), so eager runs torch's, as measured before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def fcos_head(channels: int, num_classes: int, num_convs: int) -> FCOSHead:
    """torchvision's FCOS head (which takes no norm layer) with `HeadGroupNorm` in its towers."""
    head = FCOSHead(channels, 1, num_classes, num_convs=num_convs)
    norm = partial(HeadGroupNorm, 32)
    head.classification_head = FCOSClassificationHead(channels, 1, num_classes, num_convs, norm_layer=norm)
    head.regression_head = FCOSRegressionHead(channels, 1, num_convs, norm_layer=norm)
    return head


class BatchFCOS(FCOS):
    """torchvision's FCOS with its training loss over the whole batch at once, without host syncs
    (training/tasks/fcos.py); the same losses. `batch_loss` is swapped for its compiled self by `train.compile`."""

    batch_loss = staticmethod(fcos.batch_loss)

    def compute_loss(self, targets: list[dict[str, torch.Tensor]], head_outputs: dict[str, torch.Tensor],
                     anchors: list[torch.Tensor], num_anchors_per_level: list[int]) -> dict[str, torch.Tensor]:
        boxes, labels, real = padded_targets(targets, anchors[0].device)
        return self.batch_loss(self.head, head_outputs, anchors[0], boxes, labels, real, num_anchors_per_level,
                               self.center_sampling_radius)


class BatchRetinaNet(RetinaNet):
    """torchvision's RetinaNet with its training loss over the whole batch at once, without host syncs
    (training/tasks/retinanet.py); the same losses. `batch_loss` is swapped for its compiled self by
    `train.compile`."""

    batch_loss = staticmethod(retinanet.batch_loss)

    def compute_loss(self, targets: list[dict[str, torch.Tensor]], head_outputs: dict[str, torch.Tensor],
                     anchors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        boxes, labels, real = padded_targets(targets, anchors[0].device)
        m = self.proposal_matcher
        return self.batch_loss(self.head, head_outputs, anchors[0], boxes, labels, real, m.high_threshold,
                               m.low_threshold, m.allow_low_quality_matches)


def build_detector(cfg: RunConfig, num_classes: int, cache_dir: Path) -> nn.Module:
    """The detector `cfg.detect` names, with `cfg.model` (any timm model with features_only) as its body."""
    d = detect_settings(cfg)
    body_cfg = cfg.model.model_copy(
        update={"kwargs": {**cfg.model.kwargs, "features_only": True, "out_indices": tuple(d.out_indices)}})
    try:
        body = build_timm_model(body_cfg, num_classes, cache_dir)
    except IndexError:
        raise TrainError(f"bad value for detect.out_indices: {cfg.model.name} has no feature levels "
                         f"{list(d.out_indices)}") from None
    backbone = TimmFPN(body, d.fpn_channels, d.p6p7)
    strides = backbone.strides
    common = dict(score_thresh=d.score_thresh, nms_thresh=d.nms_thresh, detections_per_img=d.detections_per_img,
                  topk_candidates=d.topk_candidates)
    if d.head == "fcos":
        # FCOS assigns objects to levels by anchor size, so one anchor per location, the size of its stride.
        anchors = SizedAnchors(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        head = fcos_head(d.fpn_channels, num_classes, d.head_convs)
        return letterboxed(BatchFCOS(backbone, num_classes, anchor_generator=anchors, head=head, **common))
    # RetinaNet: 3 scales x 3 ratios per level from 4x the stride (the paper's 32 px at stride 8), GIoU loss as
    # in torchvision's retinanet_resnet50_fpn_v2.
    sizes = tuple(tuple(round(4 * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
    anchors = SizedAnchors(sizes, ((0.5, 1.0, 2.0),) * len(strides))
    head = RetinaNetHead(d.fpn_channels, anchors.num_anchors_per_location()[0], num_classes,
                         norm_layer=partial(HeadGroupNorm, 32))
    head.regression_head._loss_type = "giou"
    return letterboxed(BatchRetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **common))


def letterboxed(detector: FCOS | RetinaNet) -> nn.Module:
    detector.transform = Letterboxed()
    return detector


def detect_settings(cfg: RunConfig) -> DetectConfig:
    assert cfg.detect is not None, "the config gives every detect run its detect: section"
    return cfg.detect


def targets_of(batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": b, "labels": lab} for b, lab in zip(batch["boxes"], batch["labels"])]


def mean_average_precision(preds: list[dict], targets: list[dict]) -> dict[str, float]:
    """COCO mAP@0.5:0.95 and mAP@0.5 (torchmetrics with the faster_coco_eval backend), as fractions."""
    from torchmetrics.detection import MeanAveragePrecision

    # sync_on_compute off: the caller gathered every rank's share already (the metric's own sync would wait
    # for the other ranks, which are not computing)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval",
                                  sync_on_compute=False)
    metric.update(preds, targets)
    scores = metric.compute()
    return {"map": float(scores["map"]), "map50": float(scores["map_50"])}


class DetectTask(Task):
    compiled = "the backbone, FPN and head, and the box matching and losses (NMS stays eager)"

    def __init__(self, cfg: RunConfig, classes: list[str], world: World, cache_dir: Path) -> None:
        if not classes:
            raise TrainError("data.path: a detect run needs a store with class names (convert with --layout yolo)")
        super().__init__(cfg, classes, world, cache_dir)

    def build_model(self) -> nn.Module:
        self.model = build_detector(self.cfg, len(self.classes), self.cache_dir)
        return self.model

    def compile(self, model: nn.Module, **options: Any) -> nn.Module:
        """The convolutions compile in place (the state dict keeps its keys), and the batch loss, whose shapes
        change with the padded box count only. NMS (evaluation, predict) stays eager: its box counts change with
        every image."""
        detector = cast(BatchFCOS | BatchRetinaNet, self.model)
        detector.backbone.compile(**options)
        detector.head.compile(**options)
        detector.batch_loss = torch.compile(type(detector).batch_loss, **options)
        return model

    def train_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        losses = model(list(batch["image"]), targets_of(batch))  # focal + GIoU (+ centerness for FCOS)
        return sum(losses.values())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """mAP over the split: each rank predicts its share, rank 0 scores them all and tells the others."""
        was_training = model.training
        model.eval()
        preds, targets = [], []
        for batch in loader:
            preds += [{k: v.cpu() for k, v in p.items()} for p in model(list(batch["image"]))]
            targets += [{k: v.cpu() for k, v in t.items()} for t in targets_of(batch)]
        model.train(was_training)
        shares = dist.gather(self.world, (preds, targets))
        scores = None
        if self.world.is_main:
            all_preds = [p for share_preds, _ in shares for p in share_preds]
            all_targets = [t for _, share_targets in shares for t in share_targets]
            if all_targets:
                scores = mean_average_precision(all_preds, all_targets)
        scores = dist.broadcast(self.world, scores)
        if scores is None:
            raise TrainError("the validation split yielded no samples (check data.val_split)")
        return scores
