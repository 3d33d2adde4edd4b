"""Conversion images/s on Dask clusters of 1, 2, 4, 8 worker processes, with the efficiency per worker.

    python3 bench/convert_scaling.py [SRC] --workers 1,2,4,8 [--format wds|lmdb] [--repeats 2] [--shard-size 4MB]

Each count n is `convert --dask local:n`: a LocalCluster of n one-thread worker processes on this host,
started and warmed (each worker imports what conversion needs) before timing. A timing is one whole
shards.convert on that cluster, from the listing to manifest.json, into a new store; best of --repeats.
Efficiency at n: rate(n) / (n x rate(1)); the aim is >= 0.8 at 8 (on a 16-core host: the client packs and
the workers move parts between them, so they need cores beside the n decoding). Side by side, the same
conversion with n processes of convert's own pool (`--workers n`, one host; its parent packs and writes),
the baseline Dask costs against, with its own efficiency: what the host itself allows. Without SRC, a
source of real photos at 256-500 px is made with shards.samples. Page cache warm for all. The last line
is one JSON object (efficiency_convert_<n>, ...), also appended to bench/results/convert_scaling.jsonl.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import machine, record
from shards import ConvertOptions, ConvertSummary, convert, samples
from shards.distributed import connect


def warm() -> None:
    import webdataset  # noqa: F401  (it imports torch: seconds once per worker, not conversion work)


def timed(opts: ConvertOptions, repeats: int, **kwargs) -> tuple[float, ConvertSummary]:
    """Best images/s of `repeats` conversions into new stores."""
    best, summary = 0.0, None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="bench-convert-scaling-") as tmp:
            start = time.perf_counter()
            summary = convert(opts.model_copy(update={"dest": f"{tmp}/store"}), progress=False, **kwargs)
            best = max(best, (summary.added + summary.rejected) / (time.perf_counter() - start))
    assert summary is not None
    return best, summary


def make_source(root: Path, per_class: int) -> Path:
    for i, size in enumerate((256, 320, 400, 500)):
        samples.make_imagefolder(root / f"s{size}", per_class={"train": per_class}, size=size, seed=i)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="?", help="a raw folder (default: one made from the bundled photos)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts; 1 is always measured")
    parser.add_argument("--format", choices=["wds", "lmdb"], default="wds")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many conversions per count")
    parser.add_argument("--shard-size", default="4MB", help="convert's --shard-size: small, so the test source "
                                                            "makes many shards, as a real one does at 256MB")
    parser.add_argument("--per-class", type=int, default=40, help="images per class and size of a made source")
    args = parser.parse_args()
    counts = sorted({1, *map(int, args.workers.split(","))})

    with tempfile.TemporaryDirectory(prefix="bench-convert-scaling-src-") as made:
        src = args.src or str(make_source(Path(made), args.per_class))
        for path in Path(src).rglob("*"):
            if path.is_file():
                path.read_bytes()  # page cache
        warm()
        opts = ConvertOptions(src=src, dest="unused", format=args.format, shard_size=args.shard_size)
        dask_rate, pool_rate = {}, {}
        for n in counts:
            pool_rate[n], summary = timed(opts.model_copy(update={"workers": n}), args.repeats)
            with connect(f"local:{n}") as client:
                client.run(warm)
                dask_rate[n], _ = timed(opts, args.repeats, client=client)
            efficiency, pool_efficiency = dask_rate[n] / (n * dask_rate[1]), pool_rate[n] / (n * pool_rate[1])
            print(f"{n} workers: dask {dask_rate[n]:8.1f} images/s, efficiency {efficiency:.2f}; one host's pool "
                  f"{pool_rate[n]:8.1f} images/s, efficiency {pool_efficiency:.2f}; "
                  f"dask/pool {dask_rate[n] / pool_rate[n]:.2f}", flush=True)

    result: dict = {"bench": "convert_scaling", "images": summary.added + summary.rejected, "format": args.format,
                    "shard_size": args.shard_size, "shards": len(summary.shards_written), "workers": counts,
                    "repeats": args.repeats}
    for n in counts:
        result[f"images_per_s_{n}"] = round(dask_rate[n], 1)
        result[f"efficiency_convert_{n}"] = round(dask_rate[n] / (n * dask_rate[1]), 3)
        result[f"pool_images_per_s_{n}"] = round(pool_rate[n], 1)
        result[f"pool_efficiency_{n}"] = round(pool_rate[n] / (n * pool_rate[1]), 3)
        result[f"dask_vs_pool_{n}"] = round(dask_rate[n] / pool_rate[n], 3)
    record("convert_scaling", {**result, **machine()})


if __name__ == "__main__":
    main()
