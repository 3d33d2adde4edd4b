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

import fsspec
import torch
from timm.models import save_for_hf
from timm.models._hub import save_config_for_hf  # what save_for_hf writes beside the weights; not re-exported
from torch import nn

from pipelines.presets import PAD_VALUE
from training.config import RunConfig, TrainError
from training.model import build_model
from training.preflight import another_model
from training.tasks.detect import build_detector, detect_settings

FORMATS: dict[str, tuple[str, ...]] = {"safetensors": ("classify", "dino"), "onnx": ("classify", "detect")}
DINO_BACKBONE = "teacher.module.backbone."
OPSET = 17
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a zip archive


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


def read_checkpoint(cfg: RunConfig, checkpoint: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights a checkpoint serves with (its EMA's when eval.metric is an ema_ one) and its class names."""
    ckpt = load_checkpoint(checkpoint)
    if not isinstance(ckpt, dict) or "classes" not in ckpt or "config" not in ckpt:
        raise TrainError(f"checkpoint {checkpoint} has no class names: is it a shardtrain checkpoint?")
    other = another_model(ckpt, cfg, list(ckpt["classes"]))
    if other is not None:
        raise TrainError(f"checkpoint {checkpoint} holds another model than the config's ({other}): give the "
                         "config it was trained with (its run dir's config.yaml)")
    weights = ckpt["ema"] if cfg.eval.metric.startswith("ema_") and ckpt.get("ema") else ckpt["model"]
    return weights, list(ckpt["classes"])


def load_into(model: nn.Module, weights: dict[str, torch.Tensor], checkpoint: str) -> nn.Module:
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise TrainError(f"checkpoint {checkpoint} does not fit the config's model settings: "
                         f"{str(e).splitlines()[1].strip()[:160]}") from None
    return model.eval()


def timm_model(cfg: RunConfig, checkpoint: str) -> tuple[nn.Module, list[str]]:
    """The checkpoint's timm model (classify: the classifier; dino: the teacher's backbone) and class names."""
    weights, classes = read_checkpoint(cfg, checkpoint)
    model_cfg = cfg.model.model_copy(update={"pretrained": None})  # the checkpoint holds every weight
    if cfg.task == "dino":
        weights = {k.removeprefix(DINO_BACKBONE): v for k, v in weights.items() if k.startswith(DINO_BACKBONE)}
        return load_into(build_model(model_cfg, 0, Path()), weights, checkpoint), []
    return load_into(build_model(model_cfg, len(classes), Path()), weights, checkpoint), classes


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


def export(cfg: RunConfig, checkpoint: str, out: Path, fmt: str | None = None) -> list[Path]:
    """Write `checkpoint`'s model into `out` as `fmt` (None: the task's first format in FORMATS); returns the
    files written."""
    fmt = fmt or next(f for f, tasks in FORMATS.items() if cfg.task in tasks)
    if fmt not in FORMATS:
        raise TrainError(f"--format must be safetensors or onnx, not {fmt}")
    if cfg.task not in FORMATS[fmt]:
        other = next(f for f, tasks in FORMATS.items() if cfg.task in tasks)
        raise TrainError(f"task {cfg.task} exports as {other}, not {fmt}")
    out.mkdir(parents=True, exist_ok=True)
    size = cfg.data.image_size
    if cfg.task == "detect":
        weights, classes = read_checkpoint(cfg, checkpoint)
        detector = load_into(build_detector(cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"pretrained": None})}), len(classes), Path()), weights, checkpoint)
        to_onnx(Detections(detector), torch.zeros(1, 3, size, size), out / "model.onnx", ["boxes", "scores", "labels"],
                batch_axis=False)
        (out / "config.json").write_text(json.dumps(detect_config(cfg, classes), indent=2) + "\n")
        return [out / "model.onnx", out / "config.json"]
    model, classes = timm_model(cfg, checkpoint)
    if fmt == "safetensors":
        save_for_hf(model, str(out), model_config={"label_names": classes} if classes else None,
                    safe_serialization=True, data_config=eval_data_config(cfg))
        return [out / "model.safetensors", out / "config.json"]
    to_onnx(model, torch.zeros(2, 3, size, size), out / "model.onnx", ["logits"], batch_axis=True)
    return [out / "model.onnx", save_timm_config(model, cfg, classes, out)]
