"""decode: gpu. Workers send encoded bytes and crop boxes; the training process decodes the
batch with nvjpeg (`torchvision.io.decode_jpeg(..., device="cuda")`) and crops, resizes and
flips it with one `torchvision.ops.roi_align` per group of images, in a thread of its own one
batch ahead of the step (`run_ahead`). Without CUDA the same code decodes on the CPU, which is
how the tests run it.

Classification only. Colour jitter is not applied in this mode (crop, flip and resize are).
`data.decode: hw` (pipelines/hw.py) runs the same code with the hardware decoder's `decode_batch`.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.ops import roi_align

from pipelines.batches import BatchSpec
from pipelines.decode import probe_image
from pipelines.store import BadSample, RawSample

SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that exchange width and height
CANVAS_BYTES = 512 << 20  # float32 budget of one roi_align call's padded input
T = TypeVar("T")
U = TypeVar("U")


def random_resized_crop_box(w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop.get_params, on a numpy Generator: (x0, y0, x1, y1)."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    in_ratio = w / h  # fallback: central crop at the nearest allowed ratio
    cw, ch = (w, round(w / min(ratio))) if in_ratio < min(ratio) \
        else (round(h * max(ratio)), h) if in_ratio > max(ratio) else (w, h)
    x, y = (w - cw) // 2, (h - ch) // 2
    return x, y, x + cw, y + ch


def center_crop_box(w: int, h: int, crop_pct: float) -> tuple[float, float, float, float]:
    """Resize-shorter-side-to-size/crop_pct then centre-crop-size, as a box on the original."""
    side = min(w, h) * crop_pct
    x, y = (w - side) / 2, (h - side) / 2
    return x, y, x + side, y + side


def worker_batch(samples: list[RawSample], seeds: list[int], spec: BatchSpec) -> tuple[dict, list[BadSample]]:
    """The worker half: probe headers, draw crop boxes and flips; no pixel decoding.

    The encoded images travel as one flat uint8 tensor with their lengths: a DataLoader worker
    passes every tensor through a shared-memory segment of its own, and hundreds of small
    segments per batch cost more than decoding them does.
    """
    payload, orient, boxes, flips, labels, keys, bad = [], [], [], [], [], [], []
    for raw, seed in zip(samples, seeds):
        try:
            w, h, o = probe_image(raw.image)
        except Exception as e:  # unreadable header: a corrupt sample
            bad.append(BadSample(raw.shard, raw.key, f"cannot read {raw.ext} header: {type(e).__name__}: {e}"))
            continue
        if o in SWAPS_AXES:
            w, h = h, w
        rng = np.random.default_rng(seed)
        if spec.train:
            boxes.append(random_resized_crop_box(w, h, spec.aug.scale, spec.aug.ratio, rng))
            flips.append(bool(rng.random() < spec.aug.hflip))
        else:
            boxes.append(center_crop_box(w, h, spec.aug.eval_crop_pct))
            flips.append(False)
        payload.append(raw.image)
        orient.append(o)
        labels.append(raw.meta["cls"])
        keys.append((raw.shard, raw.key, raw.ext))
    batch = {
        "data": torch.frombuffer(bytearray().join(payload), dtype=torch.uint8) if payload
        else torch.zeros(0, dtype=torch.uint8),
        "length": torch.tensor([len(p) for p in payload], dtype=torch.int64),
        "orientation": torch.tensor(orient, dtype=torch.int64),
        "box": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "flip": torch.tensor(flips, dtype=torch.bool),
        "label": torch.tensor(labels, dtype=torch.int64),
        "keys": keys,
    }
    return batch, bad


def apply_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """EXIF orientation on a CHW tensor, matching PIL's ImageOps.exif_transpose."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:
        return img.flip(-1, -2).transpose(-1, -2)
    if orientation == 8:
        return torch.rot90(img, 1, (-2, -1))
    return img


def decode_one(data: torch.Tensor, ext: str, device: torch.device) -> torch.Tensor:
    if ext in ("jpg", "jpeg"):
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return decode_image(data, mode=ImageReadMode.RGB).to(device)  # png/webp: CPU decode


def decode_batch(data: list[torch.Tensor], keys: list[tuple[str, str, str]],
                 device: torch.device) -> list[torch.Tensor | Exception]:
    """Decode all JPEGs in one batched call; if one is corrupt, retry one by one to find it."""
    out: list[torch.Tensor | Exception] = [None] * len(data)  # type: ignore[list-item]  # every slot is filled below
    jpegs = [i for i, k in enumerate(keys) if k[2] in ("jpg", "jpeg")]
    try:
        images = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
        for i, img in zip(jpegs, images):
            out[i] = img
        todo = sorted(set(range(len(data))) - set(jpegs))
    except RuntimeError:
        todo = list(range(len(data)))
    for i in todo:
        try:
            out[i] = decode_one(data[i], keys[i][2], device)
        except RuntimeError as e:
            out[i] = e
    return out


_DECODE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


DecodeFn = Callable[[list[torch.Tensor], list[tuple[str, str, str]], torch.device], list[torch.Tensor | Exception]]


