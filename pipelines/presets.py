"""albumentations presets: HxWx3 uint8 in, uint8 out (normalisation happens on the device).

Each preset is an `A.Compose`; callers seed it per sample (`set_random_seed`) so that the
augmentation of a sample is a function of its position in the epoch, not of worker history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

from pipelines.config import AugmentConfig

PAD_VALUE = 114  # the letterbox grey of YOLO detectors

# OpenCV's thread pool does not survive fork: a DataLoader worker forked after the parent
# ran an OpenCV op in parallel hangs on its first one. Our parallelism is the workers.
cv2.setNumThreads(0)


def classify_train(size: int, aug: AugmentConfig) -> A.Compose:
    cj = aug.color_jitter
    return A.Compose([
        A.RandomResizedCrop((size, size), scale=aug.scale, ratio=aug.ratio),
        A.HorizontalFlip(p=aug.hflip),
        A.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=0.0, p=1.0 if cj > 0 else 0.0),
    ])


def classify_eval_resize(size: int, aug: AugmentConfig) -> int:
    """Shorter side before the centre crop (timm's crop_pct convention)."""
    return math.floor(size / aug.eval_crop_pct)


def classify_eval(size: int, aug: AugmentConfig) -> A.Compose:
    return A.Compose([
        A.SmallestMaxSize(max_size=classify_eval_resize(size, aug), area_for_downscale="image"),
        A.CenterCrop(size, size),
    ])


# DINO's view recipe (Caron et al. 2021), shared by the CPU presets below and the device path (pipelines/gpu.py)
DINO_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect range
DINO_JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
DINO_JITTER_P = 0.8
DINO_GRAY_P = 0.2
DINO_SIGMA = (0.1, 2.0)  # gaussian blur's sigma range


@dataclass(frozen=True)
class DinoView:
    size: int
    scale: tuple[float, float]
    blur: float  # probability of a gaussian blur
    solarize: float  # probability of solarizing


def dino_view_specs(size: int, aug: AugmentConfig) -> list[DinoView]:
    """global_crops global views (the first always blurred, the second sometimes solarized,
    as in DINO), then local_crops local views."""
    globals_ = [DinoView(size, aug.global_scale, blur=1.0 if i == 0 else 0.1, solarize=0.0 if i == 0 else 0.2)
                for i in range(aug.global_crops)]
    return globals_ + [DinoView(aug.local_size, aug.local_scale, blur=0.5, solarize=0.0)] * aug.local_crops


def _dino_view(view: DinoView, aug: AugmentConfig) -> A.Compose:
    """One DINO view: crop, flip, colour jitter, grey, blur, solarize."""
    b, c, s, h = DINO_JITTER
    return A.Compose([
        A.RandomResizedCrop((view.size, view.size), scale=view.scale, ratio=DINO_RATIO,
                            interpolation=cv2.INTER_CUBIC),
        A.HorizontalFlip(p=aug.hflip),
        A.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h, p=DINO_JITTER_P),
        A.ToGray(p=DINO_GRAY_P),
        A.GaussianBlur(sigma_limit=DINO_SIGMA, p=view.blur),
        A.Solarize(threshold_range=(0.5, 0.5), p=view.solarize),
    ])


def dino_views(size: int, aug: AugmentConfig) -> list[A.Compose]:
    """The views of `dino_view_specs` as albumentations presets."""
    return [_dino_view(view, aug) for view in dino_view_specs(size, aug)]


def _bbox_params(aug: AugmentConfig, label_fields: tuple[str, ...] = ("labels",)) -> A.BboxParams:
    # Clipped to the image, dropped under min_box_px. The visibility and aspect rule needs each object's whole
    # area, which albumentations' Mosaic loses (its cells clip boxes before its own min_visibility test, so
    # that test always passes): `keep_visible` applies it to the train preset's output instead.
    return A.BboxParams(
        format="pascal_voc", label_fields=list(label_fields), clip=True, filter_invalid_bboxes=True,
        min_width=aug.min_box_px, min_height=aug.min_box_px,
    )


def _letterbox(size: int) -> list[A.BasicTransform]:
    return [
        A.LongestMaxSize(max_size=size, area_for_downscale="image"),
        A.PadIfNeeded(size, size, border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE),
    ]


def detect_train(size: int, aug: AugmentConfig) -> A.Compose:
    """Mosaic of 4 (partners passed as `mosaic_metadata`), letterbox, affine, flip, HSV, as YOLO's train pipeline.

    Every image is at the letterbox scale before the affine step, in a mosaic cell (fit "contain": longest side
    `size`, grey padding) as alone, so objects have the sizes they have at evaluation until the scale jitter.
    The affine step scales both axes by one factor (objects keep their shape). Boxes are pascal_voc pixels with
    two label fields, `labels` and `areas` (each box's whole area at the letterbox scale, for `keep_visible`).
    """
    h, s, v = aug.hsv
    return A.Compose(
        [
            A.Mosaic(grid_yx=(2, 2), target_size=(size, size), cell_shape=(size, size), fit_mode="contain",
                     fill=PAD_VALUE, p=aug.mosaic),
            *_letterbox(size),
            A.Affine(
                scale=(1 - aug.scale_jitter, 1 + aug.scale_jitter), keep_ratio=True,
                translate_percent=(-aug.translate, aug.translate), border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE,
                p=1.0,
            ),
            A.HorizontalFlip(p=aug.hflip),
            # YOLO's HSV gains: saturation and value multiplied by a factor in [1 - s, 1 + s] and [1 - v, 1 + v],
            # hue shifted by up to h of the circle. (HueSaturationValue shifts by amounts added to the uint8
            # channels: s=0.7 was a shift of up to 178 of 255, far harsher than YOLO's gain of 0.3 to 1.7.)
            A.ColorJitter(brightness=v, contrast=0.0, saturation=s, hue=h, p=1.0),
        ],
        bbox_params=_bbox_params(aug, ("labels", "areas")),
        save_applied_params=True,
    )


def keep_visible(out: dict, aug: AugmentConfig) -> np.ndarray:
    """Which boxes of a `detect_train` output to keep: YOLO's box-candidate rule (ultralytics' `box_candidates`).

    A box is kept when it is at least `min_box_px` wide and high (the bbox params drop the others), at least
    `min_visibility` of the object's whole box (its `areas` entry, times the affine step's area scale) is in
    view, and its sides are at most `max_aspect` to 1. Objects cut at the mosaic's or the image's edge to a
    sliver fail the last two; a sliver kept as a target teaches the detector to fire on edges of objects.
    """
    boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
    w, h = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-6), np.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)
    affine = next(params["matrix"] for name, params in out["applied_transforms"] if name == "Affine")
    whole = np.asarray(out["areas"], dtype=np.float32).reshape(-1) * abs(np.linalg.det(affine[:2, :2]))
    return (w * h >= aug.min_visibility * whole) & (np.maximum(w / h, h / w) <= aug.max_aspect)


def detect_eval(size: int, aug: AugmentConfig) -> A.Compose:
    return A.Compose(_letterbox(size), bbox_params=_bbox_params(aug))
