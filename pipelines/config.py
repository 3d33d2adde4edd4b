"""The YAML `data:` section of a run config, and the one error type of this package."""

from __future__ import annotations

from typing import Literal

import pydantic

# timm.data's IMAGENET_DEFAULT_MEAN and _STD, written out: importing timm imports torch, seconds that every
# `shardtrain` command would pay (training.config reads this module), --help included.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


class DataError(Exception):
    """A problem with the data or its settings, stated in one line for the user."""


class AugmentConfig(pydantic.BaseModel, extra="forbid"):
    """Preset tuning from YAML `data.augment.*`."""

    # classify
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4
    eval_crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    # DINO multi-crop
    global_crops: int = 2
    local_crops: int = 6
    local_size: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    # detection
    mosaic: float = 0.5
    translate: float = 0.1
    scale_jitter: float = 0.5
    hsv: tuple[float, float, float] = (0.015, 0.7, 0.4)
    min_box_px: float = 2.0
    # YOLO's box-candidate rule (pipelines.presets.keep_visible): share of the whole box in view, sides' ratio
    min_visibility: float = 0.25
    max_aspect: float = 20.0


class DataConfig(pydantic.BaseModel, extra="forbid"):
    """The YAML `data:` section of a run config."""

    path: str  # store: local path or fsspec URL
    image_size: int = 224
    batch_size: int = 64  # per process
    workers: int = 4
    decode: Literal["cpu", "gpu"] = "cpu"
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 4
    # train: samples are permuted within blocks of this many (after the shard order is shuffled), so a
    # worker reads from about shuffle_block / shard size shards at once (pipelines/plan.py, epoch_sequence)
    shuffle_block: int = pydantic.Field(default=262_144, ge=1)
    channels_last: bool = True
    on_error: Literal["skip", "fail"] = "skip"
    train_split: str = "train"
    val_split: str = "val"
    augment: AugmentConfig = AugmentConfig()
