"""Checks `launch` runs before torchrun starts: the mistakes a user makes most fail at once, with one line, and
leave no run directory behind (they would otherwise surface from every rank after the workers' start-up).

The store checks come first and need no torch; the model, checkpoint and weights checks then import timm
and torch (seconds), which the launcher otherwise does without.
"""

from __future__ import annotations

import os
from pathlib import Path

import shards
from training.config import RunConfig, TrainError, run_dir, to_dict

# Config keys that decide the shapes in a checkpoint's `model` state dict, per task.
MODEL_KEYS = {
    "classify": (),
    "detect": ("detect.head", "detect.out_indices", "detect.p6p7", "detect.fpn_channels", "detect.head_convs"),
    "dino": ("dino.out_dim", "dino.hidden_dim", "dino.bottleneck_dim", "dino.head_layers", "dino.norm_last_layer"),
}


def preflight(cfg: RunConfig) -> None:
    """Raise a one-line TrainError for a bad model name, missing weights, a missing store or split, or a run
    directory whose checkpoint holds another model. Reads only; writes nothing."""
    manifest = store_manifest(cfg.data.path, "data.path")
    check_layout(cfg, manifest)
    check_splits(cfg, manifest)
    if cfg.task == "detect":
        check_boxes(cfg, manifest)
    from training.model import check_model_name, hub_weights

    check_model_name(cfg.model.name)
    check_input_size(cfg)
    check_run_dir(cfg, manifest.classes)
    if cfg.model.pretrained is True:
        hub_weights(cfg.model.name)
    elif cfg.model.pretrained and "://" not in cfg.model.pretrained:
        check_weights_file(cfg, cfg.model.pretrained.removeprefix("file://"))


def check_weights_file(cfg: RunConfig, path: str) -> None:
    """A local model.pretrained file that timm would load with none of its tensors matched (another model's
    weights) leaves the model at random init, with one logged line; so is one that is no weights file at all
    (a traceback from every rank). Files of JAX's .npz format are timm's own to map: not checked."""
    from training.model import architecture, weight_names

    if os.path.isdir(path):
        raise TrainError(f"model.pretrained: {path} is a folder; give the weights file in it")
    if not os.path.isfile(path):
        raise TrainError(f"model.pretrained: no such file {path}")
    if path.endswith(".npz"):
        return
    names = weight_names(path)
    model = sorted(architecture(cfg.model).state_dict())
    if names and not set(names) & set(model):
        raise TrainError(f"model.pretrained: none of the {len(names)} tensors in {path} is one of "
                         f"{cfg.model.name}'s (the file has {', '.join(names[:3])}, ...; the model has "
                         f"{', '.join(model[:3])}, ...): are they another model's weights?")


def store_manifest(path: str, key: str) -> shards.Manifest:
    try:
        return shards.read_manifest(path)
    except shards.StoreError as e:
        raise TrainError(f"{key}: {e}") from None


def check_layout(cfg: RunConfig, manifest: shards.Manifest) -> None:
    """Before the splits: a store of another layout lacks them for another reason than the splits' advice says."""
    from pipelines import DataError
    from pipelines.loader import check_layout as check

    try:
        check(cfg.data.path, manifest.layout, cfg.task)
    except DataError as e:
        raise TrainError(f"data.path: {e}") from None


def check_splits(cfg: RunConfig, manifest: shards.Manifest) -> None:
    """The splits the run reads: train (and val) of data.path; for dino, the k-NN store's train and val."""
    data = cfg.data
    need_split(manifest, data.path, data.train_split, "data.path", "data.train_split")
    if cfg.task != "dino":
        need_split(manifest, data.path, data.val_split, "data.path", "data.val_split")
        return
    knn_path, knn = knn_store(cfg)
    key = "eval.knn_path" if cfg.eval.knn_path else "data.path"
    need_split(knn, knn_path, data.train_split, key, "data.train_split")
    need_split(knn, knn_path, data.val_split, key, "data.val_split")


def knn_store(cfg: RunConfig) -> tuple[str, shards.Manifest]:
    """The labeled store DINO's k-NN evaluation reads, eval.knn_path or else data.path, and its manifest; a
    one-line TrainError unless it is one (an unlabeled store has no labels to vote with)."""
    path = cfg.eval.knn_path or cfg.data.path
    manifest = store_manifest(path, "eval.knn_path" if cfg.eval.knn_path else "data.path")
    if manifest.layout != "imagefolder":
        key = "eval.knn_path" if cfg.eval.knn_path else "data.path (no eval.knn_path set)"
        raise TrainError(f"{key}: the k-NN evaluation of task dino needs a labeled (imagefolder) store, "
                         f"{path} has layout {manifest.layout}; set eval.knn_path to one")
    return path, manifest


