"""Conversion speed vs the decode-only baseline (PIL open + load of the same files), same run.

    python bench/convert.py SRC [--workers N] [--format wds|lmdb]

Both are measured with the same number of worker processes over the same files (read once
before timing, so both find them in the page cache). Prints images/s per worker for each and
their ratio (the aim is >= 0.8: conversion costs little beyond the decode it must do anyway);
the last line is one JSON object, also appended to bench/results/convert.jsonl.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from common import machine, record
from shards import ConvertOptions, convert
from shards.layouts import image_relpaths
from shards.storage import open_fs


def decode_only(path: str) -> int:
    with open(path, "rb") as f:
        data = f.read()
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.width


def decode_rate(paths: list[str], workers: int) -> float:
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap(decode_only, paths, chunksize=max(1, min(32, len(paths) // (workers * 8)))):
            pass
    return len(paths) / (time.perf_counter() - start)


def convert_rate(src: str, fmt: str, workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        start = time.perf_counter()
        summary = convert(ConvertOptions(src=src, dest=f"{tmp}/store", format=fmt, workers=workers), progress=False)
        elapsed = time.perf_counter() - start
    return (summary.added + summary.rejected) / elapsed, summary.added



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--format", choices=["wds", "lmdb"], default="wds")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs of each")
    args = parser.parse_args()

    fs, root = open_fs(args.src)
    paths = [os.path.join(root, r) for r in image_relpaths(fs, root)[0]]
    for p in paths:  # warm the page cache for both measurements
        Path(p).read_bytes()
    import webdataset  # noqa: F401  (its one-time import is not conversion work)

    decode = max(decode_rate(paths, args.workers) for _ in range(args.repeats))
    runs = [convert_rate(args.src, args.format, args.workers) for _ in range(args.repeats)]
    conv, added = max(r[0] for r in runs), runs[0][1]
    w = args.workers
    print(f"{len(paths)} images ({added} converted), {w} workers, format {args.format}")
    print(f"decode only (PIL open+load): {decode:8.1f} images/s  {decode / w:8.1f} per worker")
    print(f"convert:                     {conv:8.1f} images/s  {conv / w:8.1f} per worker")
    print(f"ratio convert/decode: {conv / decode:.2f} (aim >= 0.8)")
    result = {
        "bench": "convert", "images": len(paths), "workers": w, "format": args.format,
        "decode_images_per_s": round(decode, 1), "decode_per_worker": round(decode / w, 1),
        "convert_images_per_s": round(conv, 1), "convert_per_worker": round(conv / w, 1),
        "ratio": round(conv / decode, 3), **machine(),
    }
    record("convert", result)


if __name__ == "__main__":
    main()
