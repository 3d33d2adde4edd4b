"""What every benchmark shares (DESIGN.md, "How we test"): the machine it ran on, and its JSON line,
printed last and appended to bench/results/<bench>.jsonl."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def iterator_rate(it: Iterator, batch: int, warmup: int, count: int) -> float:
    """images/s of drawing `count` batches of `batch` from `it` on the GPU, after `warmup` batches."""
    for _ in range(warmup):
        next(it)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        next(it)
    torch.cuda.synchronize()
    return batch * count / (time.perf_counter() - start)


def train_loader_rate(cfg, task: str, count: int) -> float:  # noqa: ANN001 (a pipelines.DataConfig)
    """images/s of `cfg`'s train loader alone (workers, decode, copy to the GPU, normalise; no model): `count`
    batches after those its workers prefetched while it started (queued, and one in each worker's hands: counted,
    they would overstate the workers' rate), across epochs as the training loop iterates them."""
    import itertools

    from pipelines import build_loader

    loader = build_loader(cfg, cfg.train_split, train=True, task=task, rank=0, world_size=1, seed=0,
                          device=torch.device("cuda"))
    loader.plan_epochs(10**6)

    def across_epochs() -> Iterator:
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield from loader

    prefetched = cfg.workers * ((cfg.prefetch_factor or 2) + 1)
    return iterator_rate(across_epochs(), cfg.batch_size, warmup=prefetched + 2, count=count)


def profile_steps(step: Callable[[], object], steps: int = 5, top: int = 25) -> None:
    """Where `steps` calls of `step` spend the GPU's time: the share of the wall clock with a kernel or copy
    running, and the `top` kernels by time, printed (each kernel's line starts with two spaces). First the same
    number of steps without the profiler: its cost per launch lengthens a step of thousands of launches (H100,
    DINO's compiled step: 78 ms, 102 under the profiler, which then called the GPU 73% busy)."""
    from torch.profiler import ProfilerActivity, profile

    from training.profiling import summary

    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    plain = time.perf_counter() - t
    print(f"profile: unprofiled, {plain / steps * 1e3:.1f} ms a step (the profiler's own launch cost comes on top)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    print("\n".join(summary(prof, steps, wall, top)))


def machine() -> dict:
    """CPU count, GPU name and count, torch version; never a host name."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_count": os.cpu_count(), "gpu": gpu, "gpus": torch.cuda.device_count(), "torch": torch.__version__}


def record(bench: str, result: dict) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / f"{bench}.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result))


def record_if_stopped(bench: str, result: dict) -> None:
    """From here on, a SIGTERM (`timeout`, a device call's limit) first records `result` as measured so far, marked
    partial, then ends the bench as it would have: a cut run's figures land in the jsonl, not only in its log."""
    def stop(signum: int, _frame: object) -> None:
        record(bench, {**result, "partial": True})
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stop)


def print_table(columns: dict[str, str], rows: list[tuple]) -> None:
    """A results table: a name column, then one column per `columns` entry (heading: format spec of its
    numbers); a cell that is None stays empty."""
    width = max(len(str(row[0])) for row in rows) if rows else 3
    cell_widths = [max(len(heading), 9) for heading in columns]
    print()
    print(f"{'run':{width}s} " + " ".join(f"{h:>{w}s}" for h, w in zip(columns, cell_widths, strict=True)))
    for name, *values in rows:
        cells = ("" if v is None else format(v, spec) for v, spec in zip(values, columns.values(), strict=True))
        print(f"{name:{width}s} " + " ".join(f"{c:>{w}s}" for c, w in zip(cells, cell_widths, strict=True)))
