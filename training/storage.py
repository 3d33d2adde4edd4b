"""Checkpoints to and from storage (fsspec: s3://bucket/prefix or a NAS path), in the background.

A file is uploaded, then its marker `<name>.complete` (step, epoch, sha256, bytes) is written:
readers take a remote checkpoint only when its marker exists and the bytes match.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from shards.storage import storage_error
from training.checkpoint import MARKER, STEP_FILE, CheckpointRef
from training.config import TrainError

MAX_BACKOFF_S = 30.0


def remote_dir(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """A fresh (uncached) filesystem: listings must see what other processes wrote."""
    try:
        return fsspec.core.url_to_fs(url, skip_instance_cache=True)
    except (ImportError, ValueError) as e:
        raise TrainError(f"checkpoint.storage: cannot use {url}: {e}") from None
    except Exception as e:  # a filesystem that connects as it is made (ftp, sftp): an unknown host, a refusal
        raise TrainError(f"checkpoint.storage: cannot reach {url}: {storage_error(e)}") from None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class _Item:
    local: Path
    remote: str  # path inside the filesystem
    info: dict | None  # marker content (without sha256), or None for a plain file
    group: str  # a newer item of the same group supersedes a pending one
    keep: int = 0  # for step checkpoints: how many the remote keeps


@dataclass
class Uploader:
    """One thread that uploads queued files in order; retries with backoff; training never waits."""

    storage: str
    name: str
    log: Callable[[str], None]
    pending: list[_Item] = field(default_factory=list)
    busy: bool = False

    def __post_init__(self) -> None:
        self.fs, self.root = filesystem(remote_dir(self.storage, self.name))
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._work, name="checkpoint-upload", daemon=True)
        self.thread.start()

    def submit(self, local: Path, subpath: str, info: dict | None = None, keep: int = 0) -> None:
        group = "step" if STEP_FILE.match(Path(subpath).name) else subpath
        item = _Item(local, f"{self.root}/{subpath}", info, group, keep)
        with self.cond:
            self.pending = [p for p in self.pending if p.group != group] + [item]  # only the newest matters
            self.cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """Block until every queued upload is done, or `timeout` seconds; True when all are done."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.pending or self.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if not self.pending:
                    return
                item = self.pending.pop(0)
                self.busy = True
            try:
                self._upload_with_retry(item)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def _superseded(self, item: _Item) -> bool:
        with self.cond:
            return any(p.group == item.group for p in self.pending)

    def _upload_with_retry(self, item: _Item) -> None:
        delay = 1.0
        while True:
            try:
                upload(self.fs, item.local, item.remote, item.info)
                if item.keep:
                    prune(self.fs, str(Path(item.remote).parent), item.keep)
                return
            except FileNotFoundError:
                if not item.local.exists():  # pruned locally after a newer save: nothing to do
                    return
                err = "not found"
            except Exception as e:  # any storage failure is retried; the local copy stays
                err = storage_error(e)
            self.log(f"upload of {item.local.name} to storage failed ({err}); retrying in {delay:.0f}s")
            with self.cond:  # a newer file of its group, queued meanwhile, makes this one's late copy waste
                if self.cond.wait_for(lambda: self._superseded(item), timeout=delay):
                    self.log(f"upload of {item.local.name} dropped: a newer file replaces it")
                    return
            delay = min(delay * 2, MAX_BACKOFF_S)


def upload(fs: fsspec.AbstractFileSystem, local: Path, remote: str, info: dict | None) -> None:
    """Old marker out, file up, new marker in: a marker always describes the bytes beside it."""
    marker = remote + MARKER
    if info is not None and fs.exists(marker):
        fs.rm(marker)
    digest, size = sha256_of(local), local.stat().st_size
    fs.makedirs(str(Path(remote).parent), exist_ok=True)
    fs.put_file(str(local), remote)
    if info is not None:
        fs.pipe_file(marker, json.dumps({**info, "sha256": digest, "bytes": size}).encode())


def prune(fs: fsspec.AbstractFileSystem, folder: str, keep: int) -> None:
    """Keep the newest `keep` step checkpoints in storage (marker removed before its file)."""
    fs.invalidate_cache(folder)
    steps = sorted(p for p in fs.ls(folder, detail=False) if STEP_FILE.match(p.rsplit("/", 1)[-1]))
    for path in steps[:-keep]:
        if fs.exists(path + MARKER):
            fs.rm(path + MARKER)
        fs.rm(path)


def latest_remote(storage: str, name: str) -> CheckpointRef | None:
    """The newest step checkpoint in storage whose marker exists."""
    fs, root = filesystem(remote_dir(storage, name))
    folder = f"{root}/checkpoints"
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return None
    except Exception as e:  # storage errors are the user's to fix: one line
        raise TrainError(f"checkpoint.storage: cannot list {storage}: {storage_error(e)}") from None
    present = {p.rsplit("/", 1)[-1] for p in names}
    steps = sorted(n for n in present if STEP_FILE.match(n) and n + MARKER in present)
    if not steps:
        return None
    info = json.loads(fs.cat_file(f"{folder}/{steps[-1]}{MARKER}"))
    url = f"{remote_dir(storage, name)}/checkpoints/{steps[-1]}"
    return CheckpointRef.from_marker(url, info, remote=True, sha256=info["sha256"])


def download(url: str, dest: Path, sha256: str | None) -> Path:
    """Copy a remote checkpoint to `dest` (atomically), checking its sha256 when known."""
    fs, path = filesystem(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        fs.get_file(path, str(tmp))
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise TrainError(f"cannot fetch checkpoint {url}: {storage_error(e)}") from None
    if sha256 and sha256_of(tmp) != sha256:
        tmp.unlink()
        raise TrainError(f"checkpoint {url} does not match its marker's sha256 (partial upload?)")
    os.replace(tmp, dest)
    return dest
