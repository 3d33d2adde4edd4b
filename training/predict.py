"""`shardtrain predict`: a trained model on new images. A detector's boxes as JSON or YOLO text, optionally
drawn; a classifier's top classes with their probabilities, as JSON.

Each image goes through what evaluation used: the pipeline's decoding (EXIF applied) and its eval
transform (the detector's letterbox, the classifier's resize and centre crop), then the run's
normalisation. Boxes come back in the original image's pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import albumentations as A
import fsspec
import numpy as np
import torch
from rich.progress import track
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes

from pipelines import decode_image, detect_eval
from pipelines.presets import classify_eval
from shards.layouts import IMAGE_EXTENSIONS, image_relpaths
from training.config import RunConfig, TrainError, make_dir
from training.export import load_model
from training.tasks.detect import detect_settings


@dataclass(frozen=True)
class Placement:
    """Where the original image lies in the letterboxed square: offset and scale per axis."""

    x0: float
    y0: float
    sx: float
    sy: float

    def to_original(self, boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Letterboxed xyxy pixels back to the original image's, clipped to it."""
        offset = boxes.new_tensor([self.x0, self.y0, self.x0, self.y0])
        scale = boxes.new_tensor([self.sx, self.sy, self.sx, self.sy])
        out = (boxes - offset) / scale
        return out.clamp(min=0).minimum(boxes.new_tensor([width, height, width, height]))


def letterbox(transform: A.Compose, image: np.ndarray) -> tuple[np.ndarray, Placement]:
    """Apply the eval letterbox; the placement is read back from a box around the whole image, so it is
    exactly what the transform did (its rounding included)."""
    h, w = image.shape[:2]
    out = transform(image=image, bboxes=np.array([[0, 0, w, h]], dtype=np.float32), labels=[0])
    x0, y0, x1, y1 = (float(v) for v in out["bboxes"][0])
    return out["image"], Placement(x0, y0, (x1 - x0) / w, (y1 - y0) / h)


def to_yolo(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """xyxy pixels to YOLO's normalised (cx, cy, w, h)."""
    return box_convert(boxes, "xyxy", "cxcywh") / boxes.new_tensor([width, height, width, height])


def list_images(paths: list[Path], log=print) -> list[tuple[Path, Path]]:
    """(file, output name) for each image: a file by its name, a folder's images by their path inside it, found
    as `convert` finds a source's (its extensions, symlinked folders followed, hidden files left out; what it
    leaves out is logged)."""
    found: list[tuple[Path, Path]] = []
    for path in paths:
        if path.is_dir():
            relpaths, skipped = image_relpaths(fsspec.filesystem("file"), str(path.absolute()))
            found += [(path / r, Path(r)) for r in relpaths]
            for line in skipped:
                log(f"warning: skipped {path}/{line}")  # the line starts with a path inside the folder
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            raise TrainError(f"no such image or folder: {path}")
    if not found:
        raise TrainError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, paths))}")
    return found


def check_one_output_each(found: list[tuple[Path, Path]]) -> None:
    """--draw and --format yolo write a file per image, named by its output name less the suffix: two images of
    one such name (photo.jpg and photo.png) would overwrite each other's."""
    first: dict[Path, Path] = {}
    for path, name in found:
        other = first.setdefault(name.with_suffix(""), path)
        if other != path:
            raise TrainError(f"{other} and {path} would write the same output file {name.with_suffix('')}; "
                             "predict them in separate runs")


def to_input(image: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """An eval-transformed HWC uint8 image as the model's normalised CHW float, on mean's device."""
    return torch.from_numpy(image).to(mean.device).permute(2, 0, 1).float().sub_(mean).div_(std)


@torch.no_grad()
def detect(model: torch.nn.Module, image: np.ndarray, transform: A.Compose, mean: torch.Tensor, std: torch.Tensor,
           conf: float) -> dict[str, torch.Tensor]:
    """One image's boxes (original pixels), scores and labels with score >= conf."""
    boxed, place = letterbox(transform, image)
    out = model([to_input(boxed, mean, std)])[0]
    h, w = image.shape[:2]
    boxes = place.to_original(out["boxes"], w, h)
    # a box wholly in the letterbox's padding clips to a line along the image's edge: not a box of the image
    keep = (out["scores"] >= conf) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[keep].cpu(), "scores": out["scores"][keep].cpu(), "labels": out["labels"][keep].cpu()}


