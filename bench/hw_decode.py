"""The hardware JPEG decoder's stages in isolation (data.decode: hw, issue 19), on one GPU, side by side.

    python bench/hw_decode.py --images 6144 --workers 15,4

1. bare: nvImageCodec's batch decode of 256 CodeStreams made beforehand, as the decoder gives it: new Images each
   batch (each a cudaMallocAsync and a free), reusing the last batch's Images, writing into torch's memory
   (`as_images`), with the CodeStreams made in the loop, with 4 CPU threads, and with the CUDA default memory
   pool's release threshold raised (the pool then keeps the memory the freed Images had).
2. device batch: the training process's half as the loader runs it (decode on its own stream, orient, crop and
   resize, flip) on worker batches already in memory: the baseline (per-image copies out of nvImageCodec's
   Images, the code before issue 19's fix), shardtrain's now (straight into the batch's padded canvas), and
   nvJPEG's.
3. input alone: `train_throughput.loader_rate` through the real loader and its workers, hw and cpu decode.
4. step beside decode (`--stages step`): ResNet-50's compiled step (`train_throughput.make_step`) on one batch
   already on the GPU, then fed by the device half in its thread (`gpu.run_ahead`) from worker batches in memory,
   with the interpreter's default GIL switch interval (5 ms) and a tenth of it, with the decoder's CPU threads cut
   to 2, and beside a thread that only calls the decoder: which of them slows the step itself. Last, the fed
   step profiled (the GPU's busy share and top kernels): the profiler slows what runs after it.
   `--compile-mode reduce-overhead` runs the step as CUDA graphs (a few launches a step instead of hundreds).
5. the device half in a process of its own (`--stages process`): the same step, fed by the device half in a
   thread of its own process (as the loader runs it), then by the device half in a second process whose batches
   reach the step through CUDA IPC: what the device half's Python costs the step by sharing its interpreter.
6. decoder options (`--stages options`): with nvImageCodec's `options` string of `--decoder-options` (for every
   stage), how far its decode is from libjpeg's (mean absolute difference a pixel value on one batch, against
   torchvision's CPU decode), the device half alone, and the step fed by it. Compare option strings in separate
   runs, in turn: two decoders with different options in one process crash nvImageCodec 0.9 once one of them
   has decoded in another thread.
Every figure is images/s; the last line is one JSON object, also appended to bench/results/hw_decode.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import itertools
import os
import queue
import sys
import threading
import time
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from common import machine, profile_steps, record
from pipelines import AugmentConfig, DataConfig, build_loader, gpu, hw
from pipelines.tasks import TASKS, Decoder, each
from shards import ConvertOptions, convert
from train_throughput import ceiling, loader_rate, make_raw, make_step

DEVICE = torch.device("cuda")
SPEC = TASKS["classify"].spec(True, 224, AugmentConfig())  # the device half's crop size and augment settings


def make_store(work: Path, images: int) -> str:
    raw, dest = work / "raw", work / "store-wds"
    if not (raw / "train").exists():
        make_raw(raw, images, 64, os.cpu_count() or 1)
    if not (dest / "manifest.json").exists():
        convert(ConvertOptions(src=str(raw), dest=str(dest), format="wds", max_side=None,
                               workers=os.cpu_count() or 1), progress=False)
    return str(dest)


def worker_batches(store: str, n: int, batch: int, task: str = "classify", decode: str = "hw",
                   device: torch.device = DEVICE) -> list[dict]:
    """`n` worker batches of encoded JPEGs and their drawn crop (and colour) parameters, as the loader's workers
    send them for `task` with `decode` (pinned)."""
    loader = build_loader(DataConfig(path=store, batch_size=batch, workers=4, decode=decode), "train", train=True,
                          task=task, rank=0, world_size=1, seed=0, device=device)
    loader.sampler.epoch, loader.sampler.start = 0, 0
    out = []
    for item, _, _ in loader.dataloader:
        out.append(item)
        if len(out) == n:
            break
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, batches: list, reps: int = 2, device: torch.device = DEVICE) -> float:
    """images/s of fn over the batches, after one warm-up pass."""
    for b in batches[:2]:
        fn(b)
    sync(device)
    t = time.perf_counter()
    n = 0
    for _ in range(reps):
        for b in batches:
            n += fn(b)
    sync(device)
    return n / (time.perf_counter() - t)


def raise_release_threshold(device: torch.device) -> None:
    """The CUDA default memory pool keeps what is freed into it instead of handing it back at each sync."""
    cuda = ctypes.CDLL("libcuda.so.1")
    pool = ctypes.c_void_p()
    assert cuda.cuDeviceGetDefaultMemPool(ctypes.byref(pool), ctypes.c_int(device.index or 0)) == 0
    value = ctypes.c_uint64(2**64 - 1)
    assert cuda.cuMemPoolSetAttribute(pool, ctypes.c_int(4), ctypes.byref(value)) == 0  # RELEASE_THRESHOLD


def decode_before(data, keys, slots):
    """The baseline: pipelines/hw.py's decode_batch before issue 19's fix, new Images from nvImageCodec, each
    copied into torch's memory (and freed)."""
    from nvidia import nvimgcodec

    jpegs = [i for i, key in enumerate(keys) if key[2] in hw.JPEG_EXTS]
    why: list[str | None] = ["not decoded"] * len(data)
    stream = torch.cuda.current_stream(DEVICE)
    images = hw.decoder(DEVICE).decode([nvimgcodec.CodeStream(data[i].numpy()) for i in jpegs],
                                       params=hw.params(), cuda_stream=stream.cuda_stream)
    for i, image in zip(jpegs, images):
        if image is not None:
            slots[i].copy_(torch.from_dlpack(image))
            why[i] = None
    return hw.cpu_fallback(data, keys, slots, why)


