"""pipelines/gpu.py's device half (on the CPU here): a crop cut from a batch's canvas of images of different sizes
and orientations is the crop of that image alone, upright, up to its right and bottom edges."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from pipelines import AugmentConfig, gpu_color
from pipelines.batches import BatchSpec
from pipelines.decode import probe_image
from pipelines.gpu import (
    apply_orientation,
    classify_draw,
    decode_batch,
    decoded_crops,
    device_batch,
    encoded_batch,
    worker_batch,
)
from pipelines.store import RawSample

CPU = torch.device("cpu")


def read_rgb(path: Path) -> np.ndarray:
    """An image file as cv2 decodes it, in RGB order."""
    image = cv2.imread(str(path))
    assert image is not None, f"cv2 cannot read {path}"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def jpeg(pixels: np.ndarray, orientation: int = 1) -> bytes:
    """RGB pixels as a JPEG file, with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


@pytest.fixture(scope="module")
def big_small_turned(imagefolder_src) -> list[RawSample]:
    """Real photos of different sizes in one batch: a whole 48x48 one, a 35x27 cut of another, and that cut stored
    turned a quarter (27x35) with the EXIF orientation (6) that shows it upright."""
    a, b = (read_rgb(p) for p in sorted(imagefolder_src.rglob("*.jpg"))[:2])
    assert b.shape == (48, 48, 3)
    small = np.ascontiguousarray(a[:27, :35])
    turned = np.ascontiguousarray(np.rot90(small, 1))  # ROTATE_90: what orientation 6 turns back
    return [RawSample("s", k, "jpg", data, {"cls": 0})
            for k, data in (("big", jpeg(b)), ("small", jpeg(small)), ("turned", jpeg(turned, 6)))]


def alone(sample: RawSample) -> torch.Tensor:
    """The image decoded on its own and turned upright, float (1,3,H,W)."""
    image = decode_jpeg(torch.frombuffer(bytearray(sample.image), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return apply_orientation(image, probe_image(sample.image)[2])[None].float()


def test_a_crop_to_a_smaller_images_bottom_right_edge_is_that_crop_of_the_image_alone(big_small_turned):
    # (x0, y0, x1, y1) on the upright images: enlarged to 32 px (one bilinear sample per pixel), shrunk to 8 px
    # (averaged samples), and the whole 35x27 image enlarged to 48 px: three sizes from one canvas
    grow, shrink, whole = (21.0, 15.0, 35.0, 27.0), (5.0, 3.0, 35.0, 27.0), (0.0, 0.0, 35.0, 27.0)
    batch, good, bad = encoded_batch(big_small_turned, [0, 1, 2], lambda w, h, seed: {})
    assert len(good) == 3 and not bad and batch["size"].tolist() == [[48, 48], [27, 35], [35, 27]]
    crops = [(torch.tensor([[grow]] * 3), 32), (torch.tensor([[shrink]] * 3), 8), (torch.tensor([[whole]] * 3), 48)]
    (grown, shrunk, enlarged), keep, bad = decoded_crops(batch, crops, CPU, decode_batch)
    assert keep == [0, 1, 2] and not bad
    for i in (1, 2):
        lone = alone(big_small_turned[i])
        assert lone.shape == (1, 3, 27, 35)
        for got, box, size in ((grown[i, 0], grow, 32), (shrunk[i, 0], shrink, 8)):
            want = roi_align(lone, torch.tensor([[0.0, *box]]), size, 1.0, 0, aligned=True)[0]
            # the samples past the last pixel centre read the edge, not the canvas's padding (a fringe)
            assert torch.allclose(got, want, atol=1e-3), (i, size, (got - want).abs().amax(dim=(0, 1)))
        # the whole image enlarged: torchvision's resize (clamped to the edge too) on the lone image
        want = TF.resize(lone[0], [48, 48], antialias=True)
        assert torch.allclose(enlarged[i, 0], want, atol=1e-3), (i, (enlarged[i, 0] - want).abs().amax(dim=(0, 1)))


def test_a_sample_that_does_not_decode_leaves_the_others_crops(big_small_turned):
    big, small, turned = big_small_turned
    cut = RawSample("s", "cut", "jpg", big.image[: len(big.image) // 2], {"cls": 0})  # header fine, data cut short
    batch, good, _ = encoded_batch([small, cut, turned], [0, 1, 2], lambda w, h, seed: {})
    assert len(good) == 3  # the workers read headers only
    box = torch.tensor([[[0.0, 0.0, 35.0, 27.0]]] * 3)
    (out,), keep, bad = decoded_crops(batch, [(box, 16)], CPU, decode_batch)
    assert keep == [0, 2] and [b.key for b in bad] == ["cut"] and "cannot decode" in bad[0].reason
    for got, sample in zip(out, (small, turned)):
        want = roi_align(alone(sample), torch.tensor([[0.0, *box[0, 0]]]), 16, 1.0, 0, aligned=True)[0]
        assert torch.allclose(got[0], want, atol=1e-3)


def test_classify_colour_jitter_on_the_device_is_the_drawn_factors_in_the_drawn_order(imagefolder_src):
    # classify's gpu/hw/dali device half applies the preset's ColorJitter (brightness, contrast, saturation; no hue)
    # with the factors and order each worker drew, on top of the same crop and flip as without jitter
    paths = sorted(imagefolder_src.rglob("*.jpg"))[:6]
    samples = [RawSample("s", p.stem, "jpg", p.read_bytes(), {"cls": i % 2}) for i, p in enumerate(paths)]
    seeds = list(range(100, 100 + len(samples)))
    specs = {cj: BatchSpec(size=24, train=True, aug=AugmentConfig(color_jitter=cj), transforms=[]) for cj in (0.0, 0.4)}
    plain, jittered = (device_batch(worker_batch(samples, seeds, spec)[0], spec, torch.device("cpu"))[0]["image"]
                       for spec in specs.values())
    assert "factors" not in worker_batch(samples, seeds, specs[0.0])[0]
    reference = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i, seed in enumerate(seeds):
        w, h = cv2.imdecode(np.frombuffer(samples[i].image, np.uint8), cv2.IMREAD_COLOR).shape[1::-1]
        drawn = classify_draw(specs[0.4], w, h, seed)
        assert np.array_equal(drawn["box"], classify_draw(specs[0.0], w, h, seed)["box"])
        factors = drawn["factors"]
        assert factors[3] == 0 and all(0.6 <= f <= 1.4 for f in factors[:3])
        want = plain[i] / 255
        for op in drawn["order"].tolist():
            want = want if op == gpu_color.HUE else reference[op](want, float(factors[op]))
        assert torch.allclose(jittered[i], want * 255, atol=0.05), (i, (jittered[i] - want * 255).abs().max())
    assert not torch.allclose(jittered, plain, atol=1.0)
