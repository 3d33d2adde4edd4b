"""The fault campaign: kill, corrupt and cut off shardtrain on purpose, and count what survived.

    .venv/bin/python bench/faults.py                       # every part, 20 kills each (about an hour on 2 cores)
    .venv/bin/python bench/faults.py --only data --kills 5
    .venv/bin/python bench/faults.py --only preempt --kills 5   # the train part's preemption trials alone

Each part (`faults_train`, `faults_data`, `faults_prefect`) exposes `run(work, kills, seed) -> dict` of
flat figures (`preempt` is `faults_train.run_preemptions`) and prints one line per trial; the last line
of output is the campaign's JSON line, also appended to bench/results/faults.jsonl. docs/RELIABILITY.md reads the figures.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import tempfile
import time
from pathlib import Path

from common import machine, record

# each part is a function of bench/faults_*.py; `train` includes `preempt`
PARTS = {"train": "faults_train:run", "preempt": "faults_train:run_preemptions", "data": "faults_data:run",
         "prefect": "faults_prefect:run"}
DEFAULT_PARTS = ("train", "data", "prefect")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kills (or faults) per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=",".join(DEFAULT_PARTS),
                        help=f"comma-separated parts of {','.join(PARTS)}")
    parser.add_argument("--work", type=Path, help="keep the campaign's files here (default: a temp dir, removed)")
    args = parser.parse_args()
    parts = args.only.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")

    work = args.work or Path(tempfile.mkdtemp(prefix="shardtrain-faults-"))
    figures: dict = {}
    started = time.monotonic()
    try:
        for name in parts:
            print(f"== {name} ==", flush=True)
            module, function = PARTS[name].split(":")
            part = getattr(importlib.import_module(module), function)
            figures.update(part(work / name, kills=args.kills, seed=args.seed))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    record("faults", {"bench": "faults", "parts": parts, "kills": args.kills, "seed": args.seed, **figures,
                      "wall_s": round(time.monotonic() - started), **machine()})


if __name__ == "__main__":
    main()
