"""Run config, torchrun launch, the DDP loop, tasks, checkpoints and their sync to storage."""

from training.config import RunConfig, TrainError, load_config, run_dir
from training.launch import launch
from training.preempt import EXIT_PREEMPTED
from training.resume import latest_checkpoint
from training.train import run

__all__ = ["EXIT_PREEMPTED", "RunConfig", "TrainError", "latest_checkpoint", "launch", "load_config", "run",
           "run_dir"]
