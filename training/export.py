"""`shardtrain export`: a checkpoint as what a serving side loads, with its class names and eval preprocessing.

- safetensors (classify; dino: the teacher's backbone): timm's own export layout (`timm.models.save_for_hf`),
  `model.safetensors` and `config.json` (architecture, num_classes, label_names, and `pretrained_cfg` with the
  eval preprocessing: input_size, crop_pct, interpolation, mean, std). timm loads it with
  `timm.create_model(name, pretrained=True, pretrained_cfg_overlay={**config["pretrained_cfg"], "file": path})`
  (the overlay's num_classes keeps the head: timm drops a head whose size differs from its pretrained_cfg's),
  or `timm.create_model("local-dir:DIR", pretrained=True)`.
- onnx (classify, detect): `model.onnx` and the same `config.json` (detect: its own, see `detect_config`).
  torch.onnx's TorchScript exporter: it traces the detector's post-processing (NMS) too, which torch.export
  cannot express yet. A classifier takes a batch; a detector one letterboxed image.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import fsspec
import pydantic
import torch
import yaml
from timm.models import save_for_hf
from timm.models._hub import save_config_for_hf  # what save_for_hf writes beside the weights; not re-exported
from torch import nn

from pipelines.presets import PAD_VALUE
from training.checkpoint import ZIP_MAGIC
from training.config import RunConfig, TrainError, make_dir, to_dict
from training.model import build_model
from training.preflight import MODEL_KEYS
from training.tasks.detect import build_detector, detect_settings
from training.train import diff_keys

FORMATS: dict[str, tuple[str, ...]] = {"safetensors": ("classify", "dino"), "onnx": ("classify", "detect")}
DINO_BACKBONE = "teacher.module.backbone."
OPSET = 17
# What defines the trained model, the input it takes and which of its weights (model, or ema when eval.metric is an
# ema_ one) best.pt was chosen by, besides its task's MODEL_KEYS: predict and export take these from the config the
# checkpoint stores, so that a setting of the run's (an override: data.image_size=48) is not lost to the config
# given on their command line.
TRAINED_KEYS = ("model.name", "model.kwargs", "data.image_size", "data.augment.eval_crop_pct", "data.augment.mean",
                "data.augment.std", "train.ema_decay", "eval.metric")


class Absent:
    """What `lookup` finds where a config dict has no such key (None is a value: train.ema_decay: null)."""

    def __repr__(self) -> str:
        return "unset"


ABSENT = Absent()


def load_checkpoint(checkpoint: str) -> object:
    """What the checkpoint file holds, read as tensors and plain values only (never code)."""
    try:
        with fsspec.open(checkpoint, "rb") as f:
            is_zip = f.read(4) == ZIP_MAGIC
            f.seek(0)
            return torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError):
        # not torch's message: it suggests weights_only=False, which would run whatever code the file holds
        what = ("holds pickled Python objects (a whole model saved with torch.save(model)?), not only tensors"
                if is_zip else "is not a checkpoint file")
        raise TrainError(f"{checkpoint} {what}; expected one written by `shardtrain train`, e.g. "
                         "runs/NAME/checkpoints/best.pt") from None
    except (OSError, RuntimeError, ValueError) as e:
        raise TrainError(f"cannot read checkpoint {checkpoint}: {str(e).splitlines()[0]}") from None


def read_checkpoint(cfg: RunConfig, checkpoint: str,
                    log=print) -> tuple[dict[str, torch.Tensor], RunConfig, list[str]]:
    """The weights a checkpoint serves with (its EMA's when its run's eval.metric is an ema_ one), the config it
    was trained with (see `trained_config`) and its class names."""
    ckpt = load_checkpoint(checkpoint)
    if not isinstance(ckpt, dict) or "classes" not in ckpt or not isinstance(ckpt.get("config"), dict):
        raise TrainError(f"checkpoint {checkpoint} has no class names: is it a shardtrain checkpoint?")
    task = ckpt["config"].get("task")
    if task != cfg.task:  # the config's task-specific settings (its thresholds) would not apply
        raise TrainError(f"checkpoint {checkpoint} holds another model than the config's (task {task!r}, this "
                         f"config has {cfg.task!r}): give the config it was trained with (its run dir's config.yaml)")
    trained = trained_config(cfg, ckpt["config"], checkpoint, log)
    weights = ckpt["ema"] if trained.eval.metric.startswith("ema_") and ckpt.get("ema") else ckpt["model"]
    return weights, trained, list(ckpt["classes"])


def trained_config(cfg: RunConfig, stored: dict, checkpoint: str, log=print) -> RunConfig:
    """`cfg` with the settings that define the trained model and its input (TRAINED_KEYS, its task's MODEL_KEYS)
    taken from `checkpoint`'s `stored` config, logging a line for each that differs. The rest (thresholds) is
    chosen per invocation and stays `cfg`'s, as does a key that an older run's config lacks."""
    given, raw = to_dict(cfg), to_dict(cfg)
    for key in (*TRAINED_KEYS, *MODEL_KEYS.get(cfg.task, ())):
        *section, leaf = key.split(".")
        value = lookup(stored, key)
        if value is not ABSENT:
            lookup(raw, ".".join(section))[leaf] = value
    taken = diff_keys(raw, given)
    raw["model"]["pretrained"] = None  # the checkpoint holds every weight: none to fetch
    try:
        trained = RunConfig.model_validate(raw)
    except pydantic.ValidationError as e:
        raise refused(e, raw, taken, checkpoint) from None
    for key in taken:
        log(f"using the checkpoint's {key}={as_written(lookup(raw, key))} "
            f"(the config says {as_written(lookup(given, key))})")
    return trained


def refused(e: pydantic.ValidationError, raw: dict, taken: list[str], checkpoint: str) -> TrainError:
    """The error for settings taken from the checkpoint that this version's config refuses (an older run's value
    now out of range, a metric since renamed). The config given was valid, so they are the cause; config's own
    "bad value for K" would send the user to edit a config whose K is not the one used."""
    err = e.errors()[0]
    loc, why = ".".join(map(str, err["loc"])), err["msg"].removeprefix("Value error, ")
    # the taken key at or above the refused one (data.augment.std for data.augment.std.1); a check across keys has
    # no loc: the taken keys its message names (else all of them)
    keys = [key for key in taken if f"{loc}.".startswith(f"{key}.") or key in why] or taken
    settings = ", ".join(f"{key}={as_written(lookup(raw, key))}" for key in keys)
    return TrainError(f"checkpoint {checkpoint} was trained with {settings}, which this version's config refuses "
                      f"({why}); predict and export take the model's settings from the checkpoint whatever the "
                      "config says: retrain, or use the shardtrain version that trained it")


def as_written(value: Any) -> str:
    """`value` as a user writes it in the YAML config or a key=value override: null, true, [0.5, 0.5, 0.5]."""
    if value is ABSENT:
        return repr(value)  # "unset": the key is missing, which no YAML value says
    # one line however long; a bare scalar's dump ends with YAML's document end marker, "..."
    return yaml.safe_dump(value, default_flow_style=True, width=2**31).removesuffix("\n...\n").strip()


def lookup(config: dict, key: str) -> Any:
    """The value at a dotted key of a nested config dict, ABSENT where there is none."""
    node: Any = config
    for part in key.split("."):
        node = node.get(part, ABSENT) if isinstance(node, dict) else ABSENT
    return node


def load_model(cfg: RunConfig, checkpoint: str, log=print) -> tuple[nn.Module, RunConfig, list[str]]:
    """The checkpoint's model in eval mode (classify: the classifier; dino: the teacher's backbone; detect: the
    detector), the config it was trained with (see `read_checkpoint`) and its class names (dino: none)."""
    weights, cfg, classes = read_checkpoint(cfg, checkpoint, log)
    if cfg.task == "detect":
        return load_into(build_detector(cfg, len(classes), Path()), weights, checkpoint), cfg, classes
    if cfg.task == "dino":
        weights = {k.removeprefix(DINO_BACKBONE): v for k, v in weights.items() if k.startswith(DINO_BACKBONE)}
        classes = []
    return load_into(build_model(cfg.model, len(classes), Path()), weights, checkpoint), cfg, classes


def load_into(model: nn.Module, weights: dict[str, torch.Tensor], checkpoint: str) -> nn.Module:
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise TrainError(f"checkpoint {checkpoint} does not fit the config's model settings: "
                         f"{str(e).splitlines()[1].strip()[:160]}") from None
    return model.eval()


def eval_data_config(cfg: RunConfig) -> dict:
    """The classify eval preset (pipelines.presets.classify_eval) in timm's pretrained_cfg terms."""
    aug, size = cfg.data.augment, cfg.data.image_size
    return {"input_size": (3, size, size), "crop_pct": aug.eval_crop_pct, "crop_mode": "center",
            "interpolation": "bilinear", "mean": tuple(aug.mean), "std": tuple(aug.std)}


