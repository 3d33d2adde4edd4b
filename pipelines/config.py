"""The YAML `data:` section of a run config, and the one error type of this package."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args, get_origin

import pydantic
from pydantic.fields import FieldInfo

# timm.data's IMAGENET_DEFAULT_MEAN and _STD, written out: importing timm imports torch, seconds that every
# `shardtrain` command would pay (training.config reads this module), --help included.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


Share = Annotated[float, pydantic.Field(gt=0, le=1)]  # of an image's area
Positive = Annotated[float, pydantic.Field(gt=0)]
NonNegative = Annotated[float, pydantic.Field(ge=0)]


class DataError(Exception):
    """A problem with the data or its settings, stated in one line for the user."""


class Section(pydantic.BaseModel, extra="forbid"):
    """A section of the YAML run config: unknown keys are refused, and so is true or false where a number goes,
    which pydantic would take as 1 or 0 (`optim.lr: true` read as 1.0)."""

    @pydantic.field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: object, info: pydantic.ValidationInfo) -> object:
        field = cls.model_fields[str(info.field_name)]  # set for a field validator
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) for v in items) and takes_numbers(field.annotation):
            raise ValueError(numbers_wanted(field))
        return value


def kinds(annotation: Any) -> set[Any]:
    """The annotation and the types it is made of (through unions, tuples and Annotated)."""
    return {annotation}.union(*(kinds(arg) for arg in get_args(annotation)))


def takes_numbers(annotation: Any) -> bool:
    """int or float, optional or in a tuple, but never a bool."""
    found = kinds(annotation)
    return bool(found & {int, float}) and bool not in found


def numbers_wanted(field: FieldInfo) -> str:
    """What a numeric field takes, in words: 'a number in [0, 1)', 'a whole number >= 1', 'a list of 3 numbers'."""
    found = kinds(field.annotation)
    number = "whole number" if int in found else "number"
    null = ", or null" if type(None) in found else ""
    tuples = [kind for kind in found if get_origin(kind) is tuple]
    if tuples:
        args = get_args(tuples[0])
        return f"a list of {'' if Ellipsis in args else f'{len(args)} '}{number}s{null}"
    bound = {name: getattr(m, name) for m in field.metadata for name in ("gt", "ge", "lt", "le")
             if getattr(m, name, None) is not None}
    low = f"[{bound['ge']:g}" if "ge" in bound else f"({bound['gt']:g}" if "gt" in bound else ""
    high = f"{bound['le']:g}]" if "le" in bound else f"{bound['lt']:g})" if "lt" in bound else ""
    if low and high:
        where = f" in {low}, {high}"
    else:
        where = "".join(f" {op} {bound[name]:g}" for name, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                        if name in bound)
    return f"a {number}{where}{null}"


class AugmentConfig(Section):
    """Preset tuning from YAML `data.augment.*`."""

    # classify
    scale: tuple[Share, Share] = pydantic.Field(
        default=(0.08, 1.0), description="classify train: RandomResizedCrop's area range, as fractions of the "
        "image.")
    ratio: tuple[Positive, Positive] = pydantic.Field(
        default=(3 / 4, 4 / 3), description="classify train: RandomResizedCrop's aspect ratio range.")
    hflip: float = pydantic.Field(
        default=0.5, ge=0, le=1,
        description="Probability of a horizontal flip, in every train preset (classify, dino views, "
        "detect).")
    color_jitter: float = pydantic.Field(
        default=0.4, ge=0, description="classify train: brightness, contrast and saturation jitter strength; 0 = off. "
        "With `data.decode` gpu, hw or dali the workers draw it and the device applies it.")
    eval_crop_pct: float = pydantic.Field(
        default=0.875, gt=0, le=1,
        description="classify eval: the shorter side is resized to image_size / eval_crop_pct, then "
        "centre-cropped to image_size (timm's crop_pct).")
    mean: tuple[float, float, float] = pydantic.Field(
        default=IMAGENET_DEFAULT_MEAN, description="Per-channel mean (RGB, 0-1): the images become (x - mean) / "
        "std, on the device.")
    std: tuple[Positive, Positive, Positive] = pydantic.Field(
        default=IMAGENET_DEFAULT_STD, description="Per-channel standard deviation (RGB, 0-1), as `mean`.")
    # DINO multi-crop
    global_crops: int = pydantic.Field(default=2, ge=1, description="dino: global views at `data.image_size`.")
    local_crops: int = pydantic.Field(default=6, ge=0, description="dino: local views at `local_size`.")
    local_size: int = pydantic.Field(default=96, ge=1, description="dino: the local views' side in pixels.")
    global_scale: tuple[Share, Share] = pydantic.Field(
        default=(0.4, 1.0), description="dino: the global views' area range, as fractions of the image.")
    local_scale: tuple[Share, Share] = pydantic.Field(
        default=(0.05, 0.4), description="dino: the local views' area range, as fractions of the image.")
    # detection
    mosaic: float = pydantic.Field(
        default=0.5, ge=0, le=1,
        description="detect train: probability of a mosaic of 4 images from the same batch, each cell "
        "at the letterbox scale.")
    close_mosaic: int = pydantic.Field(
        default=0, ge=0, description="detect train: no mosaic in the run's last this many epochs, so that the model "
        "ends on whole images as it is evaluated (YOLO's close_mosaic).")
    translate: float = pydantic.Field(
        default=0.1, ge=0, le=1, description="detect train: affine translation, as a fraction of the image side.")
    scale_jitter: float = pydantic.Field(
        default=0.5, ge=0, lt=1,
        description="detect train: affine scale drawn from [1 - this, 1 + this], one factor for both "
        "axes.")
    hsv: tuple[NonNegative, NonNegative, NonNegative] = pydantic.Field(
        default=(0.015, 0.7, 0.4), description="detect train: YOLO's HSV gains: hue shifted by up to this "
        "fraction of the circle, saturation and value multiplied by a factor in [1 - s, 1 + s] and [1 - v, 1 + v].")
    min_box_px: float = pydantic.Field(
        default=2.0, ge=0,
        description="detect train: boxes narrower or lower than this (pixels) are dropped with their "
        "labels.")
    min_visibility: float = pydantic.Field(
        default=0.25, ge=0, le=1,
        description="detect train: a box with less than this share of the object's whole box in view "
        "is dropped (YOLO's box-candidate rule).")
    max_aspect: float = pydantic.Field(
        default=20.0, ge=1, description="detect train: a box whose sides are more than this to 1 is dropped (YOLO's "
        "box-candidate rule).")


    @pydantic.field_validator("scale", "ratio", "global_scale", "local_scale")
    @classmethod
    def _a_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError("a range [low, high] needs low <= high")
        return v


class DataConfig(Section):
    """The YAML `data:` section of a run config."""

    path: str = pydantic.Field(
        description="The shard store: a local or NAS path, or an fsspec URL (`s3://bucket/prefix`).")
    image_size: int = pydantic.Field(
        default=224, ge=1, description="The side of the images in a batch (dino: of the global views; detect: of the "
        "letterbox square).")
    batch_size: int = pydantic.Field(default=64, ge=1, description="Samples per batch, per process.")
    workers: int | Literal["auto"] = pydantic.Field(
        default=4, description="DataLoader worker processes per training process, >= 0. auto: the process's share "
        "of the CPUs it may use (its affinity and cgroup quota, over torchrun's processes on the host) less 2, at "
        "least 1: 14 on a 16-core one-GPU host, 12 for each of 8 GPUs on 112 cores. The run's log says how many.")
    decode: Literal["auto", "cpu", "gpu", "hw", "dali"] = pydantic.Field(
        default="auto", description="cpu: the workers decode and augment. gpu (classify and dino): the workers send "
        "the JPEG bytes and each view's crop box, flip (and for dino colour parameters), decoded with nvJPEG, cropped "
        "and augmented on the device (on the CPU without CUDA). hw (classify and dino): as gpu, decoded by the GPU's "
        "hardware JPEG decoder through nvImageCodec (`pip install 'shardtrain[gpu]'`), other images on the CPU. "
        "dali (classify): as gpu, the decode (hardware decoder first), crop, resize and flip run by NVIDIA DALI's "
        "engine in its own threads (`pip install 'shardtrain[dali]'`; only when set, never by auto). auto: hw where "
        "it works and `workers` is few (classify 6 or fewer, dino 8: more decode as fast on the CPU, "
        "bench/RESULTS.md, issue 19), else cpu; the run's log says which and why.")
    pin_memory: bool = pydantic.Field(
        default=True, description="Worker batches in pinned memory (on CUDA), for non-blocking copies to the "
        "device.")
    persistent_workers: bool = pydantic.Field(
        default=True, description="Keep the workers (and their shard indexes) across epochs.")
    prefetch_factor: int = pydantic.Field(default=4, ge=1, description="Batches each worker prepares ahead.")
    stall_notice_s: float = pydantic.Field(
        default=300, ge=0, description="A line in the run's log when the loader has waited this many seconds for "
        "its next batch (a stuck worker, a stalled read), and again after each further such wait; 0: none.")
    cache_dir: str | None = pydantic.Field(
        default=None, description="A wds store on object storage (s3://...): each shard is copied whole into "
        "this local folder the first time a worker reads from it, and read there from then on, as MosaicML "
        "Streaming and LitData read from their caches. Needs room for the split's shards (a rank reads from all "
        "of them); copies are shared by the workers and by later runs on this host, and checked against the "
        "manifest's sizes. Unset: every sample is a byte-range request to the store, and nothing is written "
        "locally. Local stores ignore it.")
    shuffle_block: int = pydantic.Field(
        default=262_144, ge=1, description="train: the samples are permuted within runs of this many "
        "consecutive samples, after the shard order is shuffled; a worker reads from about shuffle_block / "
        "samples-per-shard shards at once (`pipelines/plan.py`).")
    channels_last: bool = pydantic.Field(
        default=True, description="The model and the batches in channels_last memory format.")
    on_error: Literal["skip", "fail"] = pydantic.Field(
        default="skip", description="A corrupt sample: skip it and count it (`metrics.json`'s `skipped_samples`), "
        "or stop the run with an error naming its shard and key.")
    train_split: str = pydantic.Field(default="train", description="The split the run trains on.")
    val_split: str = pydantic.Field(default="val", description="The split the run evaluates on.")
    augment: AugmentConfig = pydantic.Field(
        default=AugmentConfig(), description="Tuning of the augmentation presets (`pipelines/presets.py`).")

    @pydantic.field_validator("workers", mode="before")
    @classmethod
    def _whole_or_auto(cls, v: object) -> object:
        # one message for both halves of the union, not pydantic's one for each
        if v != "auto" and (not isinstance(v, int) or v < 0):
            raise ValueError("expected a whole number >= 0 or auto")
        return v
