"""Raw samples of one batch to a batch of uint8 tensors, per task (runs in the workers).

Every function takes the batch's samples with one seed per position and returns the
batch dict and the samples it could not decode. Augmentation is seeded per sample, so a
sample's pixels depend on (run seed, epoch, rank, position) only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch

from pipelines import presets
from pipelines.config import AugmentConfig
from pipelines.decode import decode_image
from pipelines.store import BadSample, RawSample


@dataclass
class BatchSpec:
    """What the batch functions need: task settings and the (picklable) presets."""

    size: int
    train: bool
    aug: AugmentConfig
    transforms: list[A.Compose]


Decoded = tuple[RawSample, int, np.ndarray]  # sample, seed, HxWx3 uint8
BatchFn = Callable[[list[RawSample], list[int], BatchSpec], tuple[dict, list[BadSample]]]


def decoded(samples: list[RawSample], seeds: list[int], min_side: int, bad: list[BadSample]) -> Iterator[Decoded]:
    """The samples decoded one at a time, so that each image is transformed while it is still in the CPU's
    caches (DINO's 12 views: 1.07-1.17x faster than decoding the whole batch first, bench/worker_batches.py);
    the samples that cannot be decoded go to `bad`."""
    for raw, seed in zip(samples, seeds):
        try:
            image = decode_image(raw.image, min_side)
        except Exception as e:  # PIL raises many types for bad bytes; each is a corrupt sample
            bad.append(BadSample(raw.shard, raw.key, f"cannot decode {raw.ext}: {type(e).__name__}: {e}"))
            continue
        yield raw, seed, image


def apply(transform: A.Compose, seed: int, **data) -> dict:
    # one generator pair shared by all its transforms: a quarter of set_random_seed's cost
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform(**data)


def chw(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Stack HxWx3 uint8 arrays into one (N,3,H,W) uint8 tensor, channels_last in memory:
    no transposing copy here, and none on the device when channels_last is wanted."""
    if not images:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def classify_batch(samples: list[RawSample], seeds: list[int], spec: BatchSpec) -> tuple[dict, list[BadSample]]:
    min_side = spec.size if spec.train else presets.classify_eval_resize(spec.size, spec.aug)
    images, labels = [], []
    bad: list[BadSample] = []
    for raw, seed, img in decoded(samples, seeds, min_side, bad):
        images.append(apply(spec.transforms[0], seed, image=img)["image"])
        labels.append(raw.meta["cls"])
    return {"image": chw(images, spec.size), "label": torch.tensor(labels, dtype=torch.int64)}, bad


def dino_batch(samples: list[RawSample], seeds: list[int], spec: BatchSpec) -> tuple[dict, list[BadSample]]:
    views: list[list[np.ndarray]] = [[] for _ in spec.transforms]
    bad: list[BadSample] = []
    for _, seed, img in decoded(samples, seeds, spec.size, bad):
        for v, view in enumerate(spec.transforms):
            # every view of a sample gets its own seed derived from the sample's
            views[v].append(apply(view, seed * 131 + v, image=img)["image"])
    sizes = [spec.size if v < spec.aug.global_crops else spec.aug.local_size for v in range(len(views))]
    return {"crops": [chw(crops, size) for crops, size in zip(views, sizes)]}, bad


def yolo_to_pixels(meta: dict, width: int, height: int) -> tuple[np.ndarray, list[int]]:
    """YOLO-normalised (cx, cy, w, h) to pascal_voc pixel (x0, y0, x1, y1), clipped to the image."""
    boxes = np.asarray(meta.get("boxes", []), dtype=np.float32).reshape(-1, 4)
    xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], axis=1)
    xyxy = np.clip(xyxy * [width, height, width, height], 0, [width, height, width, height]).astype(np.float32)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return xyxy[keep], [int(label) for label, k in zip(meta.get("labels", []), keep) if k]


def detect_batch(samples: list[RawSample], seeds: list[int], spec: BatchSpec) -> tuple[dict, list[BadSample]]:
    bad: list[BadSample] = []
    good = list(decoded(samples, seeds, spec.size, bad))  # all first: mosaic combines the batch's images
    items = []
    for raw, _, img in good:
        height, width = img.shape[:2]
        xyxy, cls = yolo_to_pixels(raw.meta, width, height)
        item = {"image": img, "bboxes": xyxy, "labels": cls}
        if spec.train:
            # whole areas at the letterbox scale (mosaic cells are at it too): the visibility rule's reference
            scale = spec.size / max(height, width)
            item["areas"] = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]) * scale**2
        items.append(item)
    images: list[np.ndarray] = []
    boxes: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for i, (_, seed, _) in enumerate(good):
        data = dict(items[i])
        if spec.train:
            # mosaic partners: 3 other samples of this batch, chosen from the sample's seed
            others = [j for j in range(len(items)) if j != i]
            picks: np.ndarray | list[int] = np.random.default_rng(seed).permutation(others)[:3] if others else []
            data["mosaic_metadata"] = [items[j] for j in picks]
        out = apply(spec.transforms[0], seed, **data)
        keep = presets.keep_visible(out, spec.aug) if spec.train else slice(None)
        images.append(out["image"])
        boxes.append(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)[keep])
        labels.append(np.asarray(out["labels"], dtype=np.int64).reshape(-1)[keep])
    # The boxes and labels of all images as one tensor each, with each image's count: a worker passes every
    # tensor through a shared-memory segment of its own, and receiving two per image cost the training process
    # more than the rest of the batch (bench/batch_transfer.py). `TaskData.received` splits them there.
    return {"image": chw(images, spec.size), "counts": torch.tensor([len(b) for b in boxes], dtype=torch.int64),
            "boxes": torch.from_numpy(np.concatenate([np.zeros((0, 4), np.float32), *boxes])),
            "labels": torch.from_numpy(np.concatenate([np.zeros(0, np.int64), *labels]))}, bad
