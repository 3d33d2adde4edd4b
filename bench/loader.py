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
(worker start, page cache, tar index) they take turns, one timed epoch each per round, in an
order that rotates, so that load from other processes and the loader run just before fall on
all three alike; a ratio is the median over rounds of ours/ImageFolder within the round.
With --device cuda (a GPU host) every loader hands its batches to the GPU as a trainer gets them
(pinned memory, non-blocking copies), and two more loaders join: ours in GPU decode mode
(`data.decode: gpu`, nvJPEG) on the same wds and lmdb stores, reported against CPU decode with
the same workers. Prints images/s and the ratios; the last line is one JSON object, also appended
to bench/results/loader.jsonl.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from common import machine, record
from pipelines import AugmentConfig, DataConfig, build_loader, presets
from shards import ConvertOptions, convert, samples


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
        img.crop((x, y, x + cw, y + ch)).resize((400, 300), Image.BILINEAR).save(
            folder / f"{name}_{i:05d}.jpg", quality=90
        )


def interleaved_rates(epoch_fns: dict, rounds: int) -> dict[str, list[float]]:
    """Images/s of each epoch function per round, run in turns after one untimed epoch each."""
    for fn in epoch_fns.values():
        fn(0)
    rates = {name: [] for name in epoch_fns}
    names = list(epoch_fns)
    for e in range(1, rounds + 1):
        turn = e % len(names)  # each round starts with the next loader: none always follows the same one
        for name in names[turn:] + names[:turn]:
            start = time.perf_counter()
            n = epoch_fns[name](e)
            rates[name].append(n / (time.perf_counter() - start))
    return rates


def median_ratio(ours: list[float], baseline: list[float]) -> float:
    """Median over rounds of the ratio within a round: load from other processes mostly cancels out."""
    return float(np.median(np.asarray(ours) / np.asarray(baseline)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(store: str, args, aug: AugmentConfig, decode: str = "cpu"):
    device = torch.device(args.device)
    cfg = DataConfig(path=store, image_size=args.size, batch_size=args.batch_size, workers=args.workers, decode=decode,
                     augment=aug)
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



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7, help="timed epochs per loader, taken in turns")
    parser.add_argument("--make", type=int, default=0, help="first write this many 400x300 photos into SRC")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: also GPU decode mode")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    if args.make:
        make_photos(args.src, args.make)
    aug = AugmentConfig()
    count = sum(1 for _ in (args.src / "train").rglob("*.jpg"))
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        for fmt in ("wds", "lmdb"):
            convert(
                ConvertOptions(src=str(args.src), dest=f"{tmp}/{fmt}", format=fmt, workers=max(args.workers, 1)),
                progress=False,
            )
        epochs = {fmt: ours(f"{tmp}/{fmt}", args, aug) for fmt in ("wds", "lmdb")}
        if args.device == "cuda":
            epochs.update({f"{fmt}-gpu": ours(f"{tmp}/{fmt}", args, aug, decode="gpu") for fmt in ("wds", "lmdb")})
        # last: its workers start after this process has freed large blocks, and inherit the heap limits that
        # glibc raised then (ours set them themselves; see pipelines.loader.keep_freed_heap): its best case
        epochs["imagefolder"] = imagefolder(args.src, args, aug)
        rates = interleaved_rates(epochs, args.rounds)
    print(f"{count} images, {args.workers} workers, batch {args.batch_size}, size {args.size}, device {args.device}")
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
    result = {
        "bench": "loader",
        "images": count,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "size": args.size,
        "rounds": args.rounds,
        **{f"{name}_images_per_s": round(float(np.median(r)), 1) for name, r in rates.items()},
        "ratio_wds_vs_imagefolder": round(wds_ratio, 3),
        "ratio_lmdb_vs_imagefolder": round(lmdb_ratio, 3),
        **gpu_ratios,
        "device": args.device,
        **machine(),
    }
    record("loader", result)


if __name__ == "__main__":
    main()