def gil_share(fn) -> float:
    """The share of a pure-Python counting thread's rate that it keeps while `fn` runs (1: fn releases the GIL)."""
    def spin(seconds: float) -> int:
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            n += 1
        return n

    alone = spin(0.5) / 0.5
    counts = []
    stop = threading.Event()

    def count() -> None:
        n = 0
        t = time.perf_counter()
        while not stop.is_set():
            n += 1
        counts.append(n / (time.perf_counter() - t))

    thread = threading.Thread(target=count)
    thread.start()
    fn()
    stop.set()
    thread.join()
    return counts[0] / alone


def fed_rate(step, feed, batch: int, warmup: int = 5, steps: int = 30) -> float:
    """images/s of `step` on the (float images, labels) that `feed` yields."""
    for _ in range(warmup):
        step(*next(feed))
    sync(DEVICE)
    t = time.perf_counter()
    for _ in range(steps):
        step(*next(feed))
    sync(DEVICE)
    return batch * steps / (time.perf_counter() - t)


def device_feed(batches: list[dict]):
    """Normalised (images, labels) from the product's hw device half, one batch ahead in its thread, the batches
    cycled."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=DEVICE).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=DEVICE).view(1, 3, 1, 1) * 255
    for out, _ in gpu.run_ahead((hw.device_batch(b, SPEC, DEVICE) for b in itertools.cycle(batches)), DEVICE):
        x = ((out["image"] - mean) / std).contiguous(memory_format=torch.channels_last)
        yield x, out["label"]


def feed_in_process(batches: list[dict], out, stop) -> None:
    """Stage 5's producer, in a spawned process: the device half's batches put on `out` (CUDA IPC: the consumer's
    stream waits for an event recorded when each is put; torch keeps each batch's memory here until the consumer
    frees it)."""
    for x, y in device_feed(batches):
        if stop.is_set():
            return
        out.put((x, y))


def process_feed(batches: list[dict]):
    """(images, labels) from the device half in a second process (`feed_in_process`), two batches in flight."""
    ctx = torch.multiprocessing.get_context("spawn")
    out, stop = ctx.Queue(2), ctx.Event()
    proc = ctx.Process(target=feed_in_process, args=(batches, out, stop), daemon=True)
    proc.start()
    try:
        while True:
            yield out.get(timeout=300)
    finally:
        stop.set()
        while proc.is_alive():  # a producer blocked on a full queue sees the stop after a get
            with contextlib.suppress(queue.Empty):
                out.get(timeout=0.1)
        proc.join()


def step_fed_from_process(batches: list[dict], batch: int, mode: str, put) -> None:
    """Stage 5: the step fed by the device half in its own process against in a thread of the step's process."""
    step = make_step("resnet50", 1000, compile=True, mode=mode)
    put("step_ceiling", ceiling(step, batch, 1000, warmup=10, steps=30))
    for name, feed in (("step_fed_hw", device_feed(batches)), ("step_fed_hw_process", process_feed(batches))):
        put(name, fed_rate(step, feed, batch, steps=60))
        feed.close()


