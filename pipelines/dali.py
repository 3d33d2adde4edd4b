"""decode: dali. Classification's device half run by NVIDIA DALI's engine (`pip install 'shardtrain[dali]'`).

The loader keeps what it owns: which samples, their order, exact resume, the crop boxes, flips and colour jitter its
seeded workers draw (`gpu.worker_batch`; the jitter applied after DALI, as `gpu` mode does) and the samples it
rejects. Only the per-image work of the training process moves into DALI's C++ threads, where `gpu`/`hw` mode run it
in Python under the GIL: per batch, a DALI pipeline takes the workers' encoded bytes (`fn.external_source`, numpy
views of the batch's pinned buffer, not copied), decodes only each image's crop region (`fn.decoders.image_slice`,
device "mixed" with its hardware-decoder share on a GPU, "cpu" with `device_id=None`), resizes it to S x S
(`fn.resize`, the sub-pixel box as its ROI, float output; linear when enlarging, DALI's antialiased Gaussian when
shrinking: the nearest of DALI's filters to roi_align's averaged bilinear samples, about half the difference of its
default antialiased linear one, which blurs more) and flips it (`fn.crop_mirror_normalize`, float CHW 0..255). The
result is copied into a torch tensor on the caller's stream (`feed_ndarray`, after the event DALI's outputs are
bound to): the caller is `gpu.run_ahead`'s thread, which hands it to the training stream with an event, so neither
thread waits for DALI's work. Two batches are in DALI at once (`Ahead`): each is fed and scheduled before the
outputs of the one before it are taken, so that its CPU, decoder and GPU stages overlap across batches.

EXIF orientation: the boxes are drawn on the oriented image (as for every decoder). DALI decodes the stored pixels
(`adjust_orientation=False`); the box is mapped onto them (`stored_box`), and the S x S crop is oriented afterwards
(then flipped) in torch, for the rare images that carry an orientation.

Differences from `gpu.device_batch` (roi_align, averaging bilinear samples when shrinking): DALI's shrinking
filter and its JPEG decoder's IDCT/upsampling; the crop reads no pixels outside the box's whole-pixel hull
(roi_align reads one more). tests/test_pipelines_dali.py states the difference measured on real photos.

Images DALI's decoder cannot decode make its whole batch fail: that batch is decoded image by image on the CPU
(`gpu.decode_one`) and cropped by `gpu.device_batch`, and the batch in flight behind it goes to a new pipeline; the
images that fail there too are corrupt samples (BadSample: skipped and counted, or the run's error, by
`data.on_error`). Non-JPEG samples (PNG, WebP) DALI decodes
itself off the hardware decoder. Both are counted in `FALLBACKS` and reported at the 1st, 10th, 100th, ... of them.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines import gpu, hw
from pipelines.batches import BatchSpec
from pipelines.store import BadSample

JPEG_EXTS = ("jpg", "jpeg")
THREADS = 4  # DALI's CPU threads per pipeline: the host side of its mixed decoder, and the JPEGs off the engines
HW_DECODER_LOAD = 0.9  # the share of the JPEGs that DALI's mixed decoder gives the hardware decoder
FALLBACKS: Counter[str] = Counter()  # images of this process not decoded by DALI's JPEG path, by reason


@functools.cache
def unavailable(device: torch.device) -> str | None:
    """Why data.decode=dali cannot run on `device`, or None where it can."""
    return hw.extra_missing(device, "nvidia.dali.plugin.pytorch", "NVIDIA DALI", "dali")


def describe(device: torch.device) -> str:
    import nvidia.dali

    return f"NVIDIA DALI {nvidia.dali.__version__} on {torch.cuda.get_device_name(device)}"


@dataclass
class Pipe:
    """One DALI pipeline, built for batches of up to `capacity` images, fed by one stream of batches at a time."""

    pipe: Any
    capacity: int
    size: int
    dev: int | None
    primed: bool = False  # its first run, which schedules PREFETCH iterations, has been made


PREFETCH = 2  # iterations in DALI at once: the next batch is fed and scheduled before this one's outputs are taken
_FREE: list[Pipe] = []  # built pipelines with nothing in flight, for the next stream of batches on their device
_FREE_LOCK = threading.Lock()


def device_id(device: torch.device) -> int | None:
    """DALI's device_id for a torch device: None (CPU operators only) for the CPU."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def build(capacity: int, size: int, dev: int | None):
    """The pipeline: encoded bytes + whole-pixel slice (start, end: (x, y)) + sub-pixel ROI within it (roi_start,
    roi_end: (y, x)) + mirror flag per sample -> float 0..255 (3, size, size)."""
    from nvidia.dali import fn, pipeline_def, types

    decode = {"device": "cpu"} if dev is None else {"device": "mixed", "hw_decoder_load": HW_DECODER_LOAD}

    @pipeline_def(batch_size=capacity, num_threads=THREADS, device_id=dev, prefetch_queue_depth=PREFETCH)
    def crops():
        data = fn.external_source(name="data", dtype=types.UINT8, ndim=1, no_copy=True)
        start = fn.external_source(name="start", dtype=types.INT32, ndim=1)
        end = fn.external_source(name="end", dtype=types.INT32, ndim=1)
        roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
        roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
        mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
        images = fn.decoders.image_slice(data, start=start, end=end, axis_names="WH", output_type=types.RGB,
                                         adjust_orientation=False, **decode)
        images = fn.resize(images, size=[size, size], roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                           mag_filter=types.INTERP_LINEAR, min_filter=types.INTERP_GAUSSIAN, antialias=True,
                           dtype=types.FLOAT)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror)

    pipe = crops()
    pipe.build()
    return pipe


