"""pipelines/gpu.py's crop and resize (on the CPU here): a crop cut from a batch of images of different sizes is
the crop of that image alone, up to its right and bottom edges."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.ops import roi_align

from pipelines import AugmentConfig, gpu_color
from pipelines.batches import BatchSpec
from pipelines.gpu import classify_draw, crop_resize, device_batch, worker_batch
from pipelines.store import RawSample


def read_rgb(path: Path) -> np.ndarray:
    """An image file as cv2 decodes it, in RGB order."""
    image = cv2.imread(str(path))
    assert image is not None, f"cv2 cannot read {path}"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def small_and_big(imagefolder_src) -> list[torch.Tensor]:
    """Two real photos as the decoder gives them, uint8 (3,H,W): a 27x35 cut of one, then a whole 48x48 one."""
    a, b = (read_rgb(p) for p in sorted(imagefolder_src.rglob("*.jpg"))[:2])
    small = torch.from_numpy(a[:27, :35]).permute(2, 0, 1).contiguous()
    big = torch.from_numpy(b).permute(2, 0, 1).contiguous()
    assert small.shape == (3, 27, 35) and big.shape == (3, 48, 48)
    return [small, big]


def test_a_crop_to_a_smaller_images_bottom_right_edge_is_that_crop_of_the_image_alone(small_and_big):
    small, big = small_and_big
    # (x0, y0, x1, y1): enlarged to 32 px (one bilinear sample per pixel), and shrunk to 8 px (averaged samples)
    grow, shrink = (21.0, 15.0, 35.0, 27.0), (5.0, 3.0, 35.0, 27.0)
    for size, box in ((32, grow), (8, shrink)):
        out = crop_resize([big, small], [(torch.tensor([[box], [box]]), size)])[0][1, 0]
        alone = roi_align(small[None].float(), torch.tensor([[0.0, *box]]), size, 1.0, 0, aligned=True)[0]
        # the samples past the last pixel centre read the edge, not the canvas's zero padding (a dark fringe)
        assert torch.allclose(out, alone, atol=1e-3), (size, (out - alone).abs().amax(dim=(0, 1)))
    # the whole image enlarged: torchvision's resize (clamped to the edge too) on the lone image
    got = crop_resize([big, small], [(torch.tensor([[(0.0, 0.0, 35.0, 27.0)]] * 2), 48)])[0][1, 0]
    want = TF.resize(small.float(), [48, 48], antialias=True)
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().amax(dim=(0, 1))


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
