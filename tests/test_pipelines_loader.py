"""build_loader on real stores made by shards.convert: splitting, epochs, resume, S3, errors.

Samples are told apart by their pixels: with a deterministic transform (eval, or train with
every random op switched off) each of the bundled crops gives a distinct tensor.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import fsspec
import lmdb
import numpy as np
import pytest
import torch

from pipelines import AugmentConfig, DataConfig, DataError, build_loader, readers
from pipelines.cpus import worker_count
from pipelines.loader import EpochBatches
from pipelines.readers import make_reader, store_key
from pipelines.store import open_split
from shards import ConvertOptions, convert, samples

CPU = torch.device("cpu")
FIXED = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=0.0)  # train, but deterministic


def make_store(root: Path, fmt: str, per_class: dict[str, int], shard_size: str, dest: str | None = None) -> str:
    src = root / "src"
    if not src.exists():
        samples.make_imagefolder(src, per_class=per_class, size=40, seed=1)
    dest = dest or str(root / fmt)
    convert(ConvertOptions(src=str(src), dest=dest, format=fmt, shard_size=shard_size, workers=1), progress=False)
    return dest


@pytest.fixture(scope="module", params=["wds", "lmdb"])
def store(request, tmp_path_factory) -> str:
    """6 classes x (9 train, 3 val) in shards of 5 samples: uneven last shards in both splits."""
    return make_store(tmp_path_factory.mktemp("store"), request.param, {"train": 9, "val": 3}, "5")


def cfg_for(path: str, **kw) -> DataConfig:
    base = dict(path=path, image_size=32, batch_size=4, workers=2, shuffle_block=8, augment=FIXED)
    return DataConfig(**{**base, **kw})


def digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


def epoch_digests(loader, epoch: int) -> list[list[str]]:
    loader.set_epoch(epoch)
    out = [[digest(img) for img in batch["image"]] for batch in loader]
    assert loader.skipped == 0
    return out


def loaders(cfg: DataConfig, split: str, *, train: bool, world_size: int, seed: int = 0):
    return [
        build_loader(cfg, split, train=train, task="classify", rank=r, world_size=world_size, seed=seed, device=CPU)
        for r in range(world_size)
    ]


def test_eval_yields_every_sample_exactly_once_across_ranks_and_workers(store):
    cfg = cfg_for(store)
    (whole,) = loaders(cfg.model_copy(update={"workers": 0}), "val", train=False, world_size=1)
    reference = [d for b in epoch_digests(whole, 0) for d in b]
    assert len(reference) == whole.num_samples == 18 and len(set(reference)) == 18

    per_rank = [epoch_digests(ld, 0) for ld in loaders(cfg, "val", train=False, world_size=2)]
    got = [d for rank in per_rank for b in rank for d in b]
    assert sorted(got) == sorted(reference)
    assert got == reference  # eval keeps store order: rank 0 then rank 1, no shuffling
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


@pytest.mark.parametrize("host_processes", [1, 2])
def test_auto_workers_come_to_a_number_the_loader_runs_and_names(store, host_processes):
    """data.workers: auto becomes this machine's count (pipelines/cpus.py) for a process among host_processes:
    the DataLoader runs that many, its log line names them, and the split is still read whole."""
    loader = build_loader(cfg_for(store, workers="auto"), "val", train=False, task="classify", rank=0, world_size=1,
                          seed=0, device=CPU, host_processes=host_processes)
    count, why = worker_count("auto", host_processes)
    assert loader.dataloader.num_workers == loader.cfg.workers == count >= 1
    assert loader.workers_choice == f"data.workers: {count} ({why})"
    assert sum(len(batch) for batch in epoch_digests(loader, 0)) == loader.num_samples
    (fixed,) = loaders(cfg_for(store, workers=2), "val", train=False, world_size=1)
    assert fixed.workers_choice == "data.workers: 2 (set in the config)"


def test_train_ranks_get_equal_full_batches_and_a_new_order_each_epoch(store):
    cfg = cfg_for(store)
    ranks = loaders(cfg, "train", train=True, world_size=2)
    # 54 samples, 2 ranks x batch 4 -> 6 batches each, 6 samples dropped
    assert [len(ld) for ld in ranks] == [6, 6]
    epochs = []
    for epoch in range(2):
        per_rank = [epoch_digests(ld, epoch) for ld in ranks]
        assert [len(b) for b in per_rank] == [6, 6]
        assert all(len(batch) == 4 for rank in per_rank for batch in rank)
        flat = [d for rank in per_rank for b in rank for d in b]
        assert len(flat) == len(set(flat)) == 48  # no sample twice in an epoch
        epochs.append(flat)
    assert epochs[0] != epochs[1]
    # and the same seed gives the same epoch again, in a fresh loader
    again = [epoch_digests(ld, 1) for ld in loaders(cfg, "train", train=True, world_size=2)]
    assert [d for rank in again for b in rank for d in b] == epochs[1]


@pytest.mark.parametrize("workers,decode", [(0, "cpu"), (2, "cpu"), (2, "gpu")])
def test_resume_after_a_kill_yields_exactly_the_rest_bitwise(store, workers, decode):
    # decode gpu (here on the CPU) decodes in a thread ahead of the consumer: the position is still what was yielded
    cfg = cfg_for(store, workers=workers, decode=decode, augment=AugmentConfig())  # real random augmentation
    (full,) = loaders(cfg, "train", train=True, world_size=1, seed=7)
    full.set_epoch(3)
    expected = [(b["image"].clone(), b["label"].clone()) for b in full]

    (killed,) = loaders(cfg, "train", train=True, world_size=1, seed=7)
    killed.set_epoch(3)
    stop_at = 1 + int(torch.randint(len(expected) - 2, ()).item())
    first = []
    for batch in killed:
        first.append((batch["image"].clone(), batch["label"].clone()))
        if len(first) == stop_at:
            break
    state = killed.state_dict()
    assert state == {"epoch": 3, "batch": stop_at, "world_size": 1, "batch_size": 4}

    (resumed,) = loaders(cfg, "train", train=True, world_size=1, seed=7)
    resumed.load_state_dict(state)
    rest = [(b["image"], b["label"]) for b in resumed]
    assert len(first) + len(rest) == len(expected)
    for (img, lab), (img2, lab2) in zip(first + rest, expected):
        assert torch.equal(img, img2) and torch.equal(lab, lab2)


def test_an_epoch_killed_on_two_processes_goes_on_with_its_rest_on_one_then_three(store):
    """A mid-epoch position saved by 2 ranks, loaded by 1 (then by 3): the rest of the epoch, each sample not yet
    yielded once, whole batches, numbered to end where the epoch does; the next epoch whole again."""
    cfg = cfg_for(store, workers=0)
    whole = [d for ld in loaders(cfg, "train", train=True, world_size=2) for b in epoch_digests(ld, 1) for d in b]
    two = loaders(cfg, "train", train=True, world_size=2)  # 54 samples: 6 batches of 4 on each rank, 48 kept
    seen = []
    for ld in two:
        ld.set_epoch(1)
        for i, batch in enumerate(ld):
            seen += [digest(img) for img in batch["image"]]
            if i == 1:
                break
    state = two[0].state_dict()
    assert state == {"epoch": 1, "batch": 2, "world_size": 2, "batch_size": 4}

    (one,) = loaders(cfg, "train", train=True, world_size=1)  # 13 batches a whole epoch
    one.load_state_dict(state)
    assert (one.epoch, one.batch, one.rest()) == (1, 5, (32, 32))  # 32 samples left: 8 batches, numbered 5 to 12
    for i, batch in enumerate(one):
        seen += [digest(img) for img in batch["image"]]
        if i == 2:
            break
    assert one.batch == 8 and sorted(seen) == sorted(set(seen))
    state = one.state_dict()
    assert state["taken"] == [[2, 4, 2]] and state["batch"] == 8

    three = loaders(cfg, "train", train=True, world_size=3)  # 4 batches a whole epoch
    for ld in three:
        ld.load_state_dict(state)
        assert (ld.epoch, ld.batch, ld.rest()) == (1, 3, (20, 12))  # 20 left: one batch on each rank, 8 left out
        seen += [digest(img) for b in ld for img in b["image"]]
        assert ld.batch == len(ld) == 4
    assert len(seen) == len(set(seen)) == 48 - 8 and set(seen) <= set(whole)
    assert three[0].state_dict() == {"epoch": 1, "batch": 4, "world_size": 3, "batch_size": 4,
                                     "taken": [[2, 4, 2], [1, 4, 3]]}
    next_epoch = [d for ld in three for b in epoch_digests(ld, 2) for d in b]
    assert len(next_epoch) == len(set(next_epoch)) == 48


def images(loader) -> list[torch.Tensor]:
    return [b["image"].clone() for b in loader]


@pytest.mark.parametrize("workers,decode", [(0, "cpu"), (2, "cpu"), (2, "gpu")])
def test_epochs_from_one_live_iteration_match_a_fresh_loader_per_epoch_and_a_resume(store, workers, decode):
    # The train loader goes from one epoch into the next on one iteration of its DataLoader; each batch still
    # comes from its own (epoch, batch) reference, so the batches are those of a loader started at that epoch.
    cfg = cfg_for(store, workers=workers, decode=decode, augment=AugmentConfig())  # real random augmentation
    fresh = []
    for epoch in range(3):
        (ld,) = loaders(cfg, "train", train=True, world_size=1, seed=7)
        ld.set_epoch(epoch)
        fresh.append(images(ld))

    (live,) = loaders(cfg, "train", train=True, world_size=1, seed=7)
    live.plan_epochs(3)
    got = []
    for epoch in range(3):
        live.set_epoch(epoch)
        got.append(images(live))
    # a resume mid-epoch 1, in a new process's loader, then on through epoch 2 as the trainer does
    (resumed,) = loaders(cfg, "train", train=True, world_size=1, seed=7)
    resumed.plan_epochs(3)
    resumed.load_state_dict({"epoch": 1, "batch": 2})
    rest = images(resumed)
    resumed.set_epoch(2)
    rest_2 = images(resumed)
    # and the live loader moved back to an epoch it has passed (set_epoch elsewhere starts anew there)
    live.set_epoch(0, 3)
    again = images(live)

    for a, b in zip(got + [rest, rest_2, again], fresh + [fresh[1][2:], fresh[2], fresh[0][3:]], strict=True):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_next_epoch_is_handed_to_the_workers_before_this_one_ends(store, monkeypatch):
    # Before, each epoch started a new iteration of the DataLoader: the workers had nothing to do from an
    # epoch's last batches until the next epoch began, and its first batches were prepared from empty.
    handed: list[tuple[int, int]] = []  # the references the sampler gave the DataLoader, in order
    sampler_iter = EpochBatches.__iter__

    def recording(self):
        for ref in sampler_iter(self):
            handed.append(ref[:2])
            yield ref

    monkeypatch.setattr(EpochBatches, "__iter__", recording)
    (ld,) = loaders(cfg_for(store), "train", train=True, world_size=1)  # 2 workers x prefetch 2
    ld.plan_epochs(2)
    batches = iter(ld)
    for _ in range(len(ld)):
        next(batches)
    assert (1, 0) in handed  # while the consumer holds epoch 0's last batch
    started = ld.dataloader._iterator
    ld.set_epoch(1)
    images(ld)
    assert ld.dataloader._iterator is started
    assert handed == [(e, j) for e in range(2) for j in range(len(ld))]  # each once; nothing past the planned end

    # eval: one epoch per iteration, from its first batch every time
    (val,) = loaders(cfg_for(store), "val", train=False, world_size=1)
    handed.clear()
    first = images(val)
    val.set_epoch(0)
    second = images(val)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert handed == [(0, j) for j in range(len(val))] * 2


def test_starting_an_iteration_draws_nothing_from_torchs_rng(store):
    # A resumed run restores the checkpoint's RNG state and then starts its loader's iteration, which the
    # uninterrupted run had started epochs before: a draw there (the DataLoader's base seed) would part them.
    (ld,) = loaders(cfg_for(store), "train", train=True, world_size=1)
    state = torch.random.get_rng_state()
    next(iter(ld))
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_a_loader_without_workers_leaves_the_trainings_rngs_alone(store, decode):
    # With data.workers=0 the batches are made in the training process (decode gpu: in run_ahead's thread, while
    # the training draws). Each reseeded its global RNGs, so dropout and mixup depended on the worker count.
    cfg = cfg_for(store, workers=0, decode=decode, augment=AugmentConfig())  # real random augmentation
    (ld,) = loaders(cfg, "train", train=True, world_size=1, seed=7)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    before = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    got = images(ld)
    assert torch.equal(torch.random.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]
    # and the batches are those made in workers, whose global RNGs are seeded per batch: nothing draws from them
    (with_workers,) = loaders(cfg.model_copy(update={"workers": 2}), "train", train=True, world_size=1, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(got, images(with_workers), strict=True))


def test_one_shard_feeds_four_consumers(tmp_path):
    path = make_store(tmp_path, "wds", {"train": 3, "val": 2}, "1000")  # everything in one shard per split
    cfg = cfg_for(path, batch_size=2)
    per_rank = [epoch_digests(ld, 0) for ld in loaders(cfg, "val", train=False, world_size=2)]
    flat = [d for rank in per_rank for b in rank for d in b]
    assert len(flat) == len(set(flat)) == 12
    # train: 2 ranks x 2 workers each all get batches out of the single shard
    ranks = loaders(cfg, "train", train=True, world_size=2)
    assert [len(ld) for ld in ranks] == [4, 4]
    flat = [d for ld in ranks for b in epoch_digests(ld, 0) for d in b]
    assert len(flat) == len(set(flat)) == 16


def test_store_on_s3_is_streamed(tmp_path, s3_bucket):
    path = make_store(tmp_path, "wds", {"train": 2, "val": 2}, "5", dest=f"{s3_bucket}/store")
    cfg = cfg_for(path, batch_size=3)
    per_rank = [epoch_digests(ld, 0) for ld in loaders(cfg, "val", train=False, world_size=2)]
    flat = [d for rank in per_rank for b in rank for d in b]
    assert len(flat) == len(set(flat)) == 12


def test_s3_store_with_cache_dir_reads_whole_shard_copies(tmp_path, s3_bucket):
    path = make_store(tmp_path, "wds", {"train": 2, "val": 2}, "5", dest=f"{s3_bucket}/store")
    cache = tmp_path / "cache"
    cfg = cfg_for(path, batch_size=3)
    streamed = [epoch_digests(ld, 0) for ld in loaders(cfg, "val", train=False, world_size=2)]
    cached = [epoch_digests(ld, 0) for ld in loaders(cfg_for(path, batch_size=3, cache_dir=str(cache)), "val",
                                                     train=False, world_size=2)]
    assert cached == streamed

    split = open_split(path, "val")
    everything = np.arange(split.num_samples)
    expected = make_reader(split).read(everything)
    copies = {p.name: p for p in cache.rglob("*.tar")}
    names = [f"{digest[:16]}-{os.path.basename(url)}" for digest, url in zip(split.digests, split.shards)]
    assert {name: p.stat().st_size for name, p in copies.items()} == dict(zip(names, split.sizes))
    first = copies[names[0]]
    first.write_bytes(first.read_bytes()[:1000])  # a stale or cut copy: not the manifest's size, fetched again
    assert make_reader(split, str(cache)).read(everything) == expected
    fs = fsspec.core.url_to_fs(path)[0]
    fs.rm([fsspec.core.url_to_fs(url)[1] for url in split.shards])
    # gone from the store: a new reader (a new worker, a later run) reads the copies
    assert make_reader(split, str(cache)).read(everything) == expected
    first.unlink()  # a shard neither cached nor in the store: a one-line storage error, and nothing half-written
    with pytest.raises(DataError, match=f"cannot read shard {split.shards[0]}") as err:
        make_reader(split, str(cache)).read(everything)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in first.parent.glob("*.tar*")) == names[1:]


def test_a_store_rewritten_at_the_same_url_is_read_afresh_and_its_old_copies_go(tmp_path, s3_bucket):
    path = make_store(tmp_path, "wds", {"train": 2, "val": 2}, "5", dest=f"{s3_bucket}/store")
    cache = tmp_path / "cache"
    (cache / "mine").mkdir(parents=True)  # not a store's folder: left alone
    other = make_store(tmp_path, "wds", {"train": 2, "val": 2}, "5", dest=f"{s3_bucket}/other")
    cfg = cfg_for(path, batch_size=3, workers=0, cache_dir=str(cache))
    for store in (path, other):
        epoch_digests(loaders(cfg.model_copy(update={"path": store}), "val", train=False, world_size=1)[0], 0)
    before = {p.parent.name for p in cache.rglob("*.tar")}
    assert len(before) == 2

    fsspec.core.url_to_fs(path)[0].rm(fsspec.core.url_to_fs(path)[1], recursive=True)
    samples.make_imagefolder(tmp_path / "new", per_class={"train": 2, "val": 2}, size=40, seed=2)
    convert(ConvertOptions(src=str(tmp_path / "new"), dest=path, shard_size="5", workers=1), progress=False)
    streamed = epoch_digests(loaders(cfg_for(path, batch_size=3, workers=0), "val", train=False, world_size=1)[0], 0)
    assert epoch_digests(loaders(cfg, "val", train=False, world_size=1)[0], 0) == streamed  # the new store's
    split = open_split(path, "val")
    copies = sorted(p.name for p in cache.rglob("*.tar"))
    assert copies == sorted([f"{d[:16]}-{os.path.basename(url)}" for d, url in zip(split.digests, split.shards)]
                            + [p.name for p in (cache / store_key(open_split(other, "val"))).glob("*.tar")])
    assert (cache / "mine").is_dir()


def test_lmdb_store_on_s3_asks_for_a_local_copy(tmp_path, s3_bucket):
    path = make_store(tmp_path, "lmdb", {"train": 2, "val": 1}, "5", dest=f"{s3_bucket}/store")
    with pytest.raises(DataError, match="local or mounted path.*copy it"):
        build_loader(cfg_for(path), "train", train=True, task="classify", rank=0, world_size=1, seed=0, device=CPU)


def child_pids() -> set[int]:
    """This process's children, from /proc."""
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids |= {int(p) for p in (task / "children").read_text().split()}
        except FileNotFoundError:  # the thread ended while we looked
            pass
    return pids