def take_pipe(capacity: int, size: int, dev: int | None) -> Pipe:
    """A free pipeline for (dev, size) that holds `capacity` images, or a new one."""
    with _FREE_LOCK:
        for i, pipe in enumerate(_FREE):
            if (pipe.dev, pipe.size) == (dev, size) and pipe.capacity >= capacity:
                return _FREE.pop(i)
    return Pipe(build(capacity, size, dev), capacity, size, dev)


def give_back(pipe: Pipe) -> None:
    """A pipeline with nothing in flight, free for the next stream of batches."""
    with _FREE_LOCK:
        _FREE.append(pipe)


def stored_box(box: tuple[float, float, float, float], orientation: int, w: int, h: int
               ) -> tuple[float, float, float, float]:
    """A box (x0, y0, x1, y1) drawn on the oriented image of size w x h, as a box on the stored pixels that
    `gpu.apply_orientation` turns into that image."""
    x0, y0, x1, y1 = box
    if orientation == 2:
        return w - x1, y0, w - x0, y1
    if orientation == 3:
        return w - x1, h - y1, w - x0, h - y0
    if orientation == 4:
        return x0, h - y1, x1, h - y0
    if orientation == 5:
        return y0, x0, y1, x1
    if orientation == 6:
        return y0, w - x1, y1, w - x0
    if orientation == 7:
        return h - y1, w - x1, h - y0, w - x0
    if orientation == 8:
        return h - y1, x0, h - y0, x1
    return box


