"""The training process's cost of taking a batch from the loader's workers (shared-memory segments received,
tensors rebuilt, the task's batch assembled; not the copy to the device), ms a batch, side by side with another
tree.

    python bench/batch_transfer.py --against /tmp/base      # git worktree add /tmp/base <commit>

Through the real loader (`pipelines.build_loader`) over a store of the task's shipped config (detection: coin
windows at 2-3x, as bench/task_throughput.py), with the workers' queues full before the clock starts: the
workers have made their `prefetch_factor` batches each during a pause, and the figure is the median time of
`next()` over those, each a batch already waiting. On the CPU (no pin-memory thread) the training process's own
thread receives them; on a GPU host the pin-memory thread does, beside the training loop. The trees alternate,
each in a process of its own; the last line is one JSON object, also appended to bench/results/batch_transfer.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(task: str, batch: int, store: str, workers: int, prefetch: int, fill_s: float) -> dict:
    """ms per batch for `next()` on a loader whose workers have filled their queues."""
    import torch
    from task_throughput import bench_config

    from pipelines import build_loader
    from training.config import validate

    raw = bench_config(task, f"data.batch_size={batch} data.prefetch_factor={prefetch}", "transfer", store,
                       Path("/tmp"), 10**6, workers)
    cfg = validate(raw).data
    loader = build_loader(cfg, cfg.train_split, train=True, task=task, rank=0, world_size=1, seed=0,
                          device=torch.device("cpu"))
    loader.plan_epochs(10**6)
    items = iter(loader.dataloader)  # the workers' batches as the training process receives them
    received = getattr(loader.task, "received", lambda batch: batch)  # trees before it took them as they came
    next(items)  # the workers have started
    time.sleep(fill_s)
    times = []
    for _ in range(workers * prefetch - 1):
        start = time.perf_counter()
        received(next(items)[0])
        times.append(time.perf_counter() - start)
    return {"ms_per_batch": statistics.median(times) * 1e3, "max_ms": max(times) * 1e3}


def in_tree(tree: Path, task: str, batch: int, store: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "batch_transfer.py"), "--measure", f"{task},{batch}", "--store", store,
           "--workers", str(args.workers), "--prefetch", str(args.prefetch), "--fill-s", str(args.fill_s)]
    env = os.environ | {"PYTHONPATH": f"{tree}:{ROOT / 'bench'}"}
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="detect")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--against", type=Path, help="another checkout, measured side by side")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--fill-s", type=float, default=20.0, help="pause for the workers to fill their queues")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/shardtrain-batch-transfer"))
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--measure", help=argparse.SUPPRESS)  # the child: TASK,BATCH
    args = p.parse_args()
    if args.measure:
        task, batch = args.measure.split(",")
        print(json.dumps(measure(task, int(batch), args.store, args.workers, args.prefetch, args.fill_s)))
        return

    from task_throughput import make_store

    from common import machine, print_table, record

    out: dict = {"bench": "batch_transfer", "machine": machine(), "workers": args.workers,
                 "prefetch": args.prefetch, "against": str(args.against) if args.against else None, "rows": []}
    table = []
    for task in args.tasks.split(","):
        store = make_store(args.work, task, 12 * args.batch, args.batch)
        trees = {"ours": ROOT} | ({"base": args.against} if args.against else {})
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.rounds):  # alternating, so that a change in the machine's load hits both
            for name, tree in trees.items():
                runs[name].append(in_tree(tree, task, args.batch, store, args))
        best = {name: min(r["ms_per_batch"] for r in found) for name, found in runs.items()}
        row = {"task": task, "batch": args.batch, "ms_per_batch": round(best["ours"], 2)}
        if "base" in best:
            row |= {"against_ms_per_batch": round(best["base"], 2), "speedup": round(best["base"] / best["ours"], 2)}
        out["rows"].append(row)
        table.append((f"{task}, batch {args.batch}", row["ms_per_batch"], row.get("against_ms_per_batch"),
                      row.get("speedup")))
    print_table({"ms/batch": ".2f", "against": ".2f", "speedup": ".2f"}, table)
    record("batch_transfer", out)


if __name__ == "__main__":
    main()
