"""The CPU cost of the workers' batch functions (`data.decode: cpu`), ms an image, side by side with another tree.

    python bench/worker_batches.py --tasks dino,classify --batch 64,256 [--against DIR] [--images 300]

On ImageNet-like JPEGs (~500x375 crops of the bundled photos, bench/train_throughput.py's `make_raw`), each task's
train batch function (pipelines/batches.py: decode and augment, as one DataLoader worker runs it) with its shipped
config's image size and augmentation (configs/dino_vits16.yaml: 2 x 224 + 10 x 96 views; configs/resnet50.yaml)
on batches of the given sizes, in one process; best of --repeats. With --against DIR (a checkout of another commit, e.g.
`git worktree add /tmp/base main`), the same measurement runs from that tree in alternation with this one, and
each row gets the ratio and whether both gave the same pixels (a checksum of the batch). The last line is one
JSON object, also appended to bench/results/worker_batches.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"dino": "configs/dino_vits16.yaml", "classify": "configs/resnet50.yaml"}


def measure(task: str, batch: int, raw: Path, repeats: int) -> dict:
    """ms an image of `task`'s train batch function on `batch` samples of `raw`, and a checksum of its output."""
    from pipelines.store import RawSample
    from pipelines.tasks import TASKS
    from training.config import load_config

    files = sorted(raw.rglob("*.jpg"))
    samples = [RawSample("bench", f.stem, "jpg", f.read_bytes(), {"cls": 0}) for f in files]
    samples = [samples[i % len(samples)] for i in range(batch)]
    seeds = list(range(batch))
    data = load_config(Path.cwd() / CONFIGS[task]).data
    spec = TASKS[task].spec(True, data.image_size, data.augment)
    fn = TASKS[task].decoders["cpu"].worker
    out, _ = fn(samples, seeds, spec)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(samples, seeds, spec)
        best = min(best, time.perf_counter() - start)
    images = out[TASKS[task].images]
    checksum = sum(int(t.to(torch.int64).sum()) for t in (images if isinstance(images, list) else [images]))
    return {"ms_per_image": best / batch * 1e3, "checksum": checksum}


def in_tree(tree: Path, task: str, batch: int, raw: Path, repeats: int) -> dict:
    """`measure` run from `tree`'s code, in a process of its own."""
    cmd = [sys.executable, __file__, "--measure", f"{task},{batch}", "--raw", str(raw), "--repeats", str(repeats)]
    # the tree first, then whatever path the caller's packages came from
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{tree}: {task} batch {batch} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="dino,classify")
    p.add_argument("--batch", default="64,256", help="comma-separated batch sizes")
    p.add_argument("--against", type=Path, help="another checkout, measured side by side")
    p.add_argument("--images", type=int, default=300, help="distinct JPEGs made (a batch cycles through them)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/shardtrain-worker-batches"))
    p.add_argument("--raw", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--measure", help=argparse.SUPPRESS)  # the child: TASK,BATCH
    args = p.parse_args()
    if args.measure:
        task, batch = args.measure.split(",")
        print(json.dumps(measure(task, int(batch), args.raw, args.repeats)))
        return

    from common import machine, print_table, record
    from train_throughput import make_raw

    raw = args.work / "raw"
    if not (raw / "train").exists():
        make_raw(raw, args.images, 0, 2)
    out: dict = {"bench": "worker_batches", "machine": machine(), "rows": [],
                 "against": str(args.against) if args.against else None}
    table = []
    for task in args.tasks.split(","):
        for batch in map(int, args.batch.split(",")):
            trees = {"ours": ROOT} | ({"base": args.against} if args.against else {})
            runs: dict[str, list[dict]] = {name: [] for name in trees}
            for _ in range(2):  # alternating, so that a change in the machine's load hits both
                for name, tree in trees.items():
                    runs[name].append(in_tree(tree, task, batch, raw, args.repeats))
            best = {name: min(found, key=lambda r: r["ms_per_image"]) for name, found in runs.items()}
            ours = best["ours"]
            row = {"task": task, "batch": batch, "ms_per_image": round(ours["ms_per_image"], 3)}
            if "base" in best:
                base = best["base"]
                row |= {"against_ms_per_image": round(base["ms_per_image"], 3),
                        "speedup": round(base["ms_per_image"] / ours["ms_per_image"], 3),
                        "same_pixels": base["checksum"] == ours["checksum"]}
            out["rows"].append(row)
            table.append((f"{task}, batch {batch}", row["ms_per_image"], row.get("against_ms_per_image"),
                          row.get("speedup"), row.get("same_pixels")))
    print_table({"ms/image": ".3f", "against": ".3f", "speedup": ".2f", "same pixels": ""}, table)
    record("worker_batches", out)


if __name__ == "__main__":
    main()
