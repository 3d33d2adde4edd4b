"""A shard store to batches on the device: readers, splitting, decoding, augmentation, loaders.

    loader = build_loader(cfg, "train", train=True, task="classify", rank=r, world_size=w, seed=s, device=d)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader: ...          # {"image": float (N,3,S,S) on d, "label": (N,) int64}

What an epoch covers is spelled out in docs/data-pipelines.md and pipelines/plan.py.
"""

import importlib
import os
from typing import TYPE_CHECKING

# albumentations asks the network for its latest version at import; GPU hosts and clusters are often
# offline, where that costs a timeout and a warning in every worker.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Each name is imported on first use: the loader pulls in torch and albumentations (seconds), which a
# reader of the config alone (training.config, hence every `shardtrain` command) does not need.
_MODULES = {"AugmentConfig": "config", "DataConfig": "config", "DataError": "config", "decode_image": "decode",
            "Loader": "loader", "Section": "config", "build_loader": "loader", "detect_eval": "presets"}
__all__ = ["AugmentConfig", "DataConfig", "DataError", "Loader", "Section", "build_loader", "decode_image",
           "detect_eval"]

if TYPE_CHECKING:  # what the names are, for type checkers (at run time __getattr__ imports them)
    from pipelines.config import AugmentConfig, DataConfig, DataError, Section
    from pipelines.decode import decode_image
    from pipelines.loader import Loader, build_loader
    from pipelines.presets import detect_eval


def __getattr__(name: str) -> object:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
