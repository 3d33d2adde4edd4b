"""timm model creation: weights only from a local path or URL (never a hub download)."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import timm
import torch

from training.config import ModelConfig, TrainError


def local_weights(url: str, cache_dir: Path) -> str:
    """A local path for `url`: the path itself, or a copy fetched once through fsspec."""
    if "://" not in url or url.startswith("file://"):
        path = url.removeprefix("file://")
        if not os.path.isfile(path):
            raise TrainError(f"model.pretrained: no such file {path}")
        return path
    try:
        fs, path = fsspec.core.url_to_fs(url)
        dest = cache_dir / Path(path).name
        if not dest.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
            fs.get_file(path, str(tmp))
            os.replace(tmp, dest)
        return str(dest)
    except (OSError, ValueError, ImportError) as e:
        raise TrainError(f"model.pretrained: cannot fetch {url}: {e}") from None


def build_model(cfg: ModelConfig, num_classes: int, cache_dir: Path) -> torch.nn.Module:
    if not timm.is_model(cfg.name):
        raise TrainError(f"bad value for model.name: no timm model named {cfg.name!r}")
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path or None, **cfg.kwargs)
    if cfg.pretrained:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": local_weights(cfg.pretrained, cache_dir)})
    try:
        model = timm.create_model(cfg.name, **kwargs)
    except TypeError as e:
        raise TrainError(f"model {cfg.name}: {e} (check model.kwargs)") from None
    except RuntimeError as e:
        raise TrainError(f"model {cfg.name}: cannot load model.pretrained weights: {str(e).splitlines()[0]}") from None
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
