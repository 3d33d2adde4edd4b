"""decode: gpu. Workers send encoded bytes, their sizes and crop boxes; the training process decodes the
batch with nvjpeg (`torchvision.io.decode_jpeg(..., device="cuda")`) into one padded canvas and crops, resizes
and flips it with one `torchvision.ops.roi_align` per crop size, in a thread of its own one batch ahead of the
step (`run_ahead`). Without CUDA the same code decodes on the CPU, which is how the tests run it.

Classification: crop, flip and resize, then the colour jitter its worker drew. DINO: every view of an image is cropped
from its one decode, then flipped, colour-jittered, greyed, blurred and solarized with the parameters its
worker drew (`pipelines/gpu_color.py`), as `presets.dino_views` does in the CPU workers.
`data.decode: hw` (pipelines/hw.py) runs the same code with the hardware decoder's `decode_batch`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from pipelines import gpu_color, presets
from pipelines.batches import BatchSpec
from pipelines.decode import probe_image
from pipelines.store import BadSample, RawSample

SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that exchange width and height
CANVAS_BYTES = 1 << 30  # float32 budget of one canvas: 256 photos of up to 500x500 in one (one decode call)
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


Draw = Callable[[int, int, int], dict[str, np.ndarray]]  # (width, height, seed) -> one image's parameters


def encoded_batch(samples: list[RawSample], seeds: list[int],
                  draw: Draw) -> tuple[dict, list[RawSample], list[BadSample]]:
    """The worker half: probe headers and draw each image's parameters (`draw`, from its oriented size and its
    seed); no pixel decoding. Returns the batch, the samples in it and the unreadable ones.

    The stored (h, w) of each image travels with it: the device half lays out its canvas before decoding.
    The encoded images travel as one flat uint8 tensor with their lengths: a DataLoader worker
    passes every tensor through a shared-memory segment of its own, and hundreds of small
    segments per batch cost more than decoding them does.
    """
    payload, stored, orient, drawn, good, bad = [], [], [], [], [], []
    for raw, seed in zip(samples, seeds):
        try:
            w, h, o = probe_image(raw.image)
        except Exception as e:  # unreadable header: a corrupt sample
            bad.append(BadSample(raw.shard, raw.key, f"cannot read {raw.ext} header: {type(e).__name__}: {e}"))
            continue
        stored.append((h, w))
        if o in SWAPS_AXES:
            w, h = h, w
        drawn.append(draw(w, h, seed))
        payload.append(raw.image)
        orient.append(o)
        good.append(raw)
    template = drawn[0] if drawn else draw(1, 1, 0)  # gives an empty batch its fields' shapes
    batch = {
        "data": torch.frombuffer(bytearray().join(payload), dtype=torch.uint8) if payload
        else torch.zeros(0, dtype=torch.uint8),
        "length": torch.tensor([len(p) for p in payload], dtype=torch.int64),
        "size": torch.tensor(stored, dtype=torch.int64).reshape(-1, 2),  # (h, w) of the stored pixels
        "orientation": torch.tensor(orient, dtype=torch.int64),
        **{key: torch.from_numpy(np.stack([d[key] for d in drawn]) if drawn
                                 else np.zeros((0, *value.shape), value.dtype)) for key, value in template.items()},
        "keys": [(raw.shard, raw.key, raw.ext) for raw in good],
    }
    return batch, good, bad


def jitter_draw(strengths: tuple[float, float, float, float], rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """ColorJitter's factors (brightness, contrast, saturation, hue) for `strengths` in those ranges, and the order
    of its four ops (random per image, as albumentations and torchvision apply them)."""
    b, c, s, hue = strengths
    factors = [rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
               rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-hue, hue)]
    return np.array(factors, np.float32), rng.permutation(4).astype(np.int64)


def classify_draw(spec: BatchSpec, w: int, h: int, seed: int) -> dict[str, np.ndarray]:
    """A crop box and a flip; in training with `augment.color_jitter`, its factors and order too (the preset's
    ColorJitter, on every image)."""
    if not spec.train:
        return {"box": np.array(center_crop_box(w, h, spec.aug.eval_crop_pct), np.float32), "flip": np.array(False)}
    rng = np.random.default_rng(seed)
    box = random_resized_crop_box(w, h, spec.aug.scale, spec.aug.ratio, rng)
    drawn = {"box": np.array(box, np.float32), "flip": np.array(rng.random() < spec.aug.hflip)}
    if cj := spec.aug.color_jitter:
        drawn["factors"], drawn["order"] = jitter_draw((cj, cj, cj, 0.0), rng)
    return drawn


def classify_colour(images: torch.Tensor, batch: dict, rows: list[int] | None = None) -> torch.Tensor:
    """The worker batch's colour jitter, where it drew one, on its decoded images (`rows`: the batch's images
    they are, None for all)."""
    if "factors" not in batch:
        return images
    factors, order = (batch[k] if rows is None else batch[k][rows] for k in ("factors", "order"))
    return gpu_color.jitter(images, order, factors, torch.ones(len(order), dtype=torch.bool))


def worker_batch(samples: list[RawSample], seeds: list[int], spec: BatchSpec) -> tuple[dict, list[BadSample]]:
    """Classification's worker half: a crop box and a flip (and colour jitter) per image, and its label."""
    batch, good, bad = encoded_batch(samples, seeds, functools.partial(classify_draw, spec))
    batch["label"] = torch.tensor([raw.meta["cls"] for raw in good], dtype=torch.int64)
    return batch, bad


