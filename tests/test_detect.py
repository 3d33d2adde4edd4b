"""Detection pieces: YOLO box encoding both ways, the letterbox and its inverse, the train augmentations
keeping boxes on their objects (hand-computed expectations), the detect config, and both heads' shapes."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

from pipelines import AugmentConfig
from pipelines.batches import yolo_to_pixels
from pipelines.presets import PAD_VALUE, detect_eval, detect_train
from training.config import TrainError, validate
from training.dist import World
from training.predict import Placement, letterbox, to_yolo
from training.tasks.detect import DetectTask, build_detector


def test_yolo_to_pixels_hand_case():
    # 200x100 image; box centred at (100, 50), 40 wide, 40 high; a second one hanging off the right edge
    boxes, labels = yolo_to_pixels({"boxes": [[0.5, 0.5, 0.2, 0.4], [0.95, 0.5, 0.2, 0.2]], "labels": [2, 0]},
                                   200, 100)
    np.testing.assert_allclose(boxes, [[80, 30, 120, 70], [170, 40, 200, 60]], atol=1e-4)
    assert labels == [2, 0]


def test_to_yolo_hand_case_and_round_trip():
    xyxy = torch.tensor([[80.0, 30, 120, 70], [0, 0, 200, 100]])
    yolo = to_yolo(xyxy, 200, 100)
    torch.testing.assert_close(yolo, torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 1.0, 1.0]]))
    back, _ = yolo_to_pixels({"boxes": yolo.tolist(), "labels": [0, 1]}, 200, 100)
    np.testing.assert_allclose(back, xyxy.numpy(), atol=1e-4)


@pytest.mark.parametrize(("w", "h", "size", "place", "box", "boxed"), [
    # wide: scale 64/200 = 0.32 -> 64x32, padded 16 above and below
    (200, 100, 64, Placement(0, 16, 0.32, 0.32), [20, 10, 120, 60], [6.4, 19.2, 38.4, 35.2]),
    # tall: scale 96/150 = 0.64 -> 32x96, padded 32 left and right
    (50, 150, 96, Placement(32, 0, 0.64, 0.64), [10, 15, 40, 150], [38.4, 9.6, 57.6, 96]),
    # already square and small: upscaled by 2, no padding
    (32, 32, 64, Placement(0, 0, 2, 2), [4, 8, 12, 30], [8, 16, 24, 60]),
])
def test_letterbox_hand_cases_and_inverse(w, h, size, place, box, boxed):
    transform = detect_eval(size, AugmentConfig())
    image = np.full((h, w, 3), 200, np.uint8)
    out, got = letterbox(transform, image)
    assert out.shape == (size, size, 3)
    assert (got.x0, got.y0, got.sx, got.sy) == pytest.approx((place.x0, place.y0, place.sx, place.sy))
    # the image sits where the placement says, the rest is the letterbox grey
    x0, y0 = round(place.x0), round(place.y0)
    x1, y1 = round(place.x0 + w * place.sx), round(place.y0 + h * place.sy)
    assert (out[y0:y1, x0:x1] == 200).all()
    assert (out == PAD_VALUE).all(axis=2).sum() == size * size - (x1 - x0) * (y1 - y0)
    # a box goes through the transform to the hand-computed place, and the placement maps it back
    moved = transform(image=image, bboxes=np.array([box], np.float32), labels=[0])["bboxes"]
    np.testing.assert_allclose(moved, [boxed], atol=1e-3)
    torch.testing.assert_close(got.to_original(torch.tensor(moved, dtype=torch.float32), w, h),
                               torch.tensor([box], dtype=torch.float32), atol=1e-3, rtol=0)


def red_extent(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Bounding box (x0, y0, x1, y1) of the clearly red pixels and their count."""
    r, g, b = (image[..., i].astype(int) for i in range(3))
    ys, xs = np.nonzero((r > 150) & (g < 90) & (b < 90))
    if len(xs) == 0:
        return np.zeros(4), 0
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32), len(xs)


def scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey noise image with one solid red rectangle, and that rectangle's box."""
    image = rng.integers(90, 140, (size, size, 3), dtype=np.uint8)
    w, h = rng.integers(size // 5, size // 2, 2)
    x, y = rng.integers(0, size - w), rng.integers(0, size - h)
    image[y:y + h, x:x + w] = (230, 20, 20)
    return image, np.array([[x, y, x + w, y + h]], dtype=np.float32)


@pytest.mark.filterwarnings("ignore:Got processor for bboxes")  # the colour step alone has no box work
def test_train_augmentations_keep_boxes_on_the_object():
    """Each transform of the train preset in turn (mosaic, letterbox, affine, flip, HSV): after every geometric
    one the box still frames the red object (to a pixel or two of resampling); colour ones leave boxes alone."""
    aug = AugmentConfig(mosaic=1.0, scale_jitter=0.3, translate=0.1, hflip=0.5)
    size = 96
    preset = detect_train(size, aug)
    rng = np.random.default_rng(0)
    kept = 0
    for trial in range(12):
        image, boxes = scene(rng, 128)
        labels, areas = [1], [1.0]  # areas: the train preset's second label field (only its rule reads it)
        partners = [{"image": rng.integers(90, 140, (80, 100, 3), dtype=np.uint8), "bboxes": np.zeros((0, 4)),
                     "labels": [], "areas": []} for _ in range(3)]
        for t in preset.transforms:
            one = A.Compose([t], bbox_params=preset.processors["bboxes"].params)
            one.set_random_seed(trial)
            data = {"image": image, "bboxes": boxes, "labels": labels, "areas": areas}
            if isinstance(t, A.Mosaic):
                data["mosaic_metadata"] = partners
            out = one(**data)
            if isinstance(t, A.ImageOnlyTransform):  # colour only (HSV): the boxes must not move
                np.testing.assert_allclose(np.asarray(out["bboxes"]).reshape(-1, 4), boxes, atol=1e-4)
                continue
            image, boxes = out["image"], np.asarray(out["bboxes"]).reshape(-1, 4)
            labels, areas = list(out["labels"]), list(out["areas"])
            extent, count = red_extent(image)
            if len(boxes) == 0:
                # dropped only when (almost) nothing of the object is left in view
                assert count < 0.1 * 128 * 128 / 25, f"{type(t).__name__} dropped a visible box"
                break
            np.testing.assert_allclose(boxes[0], extent, atol=2.5, err_msg=f"trial {trial}: {type(t).__name__}")
        else:
            kept += 1
    assert kept >= 6  # most trials keep their object through the whole chain


def test_detect_config_defaults_and_errors():
    base = {"name": "d", "data": {"path": "x"}}
    assert validate({**base, "task": "detect"}).eval.metric == "val_map"
    assert validate({**base, "task": "classify"}).eval.metric == "val_top1"
    assert validate({**base, "task": "detect", "eval": {"metric": "val_map50"}}).eval.metric == "val_map50"
    with pytest.raises(TrainError, match="bad value for detect.head"):
        validate({**base, "task": "detect", "detect": {"head": "yolo"}})
    with pytest.raises(TrainError, match="bad value for detect.fpn_channels"):
        validate({**base, "task": "detect", "detect": {"fpn_channels": 100}})
    with pytest.raises(TrainError, match="eval.metric"):
        cfg = validate({**base, "task": "detect", "eval": {"metric": "val_top1"}})
        DetectTask(cfg, ["a", "b"], World(0, 0, 1, torch.device("cpu")), Path("."))


@pytest.mark.parametrize("head", ["fcos", "retinanet"])
def test_both_heads_train_and_predict_shapes(head):
    """A loss step with an image without objects in the batch, then eval-mode detections in image pixels."""
    cfg = validate(
        {
            "name": "d",
            "task": "detect",
            "data": {"path": "x", "image_size": 64},
            "model": {"name": "test_resnet"},
            "detect": {"head": head, "fpn_channels": 32, "score_thresh": 0.0},
        }
    )
    torch.manual_seed(0)
    model = build_detector(cfg, 3, Path("."))
    images = [torch.randn(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 8, 30, 40]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and "bbox_regression" in losses
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP needs every parameter in the graph
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and len(out[0]["boxes"]) <= cfg.detect.detections_per_img
    assert out[0]["boxes"].min() >= 0 and out[0]["boxes"].max() <= 64 and out[0]["labels"].max() < 3