def decoding_beside(streams: list, stop: threading.Event) -> None:
    """The decoder alone, looping in a thread: no per-image Python around it."""
    stream = torch.cuda.Stream(DEVICE)
    params = hw.params()
    for s in itertools.cycle(streams):
        if stop.is_set():
            return
        hw.decoder(DEVICE).decode(s, params=params, cuda_stream=stream.cuda_stream)


def step_beside_decode(batches: list[dict], streams: list, batch: int, mode: str, put) -> None:
    """Stage 4: what slows ResNet-50's compiled step (torch.compile `mode`) when the hw device half runs beside it."""
    from nvidia import nvimgcodec

    step = make_step("resnet50", 1000, compile=True, mode=mode)
    put("step_ceiling", ceiling(step, batch, 1000, warmup=10, steps=30))
    put("step_fed_hw", fed_rate(step, device_feed(batches), batch))
    default = sys.getswitchinterval()
    sys.setswitchinterval(default / 10)
    put("step_fed_hw_switch_0.5ms", fed_rate(step, device_feed(batches), batch))
    sys.setswitchinterval(default)
    shipped = hw.decoder
    hw.decoder = functools.cache(lambda device: nvimgcodec.Decoder(
        device_id=0, max_num_cpu_threads=2, backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)]))
    put("step_fed_hw_2_cpu_threads", fed_rate(step, device_feed(batches), batch))
    hw.decoder = shipped
    stop = threading.Event()
    thread = threading.Thread(target=decoding_beside, args=(streams, stop), daemon=True)
    thread.start()
    put("step_ceiling_beside_bare_decode", ceiling(step, batch, 1000, warmup=3, steps=30))
    stop.set()
    thread.join()
    put("step_ceiling_again", ceiling(step, batch, 1000, warmup=3, steps=30))
    feed = device_feed(batches)
    for _ in range(3):  # the decode thread started and one batch ahead
        step(*next(feed))
    profile_steps(lambda: step(*next(feed)), top=12)  # last: the profiler slowed the steps after it
    feed.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/shardtrain-hw")
    p.add_argument("--images", type=int, default=6144)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=12, help="worker batches held in memory (stages 1, 2, 4-6)")
    p.add_argument("--workers", default="15,4")
    p.add_argument("--stages", default="bare,device,loader",
                   help="any of bare, device, loader, step, process, options (1-6 above)")
    p.add_argument("--decoder-options", default="",
                   help="nvImageCodec's options string for the hw decoder in every stage (empty: as shipped)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile's mode for stage 4's step (reduce-overhead: CUDA graphs, few launches)")
    args = p.parse_args()
    stages = set(args.stages.split(","))
    from nvidia import nvimgcodec

    store = make_store(Path(args.work), args.images)
    out: dict = {"bench": "hw_decode", "machine": machine(), "batch": args.batch,
                 "nvimgcodec": nvimgcodec.__version__, "compile_mode": args.compile_mode,
                 "decoder_options": args.decoder_options}
    if args.decoder_options:
        hw.decoder = functools.cache(functools.partial(hw.decoder, options=args.decoder_options))

    def put(key: str, value: float) -> None:
        out[key] = round(value, 1) if isinstance(value, float) else value
        print(f"{key}: {out[key]}", flush=True)

    batches = worker_batches(store, args.batches, args.batch)
    data = [list(b["data"].split(b["length"].tolist())) for b in batches]
    streams = [[nvimgcodec.CodeStream(d.numpy()) for d in ds] for ds in data]
    if "step" in stages:
        step_beside_decode(batches, streams, args.batch, args.compile_mode, put)
    if "process" in stages:
        step_fed_from_process(batches, args.batch, args.compile_mode, put)
    if "options" in stages:
        fed_with_options(batches, args.batch, args.compile_mode, put)
    if "bare" in stages:
        bare_decoder(streams, data, put)
    if "device" in stages:
        device_half(batches, put)
    if "loader" in stages:
        loader_alone(store, args.batch, [int(w) for w in args.workers.split(",")], put)
    if {"bare", "device", "loader"} <= stages:
        pool_kept(store, streams, batches, args.batch, put)
    record("hw_decode", out)


