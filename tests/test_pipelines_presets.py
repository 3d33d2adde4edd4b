"""Decoding, the albumentations presets and the GPU-path orientation, on real images;
and the dino and detect loaders on stores made by shards.convert."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

from pipelines import AugmentConfig, DataConfig, build_loader, presets
from pipelines.decode import decode_image
from pipelines.gpu import apply_orientation
from shards import ConvertOptions, convert, samples

CPU = torch.device("cpu")
RED, BLUE, GREY = (220, 20, 20), (20, 20, 220), (128, 128, 128)


def photo_jpeg(size=(160, 120), orientation: int = 1, quality: int = 95) -> bytes:
    img = Image.open(samples.photo_paths()[0]).convert("RGB").resize(size)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling=0, exif=exif)
    return buf.getvalue()


def test_decode_applies_exif_and_reduces_large_jpegs():
    full = decode_image(photo_jpeg((800, 600)))
    assert full.shape == (600, 800, 3) and full.dtype == np.uint8
    assert decode_image(photo_jpeg((800, 600)), min_side=140).shape == (150, 200, 3)  # 1/4 scale, both sides >= 140
    assert decode_image(photo_jpeg((800, 600)), min_side=500).shape == (600, 800, 3)  # 1/2 would be too small
    rotated = decode_image(photo_jpeg((160, 120), orientation=6))
    assert rotated.shape == (160, 120, 3)
    png = io.BytesIO()
    Image.new("LA", (30, 20)).save(png, "PNG")
    assert decode_image(png.getvalue()).shape == (20, 30, 3)


def test_decode_matches_pillow_and_refuses_truncated_jpegs():
    data = photo_jpeg((400, 300))
    for min_side in (None, 100):
        img = Image.open(io.BytesIO(data))
        if min_side:
            img.draft("RGB", (min_side, min_side))
        assert np.array_equal(decode_image(data, min_side), np.asarray(img.convert("RGB")))
    for cut in (0.2, 0.9, 0.999):
        with pytest.raises(OSError):
            decode_image(data[: int(len(data) * cut)])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_gpu_path_orientation_matches_pil(orientation):
    data = photo_jpeg(orientation=orientation, quality=100)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    raw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    got = apply_orientation(raw, orientation).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected).mean() < 2  # same pixels up to IDCT rounding


def test_normalisation_defaults_are_timms():
    """pipelines.config writes timm's ImageNet mean and std out rather than import timm (torch) for them."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert (AugmentConfig().mean, AugmentConfig().std) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def test_presets_keep_shapes_and_uint8():
    aug = AugmentConfig()
    img = np.random.default_rng(0).integers(0, 255, (75, 130, 3), dtype=np.uint8)
    for compose in (presets.classify_train(48, aug), presets.classify_eval(48, aug)):
        compose.set_random_seed(1)
        out = compose(image=img)["image"]
        assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    views = presets.dino_views(48, aug)
    assert len(views) == 8
    shapes = [v(image=img)["image"].shape for v in views]
    assert shapes == [(48, 48, 3)] * 2 + [(96, 96, 3)] * 6
    det = presets.detect_train(64, aug)(
        image=img, bboxes=np.array([[10, 10, 60, 50]], np.float32), labels=[3], areas=[2000.0], mosaic_metadata=[]
    )
    assert det["image"].shape == (64, 64, 3) and det["image"].dtype == np.uint8


def scene(colour, box, size=(120, 90)) -> np.ndarray:
    img = np.full((size[1], size[0], 3), GREY, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = colour
    return img


def colour_share(img: np.ndarray, box, colour) -> float:
    """Share of the box's whole pixels (edges blend with the background) that are `colour`."""
    x0, y0, x1, y1 = int(np.ceil(box[0])), int(np.ceil(box[1])), int(np.floor(box[2])), int(np.floor(box[3]))
    patch = img[y0:y1, x0:x1].astype(int)
    return float((np.abs(patch - colour).sum(-1) < 60).mean())


@pytest.mark.parametrize("mosaic", [0.0, 1.0])
def test_detection_preset_keeps_each_box_on_its_object(mosaic):
    aug = AugmentConfig(mosaic=mosaic, hsv=(0.0, 0.0, 0.0))  # colours intact so the objects can be found
    compose = presets.detect_train(96, aug)
    red_box, blue_box = (30, 20, 70, 60), (10, 40, 60, 80)
    partner = {
        "image": scene(BLUE, blue_box),
        "bboxes": np.array([blue_box], np.float32),
        "labels": [1],
        "areas": [2000.0],
    }
    kept = 0
    for seed in range(12):
        compose.set_random_seed(seed)
        out = compose(image=scene(RED, red_box), bboxes=np.array([red_box], np.float32), labels=[0], areas=[1600.0],
                      mosaic_metadata=[partner] * 3)
        assert len(out["bboxes"]) == len(out["labels"])
        for box, label in zip(out["bboxes"], out["labels"]):
            assert 0 <= box[0] < box[2] <= 96 and 0 <= box[1] < box[3] <= 96
            assert box[2] - box[0] >= aug.min_box_px and box[3] - box[1] >= aug.min_box_px
            assert colour_share(out["image"], box, RED if label == 0 else BLUE) > 0.8, (seed, box, label)
            kept += 1
    assert kept >= 12


@pytest.fixture(scope="module")
def yolo_store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("yolo")
    samples.make_yolo(root / "src", per_split={"train": 8, "val": 3}, size=96)
    convert(ConvertOptions(src=str(root / "src"), dest=str(root / "store"), format="wds", workers=1), progress=False)
    return str(root / "store")


def test_detect_loader_batches(yolo_store):
    cfg = DataConfig(path=yolo_store, image_size=64, batch_size=4, workers=1)
    for split, train in (("train", True), ("val", False)):
        ld = build_loader(cfg, split, train=train, task="detect", rank=0, world_size=1, seed=0, device=CPU)
        ld.set_epoch(0)
        batches = list(ld)
        assert len(batches) == len(ld) > 0
        for b in batches:
            n = len(b["image"])
            assert b["image"].shape == (n, 3, 64, 64) and b["image"].dtype == torch.float32
            assert len(b["boxes"]) == len(b["labels"]) == n
            for boxes, labels in zip(b["boxes"], b["labels"]):
                assert boxes.shape == (len(labels), 4) and labels.dtype == torch.int64
                assert (boxes >= 0).all() and (boxes <= 64).all()
        if not train:  # eval: a plain letterbox keeps every object
            assert sum(len(lab) for b in batches for lab in b["labels"]) > 0


def test_dino_loader_on_an_unlabeled_store(tmp_path):
    samples.make_unlabeled(tmp_path / "src", count=10, size=48)
    convert(
        ConvertOptions(src=str(tmp_path / "src"), dest=str(tmp_path / "store"), format="lmdb", workers=1),
        progress=False,
    )
    aug = AugmentConfig(global_crops=2, local_crops=2, local_size=16)
    cfg = DataConfig(path=str(tmp_path / "store"), image_size=32, batch_size=4, workers=1, augment=aug)
    ld = build_loader(cfg, "train", train=True, task="dino", rank=0, world_size=1, seed=0, device=CPU)
    ld.set_epoch(0)
    batches = list(ld)
    assert len(batches) == len(ld) == 2
    shapes = [tuple(c.shape) for c in batches[0]["crops"]]
    assert shapes == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
