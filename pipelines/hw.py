"""decode: hw, and the choice that `decode: auto` makes.

hw: the GPU's hardware JPEG decoder (the NVJPG engines of A100, H100, H200, L4, ...) through nvImageCodec
(`pip install shardtrain[gpu]`). The workers send encoded bytes and crop boxes as in `gpu` mode
(`gpu.worker_batch`, `gpu.dino_worker_batch`); the training process decodes each batch's JPEGs in one call to
nvImageCodec's HW_GPU_ONLY backend, one batch ahead on a stream of its own (`gpu.run_ahead`,
`gpu.decode_on_own_stream`), the decoder writing each image straight into its slot of the padded canvas that
`gpu.decoded_crops` then crops, resizes, flips (and for DINO colours) as `gpu` mode does.
The engines use no SMs, so the decode does not compete with the training step for them, as nvJPEG's CUDA
kernels do.

Images the hardware does not take (PNG or WebP samples, a JPEG it refuses or cannot decode) are decoded one by
one on the CPU (libjpeg through torchvision, as `gpu` mode does for PNG), counted in `FALLBACKS` by reason and
reported in a line at the 1st, 10th, 100th, ... of them. One that the CPU cannot decode either is a corrupt
sample (skipped and counted, or the run's error, by `data.on_error`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

from pipelines import dali, gpu
from pipelines.config import DataError

JPEG_EXTS = ("jpg", "jpeg")
FALLBACKS: Counter[str] = Counter()  # images of this process decoded on the CPU instead, by reason


@functools.cache
def unavailable(device: torch.device) -> str | None:
    """Why the hardware decoder cannot decode on `device`, or None where it can: nvImageCodec imports and
    decodes a small JPEG with its HW_GPU_ONLY backend (GPUs without the engines return no image). Probed once
    per device and process."""
    with jpeg_extension_only():
        if why := extra_missing(device, "nvidia.nvimgcodec", "nvImageCodec", "gpu"):
            return why
    from nvidia import nvimgcodec

    probe = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[:, None, None], (1, 64, 3))
    data = cv2.imencode(".jpg", probe)[1].tobytes()
    try:
        image = decoder(device).decode(nvimgcodec.CodeStream(data), params=params())
    except Exception as e:  # no engines, no driver support: nvImageCodec raises or returns None
        return f"nvImageCodec's hardware decoder failed on {torch.cuda.get_device_name(device)}: {e}"
    if image is None:
        return f"{torch.cuda.get_device_name(device)} has no hardware JPEG decoder that nvImageCodec can use"
    return None


@contextlib.contextmanager
def jpeg_extension_only() -> Iterator[None]:
    """nvImageCodec loads every extension in its folder when it is imported, and the JPEG 2000 and TIFF ones
    print six error lines in every run where their libraries (which hw does not need) are missing. While inside,
    the import sees a folder holding the JPEG extension alone, unless the user set NVIMGCODEC_EXTENSIONS_PATH.
    The variable is unset again after: DALI's own nvImageCodec must not see it."""
    try:
        spec = importlib.util.find_spec("nvidia.nvimgcodec")
    except ModuleNotFoundError:  # no nvidia packages at all
        spec = None
    if spec is None or spec.origin is None or "NVIMGCODEC_EXTENSIONS_PATH" in os.environ:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="shardtrain-nvimgcodec-") as folder:
        for extension in (Path(spec.origin).parent / "extensions").glob("libnvjpeg_ext.so*"):
            (Path(folder) / extension.name).symlink_to(extension)
        os.environ["NVIMGCODEC_EXTENSIONS_PATH"] = folder
        try:
            yield
        finally:
            del os.environ["NVIMGCODEC_EXTENSIONS_PATH"]


def extra_missing(device: torch.device, module: str, name: str, extra: str) -> str | None:
    """Why an optional extra's GPU decode cannot start on `device`: no CUDA device, or its package `module` not
    installed or not loading; None where it imports."""
    if device.type != "cuda":
        return f"no CUDA GPU (the device is {device.type})"
    try:
        importlib.import_module(module)
    except ImportError:
        return f"{name} is not installed (pip install 'shardtrain[{extra}]')"
    except Exception as e:  # a wheel for another CUDA major fails to load its libraries
        return f"{name} does not load: {type(e).__name__}: {e}"
    return None


def describe(device: torch.device) -> str:
    """What decodes with data.decode=hw on `device`, for the log line of the choice."""
    from nvidia import nvimgcodec

    return f"nvImageCodec {nvimgcodec.__version__} hardware JPEG decoder on {torch.cuda.get_device_name(device)}"


@functools.cache
def decoder(device: torch.device, options: str = ""):
    """nvImageCodec's HW_GPU_ONLY decoder on `device`, with its `options` string (bench/hw_decode.py compares
    them)."""
    from nvidia import nvimgcodec

    index = device.index if device.index is not None else torch.cuda.current_device()
    return nvimgcodec.Decoder(device_id=index, backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)],
                              options=options)