@torch.no_grad()
def classify(model: torch.nn.Module, image: np.ndarray, transform: A.Compose, mean: torch.Tensor, std: torch.Tensor,
             top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's `top` most probable classes: (probabilities, class indices), most probable first."""
    x = to_input(transform(image=image)["image"], mean, std)
    probs = model(x[None])[0].float().softmax(dim=0)
    return probs.topk(min(top, len(probs)))


def write_yolo(path: Path, det: dict[str, torch.Tensor], width: int, height: int) -> None:
    """One line per box: `class cx cy w h score` (YOLO's save_txt with save_conf)."""
    rows = torch.cat([det["labels"][:, None].float(), to_yolo(det["boxes"], width, height), det["scores"][:, None]], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{int(r[0])} " + " ".join(f"{v:.6f}" for v in r[1:].tolist()) + "\n" for r in rows))


def draw(path: Path, image: np.ndarray, det: dict[str, torch.Tensor], classes: list[str]) -> None:
    from PIL import Image

    names = [f"{classes[int(c)]} {float(s):.2f}" for c, s in zip(det["labels"], det["scores"])]
    drawn = draw_bounding_boxes(torch.from_numpy(image.copy()).permute(2, 0, 1), det["boxes"], labels=names, width=2,
                                colors="red")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(path)


def predict(cfg: RunConfig, checkpoint: str, images: list[Path], out: Path, *, fmt: str = "json",
            draw_boxes: bool = False, conf: float | None = None, top: int = 5, log=print) -> list[dict]:
    """Run a detect or classify checkpoint on `images` (files or folders); write `out`/predictions.json (detect:
    or `out`/labels/*.txt, and `out`/images/* with the boxes drawn); returns one record per image (`error` set
    where it could not be read)."""
    if fmt not in ("json", "yolo"):
        raise TrainError(f"--format must be json or yolo, not {fmt}")
    if conf is not None and not 0 <= conf <= 1:
        raise TrainError(f"--conf is a score between 0 and 1, not {conf}")
    if cfg.task == "classify" and (fmt != "json" or draw_boxes or conf is not None):
        raise TrainError("--format yolo, --draw and --conf are for detect runs; a classify run writes each "
                         "image's top classes to predictions.json (--top)")
    if cfg.task not in ("classify", "detect"):
        raise TrainError(f"predict needs a config with task: classify or detect, this one has task: {cfg.task} "
                         "(`shardtrain export` writes its backbone)")
    if top < 1:
        raise TrainError(f"--top must be at least 1, not {top}")
    found = list_images(images, log)
    if draw_boxes or fmt == "yolo":
        check_one_output_each(found)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, classes = load_model(cfg, checkpoint, log)
    model = model.to(device)
    aug = cfg.data.augment
    mean = torch.tensor(aug.mean, device=device).view(3, 1, 1) * 255
    std = torch.tensor(aug.std, device=device).view(3, 1, 1) * 255
    if cfg.task == "detect":
        transform = detect_eval(cfg.data.image_size, aug)
        conf = detect_settings(cfg).predict_score_thresh if conf is None else conf
    else:
        transform = classify_eval(cfg.data.image_size, aug)
    records: list[dict[str, Any]] = []
    make_dir(out, "--out")
    for path, name in track(found, description="predict", transient=True):
        try:
            if not path.is_file():  # a FIFO or device named like an image: opening it could wait forever
                raise OSError(f"{path} is not a regular file")
            image = decode_image(path.read_bytes())
        except Exception as e:  # PIL raises many types for bad bytes; the image is reported, the rest go on
            log(f"warning: skipped {path}: cannot read it as an image: {str(e) or type(e).__name__}")
            records.append({"image": str(path), "error": f"cannot read: {type(e).__name__}: {e}"})
            continue
        h, w = image.shape[:2]
        record: dict[str, Any] = {"image": str(path), "width": w, "height": h}
        if cfg.task == "classify":
            probs, idx = classify(model, image, transform, mean, std, top)
            records.append(record | {"classes": [
                {"class": int(c), "name": classes[int(c)], "score": round(float(p), 6)} for p, c in zip(probs, idx)]})
            continue
        det = detect(model, image, transform, mean, std, cast(float, conf))
        records.append(record | {"detections": [
            {"box": [round(v, 2) for v in b.tolist()], "score": round(float(s), 4), "class": int(c),
             "name": classes[int(c)]}
            for b, s, c in zip(det["boxes"], det["scores"], det["labels"])]})
        if fmt == "yolo":
            write_yolo(out / "labels" / name.with_suffix(".txt"), det, w, h)
        if draw_boxes:
            draw(out / "images" / name.with_suffix(".jpg"), image, det, classes)
    if fmt == "json":
        (out / "predictions.json").write_text(json.dumps(records, indent=1) + "\n")
    return records
