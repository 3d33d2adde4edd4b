"""A shard store to batches on the device: readers, splitting, decoding, augmentation, loaders.

    loader = build_loader(cfg, "train", train=True, task="classify", rank=r, world_size=w, seed=s, device=d)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader: ...          # {"image": float (N,3,S,S) on d, "label": (N,) int64}

What an epoch covers is spelled out in README.md `## Data pipelines` and pipelines/plan.py.
"""

import os

# albumentations asks the network for its latest version at import; GPU hosts and clusters are often
# offline, where that costs a timeout and a warning in every worker.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipelines.config import AugmentConfig, DataConfig, DataError  # noqa: E402
from pipelines.decode import decode_image  # noqa: E402
from pipelines.loader import Loader, build_loader  # noqa: E402
from pipelines.presets import detect_eval  # noqa: E402

__all__ = ["AugmentConfig", "DataConfig", "DataError", "Loader", "build_loader", "decode_image", "detect_eval"]