def need_split(manifest: shards.Manifest, path: str, split: str, store_key: str, split_key: str) -> None:
    if split in manifest.splits:
        return
    has = ", ".join(manifest.splits) or "no samples"
    if manifest.holdout is None or split != manifest.holdout.split:
        fix = (f"set {split_key} to one of those (a source without split folders gets a val split from "
               "convert's --val-fraction)")
    elif manifest.holdout.fraction == 0:
        fix = "the store was converted with --val-fraction 0: reconvert into an empty store without it"
    else:
        fix = (f"its holdout of {manifest.holdout.fraction:.0%} drew no image yet: reconvert into an empty store "
               "with a larger --val-fraction, or add images")
    raise TrainError(f"{store_key}: the store {path} has no split {split!r} (it has: {has}); {fix}")


def check_boxes(cfg: RunConfig, manifest: shards.Manifest) -> None:
    """A detection split without a single box (its label files missing or empty) trains on background alone, or
    gives COCO's undefined mAP (-1) at every eval, which would keep the first epoch's weights as best.pt. Stores
    written before the counts were recorded are not checked."""
    why = {"data.train_split": "the detector would learn background alone",
           "data.val_split": "val_map cannot be measured on it (COCO mAP is undefined without boxes)"}
    for key, split in (("data.train_split", cfg.data.train_split), ("data.val_split", cfg.data.val_split)):
        if manifest.splits[split].boxes == 0:
            raise TrainError(f"data.path: the {split} split of {cfg.data.path} holds no boxes (none of its "
                             f"{manifest.splits[split].samples} images has a label line), so {why[key]}; label "
                             f"them and convert into an empty store, or set {key} to a split with boxes")


def check_input_size(cfg: RunConfig) -> None:
    """A ViT built for one input size stops at its first step on another (an assertion from every rank): say
    which setting fixes it instead. Detection backbones are convolutional: any size passes."""
    from training.model import HF_HUB_PREFIX, architecture, fixed_input_size

    if cfg.task == "detect" or cfg.model.name.startswith(HF_HUB_PREFIX):  # a hub config is read only by the run
        return
    fixed = fixed_input_size(architecture(cfg.model))
    size, name = cfg.data.image_size, cfg.model.name
    if fixed is None:
        return
    aug = cfg.data.augment
    if cfg.task == "dino" and aug.local_crops and aug.local_size != size:
        raise TrainError(f"model.kwargs: {name} takes one input size; add dynamic_img_size: true so DINO's "
                         f"{size}px global and {aug.local_size}px local crops pass")
    if fixed != (size, size):
        raise TrainError(f"model.kwargs: {name} takes {fixed[0]}x{fixed[1]} inputs and data.image_size is {size}: "
                         f"add img_size: {size} (timm resizes pretrained position embeddings to it)")


def check_run_dir(cfg: RunConfig, classes: list[str]) -> None:
    """The checkpoint a run would resume from locally must hold this config's model (another name reuses a
    run dir by mistake far more often than on purpose)."""
    import torch

    from training import checkpoint, resume

    if cfg.resume == "never":
        return
    if cfg.resume == "auto":
        found = checkpoint.latest_local(resume.checkpoint_dir(cfg))
        path = Path(found.path) if found else None
    else:
        path = Path(cfg.resume) if "://" not in cfg.resume else None
        if path is not None and not path.is_file():
            raise TrainError(f"bad value for resume: no checkpoint file {cfg.resume}")
    if path is None:
        return  # nothing local to resume from (a remote checkpoint is checked when the run loads it)
    where = f"run dir {run_dir(cfg)}" if cfg.resume == "auto" else "resume"
    try:
        with open(path, "rb") as f:  # torch's own error for another file is about mmap and zipfile serialization
            if f.read(4) != checkpoint.ZIP_MAGIC:
                raise TrainError(f"{where}: {path} is not a checkpoint file; resume from one that `shardtrain "
                                 "train` wrote (runs/NAME/checkpoints/*.pt)")
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise TrainError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise TrainError(f"{where}: {path} holds no run config, so it was not written by `shardtrain train`; "
                         "resume from one of its checkpoints (runs/NAME/checkpoints/*.pt)")
    other = another_model(ckpt, cfg, classes)
    if other is not None:
        raise TrainError(f"{where}: checkpoint {path} holds another model ({other}): give the run another name, "
                         "or move its run dir away")


def another_model(ckpt: dict, cfg: RunConfig, classes: list[str]) -> str | None:
    """How the checkpoint's model differs from the one `cfg` builds for `classes` ("model.name 'a', this config
    has 'b'"), or None when they are the same."""
    old = model_identity(ckpt["config"], len(ckpt.get("classes", classes)))
    new = model_identity(to_dict(cfg), len(classes))
    changed = next((k for k in new if old.get(k) != new[k]), None)
    return None if changed is None else f"{changed} {old.get(changed)!r}, this config has {new[changed]!r}"


def model_identity(config: dict, num_classes: int) -> dict:
    """What decides the model's state dict, from a (resolved) config dict."""
    task = config.get("task")
    identity = {"task": task, "model.name": config["model"]["name"], "model.kwargs": config["model"].get("kwargs", {}),
                "classes": None if task == "dino" else num_classes}  # a dino model has no class head
    for key in MODEL_KEYS.get(task or "", ()):
        section, name = key.split(".")
        identity[key] = config.get(section, {}).get(name)
    return identity
