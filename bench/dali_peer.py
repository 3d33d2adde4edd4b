"""The peer input path of issue 19: NVIDIA DALI alone on the same WebDataset tars, as `--paths wds-peer` in
bench/train_throughput.py (`wds-dali` there is ours with DALI as the device half: pipelines/dali.py).

DALI reads the tars (`fn.readers.webdataset`, with the `.idx` files convert writes in its index format), decodes
JPEGs on the GPU with its share for the hardware decoder (`fn.decoders.image_random_crop`, device "mixed": a
region-of-interest decode of the random resized crop), resizes, flips and normalises, and feeds the same model and
step as the ceiling. DALI is not a dependency of shardtrain: `pip install nvidia-dali-cuda130` (for torch's CUDA 13
builds; -cuda120 for CUDA 12).

Without a GPU (`device_id=None`) the pipeline decodes on the CPU: only for checking the pipeline, not a figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from common import iterator_rate
from pipelines.config import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from shards import idx_name, read_manifest

LABEL_BYTES = 8  # a `.cls` is the class index in ASCII digits; room for 10**8 classes


def train_tars(store: str) -> list[str]:
    return [str(Path(store) / shard.name) for shard in read_manifest(store).splits["train"].shards]


def pipeline(tars: list[str], batch: int, threads: int, device_id: int | None, hw_load: float, size: int = 224,
             seed: int = 0):
    """DALI's training pipeline over `tars`: (N,3,size,size) float images normalised as timm's, and each sample's
    `.cls` bytes padded to LABEL_BYTES (`labels` reads them)."""
    from nvidia.dali import fn, pipeline_def, types

    decode = {"device": "cpu"} if device_id is None else {"device": "mixed", "hw_decoder_load": hw_load}
    indexes = [str(Path(t).with_name(idx_name(Path(t).name))) for t in tars]  # convert's, in DALI's format

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, seed=seed, prefetch_queue_depth=2)
    def train():
        jpegs, cls = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=["jpg", "cls"],
                                           missing_component_behavior="error", random_shuffle=True,
                                           initial_fill=4 * batch, name="reader")
        images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=[0.08, 1.0],
                                               random_aspect_ratio=[3 / 4, 4 / 3], **decode)
        images = fn.resize(images, resize_x=size, resize_y=size)
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", mirror=fn.random.coin_flip(),
            mean=[255 * m for m in IMAGENET_DEFAULT_MEAN], std=[255 * s for s in IMAGENET_DEFAULT_STD],
        )
        return images, fn.pad(cls, fill_value=0, axes=[0], shape=[LABEL_BYTES])

    return train()


def labels(cls: torch.Tensor) -> torch.Tensor:
    """(N, LABEL_BYTES) zero-padded ASCII digits -> (N,) int64 class indices, on the tensors' device."""
    digits = cls.long() - ord("0")
    present = cls > 0
    places = present.sum(1, keepdim=True) - 1 - torch.arange(cls.shape[1], device=cls.device)
    return (digits * torch.pow(10, places.clamp(min=0)) * present).sum(1)


def batches(store: str, batch: int, threads: int, device_id: int | None, hw_load: float,
            seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches epoch after epoch (the last partial batch of each dropped, as our loader does)."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    pipe = pipeline(train_tars(store), batch, threads, device_id, hw_load, seed=seed)
    it = DALIGenericIterator([pipe], ["images", "cls"], reader_name="reader",
                             last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
    while True:
        for (out,) in it:
            images = out["images"]  # on the GPU; the labels are read on the CPU
            yield images, labels(out["cls"]).to(images.device, non_blocking=True)


def train_rate(store: str, step: Callable[[torch.Tensor, torch.Tensor], None], batch: int, threads: int,
               hw_load: float, warmup: int, steps: int) -> tuple[float, float]:
    """images/s of `step` fed by DALI on GPU 0, and the share of that time spent waiting for DALI's next batch."""
    data = batches(store, batch, threads, 0, hw_load)
    for _ in range(warmup):
        x, y = next(data)
        step(x.contiguous(memory_format=torch.channels_last), y)  # as the ceiling's batch: the same compiled graph
    torch.cuda.synchronize()
    waited, start = 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        x, y = next(data)
        waited += time.perf_counter() - t
        step(x.contiguous(memory_format=torch.channels_last), y)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    return batch * steps / total, waited / total


def input_rate(store: str, batch: int, threads: int, hw_load: float, warmup: int = 8, count: int = 40) -> float:
    """images/s of DALI's pipeline alone, no model: `count` batches after `warmup`."""
    return iterator_rate(batches(store, batch, threads, 0, hw_load), batch, warmup, count)
