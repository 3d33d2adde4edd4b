"""build_loader: a shard store split to batches on the device, resumable mid-epoch.

One `Loader` per split per process keeps its DataLoader (and persistent workers) across
epochs. The DataLoader is map-style with batch_size=None: the sampler below yields one
(epoch, batch number, sample numbers) reference per batch, a worker turns it into a
uint8 batch (a quarter of float's bytes to pass between processes), and the Loader moves it to
the device, where it becomes float.

A train loader iterates its DataLoader once for the whole run: the sampler goes on from one epoch
into the next, and each iteration of the Loader takes one epoch's batches from that live iteration.
So the workers prepare the next epoch's first batches while this epoch ends and while validation
runs, instead of refilling the prefetch queue from empty at every epoch start. A position set
elsewhere (a resume) starts a new iteration there. An eval loader's iteration is one epoch.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from timm.utils import random_seed
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from pipelines import gpu, hw, plan
from pipelines.batches import BatchFn, BatchSpec
from pipelines.config import DataConfig, DataError
from pipelines.cpus import worker_count
from pipelines.readers import ShardReader, make_reader
from pipelines.stall import StallWatch
from pipelines.store import BadSample, StoreSplit, open_split
from pipelines.tasks import TASKS, Batch, TaskData

BatchRef = tuple[int, int, np.ndarray]  # (epoch, batch number in the rank's epoch, global sample numbers)
GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
WORKER_MMAP_THRESHOLD, WORKER_TRIM_THRESHOLD = 16 << 20, 64 << 20


class EpochBatches(Sampler):
    """Yields this rank's batch references from batch `start` of `epoch` on (see plan.py): for eval that epoch's,
    for train epoch after epoch, until `end` (the run's epoch count, when known). Of the epoch in `taken`, only the
    rest that other layouts (process counts, batch sizes) left."""

    def __init__(self, store: StoreSplit, *, train: bool, seed: int, rank: int, world_size: int, batch_size: int,
                 shuffle_block: int):
        self.store, self.train, self.seed = store, train, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.shuffle_block = shuffle_block
        self.epoch, self.start = 0, 0
        self.end: int | None = None
        self.taken: tuple[int, list[plan.Taken]] = (-1, [])  # an epoch begun by other layouts, and those layouts
        lo, hi = plan.rank_span(store.num_samples, rank=rank, world_size=world_size, batch_size=batch_size, train=train)
        self.num_batches = -(-(hi - lo) // batch_size)

    def batches(self, epoch: int) -> list[np.ndarray]:
        seq = plan.epoch_sequence(self.store.counts, train=self.train, seed=self.seed, epoch=epoch,
                                  block=self.shuffle_block)
        if epoch == self.taken[0]:
            seq = plan.rest_of_epoch(seq, self.taken[1])
        span = plan.rank_span(len(seq), rank=self.rank, world_size=self.world_size, batch_size=self.batch_size,
                              train=self.train)
        return plan.rank_batches(seq, span, self.batch_size)

    def first(self, epoch: int) -> int:
        """The number of `epoch`'s first batch: 0, or for the rest of an epoch begun by another layout, where its
        batches start so that they end where a whole epoch's do."""
        if epoch != self.taken[0]:
            return 0
        return plan.first_batch(self.store.num_samples, self.taken[1], world_size=self.world_size,
                                batch_size=self.batch_size)

    def __iter__(self) -> Iterator[BatchRef]:
        epoch, start = self.epoch, self.start
        while True:
            for j, samples in enumerate(self.batches(epoch)[start - self.first(epoch):], start=start):
                yield epoch, j, samples
            epoch, start = epoch + 1, 0
            if not self.train or (self.end is not None and epoch >= self.end):
                return


class StoreBatches(Dataset):
    """Map-style: a batch reference in, (uint8 batch, skipped count, failure or None) out."""

    def __init__(self, reader: ShardReader, batch_fn: BatchFn, spec: BatchSpec, *, seed: int, rank: int, on_error: str):
        self.reader, self.batch_fn, self.spec = reader, batch_fn, spec
        self.seed, self.rank, self.on_error = seed, rank, on_error
        self.closing: tuple[int, BatchSpec] | None = None  # (first epoch, spec): the spec of the last epochs

    def spec_at(self, epoch: int) -> BatchSpec:
        return self.closing[1] if self.closing and epoch >= self.closing[0] else self.spec

    def __getitem__(self, ref: BatchRef) -> tuple[dict | None, int, str | None]:
        epoch, batch, indices = ref
        seeds = plan.sample_seeds(self.seed, epoch, self.rank, batch, len(indices))
        if get_worker_info() is not None:
            # In a worker, anything outside the presets sees a positional RNG too. In the training process
            # (data.workers=0) the global RNGs are the training's own (dropout, mixup): the batch functions
            # draw only from their per-sample generators, and leave those alone.
            random_seed(seeds[0] if seeds else self.seed)
        try:
            raws = self.reader.read(indices)
        except DataError as e:  # storage failed: the run stops with this line (a resume continues)
            return None, 0, str(e)
        bad = [r for r in raws if isinstance(r, BadSample)]
        good = [(r, s) for r, s in zip(raws, seeds) if not isinstance(r, BadSample)]
        out, more_bad = self.batch_fn([r for r, _ in good], [s for _, s in good], self.spec_at(epoch))
        bad += more_bad
        if bad and self.on_error == "fail":
            return None, len(bad), describe(bad[0])
        return out, len(bad), None


@dataclass(frozen=True)
class Normalise:
    """uint8 (N,3,H,W) -> float (x - mean) / std. Worker batches are channels_last in memory,
    so the arithmetic runs on the contiguous NHWC view."""

    mean: torch.Tensor  # (3,), on the 0..255 scale
    std: torch.Tensor
    channels_last: bool

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        nhwc = images.permute(0, 2, 3, 1)
        if images.device.type == "cpu" and images.dtype == torch.uint8 and images.numel():
            x = self.lookup(nhwc)
        else:
            x = nhwc.float().sub_(self.mean).div_(self.std)
        x = x.permute(0, 3, 1, 2)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def lookup(self, nhwc: torch.Tensor) -> torch.Tensor:
        """On the CPU a 256-entry table per channel (OpenCV's LUT) is about 3x faster than float arithmetic
        whose innermost dimension is 3 channels."""
        table = ((torch.arange(256.0)[:, None] - self.mean.cpu()) / self.std.cpu()).numpy()[None]  # (1,256,3)
        n, h, w, c = nhwc.shape
        return torch.from_numpy(cv2.LUT(nhwc.contiguous().numpy().reshape(n * h, w, c), table)).view(n, h, w, c)


def make_normalise(cfg: DataConfig, device: torch.device) -> Normalise:
    mean = torch.tensor(cfg.augment.mean, device=device) * 255
    std = torch.tensor(cfg.augment.std, device=device) * 255
    return Normalise(mean, std, cfg.channels_last)


def describe(bad: BadSample) -> str:
    where = f"key {bad.key}" if bad.key else "a sample"
    return f"corrupt data in shard {bad.shard}, {where}: {bad.reason} (set data.on_error=skip to skip such samples)"


def init_worker(_: int) -> None:
    # The workers are the parallelism; threads of their own would oversubscribe the cores. OpenCV's are off in the
    # parent already (pipelines.presets), and setting its count again here, in a fork, waits forever on the pool
    # threads that fork left behind where the parent had run an OpenCV op in parallel before that.
    torch.set_num_threads(1)
    keep_freed_heap()
    forget_parent_exit_hooks()
    outlive_stop_signals()


def forget_parent_exit_hooks() -> None:
    """Drop the exit hooks this forked worker inherited from its parent's threads.

    Prefect's services (in a process that also ran a flow or used the Prefect client) register one through
    `threading._register_atexit`; a worker has none of those threads, the hook fails at its exit, and a
    failing hook ends it with exit code 1: "DataLoader worker exited unexpectedly". Python has no public
    way to unregister them.
    """
    threading._threading_atexits.clear()  # type: ignore[attr-defined]


def outlive_stop_signals() -> None:
    """A worker lives until its rank closes the loader, even when SIGTERM or SIGINT reaches it first.

    On a stop signal the rank finishes its step and saves; a worker that died of the signal would end the
    rank with "DataLoader worker is killed by signal" instead. Such signals reach workers from torchrun
    (which signals each rank's whole process group), a terminal or a scheduler that signals every process.
    SIGINT is ignored. SIGTERM is taken in a thread that knows the sender: the rank's own (a DataLoader
    shutting down its workers, as torch's handler does) ends the worker quietly, anyone else's is ignored.
    A worker whose rank died exits by torch's watchdog.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # held while it started: now dropped
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started after this inherit it
    threading.Thread(target=exit_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT blocked in this thread while it forks DataLoader workers, so that each worker starts
    with them blocked: torch's SIGTERM handler, in place before `outlive_stop_signals`, dies of a signal from
    anyone but the worker's parent, as torchrun's to the rank's process group. The worker takes what is held
    once its own handling is in place; this process, when the block ends."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def exit_on_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)


def keep_freed_heap() -> None:
    """Let this process's C heap keep what a batch frees, for the next batch.

    By default glibc maps every block over 128 KiB on its own and hands free memory at the top of the
    heap back to the OS once more than 128 KiB is free there. It raises those limits only after the
    process frees a large mapped block. A worker forked before its parent did so decodes a batch, frees it,
    and faults all of that memory in again for the next. On the dev machine that was 1.20 ms per image against 0.83, and
    the cause of the loaders created first in a process running slower. Keeping 64 MiB bounds a worker's
    extra memory. Other C libraries have no mallopt and are left as they are.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(GLIBC_M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)
        mallopt(GLIBC_M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD)


class Loader:
    """One split for one process; see the package docstring for what an epoch covers."""

    def __init__(self, cfg: DataConfig, store: StoreSplit, sampler: EpochBatches, dataloader: DataLoader, *,
                 task: TaskData, device: torch.device, normalise: Normalise, workers_choice: str,
                 decode_choice: str):
        self.cfg, self.sampler, self.dataloader = cfg, sampler, dataloader
        # what data.workers and data.decode came to and why, lines for the run's log
        self.workers_choice, self.decode_choice = workers_choice, decode_choice
        self.task, self.decoder, self.device = task, task.decoders[cfg.decode], device
        self.num_samples = store.num_samples
        self.classes = store.classes
        self.skipped = 0
        self._epoch, self._batch = 0, 0
        self._normalise = normalise
        self._items: Iterator[tuple[dict | None, int, str | None]] = iter(())  # the live iteration of dataloader
        self._items_at: tuple[int, int] | None = None  # (epoch, batch) of its next item
        self._stall = StallWatch(cfg.stall_notice_s, f"data: no batch from split {store.split!r} for {{s:.0f}} s "
                                 f"({cfg.workers} worker(s)); still waiting: a stuck worker or a stalled read "
                                 "(data.stall_notice_s)")
        LIVE.add(self)

    def __len__(self) -> int:
        return self.sampler.num_batches

    @property
    def epoch(self) -> int:
        """The epoch an iteration covers."""
        return self._epoch

    @property
    def batch(self) -> int:
        """Batches of `epoch` yielded so far (or where the next iteration starts)."""
        return self._batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._epoch, self._batch = epoch, start_batch

    def plan_epochs(self, epochs: int) -> None:
        """The epochs training runs: the last `augment.close_mosaic` of them get no mosaic, so that the model ends
        on images like those it is evaluated on (YOLO's close_mosaic), and the sampler stops after the last. Call it
        before the first iteration: the workers take their copy of the dataset then."""
        aug, dataset = self.cfg.augment, self.dataloader.dataset
        assert isinstance(dataset, StoreBatches)
        if aug.close_mosaic and dataset.spec.train:
            closed = self.task.spec(True, self.cfg.image_size, aug.model_copy(update={"mosaic": 0.0}))
            dataset.closing = (max(epochs - aug.close_mosaic, 0), closed)
        self.sampler.end = epochs  # no batches of an epoch the run never reaches

    def state_dict(self) -> dict:
        """The position: epoch and batch, the layout they count in (world size, batch size) and, in an epoch begun
        by other layouts, those (`taken`)."""
        s = self.sampler
        taken = s.taken[1] if s.taken[0] == self._epoch else []
        return {"epoch": self._epoch, "batch": self._batch, "world_size": s.world_size, "batch_size": s.batch_size,
                **({"taken": [list(t) for t in taken]} if taken else {})}

    def load_state_dict(self, d: dict) -> None:
        """A position from `state_dict`. One saved by another layout (process count or batch size) mid-epoch goes
        on with the rest of its epoch, every sample not yet taken once, split among this layout's ranks in whole
        batches (plan.rest_of_epoch); its batches are numbered to end where a whole epoch's do."""
        s, epoch, batch = self.sampler, int(d["epoch"]), int(d["batch"])
        taken: list[plan.Taken] = [(int(w), int(b), int(n)) for w, b, n in d.get("taken", [])]
        world_size, batch_size = int(d.get("world_size", s.world_size)), int(d.get("batch_size", s.batch_size))
        if (world_size, batch_size) != (s.world_size, s.batch_size):
            done = batch - plan.first_batch(self.num_samples, taken, world_size=world_size, batch_size=batch_size)
            taken += [(world_size, batch_size, done)] if done else []
            batch = plan.first_batch(self.num_samples, taken, world_size=s.world_size, batch_size=s.batch_size)
        s.taken = (epoch, taken)
        self.set_epoch(epoch, batch)

    def rest(self) -> tuple[int, int]:
        """The samples the epoch has left after the layouts that took its start (all of it when none did), and how
        many of them this loader's ranks yield in whole batches."""
        taken = self.sampler.taken[1] if self.sampler.taken[0] == self._epoch else []
        left = plan.rest_length(self.num_samples, taken)
        return left, (len(self) - self.sampler.first(self._epoch)) * self.sampler.world_size * self.sampler.batch_size

    def close(self) -> None:
        """End the live iteration: its workers take the DataLoader's stop message and exit. The loader is not
        iterated again."""
        items, self._items, self._items_at = self._items, iter(()), None
        shutdown = getattr(items, "_shutdown_workers", None)  # a multi-process iteration: what its __del__ calls
        if shutdown is not None:
            shutdown()

    def batch_size(self, batch: Batch) -> int:
        """Samples in one of this loader's batches (a train batch is short by the corrupt samples skipped)."""
        return self.task.batch_size(batch)

    def __iter__(self) -> Iterator[Batch]:
        if self._items_at != (self._epoch, self._batch):  # a first epoch, a resume, an eval pass
            self.sampler.epoch, self.sampler.start = self._epoch, self._batch
            with stop_signals_held():  # where the workers start
                self._items, self._items_at = iter(self.dataloader), (self._epoch, self._batch)
        items: Iterable[tuple[dict | None, int, str | None]] = self._take(len(self) - self._batch)
        if self.decoder.device is not None:
            items = gpu.run_ahead(self._decoded(items), self.device)
        for batch, skipped, failure in items:
            if failure:
                raise DataError(failure)
            assert batch is not None  # a batch is missing only with a failure
            self.skipped += skipped
            self._batch += 1
            yield self.task.to_device(self.task.received(batch), self.device, self._normalise)

    def _take(self, n: int) -> Iterator[tuple[dict | None, int, str | None]]:
        """The live iteration's next `n` items; `_items_at` follows what was taken (run_ahead takes ahead of what
        was yielded, so a consumer that leaves mid-epoch leaves the iteration elsewhere, and the next starts anew)."""
        for _ in range(n):
            self._stall.started()
            try:
                item = next(self._items)
            finally:
                self._stall.ended()
            epoch, batch = self._items_at  # type: ignore[misc]  # set with _items
            self._items_at = (epoch, batch + 1) if batch + 1 < len(self) else (epoch + 1, 0)
            yield item

    def _decoded(self, items: Iterable[tuple[dict | None, int, str | None]]
                 ) -> Iterator[tuple[dict | None, int, str | None]]:
        """The training process's half of the decode (data.decode: gpu, hw or dali) over the workers' batches of
        encoded images, in order; a worker's failure ends them."""
        dataset = self.dataloader.dataset
        assert self.decoder.device is not None and isinstance(dataset, StoreBatches)
        skipped: deque[int] = deque()
        failed: list[tuple[dict | None, int, str | None]] = []

        def batches() -> Iterator[tuple[dict, BatchSpec]]:
            for batch, n, failure in items:
                if failure:
                    failed.append((batch, n, failure))
                    return
                assert batch is not None  # a batch is missing only with a failure
                skipped.append(n)
                yield batch, dataset.spec_at(self._epoch)

        for batch, bad in self.decoder.device(batches(), self.device):
            n = skipped.popleft() + len(bad)
            if bad and self.cfg.on_error == "fail":
                yield None, n, describe(bad[0])
                return
            yield batch, n, None
        yield from failed


LIVE: weakref.WeakSet[Loader] = weakref.WeakSet()


@atexit.register  # after torch's and multiprocessing's hooks, so it runs before them (last in, first out)
def close_live_loaders() -> None:
    """At the interpreter's exit, every loader's workers sent their stop message, as at the end of an iteration.

    Left to torch and multiprocessing, torch skips its own shutdown at exit, and multiprocessing ends the workers
    with SIGTERM, which a worker takes only from its parent (`outlive_stop_signals`). Standard signals do not
    queue: a stop signal from anyone else (torchrun's to the process group) still pending in the worker swallowed
    the parent's, and the exit waited on that worker forever."""
    for loader in list(LIVE):
        loader.close()


def check_layout(path: str, layout: str, task: str) -> None:
    """A store that `task` cannot read: a one-line DataError."""
    if layout not in TASKS[task].layouts:
        raise DataError(f"{path}: task {task} needs a store of layout {' or '.join(TASKS[task].layouts)}, "
                        f"this one is {layout!r}")


def check_settings(cfg: DataConfig, store: StoreSplit, task: str, *, train: bool, world_size: int) -> None:
    data = TASKS[task]
    check_layout(cfg.path, store.layout, task)
    if cfg.decode != "auto" and cfg.decode not in data.decoders:
        able = [name for name, other in TASKS.items() if cfg.decode in other.decoders]
        raise DataError(f"data.decode={cfg.decode} supports task {' or '.join(able)} only, not {task}; "
                        "use data.decode=cpu")
    if train and store.num_samples < world_size * cfg.batch_size:
        raise DataError(
            f"{cfg.path}: split {store.split!r} has {store.num_samples} samples, fewer than one batch per rank "
            f"({world_size} x data.batch_size {cfg.batch_size}); lower data.batch_size"
        )


def build_loader(cfg: DataConfig, split: str, *, train: bool, task: str, rank: int, world_size: int, seed: int,
                 device: torch.device, host_processes: int = 1) -> Loader:
    """The loader of one split for this process (rank of world_size, one of host_processes on its host); see
    docs/data-pipelines.md."""
    store = open_split(cfg.path, split)
    check_settings(cfg, store, task, train=train, world_size=world_size)
    data = TASKS[task]
    workers, workers_why = worker_count(cfg.workers, host_processes)
    decode, why = hw.choose(cfg.decode, data.decoders, device, workers, data.auto_hw_workers)
    cfg = cfg.model_copy(update={"decode": decode, "workers": workers})
    dataset = StoreBatches(make_reader(store, cfg.cache_dir), data.decoders[cfg.decode].worker,
                           data.spec(train, cfg.image_size, cfg.augment), seed=seed, rank=rank, on_error=cfg.on_error)
    sampler = EpochBatches(
        store, train=train, seed=seed, rank=rank, world_size=world_size,
        batch_size=cfg.batch_size, shuffle_block=cfg.shuffle_block,
    )
    dataloader = DataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cfg.pin_memory and device.type == "cuda",
        persistent_workers=cfg.persistent_workers and workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        worker_init_fn=init_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),  # its base seed is not drawn from the training's RNG
    )
    return Loader(cfg, store, sampler, dataloader, task=data, device=device, normalise=make_normalise(cfg, device),
                  workers_choice=f"data.workers: {workers} ({workers_why})",
                  decode_choice=f"data.decode: {decode} ({why})")
