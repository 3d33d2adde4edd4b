"""Which checkpoint a run starts from: the newest complete one locally, else in storage, or a given one."""

from __future__ import annotations

import json
from pathlib import Path

from shards.storage import storage_error
from training import checkpoint, storage
from training.checkpoint import CheckpointRef
from training.config import RunConfig, TrainError, run_dir


def checkpoint_dir(cfg: RunConfig) -> Path:
    return run_dir(cfg) / "checkpoints"


def latest_checkpoint(cfg: RunConfig) -> CheckpointRef | None:
    """The newest complete checkpoint of the run: in its run dir, else in storage."""
    found = checkpoint.latest_local(checkpoint_dir(cfg))
    if found is None and cfg.checkpoint.storage:
        found = storage.latest_remote(cfg.checkpoint.storage, cfg.name)
    return found


def fetch(cfg: RunConfig) -> Path | None:
    """The local path of the checkpoint `cfg.resume` asks for (downloaded when remote), or None to start fresh."""
    if cfg.resume == "never":
        refuse_existing(cfg)
        return None
    if cfg.resume == "auto":
        latest = latest_checkpoint(cfg)
        if latest is None or not latest.remote:
            return None if latest is None else Path(latest.path)
        dest = storage.download(latest.path, checkpoint_dir(cfg) / Path(latest.path).name, latest.sha256)
        info = latest.marker()
        checkpoint.write_marker(dest, info)  # complete here too
        checkpoint.point_last(checkpoint_dir(cfg), dest, info)  # the newest here: a finished run is whole again
        return dest
    return fetch_explicit(cfg.resume, checkpoint_dir(cfg))


def refuse_existing(cfg: RunConfig) -> None:
    """A fresh start over a run's checkpoints would mix two runs (and pruning by step would delete the new ones)."""
    existing = latest_checkpoint(cfg)
    if existing is not None:
        raise TrainError(f"resume=never, but run {cfg.name!r} already has a checkpoint at step {existing.step} "
                         f"({existing.path}): use resume=auto to continue it, or another name")


def fetch_named(cfg: RunConfig, name: str) -> Path:
    """Download `<storage>/<name>/checkpoints/NAME` into this node's run dir (for nodes without a shared disk)."""
    if not cfg.checkpoint.storage:
        raise TrainError(f"checkpoint {name} is not on this node's disk and checkpoint.storage is not set: "
                         "use a shared runs_dir or a storage")
    url = f"{storage.remote_dir(cfg.checkpoint.storage, cfg.name)}/checkpoints/{name}"
    return fetch_explicit(url, checkpoint_dir(cfg), dest_name=name)


def fetch_explicit(url: str, ckpt_dir: Path, dest_name: str | None = None) -> Path:
    if "://" not in url:
        if not Path(url).is_file():
            raise TrainError(f"bad value for resume: no checkpoint file {url}")
        return Path(url)
    fs, path = storage.filesystem(url)
    try:
        marker = fs.cat_file(path + checkpoint.MARKER)
    except FileNotFoundError:
        raise TrainError(f"bad value for resume: {url} has no {checkpoint.MARKER} marker "
                         "(incomplete upload?)") from None
    except Exception as e:  # storage: the network, permissions, credentials
        raise TrainError(f"bad value for resume: cannot read {url}{checkpoint.MARKER}: {storage_error(e)}") from None
    dest = ckpt_dir / (dest_name or f"resume_{Path(path).name}")
    return storage.download(url, dest, json.loads(marker).get("sha256"))
