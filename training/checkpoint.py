"""Checkpoint files: what they hold, atomic writes, completion markers, the last K kept.

Layout of `<run_dir>/checkpoints/`:
  step_00000120.pt           one file per save, the newest `keep` kept
  step_00000120.pt.complete  its marker (JSON: step, epoch), written after the file is in place
  last.pt                    a hard link to the newest step file (for people and tools)
  best.pt (+ .complete)      a hard link to the step file with the best eval metric
The same names are used in storage, where a marker also carries the file's sha256.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

MARKER = ".complete"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a zip archive
STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint (its marker exists): where it is and what its marker says."""

    path: str  # a local path, or a storage URL when `remote`
    step: int
    epoch: int  # epochs trained and evaluated
    remote: bool = False
    sha256: str | None = None  # from a storage marker: what the downloaded bytes must hash to
    # the run's plan when it was written (None in markers from before they held it): train.epochs, where it ends,
    # and optim.schedule_start_epoch, where its lr schedule began
    epochs: int | None = None
    schedule_start_epoch: int | None = None

    @classmethod
    def from_marker(cls, path: str, info: dict, **extra: Any) -> CheckpointRef:
        return cls(path, int(info["step"]), int(info["epoch"]), epochs=info.get("epochs"),
                   schedule_start_epoch=info.get("schedule_start_epoch"), **extra)

    def marker(self) -> dict:
        """Its marker's content, as `marker(state)` wrote it."""
        plan = {"epochs": self.epochs, "schedule_start_epoch": self.schedule_start_epoch}
        return {"step": self.step, "epoch": self.epoch, **{k: v for k, v in plan.items() if v is not None}}


def marker(state: dict) -> dict:
    """What a checkpoint's marker says of it: its step and epochs done, and the plan of the run that wrote it, so
    that a rerun of a killed nightly night can finish that night (flows.nightly.continue_from_latest)."""
    return {"step": state["step"], "epoch": state["epoch"], "epochs": state["config"]["train"]["epochs"],
            "schedule_start_epoch": state["config"]["optim"]["schedule_start_epoch"]}


def step_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and lists, so `torch.load(weights_only=True)` reads them."""
    version, words, gauss = random.getstate()
    # the legacy tuple form (get_state's default), not the dict one
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state = {
        "python": [version, torch.tensor(words, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_link(src: Path, dest: Path) -> None:
    """Point `dest` at `src`'s data (a hard link; a copy where links are not supported), atomically."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def write_marker(path: Path, info: dict) -> None:
    marker = path.with_name(path.name + MARKER)
    tmp = marker.with_name(f".{marker.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, marker)


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.with_name(path.name + MARKER).read_text())
    except (OSError, ValueError):
        return None


def save(ckpt_dir: Path, state: dict, keep: int) -> Path:
    """Write `step_N.pt` and its marker, repoint last.pt, drop step files beyond the newest `keep`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / step_name(state["step"])
    atomic_save(state, path)
    info = marker(state)
    write_marker(path, info)
    point_last(ckpt_dir, path, info)
    for old in step_files(ckpt_dir)[:-keep]:
        old.with_name(old.name + MARKER).unlink(missing_ok=True)  # marker first: never a marker without its file
        old.unlink(missing_ok=True)
    return path


def point_last(ckpt_dir: Path, path: Path, info: dict) -> None:
    """last.pt: a hard link to `path`, the newest step file, with its marker."""
    atomic_link(path, ckpt_dir / "last.pt")
    write_marker(ckpt_dir / "last.pt", info)


def mark_best(ckpt_dir: Path, path: Path, info: dict) -> Path:
    best = ckpt_dir / "best.pt"
    best.with_name(best.name + MARKER).unlink(missing_ok=True)
    atomic_link(path, best)
    write_marker(best, info)
    return best


def step_files(ckpt_dir: Path) -> list[Path]:
    """Step checkpoint files with markers, oldest first."""
    found = [p for p in ckpt_dir.glob("step_*.pt") if STEP_FILE.match(p.name)]
    return sorted((p for p in found if p.with_name(p.name + MARKER).exists()), key=lambda p: p.name)


def latest_local(ckpt_dir: Path) -> CheckpointRef | None:
    files = step_files(ckpt_dir) if ckpt_dir.is_dir() else []
    for path in reversed(files):
        info = read_marker(path)
        if info is not None:
            return CheckpointRef.from_marker(str(path), info)
    return None


def load(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor copied into CPU memory: a snapshot that training can no longer change.

    A GPU's tensors are copied into pinned memory without waiting, and waited for once at the end (as torchtitan
    stages its asynchronous checkpoints): a blocking copy per tensor into pageable memory, hundreds a state, drained
    the GPU's queue at the first and copied at pageable speed."""
    devices: set[torch.device] = set()

    def copy(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cuda":
            return t.detach().to("cpu", copy=True)
        devices.add(t.device)
        return torch.empty_like(t, device="cpu", pin_memory=True).copy_(t.detach(), non_blocking=True)

    snapshot = map_tensors(copy, obj)
    for device in devices:
        torch.cuda.current_stream(device).synchronize()
    return snapshot


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """`obj` with `fn` applied to every tensor in its dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


class Writer:
    """Saves checkpoints in a background thread, so a save stalls training only for a copy to CPU.

    At most one save is in flight (the next waits for it): memory holds one snapshot and files
    land in step order. `then(path)` runs in the thread once the file is in place (uploads,
    best.pt). An error in the thread (a full disk) is raised in the training thread at the
    next `submit` or `wait`, never lost.
    """

    def __init__(self, ckpt_dir: Path, keep: int) -> None:
        self.ckpt_dir, self.keep = ckpt_dir, keep
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, state: dict, then: Callable[[Path], None]) -> None:
        snapshot = to_cpu(state)
        self.wait()
        self.thread = threading.Thread(target=self._write, args=(snapshot, then), name="checkpoint-writer",
                                       daemon=True)
        self.thread.start()

    def _write(self, snapshot: dict, then: Callable[[Path], None]) -> None:
        try:
            then(save(self.ckpt_dir, snapshot, self.keep))
        except BaseException as e:  # re-raised in the training thread
            self.error = e

    def wait(self) -> None:
        """Until the last submitted checkpoint is on disk (and handed to `then`)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