def pixel_difference(batch: dict) -> float:
    """Mean absolute difference a pixel value between the hw decode of `batch` (with `hw.decoder` as set) and
    libjpeg's (torchvision on the CPU), over the images' own pixels."""
    data, stored = list(batch["data"].split(batch["length"].tolist())), [tuple(s) for s in batch["size"].tolist()]
    shape = tuple(batch["size"].amax(0).tolist())
    canvas, _ = gpu.decode_on_own_stream(DEVICE, functools.partial(
        gpu.decode_canvas, data, batch["keys"], stored, shape, DEVICE, hw.decode_batch))
    total, pixels = 0.0, 0
    for i, (d, (h, w)) in enumerate(zip(data, stored)):
        cpu = decode_jpeg(d, mode=ImageReadMode.RGB).permute(1, 2, 0).to(DEVICE)
        total += (canvas[i, :h, :w].float() - cpu.float()).abs().sum().item()
        pixels += cpu.numel()
    return total / pixels


def fed_with_options(batches: list[dict], batch: int, mode: str, put) -> None:
    """Stage 6: with `--decoder-options`, the decode's distance from libjpeg's, the device half alone and
    ResNet-50's compiled step fed by it."""
    step = make_step("resnet50", 1000, compile=True, mode=mode)
    put("step_ceiling", ceiling(step, batch, 1000, warmup=10, steps=30))
    put("pixel_difference", pixel_difference(batches[0]))
    put("device_batch_now", rate(functools.partial(device_batch, hw.decode_batch), batches))
    put("step_fed_hw", fed_rate(step, device_feed(batches), batch, steps=60))