def save_timm_config(model: nn.Module, cfg: RunConfig, classes: list[str], out: Path) -> Path:
    path = out / "config.json"
    save_config_for_hf(model, str(path), model_config={"label_names": classes} if classes else None,
                       data_config=eval_data_config(cfg))
    return path


def detect_config(cfg: RunConfig, classes: list[str]) -> dict:
    aug, size, d = cfg.data.augment, cfg.data.image_size, detect_settings(cfg)
    return {
        "task": "detect", "architecture": cfg.model.name, "head": d.head, "num_classes": len(classes),
        "label_names": classes,
        "input": {"name": "image", "shape": [1, 3, size, size],
                  "preprocess": f"RGB; longer side resized to {size} and padded to {size}x{size} with "
                                f"{PAD_VALUE} (letterbox, image centred); (pixels / 255 - mean) / std",
                  "mean": list(aug.mean), "std": list(aug.std)},
        "outputs": {"boxes": "xyxy pixels of the letterboxed image", "scores": "after NMS, highest first",
                    "labels": "index into label_names"},
        "thresholds": {"score": d.score_thresh, "nms": d.nms_thresh, "suggested_score": d.predict_score_thresh},
    }


class Detections(nn.Module):
    """A torchvision detector as a graph of plain tensors: one image in, boxes, scores and labels out."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        found = self.detector(list(image))[0]
        return found["boxes"], found["scores"], found["labels"]


def to_onnx(model: nn.Module, example: torch.Tensor, path: Path, outputs: list[str], batch_axis: bool) -> None:
    axes = {name: {0: "batch"} for name in ["image", *outputs]} if batch_axis else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=outputs, dynamic_axes=axes)


def export(cfg: RunConfig, checkpoint: str, out: Path, fmt: str | None = None, log=print) -> list[Path]:
    """Write `checkpoint`'s model into `out` as `fmt` (None: the task's first format in FORMATS); returns the
    files written."""
    fmt = fmt or next(f for f, tasks in FORMATS.items() if cfg.task in tasks)
    if fmt not in FORMATS:
        raise TrainError(f"--format must be safetensors or onnx, not {fmt}")
    if cfg.task not in FORMATS[fmt]:
        other = next(f for f, tasks in FORMATS.items() if cfg.task in tasks)
        raise TrainError(f"task {cfg.task} exports as {other}, not {fmt}")
    model, cfg, classes = load_model(cfg, checkpoint, log)
    make_dir(out, "--out")
    size = cfg.data.image_size
    if cfg.task == "detect":
        to_onnx(Detections(model), torch.zeros(1, 3, size, size), out / "model.onnx", ["boxes", "scores", "labels"],
                batch_axis=False)
        (out / "config.json").write_text(json.dumps(detect_config(cfg, classes), indent=2) + "\n")
        return [out / "model.onnx", out / "config.json"]
    if fmt == "safetensors":
        save_for_hf(model, str(out), model_config={"label_names": classes} if classes else None,
                    safe_serialization=True, data_config=eval_data_config(cfg))
        return [out / "model.safetensors", out / "config.json"]
    to_onnx(model, torch.zeros(2, 3, size, size), out / "model.onnx", ["logits"], batch_axis=True)
    return [out / "model.onnx", save_timm_config(model, cfg, classes, out)]
