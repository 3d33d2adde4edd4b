"""What each task needs from the pipeline: one record per task.

A task's record says which store layouts it reads, which presets make its samples, which batch
function the workers run for each `data.decode` mode, and which keys of its batches hold images
(moved to the device and normalised there; every other tensor is only moved, or left on the host for the
task to move). Adding a task is one entry here and its `Task` in training/tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import cast

import albumentations as A
import torch

from pipelines import dali, gpu, hw, presets
from pipelines.batches import BatchFn, BatchSpec, classify_batch, detect_batch, dino_batch
from pipelines.config import AugmentConfig
from pipelines.store import BadSample

Batch = dict[str, torch.Tensor | list[torch.Tensor]]
BatchDeviceFn = Callable[[dict, BatchSpec, torch.device], tuple[Batch, list[BadSample]]]
# (worker batches with their specs, device) -> each batch on the device with its bad samples, in order
DeviceFn = Callable[[Iterable[tuple[dict, BatchSpec]], torch.device], Iterator[tuple[Batch, list[BadSample]]]]


def each(fn: BatchDeviceFn) -> DeviceFn:
    """A device half that takes one batch at a time, over the stream of them."""
    return lambda batches, device: (fn(batch, spec, device) for batch, spec in batches)


@dataclass(frozen=True)
class Decoder:
    """One `data.decode` mode of a task: the batch function the workers run and, where the pixels are decoded
    in the training process, what it runs over the worker batches (ahead of the step, in a thread of its own)."""

    worker: BatchFn
    device: DeviceFn | None = None


@dataclass(frozen=True)
class TaskData:
    layouts: tuple[str, ...]  # store layouts it can read
    transforms: Callable[[bool, int, AugmentConfig], list[A.Compose]]  # presets, from (train, size, augment)
    decoders: dict[str, Decoder]  # by data.decode
    images: str  # the batch key of the images: a (N,3,H,W) tensor, or a list of them (one per view)
    host: tuple[str, ...] = ()  # batch keys left in (pinned) host memory: the task's model moves them itself
    # batch keys the workers send concatenated over the batch's images, with each image's rows in `counts`
    per_image: tuple[str, ...] = ()
    # data.decode: auto picks hw with at most this many CPU workers a process: where the workers decode slower than
    # the hardware decoder feeds the step (the crossover measured for each task, bench/RESULTS.md, issue 19)
    auto_hw_workers: int = 0

    def spec(self, train: bool, size: int, aug: AugmentConfig) -> BatchSpec:
        """What the workers' batch function gets besides the samples."""
        return BatchSpec(size=size, train=train, aug=aug, transforms=self.transforms(train, size, aug))

    def received(self, batch: Batch) -> Batch:
        """A worker's batch as the task reads it: each `per_image` key a list of one tensor per image (views)."""
        if not self.per_image:
            return batch
        out = {key: value for key, value in batch.items() if key != "counts"}
        sizes = cast(torch.Tensor, batch["counts"]).tolist()
        for key in self.per_image:
            out[key] = list(cast(torch.Tensor, out[key]).split(sizes))
        return out

    def to_device(self, batch: Batch, device: torch.device, normalise: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """Every tensor of the batch but `host`'s on `device` (non-blocking: from pinned memory on CUDA); the images
        normalised."""
        def move(value, image: bool):
            if isinstance(value, list):
                return [move(v, image) for v in value]
            value = value.to(device, non_blocking=True)
            return normalise(value) if image else value

        return {key: value if key in self.host else move(value, key == self.images) for key, value in batch.items()}

    def batch_size(self, batch: Batch) -> int:
        images = batch[self.images]
        return len(images[0] if isinstance(images, list) else images)


TASKS: dict[str, TaskData] = {
    "classify": TaskData(
        layouts=("imagefolder",),
        transforms=lambda train, size, aug: [(presets.classify_train if train else presets.classify_eval)(size, aug)],
        decoders={"cpu": Decoder(classify_batch), "gpu": Decoder(gpu.worker_batch, each(gpu.device_batch)),
                  "hw": Decoder(gpu.worker_batch, each(hw.device_batch)),
                  "dali": Decoder(gpu.worker_batch, dali.device_batches)},
        images="image",
        auto_hw_workers=6,  # ResNet-50 on an H100: 6 workers decode as fast as hw feeds it, 8 at its full rate
    ),
    "dino": TaskData(
        layouts=("imagefolder", "unlabeled", "yolo"),
        transforms=lambda train, size, aug: presets.dino_views(size, aug),
        decoders={"cpu": Decoder(dino_batch), "gpu": Decoder(gpu.dino_worker_batch, each(gpu.dino_device_batch)),
                  "hw": Decoder(gpu.dino_worker_batch, each(hw.dino_device_batch))},
        images="crops",
        auto_hw_workers=8,  # ViT-S/16 on an H200: the GPU views fed it faster than 7 CPU workers, slower than 10
    ),
    "detect": TaskData(
        layouts=("yolo",),
        transforms=lambda train, size, aug: [(presets.detect_train if train else presets.detect_eval)(size, aug)],
        decoders={"cpu": Decoder(detect_batch)},
        images="image",
        # torchvision checks each image's boxes before its loss: on the device, a host sync per image
        host=("boxes", "labels"),
        per_image=("boxes", "labels"),
    ),
}