def dino_view_params(view: presets.DinoView, hflip: float, w: int, h: int,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One view's crop box, flip and colour parameters, with `_dino_view`'s probabilities and ranges. The jitter
    factors and order are drawn whether or not the jitter applies, and so is sigma: the same draws every time."""
    box = random_resized_crop_box(w, h, view.scale, presets.DINO_RATIO, rng)
    flip = rng.random() < hflip
    jitter = rng.random() < presets.DINO_JITTER_P
    factors, order = jitter_draw(presets.DINO_JITTER, rng)
    gray = rng.random() < presets.DINO_GRAY_P
    sigma = rng.uniform(*presets.DINO_SIGMA)
    blur = rng.random() < view.blur
    solarize = rng.random() < view.solarize
    return {"box": np.array(box, np.float32), "flip": np.array(flip), "jitter": np.array(jitter),
            "factors": factors, "order": order, "gray": np.array(gray),
            "sigma": np.array(sigma if blur else 0.0, np.float32), "solarize": np.array(solarize)}


def dino_draw(spec: BatchSpec, w: int, h: int, seed: int) -> dict[str, np.ndarray]:
    """Every view's parameters, (views, ...) per field; view v draws from seed * 131 + v as `dino_batch` does."""
    views = [dino_view_params(view, spec.aug.hflip, w, h, np.random.default_rng(seed * 131 + v))
             for v, view in enumerate(presets.dino_view_specs(spec.size, spec.aug))]
    return {key: np.stack([v[key] for v in views]) for key in views[0]}


def dino_worker_batch(samples: list[RawSample], seeds: list[int], spec: BatchSpec) -> tuple[dict, list[BadSample]]:
    """DINO's worker half: every view's crop box, flip and colour parameters per image."""
    batch, _, bad = encoded_batch(samples, seeds, functools.partial(dino_draw, spec))
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


def put(slot: torch.Tensor, image: torch.Tensor | Exception) -> Exception | None:
    """A decoded (3, h, w) image copied into its canvas slot ((h, w, 3), the size its header gave the worker), or
    why not."""
    if isinstance(image, Exception):
        return image
    if image.shape[1:] != slot.shape[:2]:
        (h, w), (sh, sw) = image.shape[1:], slot.shape[:2]
        return RuntimeError(f"decoded {w}x{h}, its header says {sw}x{sh}")
    slot.copy_(image.permute(1, 2, 0))
    return None


def decode_on_cpu_into(slot: torch.Tensor, data: torch.Tensor, ext: str) -> Exception | None:
    """One image decoded on the CPU and copied into its slot (a PNG, or a JPEG another decoder refused), or why
    not."""
    try:
        return put(slot, decode_one(data, ext, torch.device("cpu")).to(slot.device))
    except RuntimeError as e:
        return e


def decode_batch(data: list[torch.Tensor], keys: list[tuple[str, str, str]],
                 slots: list[torch.Tensor]) -> list[Exception | None]:
    """nvJPEG (on the slots' device) or libjpeg (on the CPU): every JPEG in one batched call, one by one if that
    fails to find the corrupt one; PNG and WebP on the CPU. Each image is copied into its slot."""
    device = slots[0].device if slots else torch.device("cpu")
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
    return [put(slot, image) for slot, image in zip(slots, out)]


_DECODE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


# decode(encoded images, their keys, their canvas slots): writes each image into its slot; None per image written,
# else why not
DecodeFn = Callable[[list[torch.Tensor], list[tuple[str, str, str]], list[torch.Tensor]], list[Exception | None]]


def decode_canvas(data: list[torch.Tensor], keys: list[tuple[str, str, str]], stored: list[tuple[int, int]],
                  shape: tuple[int, int], device: torch.device,
                  decode: DecodeFn) -> tuple[torch.Tensor, list[Exception | None]]:
    """The images decoded into one uint8 (N, H, W, 3) canvas of `shape` (H, W), each at its top left at its stored
    size: a decoder writes them there itself (hw), no copy op per image. The padding is left as it was: only a
    pixel past each edge is ever read, and `replicate_edges` writes it."""
    canvas = torch.empty((len(data), *shape, 3), dtype=torch.uint8, device=device)
    return canvas, decode(data, keys, [canvas[i, :h, :w] for i, (h, w) in enumerate(stored)])


def decode_on_own_stream(device: torch.device, fill: Callable[[], U]) -> U:
    """`fill()` (a decode and the memory it writes) on CUDA, made safe against the hardware decoder.

    That decoder writes its outputs before the work already queued on its stream has run
    (pytorch/vision#9606), so on the training stream it can overwrite memory a queued kernel
    still reads (seen here as NaN losses under torch.compile). On a stream of its own that we
    drain first, nothing is queued ahead of it; `record_stream` keeps the caching allocator
    from handing its outputs to the decoder again before the current stream is done with them.
    """
    if device.type != "cuda":
        return fill()
    stream = _DECODE_STREAMS.setdefault(device, torch.cuda.Stream(device))
    consumer = torch.cuda.current_stream(device)
    stream.synchronize()  # waits for this stream's own last decode only, never for the training step
    with torch.cuda.stream(stream):
        out = fill()
    consumer.wait_stream(stream)
    for t in tensors(out):
        t.record_stream(consumer)
    return out


def turn_upright(canvas: torch.Tensor, stored: list[tuple[int, int]], orientation: list[int]) -> None:
    """Each image with an EXIF orientation turned in its slot (sized for both ways round), as PIL's
    exif_transpose: the crop boxes were drawn on the upright image. Rare in photo sets: an op or two an image."""
    for i, o in enumerate(orientation):
        if o not in (0, 1):
            h, w = stored[i]
            upright = apply_orientation(canvas[i, :h, :w].permute(2, 0, 1).clone(), o)
            canvas[i, : upright.shape[1], : upright.shape[2]] = upright.permute(1, 2, 0)


def replicate_edges(canvas: torch.Tensor, sizes: torch.Tensor) -> None:
    """Repeat each image's last column, then its last row, once into the canvas's padding.

    roi_align interpolates a sample point past the last pixel centre (x in (W-1, W]) with the next column; on the
    lone image it clamps to the edge, on the canvas that column would be padding and tint every crop that reaches
    the right or bottom edge. One pixel is all a bilinear sample can reach past the edge. Two gathers and two
    scatters for the whole canvas, not ops per image: the decode thread launches every op.
    canvas: (N,3,H,W); sizes: (N,2) each image's (h, w), on the canvas's device. An image that fills the canvas in
    a dimension copies its edge onto itself there."""
    n, c, h, w = canvas.shape
    ih, iw = (sizes[:, k].view(n, 1, 1, 1) for k in (0, 1))
    column = canvas.gather(3, (iw - 1).expand(n, c, h, 1))
    canvas.scatter_(3, iw.clamp(max=w - 1).expand(n, c, h, 1), column)
    row = canvas.gather(2, (ih - 1).expand(n, c, 1, w))
    canvas.scatter_(2, ih.clamp(max=h - 1).expand(n, c, 1, w), row)


def canvas_spans(slots: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs of consecutive images whose padded float canvas fits CANVAS_BYTES, from each slot's (h, w); an image
    too big alone gets its own."""
    spans, start = [], 0
    while start < len(slots):
        stop, h, w = start, 0, 0
        while stop < len(slots):
            nh, nw = max(h, slots[stop][0]), max(w, slots[stop][1])
            if stop > start and (stop - start + 1) * 3 * nh * nw * 4 > CANVAS_BYTES:
                break
            h, w, stop = nh, nw, stop + 1
        spans.append((start, stop))
        start = stop
    return spans


def crop_resize(canvas: torch.Tensor, crops: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """For each (boxes, size) of `crops`, each image's boxes ((N, V, 4): V per image) cut from the float (N, 3, H, W)
    canvas (edges replicated) and resized to size x size (bilinear, averaging when shrinking): (N, V, 3, size,
    size), one roi_align per size."""
    out = []
    for boxes, size in crops:
        n, views = boxes.shape[:2]
        idx = torch.arange(n, dtype=torch.float32, device=canvas.device).repeat_interleave(views)
        rois = torch.cat([idx[:, None], boxes.reshape(-1, 4).to(canvas.device)], dim=1)
        # The op itself, not `torchvision.ops.roi_align`: under deterministic algorithms on CUDA that swaps in
        # a torch.compiled version (for its backward; we take none), whose compile in this thread fails while
        # the main thread compiles the step ("FX to symbolically trace a dynamo-optimized function").
        out.append(torch.ops.torchvision.roi_align(canvas, rois, 1.0, size, size, 0, True).unflatten(0, (n, views)))
    return out


def decoded_crops(batch: dict, crops: list[tuple[torch.Tensor, int]], device: torch.device,
                  decode: DecodeFn) -> tuple[list[torch.Tensor], list[int], list[BadSample]]:
    """A worker batch's images decoded (nvJPEG's `decode_batch`, or hw's) into padded canvases on `device`, turned
    upright, and for each (boxes (N, V, 4) on `device`, size) of `crops` their boxes cut and resized: float 0..255
    (kept, V, 3, size, size). Also the positions of the images that decoded, and the samples that did not.

    Each canvas holds as many images as fit CANVAS_BYTES of float input (a batch of ImageNet-size photos: one),
    laid out from the sizes the workers read in the headers, and is decoded into, turned, converted to float and
    edged once for all crop sizes."""
    data, keys = list(batch["data"].split(batch["length"].tolist())), batch["keys"]
    stored, orientation = [tuple(s) for s in batch["size"].tolist()], batch["orientation"].tolist()
    upright = [(w, h) if o in SWAPS_AXES else (h, w) for (h, w), o in zip(stored, orientation)]
    slots = [(max(a[0], b[0]), max(a[1], b[1])) for a, b in zip(stored, upright)]
    parts: list[list[torch.Tensor]] = [[] for _ in crops]
    failed: list[Exception | None] = []
    for start, stop in canvas_spans(slots):
        shape = (max(h for h, _ in slots[start:stop]), max(w for _, w in slots[start:stop]))
        canvas, errors = decode_on_own_stream(device, functools.partial(
            decode_canvas, data[start:stop], keys[start:stop], stored[start:stop], shape, device, decode))
        turn_upright(canvas, stored[start:stop], orientation[start:stop])
        x = canvas.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        replicate_edges(x, gpu_color.upload(torch.tensor(upright[start:stop]), device))
        for out, cut in zip(parts, crop_resize(x, [(boxes[start:stop], size) for boxes, size in crops])):
            out.append(cut)
        failed += errors
    keep = [i for i, error in enumerate(failed) if error is None]
    bad = [BadSample(key[0], key[1], f"cannot decode: {error}") for key, error in zip(keys, failed) if error]
    whole = [torch.cat(out) if out else torch.zeros((0, boxes.shape[1], 3, size, size), device=device)
             for out, (boxes, size) in zip(parts, crops)]
    if len(keep) < len(failed):
        rows = gpu_color.upload(torch.tensor(keep), device)
        whole = [x[rows] for x in whole]
    return whole, keep, bad


def device_batch(batch: dict, spec: BatchSpec, device: torch.device,
                 decode: DecodeFn = decode_batch) -> tuple[dict, list[BadSample]]:
    """Classification's device half: decode, orient, crop+resize, flip, colour jitter. Returns float 0..255 images
    and labels on the device. The small tensors go over from the batch's pinned memory: a copy from pageable
    memory would wait for the training step queued before it."""
    box = batch["box"].to(device, non_blocking=True)
    (out,), keep, bad = decoded_crops(batch, [(box[:, None], spec.size)], device, decode)
    whole = len(keep) == len(batch["keys"])
    rows = slice(None) if whole else gpu_color.upload(torch.tensor(keep), device)
    flip, label = (batch[k].to(device, non_blocking=True)[rows] for k in ("flip", "label"))
    out = torch.where(flip[:, None, None, None], out[:, 0].flip(-1), out[:, 0])
    return {"image": classify_colour(out, batch, None if whole else keep), "label": label}, bad


def on_rows(x: torch.Tensor, mask: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """x[rows] = fn(x[rows], rows) for the rows set in `mask` (on the CPU: no device sync to find them)."""
    rows = mask.nonzero().squeeze(1)
    if len(rows):
        on_device = gpu_color.upload(rows, x.device)
        x[on_device] = fn(x[on_device], rows)


def dino_augment(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Flip, colour jitter (its four ops in each image's own order), grey, blur and solarize, each on the images
    drawn for it, in `presets._dino_view`'s order. x: float 0..255 (M,3,S,S); p: the M images' parameters."""
    on_rows(x, p["flip"], lambda imgs, _: imgs.flip(-1))
    x = gpu_color.jitter(x, p["order"], p["factors"], p["jitter"])
    on_rows(x, p["gray"], lambda imgs, _: gpu_color.gray(imgs))
    on_rows(x, p["sigma"] > 0, lambda imgs, r: gpu_color.gaussian_blur(imgs, p["sigma"][r]))
    on_rows(x, p["solarize"], lambda imgs, _: gpu_color.solarize(imgs))
    return x


DINO_PARAMS = ("box", "flip", "jitter", "factors", "order", "gray", "sigma", "solarize")


def dino_device_batch(batch: dict, spec: BatchSpec, device: torch.device,
                      decode: DecodeFn = decode_batch) -> tuple[dict, list[BadSample]]:
    """DINO's device half: each image decoded once, all its views cropped from it (`decoded_crops`: one roi_align
    per view size and canvas), then augmented (`dino_augment`). Returns {"crops": one float 0..255
    (N,3,S,S) per view}."""
    views = presets.dino_view_specs(spec.size, spec.aug)
    groups = {size: [v for v, view in enumerate(views) if view.size == size]
              for size in dict.fromkeys(view.size for view in views)}
    cut, keep, bad = decoded_crops(batch, [(gpu_color.upload(batch["box"][:, group], device), size)
                                           for size, group in groups.items()], device, decode)
    rows = slice(None) if len(keep) == len(batch["keys"]) else torch.tensor(keep)
    params = {k: batch[k][rows] for k in DINO_PARAMS}  # (N, views, ...), on the CPU
    crops: list[torch.Tensor] = [None] * len(views)  # type: ignore[list-item]  # every slot is filled below
    for x, group in zip(cut, groups.values()):
        x = dino_augment(x.flatten(0, 1), {k: params[k][:, group].flatten(0, 1) for k in DINO_PARAMS})
        x = x.unflatten(0, (len(keep), len(group)))  # image-major, as cut
        for j, v in enumerate(group):
            crops[v] = x[:, j]
    return {"crops": crops}, bad


def tensors(tree) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from tensors(item)


def run_ahead(outputs: Iterable[U], device: torch.device, depth: int = 2) -> Iterator[U]:
    """The items of `outputs`, a lazy iterable (a generator, a map), computed up to `depth` items ahead in a thread
    of this process.

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
                for out in outputs:
                    if stop.is_set():
                        return
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