def bare_decoder(streams: list, data: list, put) -> None:
    """Stage 1: nvImageCodec's batch decode alone."""
    from nvidia import nvimgcodec

    dec, params = hw.decoder(DEVICE), hw.params()
    cuda_stream = torch.cuda.current_stream(DEVICE).cuda_stream
    put("bare_new_images", rate(lambda s: len(dec.decode(s, params=params, cuda_stream=cuda_stream)), streams))
    last: dict = {}

    def reuse(s):
        prev = last.get(len(s))
        last[len(s)] = dec.decode(s, images=prev, params=params, cuda_stream=cuda_stream)
        return len(s)

    put("bare_reuse_images", rate(reuse, streams))

    def into_torch(s):
        shapes = [(c.height, c.width, 3) for c in s]
        flat = torch.empty(sum(h * w * c for h, w, c in shapes), dtype=torch.uint8, device=DEVICE)
        bufs = [b.view(shape) for b, shape in zip(flat.split([h * w * c for h, w, c in shapes]), shapes)]
        images = dec.decode(s, images=nvimgcodec.as_images(bufs, cuda_stream=cuda_stream), params=params,
                            cuda_stream=cuda_stream)
        last["same"] = all(im.__cuda_array_interface__["data"][0] == b.data_ptr() for im, b in zip(images, bufs))
        return len(s)

    try:
        put("bare_into_torch", rate(into_torch, streams))
        put("into_torch_writes_in_place", last["same"])
    except Exception as e:
        put("bare_into_torch", f"{type(e).__name__}: {e}")
    put("bare_with_codestreams", rate(
        lambda ds: len(dec.decode([nvimgcodec.CodeStream(d.numpy()) for d in ds], params=params,
                                  cuda_stream=cuda_stream)), data))
    dec4 = nvimgcodec.Decoder(device_id=0, max_num_cpu_threads=4,
                              backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
    put("bare_4_cpu_threads", rate(lambda s: len(dec4.decode(s, params=params, cuda_stream=cuda_stream)), streams))
    put("gil_kept_during_decode", gil_share(lambda: [dec.decode(s, params=params, cuda_stream=cuda_stream)
                                                      for s in streams[:4]]))


def device_batch(decode, b: dict) -> int:
    return len(gpu.device_batch(b, SPEC, DEVICE, decode=decode)[0]["label"])


def device_half(batches: list[dict], put) -> None:
    """Stage 2: the training process's half, on worker batches in memory."""
    variants = {"before": decode_before, "now": hw.decode_batch, "nvjpeg": gpu.decode_batch}

    def decode_only(decode, b):
        data, stored = list(b["data"].split(b["length"].tolist())), [tuple(s) for s in b["size"].tolist()]
        shape = tuple(b["size"].amax(0).tolist())
        gpu.decode_on_own_stream(DEVICE, functools.partial(gpu.decode_canvas, data, b["keys"], stored, shape,
                                                           DEVICE, decode))
        return len(data)

    for name, decode in variants.items():
        put(f"decode_{name}", rate(functools.partial(decode_only, decode), batches))
        put(f"device_batch_{name}", rate(functools.partial(device_batch, decode), batches))

    def ahead(decode, bs):
        fn = functools.partial(gpu.device_batch, spec=SPEC, device=DEVICE, decode=decode)
        return sum(len(o[0]["label"]) for o in gpu.run_ahead(map(fn, bs), DEVICE))

    for name in ("before", "now"):
        put(f"run_ahead_{name}", rate(functools.partial(ahead, variants[name]), [batches]))


def loader_alone(store: str, batch: int, worker_counts: list[int], put) -> None:
    """Stage 3: input alone through the real loader."""
    for workers in worker_counts:
        put(f"loader_hw_{workers}", loader_rate(store, "hw", batch, workers, batches=16))
        put(f"loader_cpu_{workers}", loader_rate(store, "cpu", batch, workers, batches=16))
    shipped = TASKS["classify"].decoders["hw"]
    TASKS["classify"].decoders["hw"] = Decoder(gpu.worker_batch, each(functools.partial(gpu.device_batch,
                                                                                       decode=decode_before)))
    put("loader_hw_before_15", loader_rate(store, "hw", batch, 15, batches=16))
    TASKS["classify"].decoders["hw"] = shipped


def pool_kept(store: str, streams: list, batches: list[dict], batch: int, put) -> None:
    """Last (it holds for the rest of the process): the CUDA pool keeps what it is given back."""
    dec, params = hw.decoder(DEVICE), hw.params()
    cuda_stream = torch.cuda.current_stream(DEVICE).cuda_stream
    raise_release_threshold(DEVICE)
    put("bare_new_images_pool_kept", rate(lambda s: len(dec.decode(s, params=params, cuda_stream=cuda_stream)),
                                          streams))
    put("device_batch_before_pool_kept", rate(functools.partial(device_batch, decode_before), batches))
    TASKS["classify"].decoders["hw"] = Decoder(gpu.worker_batch, each(functools.partial(gpu.device_batch,
                                                                                       decode=decode_before)))
    put("loader_hw_before_pool_kept_15", loader_rate(store, "hw", batch, 15, batches=16))


if __name__ == "__main__":
    main()
