"""Loader throughput: our wds and lmdb readers vs torchvision ImageFolder, same run.

    python bench/loader.py SRC [--workers N] [--batch-size B] [--size S] [--make 500]
    python bench/loader.py SRC --device cuda --workers 15 --batch-size 256       # on a GPU host

SRC is an ImageFolder tree (SRC/train/<class>/*.jpg); with --make N it is first filled with
N photos of 400x300 cut from the bundled samples. SRC is converted to wds and lmdb in a temp
dir, then each loader runs the classify train preset over the same images with the same
workers and batch size: ours via `build_loader` (OpenCV JPEG decode, DCT-scaled when the target
allows, uint8 batches from the workers, normalised as the trainer gets them); the baseline is
`ImageFolder` with PIL decode and the same albumentations preset plus Normalize/ToTensorV2 in
the workers (the common recipe). All three keep their workers; after one untimed epoch each
(worker start, page cache, tar index) they take turns, one timed epoch each per round, in a
new random order each round, so that load from other processes falls on all alike. A turn's
time runs until the workers (and the S3 server) are idle again: work a loader left running
(ours starts its next epoch's first batches) is its own, not the next loader's. A ratio is
the median over rounds of ours/ImageFolder within the round.
With --device cuda (a GPU host) every loader hands its batches to the GPU as a trainer gets them
(pinned memory, non-blocking copies), and two more loaders join: ours in GPU decode mode
(`data.decode: gpu`, nvJPEG) on the same wds and lmdb stores, reported against CPU decode with
the same workers. Prints images/s and the ratios; the last line is one JSON object, also appended
to bench/results/loader.jsonl.

With --s3 the loaders are ways to stream the same images from object storage, beside our reader on
local disk: the wds store uploaded to a moto S3 server on 127.0.0.1 (the one the tests use:
tests/servers.py, credentials and endpoint in AWS_* variables) and read by our reader through s3fs;
MosaicML Streaming (`MDSWriter` shards of the same JPEG bytes, `StreamingDataset` with its local cache)
and LitData (`optimize` chunks, `StreamingDataset`) reading their own copies from the same server. Every
loader runs the same per-sample work in its workers (our classify batch function: OpenCV decode, the
train preset, uint8 out, normalised in this process), so only the storage path differs. All stores use
--shard-size. Besides images/s it reports the first epoch's rate (peers' caches empty, our shard
indexes unbuilt), the peak RSS of each loader's workers and the disk each peer's cache used. The peers
are not dependencies of shardtrain (MosaicML Streaming pins numpy < 2.2): install them beside it only
for this bench, `pip install mosaicml-streaming litdata`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import albumentations as A
import numpy as np
import psutil
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from common import machine, print_table, record
from pipelines import AugmentConfig, DataConfig, build_loader, presets
from pipelines.batches import BatchSpec, classify_batch
from pipelines.loader import init_worker, make_normalise
from pipelines.store import RawSample
from pipelines.tasks import TASKS
from shards import ConvertOptions, convert, samples
from shards.convert import parse_shard_size

BUCKET = "bench-loader"


def make_photos(dest: Path, count: int, seed: int = 0) -> None:
    """`count` 400x300 crops of the bundled photos in dest/train/<photo>/."""
    rng = random.Random(seed)
    photos = {p.stem: Image.open(p).convert("RGB") for p in samples.photo_paths()}
    names = sorted(photos)
    for i in range(count):
        name = names[i % len(names)]
        img = photos[name]
        w, h = img.size
        cw = rng.randint(min(w, h * 4 // 3) // 2, min(w, h * 4 // 3))
        ch = cw * 3 // 4
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        folder = dest / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        img.crop((x, y, x + cw, y + ch)).resize((400, 300), Image.Resampling.BILINEAR).save(
            folder / f"{name}_{i:05d}.jpg", quality=90
        )


def interleaved_rates(epoch_fns: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, float], dict[str, set]]:
    """Images/s of each epoch function per round, run in turns after one first epoch each (worker start, page
    cache, tar index, a peer's downloads: left out of the rounds); also each one's first-epoch rate, and the
    pids of the worker processes that its first epoch started."""
    first, workers = {}, {}
    for name, fn in epoch_fns.items():
        before = child_pids()
        start = time.perf_counter()
        n = fn(0)
        settle()
        first[name] = n / (time.perf_counter() - start)
        workers[name] = child_pids() - before
    rates: dict[str, list[float]] = {name: [] for name in epoch_fns}
    order = random.Random(0)
    for e in range(1, rounds + 1):
        for name in order.sample(list(epoch_fns), len(epoch_fns)):  # a new order each round: no fixed neighbours
            start = time.perf_counter()
            n = epoch_fns[name](e)
            settle()
            rates[name].append(n / (time.perf_counter() - start))
    return rates, first, workers


def settle(quiet_s: float = 0.05, limit_s: float = 5.0) -> None:
    """Returns once this process's children (loader workers, the S3 server) have used under a fifth of a core for
    `quiet_s`, or after `limit_s`. Work a loader left running when its epoch returned (ours starts the next epoch's
    first batches, a request may still be in the server) is then timed as its own, not in the next loader's turn."""
    deadline = time.perf_counter() + limit_s
    used = children_cpu_s()
    while time.perf_counter() < deadline:
        time.sleep(quiet_s)
        before, used = used, children_cpu_s()
        if used - before < quiet_s / 5:
            return


def children_cpu_s() -> float:
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = child.cpu_times()
            total += times.user + times.system
    return total


def child_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def peak_rss_mib(pids: set[int]) -> float:
    """Sum of the processes' peak resident sizes (VmHWM; pages shared with the parent count in each)."""
    total_kib = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            status = Path(f"/proc/{pid}/status").read_text()
            total_kib += int(status.split("VmHWM:")[1].split()[0])
    return total_kib / 1024


def disk_mib(path: str) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def median_ratio(ours: list[float], baseline: list[float]) -> float:
    """Median over rounds of the ratio within a round: load from other processes mostly cancels out."""
    return float(np.median(np.asarray(ours) / np.asarray(baseline)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(store: str, args, aug: AugmentConfig, decode: str = "cpu", cache_dir: str | None = None):
    device = torch.device(args.device)
    cfg = DataConfig(path=store, image_size=args.size, batch_size=args.batch_size, workers=args.workers, decode=decode,
                     augment=aug, cache_dir=cache_dir)
    loader = build_loader(cfg, "train", train=True, task="classify", rank=0, world_size=1, seed=0, device=device)

    def epoch(e: int) -> int:
        loader.set_epoch(e)
        n = sum(len(b["label"]) for b in loader)
        synchronize(device)
        return n

    return epoch


def imagefolder(src: Path, args, aug: AugmentConfig):
    device = torch.device(args.device)
    transform = A.Compose([presets.classify_train(args.size, aug), A.Normalize(aug.mean, aug.std), ToTensorV2()])
    dataset = ImageFolder(str(src / "train"), transform=lambda img: transform(image=np.asarray(img))["image"])
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
        persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers > 0 else None,
        pin_memory=device.type == "cuda",
    )

    def epoch(e: int) -> int:
        n = 0
        for images, labels in loader:
            images.to(device, non_blocking=True)
            n += len(labels)
        synchronize(device)
        return n

    return epoch


class PeerBatch:
    """A peer's collate function: its samples (JPEG bytes and label) through our classify batch function, in
    its workers as in ours, so that the loaders differ only in how the bytes arrive."""

    def __init__(self, spec: BatchSpec):
        self.spec = spec

    def __call__(self, items: list[dict]) -> dict:
        raws = [RawSample("peer", "", "jpg", item["image"], {"cls": int(item["label"])}) for item in items]
        batch, _ = classify_batch(raws, [random.getrandbits(31) for _ in raws], self.spec)
        return batch


def peer(dataset, loader_cls, args, aug: AugmentConfig):
    """Epochs of a peer's dataset through its own DataLoader class, with our loader's settings and worker setup,
    the batches moved and normalised as ours are."""
    device = torch.device(args.device)
    cfg = DataConfig(path="peer", image_size=args.size, batch_size=args.batch_size, workers=args.workers, augment=aug)
    task = TASKS["classify"]
    normalise = make_normalise(cfg, device)
    loader = loader_cls(
        dataset, batch_size=args.batch_size, collate_fn=PeerBatch(task.spec(True, args.size, aug)), drop_last=True,
        num_workers=args.workers, persistent_workers=args.workers > 0, prefetch_factor=cfg.prefetch_factor,
        worker_init_fn=init_worker, pin_memory=device.type == "cuda",
    )

    def epoch(e: int) -> int:
        n = sum(task.batch_size(task.to_device(batch, device, normalise)) for batch in loader)
        synchronize(device)
        return n

    return epoch


def labelled_files(src: Path) -> list[tuple[Path, int]]:
    """(JPEG, class number) of every image, class by class as on disk and as convert numbers the classes."""
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    return [(path, c) for c, name in enumerate(classes) for path in sorted((src / "train" / name).glob("*.jpg"))]


def litdata_item(item: tuple[Path, int]) -> dict:
    path, label = item
    return {"image": path.read_bytes(), "label": label}


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """The tests' moto server on 127.0.0.1, with AWS_* pointing at it for this process and its workers; the
    endpoint. MosaicML Streaming takes its endpoint from S3_ENDPOINT_URL."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.servers
    from tests.servers import MotoServer

    with MotoServer().serving(buckets=(BUCKET,)) as server:
        os.environ["S3_ENDPOINT_URL"] = server.endpoint
        try:
            yield server.endpoint
        finally:
            del os.environ["S3_ENDPOINT_URL"]


def s3_stores(src: Path, tmp: str, shard_bytes: int) -> None:
    """The wds store, an MDS copy and a LitData copy of the same JPEG bytes, each written locally under tmp
    and uploaded to the bucket (s3://BUCKET/wds, /mds, /litdata)."""
    import s3fs
    from litdata import optimize
    from streaming import MDSWriter

    files = labelled_files(src)
    with MDSWriter(out=f"{tmp}/mds", columns={"image": "bytes", "label": "int"}, size_limit=shard_bytes) as out:
        for path, label in files:
            out.write({"image": path.read_bytes(), "label": label})
    start_method = multiprocessing.get_start_method()
    optimize(fn=litdata_item, inputs=files, output_dir=f"{tmp}/litdata", chunk_bytes=shard_bytes, num_workers=1)
    multiprocessing.set_start_method(start_method, force=True)  # optimize sets spawn for the whole process
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for name in ("wds", "mds", "litdata"):
        fs.put(f"{tmp}/{name}", f"{BUCKET}/{name}", recursive=True)


def s3_loaders(src: Path, tmp: str, args, aug: AugmentConfig, endpoint: str) -> dict:
    """Epoch functions of our reader on local disk and on S3 (byte ranges each time, and with `data.cache_dir`),
    and of the two peers on S3 (caches under tmp)."""
    import litdata
    import streaming
    from litdata.streaming import downloader

    # LitData's chunk prefetch (obstore) refuses plain-HTTP endpoints and offers no option for it: the moto
    # server is http://127.0.0.1, production endpoints are https
    downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True
    s3_stores(src, tmp, shard_bytes=args.shard_bytes)
    mds = streaming.StreamingDataset(remote=f"s3://{BUCKET}/mds", local=f"{tmp}/cache-mds", shuffle=True,
                                     shuffle_seed=0, batch_size=args.batch_size)
    lit = litdata.StreamingDataset(f"s3://{BUCKET}/litdata", cache_dir=f"{tmp}/cache-litdata", shuffle=True, seed=0,
                                   storage_options={"endpoint_url": endpoint})
    return {
        "wds": ours(f"{tmp}/wds", args, aug),
        "wds-s3": ours(f"s3://{BUCKET}/wds", args, aug),
        "wds-s3-cache": ours(f"s3://{BUCKET}/wds", args, aug, cache_dir=f"{tmp}/cache-wds"),
        "streaming-s3": peer(mds, streaming.StreamingDataLoader, args, aug),
        "litdata-s3": peer(lit, litdata.StreamingDataLoader, args, aug),
    }


def local_bench(args, aug: AugmentConfig) -> dict:
    """Ours (wds, lmdb; with cuda, GPU decode too) against ImageFolder."""
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        for fmt in ("wds", "lmdb"):
            convert(ConvertOptions(src=str(args.src), dest=f"{tmp}/{fmt}", format=fmt, workers=max(args.workers, 1),
                                   shard_size=args.shard_size), progress=False)
        epochs = {fmt: ours(f"{tmp}/{fmt}", args, aug) for fmt in ("wds", "lmdb")}
        if args.device == "cuda":
            epochs.update({f"{fmt}-gpu": ours(f"{tmp}/{fmt}", args, aug, decode="gpu") for fmt in ("wds", "lmdb")})
        # last: its workers start after this process has freed large blocks, and inherit the heap limits that
        # glibc raised then (ours set them themselves; see pipelines.loader.keep_freed_heap): its best case
        epochs["imagefolder"] = imagefolder(args.src, args, aug)
        rates, _, _ = interleaved_rates(epochs, args.rounds)
    for name, per_round in rates.items():
        print(f"{name:12s} {np.median(per_round):8.1f} images/s (median of {args.rounds} rounds)")
    wds_ratio = median_ratio(rates["wds"], rates["imagefolder"])
    lmdb_ratio = median_ratio(rates["lmdb"], rates["imagefolder"])
    print(f"ratio wds/imagefolder {wds_ratio:.2f}, lmdb/imagefolder {lmdb_ratio:.2f} (aim >= 1.5)")
    gpu_ratios = {
        f"ratio_gpu_vs_cpu_decode_{fmt}": round(median_ratio(rates[f"{fmt}-gpu"], rates[fmt]), 3)
        for fmt in ("wds", "lmdb") if f"{fmt}-gpu" in rates
    }
    for key, ratio in gpu_ratios.items():
        print(f"{key.removeprefix('ratio_').replace('_', ' ')}: {ratio:.2f}")
    return {
        **{f"{name}_images_per_s": round(float(np.median(r)), 1) for name, r in rates.items()},
        "ratio_wds_vs_imagefolder": round(wds_ratio, 3),
        "ratio_lmdb_vs_imagefolder": round(lmdb_ratio, 3),
        **gpu_ratios,
    }


def s3_bench(args, aug: AugmentConfig) -> dict:
    """Ours on local disk and on S3, and the two peers on S3; with each one's first epoch, workers' peak RSS and
    cache on disk."""
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp, s3_server() as endpoint:
        convert(ConvertOptions(src=str(args.src), dest=f"{tmp}/wds", workers=max(args.workers, 1),
                               shard_size=args.shard_size), progress=False)
        epochs = s3_loaders(args.src, tmp, args, aug, endpoint)
        rates, first, workers = interleaved_rates(epochs, args.rounds)
        rss = {name: peak_rss_mib(pids) for name, pids in workers.items()}
        cache = {name: disk_mib(f"{tmp}/cache-{store}")
                 for name, store in (("wds-s3-cache", "wds"), ("streaming-s3", "mds"), ("litdata-s3", "litdata"))}
        stores = {name: disk_mib(f"{tmp}/{name}") for name in ("wds", "mds", "litdata")}
    against_local = {name: median_ratio(r, rates["wds"]) for name, r in rates.items()}
    print_table({"images/s": ".1f", "first epoch": ".1f", "/ wds local": ".2f", "workers' peak RSS MiB": ".0f",
                 "cache MiB": ".1f"},
                [(name, float(np.median(r)), first[name], against_local[name], rss[name], cache.get(name))
                 for name, r in rates.items()])
    print(f"stores, MiB: {', '.join(f'{name} {mib:.1f}' for name, mib in stores.items())}")
    for ours_s3 in ("wds-s3", "wds-s3-cache"):
        print(f"ratio {ours_s3}/wds {against_local[ours_s3]:.2f} (aim >= 0.8); {ours_s3}/streaming-s3 "
              f"{median_ratio(rates[ours_s3], rates['streaming-s3']):.2f}, {ours_s3}/litdata-s3 "
              f"{median_ratio(rates[ours_s3], rates['litdata-s3']):.2f} (aim >= 1)")
    return {
        "s3": "moto",
        "shard_size": args.shard_size,
        **{f"{name}_images_per_s": round(float(np.median(r)), 1) for name, r in rates.items()},
        **{f"{name}_first_epoch_images_per_s": round(rate, 1) for name, rate in first.items()},
        **{f"ratio_{name}_vs_wds".replace("-", "_"): round(ratio, 3) for name, ratio in against_local.items()
           if name != "wds"},
        **{f"ratio_{ours_s3}_vs_{peer_s3}".replace("-", "_"): round(median_ratio(rates[ours_s3], rates[peer_s3]), 3)
           for ours_s3 in ("wds-s3", "wds-s3-cache") for peer_s3 in ("streaming-s3", "litdata-s3")},
        **{f"{name}_workers_peak_rss_mib": round(mib) for name, mib in rss.items()},
        **{f"{name}_cache_mib": round(mib, 1) for name, mib in cache.items()},
        **{f"{name}_store_mib": round(mib, 1) for name, mib in stores.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7, help="timed epochs per loader, taken in turns")
    parser.add_argument("--make", type=int, default=0, help="first write this many 400x300 photos into SRC")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: also GPU decode mode")
    parser.add_argument("--s3", action="store_true", help="our reader on local disk and on S3 (moto), and "
                                                          "MosaicML Streaming and LitData on S3")
    parser.add_argument("--shard-size", default="256MB", help="of every store (convert's --shard-size; MDS "
                                                              "size_limit, LitData chunk_bytes)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    args.shard_bytes = parse_shard_size(args.shard_size).max_bytes
    if args.s3 and args.shard_bytes is None:
        parser.error("--s3 needs a --shard-size in bytes (e.g. 4MB): the peers cut their shards by size")
    if args.s3 and not all(importlib.util.find_spec(peer) for peer in ("streaming", "litdata")):
        parser.error("--s3 needs the peers: pip install mosaicml-streaming litdata (for this bench only)")
    if args.make:
        make_photos(args.src, args.make)
    aug = AugmentConfig()
    count = sum(1 for _ in (args.src / "train").rglob("*.jpg"))
    print(f"{count} images, {args.workers} workers, batch {args.batch_size}, size {args.size}, device {args.device}")
    figures = s3_bench(args, aug) if args.s3 else local_bench(args, aug)
    result = {
        "bench": "loader",
        "images": count,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "size": args.size,
        "rounds": args.rounds,
        **figures,
        "device": args.device,
        **machine(),
    }
    record("loader", result)


if __name__ == "__main__":
    main()