def rss_mb(pids: set[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out[pid] = int(line.split()[1]) / 1024
    return out


def test_worker_memory_stays_flat_over_epochs(store):
    others = child_pids()  # children that are not this loader's workers (servers other tests started)
    (ld,) = loaders(cfg_for(store, augment=AugmentConfig()), "train", train=True, world_size=1)
    for epoch in range(3):  # warm-up: imports, decoder tables, allocator arenas settle
        epoch_digests(ld, epoch)
    workers = child_pids() - others
    assert len(workers) == 2
    before = rss_mb(workers)
    for epoch in range(3, 9):
        epoch_digests(ld, epoch)
    assert child_pids() - others == workers  # persistent workers: the same two processes every epoch
    after = rss_mb(workers)
    # Allocator noise on a loaded machine reaches a few MB; a leak of decoded batches or shard
    # bytes (several MB per epoch here) does not stay under this over six epochs.
    assert all(after[p] - before[p] < 16 for p in before), (before, after)


def test_workers_exit_cleanly_in_a_process_running_prefect_services(store, monkeypatch, prefect_server):
    # Prefect's services register an exit hook with threading; forked workers inherit it, and it failed
    # there: each worker ended with exit code 1 and its rank reported "DataLoader worker exited unexpectedly"
    # (39-46 such warnings per CI run, from the in-process flow tests before this module).
    # The services talk to the session's Prefect server: without one, Prefect starts a temporary server in a
    # subprocess (5 s), which stays up, idle, to the end of the session.
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        EventsWorker.instance()
        unraisable = []
        monkeypatch.setattr(sys, "unraisablehook",
                            lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}"))
        try:
            (ld,) = loaders(cfg_for(store), "train", train=True, world_size=1)
            epoch_digests(ld, 0)
            workers = list(ld.dataloader._iterator._workers)  # persistent: ended when the loader goes
            del ld
            gc.collect()
            assert [w.exitcode for w in workers] == [0, 0], unraisable
            assert unraisable == []
        finally:
            EventsWorker.drain_all()


STARTING_WORKERS = """
import signal, sys
import torch
from pipelines import DataConfig, build_loader

signal.signal(signal.SIGTERM, lambda *_: None)  # a rank's handler: it takes the request and goes on
cfg = DataConfig(path=sys.argv[1], image_size=32, batch_size=4, workers=2, persistent_workers=False)
loader = build_loader(cfg, "val", train=False, task="classify", rank=0, world_size=1, seed=0,
                      device=torch.device("cpu"))
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    for batch in loader:  # not persistent: each pass starts its workers anew
        pass
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # Python's exit sets the default back, which a signal would end
print("done", flush=True)
"""


def test_stop_signals_while_workers_start_do_not_kill_them(store):
    # torchrun signals each rank's whole process group. A worker that is still starting (torch's own SIGTERM
    # handler is in place before ours) died of it: "DataLoader worker is killed by signal: Terminated", and the
    # rank ended with a traceback instead of saving (test_training_preempt, CI 2026-12-05).
    proc = subprocess.Popen([sys.executable, "-c", STARTING_WORKERS, store, "40"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        sent = 0
        while proc.poll() is None:  # the loader's process, its workers, each as they start: the whole group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
                sent += 1
            time.sleep(0.001)
        out, err = proc.communicate()
        assert proc.returncode == 0 and out == "done\n", err[-2000:]
        assert sent > 100
    finally:  # a failure (or pytest's timeout) leaves nothing of it running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


AFTER_OPENCV_THREADS = """
import sys
import cv2, numpy as np
cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (1000, 1000))  # OpenCV's thread pool runs in this process
import torch
from pipelines import DataConfig, build_loader

cfg = DataConfig(path=sys.argv[1], image_size=32, batch_size=4, workers=2, persistent_workers=False)
loader = build_loader(cfg, "val", train=False, task="classify", rank=0, world_size=1, seed=0,
                      device=torch.device("cpu"))
for _ in range(3):
    for batch in loader:  # not persistent: each pass forks its workers anew
        pass
print("done", flush=True)
"""


def test_workers_start_in_a_process_whose_opencv_threads_ran_before_pipelines_was_imported(store):
    # A script that made its images with OpenCV, then trained (the task bench's store, then its loader): the
    # workers hung at their start, setting OpenCV's thread count that fork had left a pool of dead threads for.
    proc = subprocess.Popen([sys.executable, "-c", AFTER_OPENCV_THREADS, store], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)  # a few seconds; it hung before
        assert proc.returncode == 0 and out == "done\n", err[-2000:]
    finally:  # a hung worker (or pytest's timeout) leaves nothing of it running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


WAITING_ON_STOPPED_WORKERS = """
import multiprocessing, sys
import torch
from pipelines import DataConfig, build_loader

cfg = DataConfig(path=sys.argv[1], image_size=32, batch_size=4, workers=2, stall_notice_s=1)
loader = build_loader(cfg, "train", train=True, task="classify", rank=0, world_size=1, seed=0,
                      device=torch.device("cpu"))
batches = iter(loader)
next(batches)
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
sys.stdin.readline()  # the workers are stopped now
for _ in batches:
    pass
for epoch in range(1, 5):  # past what the workers had made ahead
    loader.set_epoch(epoch)
    for _ in loader:
        pass
print("done", flush=True)
"""


def test_a_loader_waiting_long_on_its_workers_says_so_and_goes_on_when_they_do(store):
    # A worker that hung at its start (the OpenCV case above) left the run silent for good: nothing said that
    # no batch was coming. Stopped workers stand in for stuck ones.
    proc = subprocess.Popen([sys.executable, "-c", WAITING_ON_STOPPED_WORKERS, store], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None and proc.stdin is not None
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        workers = [int(pid) for pid in lines.get(timeout=60).split()]
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        proc.stdin.write("\n")
        proc.stdin.flush()
        notice = lines.get(timeout=60)
        assert notice.startswith("data: no batch from split 'train' for "), notice
        assert "(2 worker(s)); still waiting" in notice
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
        reader.join(timeout=10)
        rest = list(lines.queue)
        assert rest[-1:] == ["done\n"] and all(line.startswith("data: no batch") for line in rest[:-1]), rest
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


EXITING_WITH_LIVE_WORKERS = """
import multiprocessing, sys
import torch
from pipelines import DataConfig, build_loader

cfg = DataConfig(path=sys.argv[1], image_size=32, batch_size=4, workers=2, persistent_workers=sys.argv[2] == "1")
loader = build_loader(cfg, "val", train=False, task="classify", rank=0, world_size=1, seed=0,
                      device=torch.device("cpu"))
next(iter(loader))  # the iteration is live: its workers wait for more
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
sys.stdin.readline()
print("exiting", flush=True)
"""


@pytest.mark.parametrize("persistent", [False, True])
def test_a_rank_exits_with_a_live_iteration_though_a_worker_holds_a_stop_signal(store, persistent):
    # At exit, multiprocessing ended the workers with SIGTERM, which a worker takes only from its rank; a stop
    # signal from anyone else still pending in it (torchrun's, to the rank's process group) swallowed the rank's,
    # as standard signals do not queue, and the exit waited on that worker forever (found under load, stop 31).
    # Stopping the worker holds the signal pending for as long as the exit takes, every time.
    proc = subprocess.Popen([sys.executable, "-c", EXITING_WITH_LIVE_WORKERS, store, str(int(persistent))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        worker = int(proc.stdout.readline().split()[0])
        os.kill(worker, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while "\nState:\tT" not in Path(f"/proc/{worker}/status").read_text():  # stopped, not yet taking signals
            assert time.monotonic() < deadline, "the worker did not stop"
            time.sleep(0.01)
        os.kill(worker, signal.SIGTERM)  # someone else's, pending while the worker is stopped
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "exiting\n"
        time.sleep(2)  # the rank is at its exit, and has ended its workers its way
        os.kill(worker, signal.SIGCONT)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def corrupt_first_image(store: str, fmt: str) -> tuple[str, str]:
    """Zero the JPEG header of one stored image in place; returns (shard, key)."""
    shard = sorted(Path(store).glob(f"val-*.{'tar' if fmt == 'wds' else 'lmdb'}"))[0]
    data = shard.read_bytes()
    if fmt == "wds":
        with tarfile.open(shard) as tar:
            member = next(m for m in tar if m.name.endswith(".jpg"))
        key = member.name.split(".")[0]
        start = member.offset_data
        data = data[:start] + bytes(32) + data[start + 32 :]
    else:
        env = lmdb.open(str(shard), subdir=False, readonly=True, lock=False)
        with env.begin() as txn:
            value = txn.get(b"00000000")
        env.close()
        assert value is not None, f"{shard}: no record 00000000"
        head = int.from_bytes(value[:4], "big")
        key = json.loads(value[4 : 4 + head])["key"]
        broken = value[: 4 + head] + bytes(32) + value[4 + head + 32 :]
        data = data.replace(value, broken)  # every copy of the value's pages
    shard.write_bytes(data)
    return shard.name, key


@pytest.mark.parametrize("fmt,decode", [("wds", "cpu"), ("lmdb", "cpu"), ("wds", "gpu")])
def test_corrupt_sample_is_skipped_and_counted_or_named(tmp_path, fmt, decode):
    path = make_store(tmp_path, fmt, {"train": 2, "val": 3}, "5")
    shard, key = corrupt_first_image(path, fmt)
    ranks = loaders(cfg_for(path, decode=decode), "val", train=False, world_size=2)
    seen = sum(len(b["image"]) for ld in ranks for b in ld)
    assert seen == 17 and sum(ld.skipped for ld in ranks) == 1

    (ld,) = loaders(cfg_for(path, decode=decode, on_error="fail"), "val", train=False, world_size=1)
    with pytest.raises(DataError) as err:
        list(ld)
    message = str(err.value)
    assert shard in message and key in message and "\n" not in message
    del err, ld  # the traceback holds the loader: let its workers go now, not in a later test
    gc.collect()


def test_truncated_lmdb_shard_is_a_bad_shard_not_a_crash(tmp_path):
    path = make_store(tmp_path, "lmdb", {"train": 2, "val": 3}, "5")
    shard = sorted(Path(path).glob("val-*.lmdb"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # reading its pages would be SIGBUS
    (ld,) = loaders(cfg_for(path, workers=0), "val", train=False, world_size=1)
    assert sum(len(b["image"]) for b in ld) == 18 - 5 and ld.skipped == 5
    (ld,) = loaders(cfg_for(path, workers=0, on_error="fail"), "val", train=False, world_size=1)
    with pytest.raises(DataError, match=f"corrupt data in shard {shard.name}, .*the manifest says"):
        list(ld)


def test_two_threads_opening_an_lmdb_shard_at_once_share_one_environment(tmp_path):
    # gpu decode's thread with workers=0 beside an eval loop reading the same store: LMDB refuses a second open of
    # a file in one process, which read as a whole unreadable shard (its samples skipped as corrupt)
    path = make_store(tmp_path, "lmdb", {"train": 2, "val": 3}, "5")
    shard = str(sorted(Path(path).glob("val-*.lmdb"))[0])

    def open_it(barrier: threading.Barrier, envs: list, errors: list) -> None:
        barrier.wait()
        try:
            envs.append(readers.open_env(shard))
        except lmdb.Error as e:
            errors.append(e)

    for _ in range(50):
        readers.forget_envs_after_fork()  # closes them: each round opens the shard afresh
        barrier, envs, errors = threading.Barrier(2), [], []
        threads = [threading.Thread(target=open_it, args=(barrier, envs, errors)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and envs[0] is envs[1]
    readers.forget_envs_after_fork()


def test_bad_settings_are_one_line_errors(tmp_path, store):
    with pytest.raises(DataError, match="no manifest|no shard store"):
        build_loader(
            cfg_for(str(tmp_path)), "train", train=True, task="classify", rank=0, world_size=1, seed=0, device=CPU
        )
    with pytest.raises(DataError, match="no split 'test'"):
        build_loader(cfg_for(store), "test", train=False, task="classify", rank=0, world_size=1, seed=0, device=CPU)
    with pytest.raises(DataError, match="fewer than one batch per rank"):
        build_loader(
            cfg_for(store, batch_size=64), "val", train=True, task="classify", rank=0, world_size=1, seed=0, device=CPU
        )
    with pytest.raises(DataError, match="needs a store of layout yolo"):
        build_loader(cfg_for(store), "val", train=False, task="detect", rank=0, world_size=1, seed=0, device=CPU)


def test_gpu_decode_path_on_cpu_matches_the_cpu_path(store):
    cpu_cfg = cfg_for(store, workers=0)
    gpu_cfg = cfg_for(store, workers=0, decode="gpu")
    (a,) = loaders(cpu_cfg, "val", train=False, world_size=1)
    (b,) = loaders(gpu_cfg, "val", train=False, world_size=1)
    for x, y in zip(a, b):
        assert torch.equal(x["label"], y["label"])
        assert x["image"].shape == y["image"].shape and y["image"].dtype == torch.float32
        # different resamplers, same crop: close on average (normalised units, range ~[-2, 2.6])
        assert (x["image"] - y["image"]).abs().mean() < 0.1
    (t,) = loaders(gpu_cfg.model_copy(update={"augment": AugmentConfig()}), "train", train=True, world_size=1)
    t.set_epoch(0)
    batches = list(t)
    assert len(batches) == len(t) and all(b["image"].shape == (4, 3, 32, 32) for b in batches)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_on_cuda(store):
    cfg = cfg_for(store, decode="gpu", augment=AugmentConfig())
    ld = build_loader(
        cfg, "train", train=True, task="classify", rank=0, world_size=1, seed=0, device=torch.device("cuda")
    )
    ld.set_epoch(0)
    for batch in ld:
        assert batch["image"].is_cuda and batch["image"].shape == (4, 3, 32, 32)
        assert batch["image"].is_contiguous(memory_format=torch.channels_last)
        assert batch["label"].is_cuda


def test_s3_outage_stops_the_epoch_with_a_one_line_error_not_skips(tmp_path, s3_bucket, moto_server):
    path = make_store(tmp_path, "wds", {"train": 1, "val": 2}, "4", dest=f"{s3_bucket}/store")
    (ld,) = loaders(cfg_for(path, workers=0), "val", train=False, world_size=1)
    batches = iter(ld)
    next(batches)  # the first shard, read whole into fsspec's readahead block
    moto_server.stop()
    try:
        with pytest.raises(DataError, match="cannot read shard .*val-00000[1-2].tar") as err:
            list(batches)
        assert "\n" not in str(err.value) and ld.skipped == 0
    finally:
        moto_server.start(buckets=(s3_bucket.removeprefix("s3://"),))


def test_tar_reader_returns_exactly_what_tarfile_reads(tmp_path):
    path = make_store(tmp_path, "wds", {"train": 3, "val": 1}, "4")
    split = open_split(path, "train")
    expected = []
    for shard in split.shards:
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name in (n for n in members if n.endswith(".jpg")):  # in the tar's order
            key = name[: -len(".jpg")]
            expected.append((key, members[name], int(members[key + ".cls"])))
    got = make_reader(split).read(np.arange(split.num_samples)[::-1])[::-1]  # out of order on purpose
    assert [(s.key, s.image, s.meta["cls"]) for s in got] == expected
