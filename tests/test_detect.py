"""Detection pieces: YOLO box encoding both ways, the letterbox and its inverse, the train augmentations
keeping boxes on their objects (hand-computed expectations), the detect config, both heads' shapes, and the
FCOS loss over the whole batch: torchvision's losses, with nothing read back from the device."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou

from pipelines import AugmentConfig
from pipelines.batches import yolo_to_pixels
from pipelines.presets import PAD_VALUE, detect_eval, detect_train
from training.config import TrainError, validate
from training.dist import World
from training.predict import Placement, letterbox, to_yolo
from training.tasks.detect import DetectTask, HeadGroupNorm, build_detector, group_norm_channels_last


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


def small_detector(head: str, size: int, classes: int = 5) -> torch.nn.Module:
    cfg = validate({"name": "d", "task": "detect", "data": {"path": "x", "image_size": size},
                    "model": {"name": "test_resnet"}, "detect": {"head": head, "fpn_channels": 32}})
    torch.manual_seed(0)
    return build_detector(cfg, classes, Path("."))


def crowded_targets(size: int, counts: list[int], classes: int = 5) -> list[dict[str, torch.Tensor]]:
    """Boxes of 2 px to most of the image, overlapping, some on its edges; one image per count (0 included)."""
    g = torch.Generator().manual_seed(1)
    targets = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * (size - 40)
        wh = torch.rand(n, 2, generator=g) ** 2 * size + 2
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=size)], 1),
                        "labels": torch.randint(0, classes, (n,), generator=g)})
    return targets


def assert_same_losses_and_gradients(model: torch.nn.Module, ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    ours_grad = torch.autograd.grad(sum(ours.values()), params, retain_graph=True)
    theirs_grad = torch.autograd.grad(sum(theirs.values()), params)
    for a, b in zip(ours_grad, theirs_grad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fcos_batch_loss_is_torchvisions_with_its_gradients():
    size = 256
    model = small_detector("fcos", size)
    images = [torch.randn(3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    targets = crowded_targets(size, [0, 1, 3, 7, 12, 40])
    batch, _ = model.transform(images, targets)
    features = list(model.backbone(batch.tensors).values())
    outputs = model.head(features)
    anchors = model.anchor_generator(batch, features)
    per_level = [f.shape[-2] * f.shape[-1] for f in features]
    ours = model.compute_loss(targets, outputs, anchors, per_level)
    theirs = FCOS.compute_loss(model, targets, outputs, anchors, per_level)
    assert_same_losses_and_gradients(model, ours, theirs)
    assert float(ours["bbox_regression"]) > 0  # the crowd matched some anchors: the test compared real terms


def test_retinanet_batch_loss_is_torchvisions_with_its_gradients():
    size = 256
    model = small_detector("retinanet", size)
    images = [torch.randn(3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    targets = crowded_targets(size, [0, 1, 3, 7, 12, 40])
    targets[1]["boxes"] = torch.tensor([[10.0, 10.0, 12.0, 13.0]])  # overlaps every anchor under 0.4: matched
    batch, _ = model.transform(images, targets)  # only by the low-quality rule, to its best anchors (ties too)
    features = list(model.backbone(batch.tensors).values())
    outputs = model.head(features)
    anchors = model.anchor_generator(batch, features)
    ours = model.compute_loss(targets, outputs, anchors)
    theirs = RetinaNet.compute_loss(model, targets, outputs, anchors)
    assert_same_losses_and_gradients(model, ours, theirs)
    iou = box_iou(targets[1]["boxes"], anchors[1])
    matched = model.proposal_matcher(iou)
    assert iou.max() < 0.4 and int((matched >= 0).sum()) > 1  # the low-quality rule alone matched it, with ties
    assert float(ours["bbox_regression"]) > 0  # the crowd matched some anchors: the test compared real terms


@pytest.mark.parametrize("head", ["fcos", "retinanet"])
def test_sized_anchors_are_torchvisions_made_once_per_size(head):
    model = small_detector(head, 128)
    stock = AnchorGenerator(model.anchor_generator.sizes, model.anchor_generator.aspect_ratios)
    for size in (128, 96, 128):
        batch, _ = model.transform([torch.rand(3, size, size) for _ in range(3)])
        features = list(model.backbone(batch.tensors).values())
        ours, theirs = model.anchor_generator(batch, features), stock(batch, features)
        assert len(ours) == len(theirs) == 3
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(model.anchor_generator.made) == 2  # 128 px once, 96 px once


@pytest.mark.parametrize("head", ["fcos", "retinanet"])
def test_training_step_reads_nothing_back_from_the_device(head):
    """On the meta device, any read of a device value (.item(), a test in an `if`, a boolean-mask index,
    nonzero) raises: torchvision's losses do dozens a step, each a host sync on a GPU."""
    model = small_detector(head, 128).to("meta")
    images = [torch.empty(3, 128, 128, device="meta") for _ in range(3)]
    losses = model(images, crowded_targets(128, [2, 0, 9]))  # targets on the host, as the loader leaves them
    sum(losses.values()).backward()
    assert {v.device.type for v in losses.values()} == {"meta"}


