"""kill -9 of a real `shardtrain convert` mid-run, then the same command again: it finishes the
job, leaves the finished shards alone, and the result equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from shards import ConvertOptions, StoreError, convert, read_manifest, samples, verify
from shards.keys import order_key, sample_key
from tests.test_shards_reader import read_store

SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))


def cli_convert(src: Path, dest: Path, *extra: str) -> subprocess.Popen:
    cmd = [SHARDTRAIN, "convert", str(src), str(dest), "--shard-size", "8samples", "--workers", "2", *extra]
    # its own session, so the kill reaches the pool workers too
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def kill_after_shards(proc: subprocess.Popen, dest: Path, finished: int) -> None:
    deadline = time.monotonic() + 120
    stderr = proc.stderr
    assert stderr is not None  # cli_convert: stderr=PIPE
    while len(list((dest / "_index").glob("*.json"))) < finished:
        assert proc.poll() is None, stderr.read().decode()
        assert time.monotonic() < deadline, "conversion made no progress"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def shard_files(dest: Path) -> dict[str, tuple[int, int]]:
    """Shards that have their index (finished), with (inode, mtime_ns)."""
    done = {p.name.removesuffix(".json") for p in (dest / "_index").glob("*.json")}
    return {n: ((dest / n).stat().st_ino, (dest / n).stat().st_mtime_ns) for n in done}


def digests(dest: Path) -> dict[str, str]:
    return {s.name: s.sha256 for split in read_manifest(str(dest)).splits.values() for s in split.shards}


@pytest.fixture(scope="module")
def big_src(tmp_path_factory) -> Path:
    # large enough that conversion takes a good second, so the kill lands mid-run
    return samples.make_imagefolder(tmp_path_factory.mktemp("big"), per_class={"train": 60, "val": 8}, size=192)


def test_kill_9_then_rerun_finishes_without_redoing_shards(big_src, tmp_path, capsys):
    dest = tmp_path / "killed"
    proc = cli_convert(big_src, dest)
    kill_after_shards(proc, dest, finished=3)
    assert not (dest / "manifest.json").exists(), "the kill came too late to test anything"
    finished = shard_files(dest)

    # the same command again, in this process (the console script's start-up takes seconds)
    opts = ConvertOptions(src=str(big_src), dest=str(dest), shard_size="8samples", workers=2)
    summary = convert(opts)
    assert "resuming" in capsys.readouterr().err
    assert {n: v for n, v in shard_files(dest).items() if n in finished} == finished  # not rewritten
    assert summary.added == 6 * 68 and set(finished) <= set(summary.shards_written)

    clean = tmp_path / "clean"
    convert(opts.model_copy(update={"dest": str(clean), "workers": 1}), progress=False)
    assert digests(dest) == digests(clean)
    assert read_store(dest).keys() == read_store(clean).keys()
    assert verify(str(dest)) == []
    assert not [p for p in dest.iterdir() if p.name.endswith((".partial", ".tmp"))]


def test_kill_during_append_then_rerun_lmdb(tmp_path):
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 4}, size=64)
    dest = tmp_path / "store"
    opts = ConvertOptions(src=str(src), dest=str(dest), format="lmdb", shard_size="8samples", workers=2)
    convert(opts, progress=False)
    samples.make_imagefolder(src, per_class={"train": 60}, size=192, seed=1, start=100)
    proc = cli_convert(src, dest, "--append", "--format", "lmdb")
    kill_after_shards(proc, dest, finished=len(digests(dest)) + 2)
    assert read_manifest(str(dest)).version == 1  # the interrupted append is not visible yet
    finished = shard_files(dest)
    summary = convert(opts.model_copy(update={"append": True}), progress=False)  # the same command, in-process
    assert summary.added == 6 * 60 and summary.version == 2
    assert {n: v for n, v in shard_files(dest).items() if n in finished} == finished
    manifest = read_manifest(str(dest))
    assert manifest.version == 2 and manifest.totals.samples == len(list(src.rglob("*.jpg")))
    assert {s.version for s in manifest.splits["train"].shards} == {1, 2}
    assert verify(str(dest)) == []


def test_unfinished_run_in_another_format_is_refused(tmp_path):
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 8}, size=32, classes=["chelsea"])
    dest = tmp_path / "store"
    convert(ConvertOptions(src=str(src), dest=str(dest), shard_size="4samples", workers=1), progress=False)
    (dest / "manifest.json").unlink()  # as if killed just before the manifest
    with pytest.raises(StoreError, match="another format"):
        convert(ConvertOptions(src=str(src), dest=str(dest), format="lmdb", workers=1), progress=False)
    summary = convert(ConvertOptions(src=str(src), dest=str(dest), shard_size="4samples", workers=1), progress=False)
    assert summary.added == 8 and summary.shards_written == ["train-000000.tar", "train-000001.tar"]


def pool_workers(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_worker_killed_mid_run_fails_in_one_line_and_the_rerun_resumes(tmp_path):
    """As the kernel's OOM killer does it: kill -9 of one decoding worker, not of the command.

    A large BMP (re-encoded as PNG: seconds) opens the third shard, so once the first shard is finished work is
    left for a while (the pool's tasks go in chunks of 3: the first shard's last chunk holds none of the third's);
    the workers are stopped (SIGSTOP) then, one of them is killed and the others go on."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 8}, size=64)
    seed = ConvertOptions(src=str(src), dest="unused").seed
    keys = sorted(order_key(sample_key(p.relative_to(src).as_posix()), seed) for p in src.rglob("*.jpg"))
    big = src / next(r for r in (f"train/chelsea/big_{i}.bmp" for i in range(100_000))
                     if keys[15] < order_key(sample_key(r), seed) < keys[16])
    noise = np.random.default_rng(0).integers(0, 256, (4000, 4000, 3), dtype=np.uint8)
    assert cv2.imwrite(str(big), noise)
    dest = tmp_path / "store"
    proc = cli_convert(src, dest)
    deadline = time.monotonic() + 120
    while not list((dest / "_index").glob("*.json")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "conversion made no progress"
        time.sleep(0.002)
    workers = pool_workers(proc.pid)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    assert not (dest / "manifest.json").exists(), "the kill came too late to test anything"
    os.kill(workers[0], signal.SIGKILL)
    for pid in workers[1:]:
        os.kill(pid, signal.SIGCONT)
    try:
        proc.wait(timeout=60)  # a multiprocessing.Pool waited here forever, a ProcessPoolExecutor when a result was cut
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = proc.stderr.read().decode()
    assert proc.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: a decoding worker process died"), stderr
    assert "Traceback" not in stderr
    assert not (dest / "manifest.json").exists()
    finished = shard_files(dest)
    assert finished

    opts = ConvertOptions(src=str(src), dest=str(dest), shard_size="8samples", workers=2)
    convert(opts, progress=False)
    assert {n: v for n, v in shard_files(dest).items() if n in finished} == finished  # kept, not rewritten
    clean = tmp_path / "clean"
    convert(opts.model_copy(update={"dest": str(clean), "workers": 1}), progress=False)
    assert digests(dest) == digests(clean)
    assert verify(str(dest)) == []