def decode_on_own_stream(data: list[torch.Tensor], keys: list[tuple[str, str, str]], device: torch.device,
                         decode: DecodeFn = decode_batch) -> list[torch.Tensor | Exception]:
    """`decode` (nvJPEG's `decode_batch`, or hw's) on CUDA, made safe against the hardware decoder.

    That decoder writes its outputs before the work already queued on its stream has run
    (pytorch/vision#9606), so on the training stream it can overwrite memory a queued kernel
    still reads (seen here as NaN losses under torch.compile). On a stream of its own that we
    drain first, nothing is queued ahead of it; `record_stream` keeps the caching allocator
    from handing its outputs to the decoder again before the training stream is done with them.
    """
    if device.type != "cuda":
        return decode(data, keys, device)
    stream = _DECODE_STREAMS.setdefault(device, torch.cuda.Stream(device))
    consumer = torch.cuda.current_stream(device)
    stream.synchronize()  # waits for this stream's own last decode only, never for the training step
    with torch.cuda.stream(stream):
        out = decode(data, keys, device)
    consumer.wait_stream(stream)
    for img in out:
        if isinstance(img, torch.Tensor):
            img.record_stream(consumer)
    return out


def crop_resize(images: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each box and resize it to size x size (bilinear, averaging when shrinking),
    in as few roi_align calls as fit CANVAS_BYTES of padded float input."""
    out = []
    start = 0
    while start < len(images):
        stop, h, w = start, 0, 0
        while stop < len(images):
            nh, nw = max(h, images[stop].shape[1]), max(w, images[stop].shape[2])
            if stop > start and (stop - start + 1) * 3 * nh * nw * 4 > CANVAS_BYTES:
                break
            h, w, stop = nh, nw, stop + 1
        canvas = images[start].new_zeros((stop - start, 3, h, w), dtype=torch.float32)
        for i in range(start, stop):
            canvas[i - start, :, : images[i].shape[1], : images[i].shape[2]] = images[i]
        idx = torch.arange(stop - start, dtype=torch.float32, device=canvas.device)[:, None]
        rois = torch.cat([idx, boxes[start:stop].to(canvas.device)], dim=1)
        out.append(roi_align(canvas, rois, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True))
        start = stop
    return torch.cat(out) if out else torch.zeros((0, 3, size, size))


def device_batch(batch: dict, size: int, device: torch.device,
                 decode: DecodeFn = decode_batch) -> tuple[dict, list[BadSample]]:
    """The device half: decode (nvJPEG's `decode_batch`, or hw's), orient, crop+resize, flip. Returns float
    0..255 images and labels on the device. The small tensors go over from the batch's pinned memory: a copy
    from pageable memory would wait for the training step queued before it."""
    data = list(batch["data"].split(batch["length"].tolist()))
    decoded = decode_on_own_stream(data, batch["keys"], device, decode)
    keep = [i for i, img in enumerate(decoded) if isinstance(img, torch.Tensor)]
    bad = [BadSample(key[0], key[1], f"cannot decode: {img}")
           for key, img in zip(batch["keys"], decoded) if isinstance(img, Exception)]
    orientation = batch["orientation"].tolist()
    images = [apply_orientation(img, orientation[i]) for i, img in enumerate(decoded) if isinstance(img, torch.Tensor)]
    rows = slice(None) if len(keep) == len(decoded) else torch.tensor(keep, device=device)
    box, flip, label = (batch[k].to(device, non_blocking=True)[rows] for k in ("box", "flip", "label"))
    out = crop_resize(images, box, size)
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return {"image": out, "label": label}, bad


def tensors(tree) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from tensors(item)


def run_ahead(items: Iterable[T], fn: Callable[[T], U], device: torch.device, depth: int = 2) -> Iterator[U]:
    """`fn` over `items`, in order, computed up to `depth` items ahead in a thread of this process.

    With the GPU decode in that thread, the training loop launches step i while batch i+1 decodes:
    torchvision's nvJPEG call blocks its caller until the decode is done, and done inline that wait
    left the GPU idle. On CUDA the thread works on a stream of its own; each result is handed over
    with an event the consumer's stream waits for, and its tensors are recorded on that stream so
    that the caching allocator keeps them until the consumer is done with them.
    """
    results: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def put(item) -> None:
        while not stop.is_set():  # a consumer that left takes nothing more
            try:
                return results.put(item, timeout=0.1)
            except queue.Full:
                pass

    def work() -> None:
        try:
            with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                for item in items:
                    if stop.is_set():
                        return
                    out = fn(item)
                    event = stream.record_event() if stream else None
                    put((out, event))
        except BaseException as e:  # handed to the consumer, raised there
            put(e)
        put(done)

    thread = threading.Thread(target=work, name="shardtrain-gpu-decode", daemon=True)
    thread.start()
    try:
        while (got := results.get()) is not done:
            if isinstance(got, BaseException):
                raise got
            out, event = got
            if event is not None:
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(event)
                for t in tensors(out):
                    if t.is_cuda:
                        t.record_stream(consumer)
            yield out
    finally:
        stop.set()
        thread.join()
