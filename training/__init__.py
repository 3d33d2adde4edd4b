"""Run config, torchrun launch, the DDP loop, tasks, checkpoints and their sync to storage."""
