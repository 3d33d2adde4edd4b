"""A shard store to batches on the device: readers, splitting, decoding, augmentation, loaders.

    loader = build_loader(cfg, "train", train=True, task="classify", rank=r, world_size=w, seed=s, device=d)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader: ...          # {"image": float (N,3,S,S) on d, "label": (N,) int64}

What an epoch covers is spelled out in README.md `## Data pipelines` and pipelines/plan.py.
"""

from pipelines.config import AugmentConfig, DataConfig, DataError
from pipelines.loader import Loader, build_loader

__all__ = ["AugmentConfig", "DataConfig", "DataError", "Loader", "build_loader"]