@functools.cache
def params():
    """RGB, 8 bits, EXIF orientation left to `gpu.apply_orientation` (the crop boxes are drawn on the oriented
    image, the same for every decoder)."""
    from nvidia import nvimgcodec

    return nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                   sample_format=nvimgcodec.SampleFormat.I_RGB)


def decode_batch(data: list[torch.Tensor], keys: list[tuple[str, str, str]],
                 slots: list[torch.Tensor]) -> list[Exception | None]:
    """The JPEGs in one hardware call on the current stream, each written by the decoder straight into its canvas
    slot (rows pitched at the canvas's width; left to nvImageCodec, each image is a cudaMallocAsync and a free, and a
    copy into torch's memory). The rest are decoded on the CPU (`cpu_fallback`)."""
    from nvidia import nvimgcodec

    streams = [code_stream(d, key[2], slot) for d, key, slot in zip(data, keys, slots)]
    taken = [i for i, stream in enumerate(streams) if not isinstance(stream, str)]
    why: list[str | None] = [stream if isinstance(stream, str) else None for stream in streams]
    if taken:
        stream = torch.cuda.current_stream(slots[0].device).cuda_stream
        try:
            images = decoder(slots[0].device).decode(
                [streams[i] for i in taken], params=params(), cuda_stream=stream,
                images=nvimgcodec.as_images([slots[i] for i in taken], cuda_stream=stream))
        except Exception:  # the batch as a whole refused: each of its images goes to the CPU
            images = [None] * len(taken)
        for i, image in zip(taken, images):
            if image is None:
                why[i] = f"the hardware decoder refused the {keys[i][2]}"
    return cpu_fallback(data, keys, slots, why)


def code_stream(data: torch.Tensor, ext: str, slot: torch.Tensor):
    """nvImageCodec's view of one encoded image, or why the hardware decoder does not get it: not a JPEG, a header
    nvImageCodec cannot read, or one whose size is not its slot's (the worker's reading, which laid out the
    canvas)."""
    from nvidia import nvimgcodec

    if ext not in JPEG_EXTS:
        return f"{ext} is not a JPEG"
    try:  # the header is parsed when its size is first read
        stream = nvimgcodec.CodeStream(data.numpy())
        size = (stream.height, stream.width, 3)
    except Exception:
        return f"nvImageCodec cannot read the {ext}'s header"
    if size != slot.shape:
        return f"nvImageCodec reads another size in the {ext}'s header"
    return stream


def cpu_fallback(data: list[torch.Tensor], keys: list[tuple[str, str, str]], slots: list[torch.Tensor],
                 why: list[str | None]) -> list[Exception | None]:
    """Each image the hardware did not decode (a reason in `why`, None where it did) decoded on the CPU into its
    slot; counted in FALLBACKS by that reason, an error in its place where the CPU cannot decode it either."""
    out: list[Exception | None] = []
    for i, reason in enumerate(why):
        if reason is None:
            out.append(None)
            continue
        count(reason)
        out.append(gpu.decode_on_cpu_into(slots[i], data[i], keys[i][2]))
    return out


def count(reason: str) -> None:
    count_fallbacks(FALLBACKS, reason, 1, "data.decode=hw: {total} image(s) decoded on the CPU instead ({reasons})")


def count_fallbacks(fallbacks: Counter[str], reason: str, n: int, line: str) -> None:
    """Add `n` images to `reason` in `fallbacks`; print `line` (with {total} and {reasons}) when the total reaches
    or passes 1, 10, 100, ... (a decode mode's fallbacks, reported without a line per image)."""
    before = fallbacks.total()
    fallbacks[reason] += n
    total = fallbacks.total()
    if before == 0 or len(str(total)) > len(str(before)):
        reasons = ", ".join(f"{k} {why}" for why, k in fallbacks.most_common())
        print(line.format(total=total, reasons=reasons), flush=True)


device_batch = functools.partial(gpu.device_batch, decode=decode_batch)
dino_device_batch = functools.partial(gpu.dino_device_batch, decode=decode_batch)


def choose(decode: str, modes: Iterable[str], device: torch.device, workers: int, max_workers: int
           ) -> tuple[str, str]:
    """The decode mode a loader runs for `data.decode`, and why, in words for the run's log. auto is hw where the
    task has it, the process has at most the task's `max_workers` CPU `workers` (more decode as fast) and the
    hardware decoder works on `device`; else cpu, with the first of those reasons that holds. An explicit hw that
    cannot work is a one-line error, and so is an explicit dali (pipelines/dali.py: never chosen by auto) that
    cannot."""
    if decode == "hw" and (why := unavailable(device)):
        raise DataError(f"data.decode=hw: {why}; use data.decode=auto or cpu")
    if decode == "dali" and (why := dali.unavailable(device)):
        raise DataError(f"data.decode=dali: {why}; use data.decode=auto or cpu")
    if decode != "auto":
        return decode, "set in the config"
    if "hw" not in modes:
        return "cpu", "auto: this task decodes in the CPU workers only"
    if workers > max_workers:
        return "cpu", f"auto: {workers} CPU workers decode as fast (hw with {max_workers} or fewer)"
    if why := unavailable(device):
        return "cpu", f"auto: {why}"
    return "hw", f"auto: {describe(device)}"