def slices(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N,4) float boxes (x0, y0, x1, y1) on the stored pixels -> each image's whole-pixel slice (start, end as
    (x, y), int32) and the box within the slice (roi_start, roi_end as (y, x), float32)."""
    lo = np.floor(boxes[:, :2]).astype(np.int64)
    hi = np.maximum(np.ceil(boxes[:, 2:]).astype(np.int64), lo + 1)
    roi_start = (boxes[:, :2] - lo)[:, ::-1]
    roi_end = (boxes[:, 2:] - lo)[:, ::-1]
    return (lo.astype(np.int32), hi.astype(np.int32), np.ascontiguousarray(roi_start, np.float32),
            np.ascontiguousarray(roi_end, np.float32))


def count(reason: str, n: int = 1) -> None:
    hw.count_fallbacks(FALLBACKS, reason, n, "data.decode=dali: {total} image(s) off DALI's JPEG path ({reasons})")


def decode_on_cpu(data: list[torch.Tensor], keys: list[tuple[str, str, str]],
                  slots: list[torch.Tensor]) -> list[Exception | None]:
    """Each image decoded on the CPU into its canvas slot; an error in its place where it cannot be."""
    return [gpu.decode_on_cpu_into(slot, image, key[2]) for image, key, slot in zip(data, keys, slots)]


def inputs(batch: dict) -> dict[str, Any]:
    """The pipeline's inputs for a worker batch: each image a view of the batch's pinned buffer, its box on the
    stored pixels as a whole-pixel slice and a sub-pixel ROI within it, and its mirror flag."""
    lengths = batch["length"].tolist()
    flat = batch["data"].numpy()  # the pinned buffer itself: each image a view of it
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    data = [flat[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    boxes = batch["box"].numpy().astype(np.float64)
    orientation, stored = batch["orientation"].numpy(), batch["size"].tolist()
    for i in np.flatnonzero(orientation != 1).tolist():  # rare
        h, w = stored[i]
        ow, oh = (h, w) if orientation[i] in gpu.SWAPS_AXES else (w, h)
        boxes[i] = stored_box(tuple(boxes[i]), int(orientation[i]), ow, oh)
    start, end, roi_start, roi_end = slices(boxes)
    flip = batch["flip"].numpy().astype(bool)
    mirror = (flip & (orientation == 1)).astype(np.int32)  # the oriented ones are flipped after their orientation
    return {"data": data, "start": start, "end": end, "roi_start": roi_start, "roi_end": roi_end, "mirror": mirror}


def oriented(images: torch.Tensor, batch: dict) -> torch.Tensor:
    """DALI's crops of the stored pixels with each image's EXIF orientation applied, then its flip."""
    flip = batch["flip"].tolist()
    orientation = batch["orientation"].tolist()
    for i in [i for i, o in enumerate(orientation) if o != 1]:
        crop = gpu.apply_orientation(images[i], orientation[i])
        images[i] = crop.flip(-1) if flip[i] else crop.clone()  # a transposed view of images[i] itself: copied first
    return images


@dataclass
class Fed:
    """A batch given to the pipeline, its outputs not taken yet; `ok` False where DALI failed on it."""

    batch: dict
    spec: BatchSpec
    ok: bool = True


class Ahead:
    """Worker batches through one DALI pipeline, up to PREFETCH of them in flight: each is fed and scheduled before
    the outputs of the one before it are taken, so that DALI's CPU, decoder and GPU stages overlap across batches
    and the caller never waits for a batch's work to finish (the outputs are taken onto the caller's stream)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.dev = device_id(device)
        self.pipe: Pipe | None = None
        self.fed: deque[Fed] = deque()

    def fits(self, batch: dict, spec: BatchSpec) -> bool:
        return self.pipe is None or (spec.size == self.pipe.size and len(batch["keys"]) <= self.pipe.capacity)

    def put(self, entry: Fed) -> None:
        if self.pipe is None:
            self.pipe = take_pipe(len(entry.batch["keys"]), entry.spec.size, self.dev)
        self.fed.append(entry)
        pipe, named = self.pipe, inputs(entry.batch)
        try:
            # DALI's first run of a pipeline schedules PREFETCH iterations, each needing its inputs: this batch's,
            # all but the last one's outputs dropped
            for _ in range(1 if pipe.primed else PREFETCH):
                for name, value in named.items():
                    pipe.pipe.feed_input(name, value)
            pipe.pipe.schedule_run()
            for _ in range(0 if pipe.primed else PREFETCH - 1):
                pipe.pipe.outputs()
            pipe.primed = True
        except RuntimeError:  # DALI's operator errors: an image it cannot decode fails its whole batch
            self.failed(entry)

    def failed(self, entry: Fed) -> None:
        """DALI failed on `entry`'s batch: it goes to the CPU, and the other batches in flight in the pipeline, which
        is not used again, are fed to a new one."""
        entry.ok, self.pipe, again = False, None, list(self.fed)
        self.fed.clear()
        for other in again:
            if other.ok:
                self.put(other)
            else:
                self.fed.append(other)

    def take(self) -> tuple[dict, list[BadSample]]:
        """The first fed batch, as `gpu.device_batch` returns it: float 0..255 (N,3,S,S) images and their labels on
        the device, and the samples that could not be decoded."""
        entry = self.fed.popleft()
        images = self.outputs(entry) if entry.ok else None
        if images is None:
            count("in a batch DALI could not decode (decoded on the CPU)", len(entry.batch["keys"]))
            return gpu.device_batch(entry.batch, entry.spec, self.device, decode=decode_on_cpu)
        label = entry.batch["label"].to(self.device, non_blocking=True)
        return {"image": gpu.classify_colour(oriented(images, entry.batch), entry.batch), "label": label}, []

    def outputs(self, entry: Fed) -> torch.Tensor | None:
        """The batch's crops, copied onto the caller's stream; None where DALI failed on it."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        assert self.pipe is not None
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            (images,) = self.pipe.pipe.outputs(stream)
        except RuntimeError:
            self.failed(entry)
            return None
        n, size = len(entry.batch["keys"]), self.pipe.size
        out = torch.empty((n, 3, size, size), dtype=torch.float32, device=self.device)
        feed_ndarray(images.as_tensor(), out, cuda_stream=stream)  # ordered after DALI's work by the outputs' event
        return out

    def close(self) -> None:
        """Give the pipeline back where nothing of it is in flight (a stream left midway drops it)."""
        if self.pipe is not None and not self.fed:
            give_back(self.pipe)
        self.pipe = None


def device_batches(batches: Iterable[tuple[dict, BatchSpec]], device: torch.device
                   ) -> Iterator[tuple[dict, list[BadSample]]]:
    """Classification's device half by DALI over a stream of (worker batch, spec), in order, as `gpu.device_batch`
    returns each: float 0..255 (N,3,S,S) images and their labels on `device`, and the samples that could not be
    decoded."""
    ahead = Ahead(device)
    try:
        for batch, spec in batches:
            others = Counter(key[2] for key in batch["keys"] if key[2] not in JPEG_EXTS)
            for ext, k in others.items():
                count(f"{ext} is not a JPEG (decoded by DALI off the hardware decoder)", k)
            if not batch["keys"] or not ahead.fits(batch, spec):  # the batches in flight first
                while ahead.fed:
                    yield ahead.take()
                ahead.close()
            if not batch["keys"]:
                yield {"image": torch.zeros((0, 3, spec.size, spec.size), device=device),
                       "label": batch["label"].to(device)}, []
                continue
            ahead.put(Fed(batch, spec))
            if len(ahead.fed) == PREFETCH:
                yield ahead.take()
        while ahead.fed:
            yield ahead.take()
    finally:
        ahead.close()
