"""Run config, torchrun launch, the DDP loop, tasks, checkpoints and their sync to storage."""

import importlib
from typing import TYPE_CHECKING

from training.config import RunConfig, TrainError, load_config, run_dir
from training.launch import launch
from training.metrics import SUMMARY_FILE, RunSummary
from training.preempt import EXIT_PREEMPTED

# Imported on first use: the loop and the checkpoints pull in torch and timm (seconds), which the
# launcher (`shardtrain train` runs torchrun in a subprocess) and every other command do without.
_LAZY = {"run": "train", "latest_checkpoint": "resume", "CheckpointRef": "checkpoint"}

__all__ = ["EXIT_PREEMPTED", "SUMMARY_FILE", "CheckpointRef", "RunConfig", "RunSummary", "TrainError",
           "latest_checkpoint", "launch", "load_config", "run", "run_dir"]

if TYPE_CHECKING:  # what the names are, for type checkers (at run time __getattr__ imports them)
    from training.checkpoint import CheckpointRef
    from training.resume import latest_checkpoint
    from training.train import run


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