@pytest.mark.parametrize("head", ["fcos", "retinanet"])
def test_compiled_head_norms_keep_the_channels_last_layout_and_torchs_values(head):
    """On CUDA, nn.GroupNorm gives a channels_last map back in NCHW (and its gradient), so each channels_last
    convolution of the head's towers copied its input and gradient back in its backward: 17 whole-map copies a
    pyramid level. Compiled, the head's norms trace a GroupNorm that keeps the layout (seen through fake CUDA
    tensors, as torch.compile traces a step; its gradient on the meta device, whose autograd runs without a GPU)
    and gives GroupNorm's values; eager, they run torch's."""
    tower = small_detector(head, 64).head.classification_head.conv.to(memory_format=torch.channels_last)
    norms = [m for m in tower.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [type(m) for m in norms] == [HeadGroupNorm] * 4
    traced: list = []

    def record(gm: torch.fx.GraphModule, inputs: list) -> object:
        traced.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    x = torch.randn(2, 32, 8, 8).to(memory_format=torch.channels_last)
    eager = tower(x)
    torch.testing.assert_close(torch.compile(tower, backend=record, fullgraph=True)(x), eager)
    assert traced.count(torch.var_mean) == 4 and torch.nn.functional.group_norm not in traced
    assert eager.grad_fn.next_functions[0][0].name() == "NativeGroupNormBackward0"  # the tower ends norm, ReLU

    norm = norms[0]
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 32, 8, 8, device="cuda").to(memory_format=torch.channels_last)
        y = group_norm_channels_last(x, 8, norm.weight.to("cuda"), norm.bias.to("cuda"), norm.eps)
        assert y.is_contiguous(memory_format=torch.channels_last)
    x = torch.empty(2, 32, 6, 5, device="meta").to(memory_format=torch.channels_last).requires_grad_()
    y = group_norm_channels_last(x, 8, norm.weight.to("meta"), norm.bias.to("meta"), norm.eps)
    assert torch.autograd.grad(y, x, torch.empty_like(y))[0].is_contiguous(memory_format=torch.channels_last)

    weight, bias = torch.randn(32), torch.randn(32)
    x = (torch.randn(2, 32, 6, 5) * 3 + 1).to(memory_format=torch.channels_last).requires_grad_()
    ours = group_norm_channels_last(x, 8, weight, bias, 1e-5)
    theirs = torch.nn.functional.group_norm(x, 8, weight, bias, 1e-5)
    torch.testing.assert_close(ours, theirs)
    g = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(theirs, x, g)[0])


@pytest.mark.parametrize("size", [128, 100])
def test_letterboxed_transform_is_what_torchvisions_gave_letterboxed_images(size):
    """The detectors' transform only stacks (and pads to a multiple of 32); torchvision's, set to resize by 1
    and normalise by (0, 1), gave the same tensors, sizes and boxes."""
    images = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    targets = crowded_targets(size, [3, 0])
    stock = GeneralizedRCNNTransform(size, size, [0.0] * 3, [1.0] * 3)
    ours, our_targets = small_detector("fcos", size).transform(images, targets)
    theirs, their_targets = stock(images, [dict(t) for t in targets])
    assert ours.image_sizes == theirs.image_sizes == [(size, size)] * 2
    assert ours.tensors.shape[-1] % 32 == 0
    torch.testing.assert_close(ours.tensors, theirs.tensors)
    for a, b in zip(our_targets or [], their_targets or []):
        torch.testing.assert_close(a["boxes"], b["boxes"])
