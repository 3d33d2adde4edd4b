"""DINO's views with data.decode gpu (on the CPU here): the per-image colour ops against torchvision's and
albumentations' one-image functions, the workers' draws against `presets.dino_views`' probabilities, and the
loader's batches against the cpu mode's."""

from __future__ import annotations

import itertools
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pipelines import AugmentConfig, DataConfig, build_loader, gpu_color, presets
from pipelines.batches import BatchSpec
from pipelines.gpu import dino_augment, dino_draw
from shards import ConvertOptions, convert

CPU = torch.device("cpu")
AUG = AugmentConfig(global_crops=2, local_crops=3, local_size=16)


def read_rgb(path: Path) -> np.ndarray:
    """An image file as cv2 decodes it, in RGB order."""
    image = cv2.imread(str(path))
    assert image is not None, f"cv2 cannot read {path}"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def photos(imagefolder_src) -> torch.Tensor:
    """Four real photo crops, float 0..255 (4,3,40,48)."""
    root = imagefolder_src
    paths = sorted(root.rglob("*.jpg"))[:4]
    images = [read_rgb(p)[:40, :48] for p in paths]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


def one_op(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    """Colour-jitter op `op` (0 brightness, 1 contrast, 2 saturation, 3 hue) on every image, each with its factor."""
    return gpu_color.hue(x, factor) if op == gpu_color.HUE else gpu_color.blend_op(x, torch.full((len(x),), op), factor)


@pytest.mark.parametrize("op,reference,factors", [
    (0, TF.adjust_brightness, [0.6, 0.9, 1.2, 1.4]),
    (1, TF.adjust_contrast, [0.6, 0.9, 1.2, 1.4]),
    (2, TF.adjust_saturation, [0.8, 0.9, 1.1, 1.2]),
    (3, TF.adjust_hue, [-0.1, -0.03, 0.05, 0.1]),
])
def test_each_image_gets_its_own_factor_as_torchvision_gives_it(photos, op, reference, factors):
    out = one_op(photos.clone(), op, torch.tensor(factors))
    for i, f in enumerate(factors):
        expected = reference(photos[i] / 255, f) * 255
        assert torch.allclose(out[i], expected, atol=0.05), (reference.__name__, f, (out[i] - expected).abs().max())
    assert not torch.allclose(out, photos, atol=1.0)


def test_jitter_in_batch_passes_is_each_images_ops_one_image_at_a_time_in_its_own_order(photos):
    orders = torch.tensor(list(itertools.permutations(range(4))) * 2)  # all 24 orders, jittered and not
    n = len(orders)
    x = photos.repeat(n // len(photos), 1, 1, 1)
    rng = np.random.default_rng(0)
    factors = torch.from_numpy(rng.uniform([0.6, 0.6, 0.8, -0.1], [1.4, 1.4, 1.2, 0.1], (n, 4)).astype(np.float32))
    on = torch.arange(n) % 5 != 0
    off = torch.zeros(n, dtype=torch.bool)
    p = {"flip": off, "jitter": on, "factors": factors, "order": orders, "gray": off, "sigma": torch.zeros(n),
         "solarize": off}
    got = dino_augment(x.clone(), p)
    for i in range(n):
        want = x[i : i + 1]
        for op in orders[i].tolist() if on[i] else []:
            want = one_op(want, op, factors[i : i + 1, op])
        assert torch.equal(got[i], want[0]), (i, orders[i], on[i], (got[i] - want[0]).abs().max())


@pytest.mark.parametrize("hue", [0.1, 0.0])  # DINO's jitter turns hues; classify's does not (no hue pass)
def test_compiled_jitter_passes_give_the_eager_passes_pixels(photos, hue):
    """On a GPU `jitter` runs its passes compiled (`gpu_color.fused_passes`); inductor's CPU build of the same
    graph gives eager's pixels."""
    n = 24
    x = photos.repeat(n // len(photos), 1, 1, 1)
    rng = np.random.default_rng(1)
    factors = torch.from_numpy(rng.uniform([0.6, 0.6, 0.8, -hue], [1.4, 1.4, 1.2, hue], (n, 4)).astype(np.float32))
    orders = torch.from_numpy(np.stack([rng.permutation(4) for _ in range(n)]))
    ops, factor, hue_at = gpu_color.jitter_slots(orders, factors, torch.arange(n) % 5 != 0)
    assert (hue_at is None) == (hue == 0)
    eager = gpu_color.passes(x, ops, factor, hue_at)
    assert not torch.allclose(eager, x, atol=1.0)
    assert (gpu_color.fused_passes()(x, ops, factor, hue_at) - eager).abs().max() < 0.01
    assert not gpu_color.fusable(CPU)  # `jitter` itself runs the eager passes here


def test_compiled_jitter_runs_eager_while_fx_traces(photos):
    """The decode thread's compiled jitter while the main thread compiles the step: torch 2.11 sets FX's tracing
    flag for the whole process, and dynamo raised in the decode thread. This torch keeps the flag per thread, so
    the test sets it in its own."""
    ops, factor, hue_at = gpu_color.jitter_slots(torch.tensor([[1, 0, 2, 3]] * 4), torch.full((4, 4), 0.1),
                                                 torch.ones(4, dtype=torch.bool))
    with torch.fx._symbolic_trace._is_fx_tracing_context(True):
        got = gpu_color.fused_passes()(photos, ops, factor, hue_at)
    assert torch.equal(got, gpu_color.passes(photos, ops, factor, hue_at))


def test_gray_and_solarize_as_albumentations(photos):
    as_uint8 = photos.permute(0, 2, 3, 1).numpy().astype(np.uint8)
    gray = gpu_color.gray(photos)
    solar = gpu_color.solarize(photos)
    for i, img in enumerate(as_uint8):
        want_gray = A.ToGray(p=1.0)(image=img)["image"]
        assert np.abs(gray[i].permute(1, 2, 0).numpy() - want_gray).max() <= 1  # albumentations rounds to uint8
        want_solar = A.Solarize(threshold_range=(0.5, 0.5), p=1.0)(image=img)["image"]
        assert np.array_equal(solar[i].permute(1, 2, 0).numpy().astype(np.uint8), want_solar)


def test_blur_with_each_images_sigma_as_albumentations(photos):
    sigmas = [0.1, 0.7, 1.3, 2.0]  # kernels of 1, 5, 9 and 15 taps
    out = gpu_color.gaussian_blur(photos, torch.tensor(sigmas))
    for i, sigma in enumerate(sigmas):
        blur = A.GaussianBlur(sigma_limit=(sigma, sigma), p=1.0)
        want = blur(image=(photos[i] / 255).permute(1, 2, 0).numpy())["image"] * 255  # float 0..1: no rounding
        assert np.abs(out[i].permute(1, 2, 0).numpy() - want).max() < 1e-2, sigma
    assert torch.equal(out[0], photos[0])  # sigma 0.1: a one-tap kernel


def test_draws_honour_the_views_probabilities_and_ranges():
    spec = BatchSpec(size=32, train=True, aug=AUG, transforms=[])
    views = presets.dino_view_specs(32, AUG)
    n = 3000
    draws = [dino_draw(spec, 400, 300, seed) for seed in range(n)]
    p = {k: np.stack([d[k] for d in draws]) for k in draws[0]}  # (n, views, ...)

    def share(x: np.ndarray, want: float) -> None:
        assert abs(x.mean() - want) < 4 * np.sqrt(want * (1 - want) / x.size) + 1e-9, (x.mean(), want)

    share(p["flip"], AUG.hflip)
    share(p["jitter"], presets.DINO_JITTER_P)
    share(p["gray"], presets.DINO_GRAY_P)
    for v, view in enumerate(views):
        share(p["sigma"][:, v] > 0, view.blur)
        share(p["solarize"][:, v], view.solarize)
        boxes = p["box"][:, v]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (400 * 300)
        assert view.scale[0] - 0.01 <= area.min() and area.max() <= view.scale[1] + 0.01
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 400).all() and (boxes[:, 3] <= 300).all()
    blurred = p["sigma"][p["sigma"] > 0]
    assert presets.DINO_SIGMA[0] <= blurred.min() and blurred.max() <= presets.DINO_SIGMA[1]
    b, c, s, h = presets.DINO_JITTER
    lo, hi = p["factors"].reshape(-1, 4).min(0), p["factors"].reshape(-1, 4).max(0)
    assert np.allclose(lo, [1 - b, 1 - c, 1 - s, -h], atol=0.01)
    assert np.allclose(hi, [1 + b, 1 + c, 1 + s, h], atol=0.01)
    assert {tuple(o) for o in p["order"].reshape(-1, 4)} == {tuple(o) for o in itertools.permutations(range(4))}
    assert dino_draw(spec, 400, 300, 7).keys() == draws[7].keys()
    assert all(np.array_equal(dino_draw(spec, 400, 300, 7)[k], draws[7][k]) for k in draws[7])


@pytest.fixture(scope="module")
def store(imagefolder_src, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("dino-gpu-store") / "store"
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(dest), format="wds"), progress=False)
    return str(dest)


def first_batches(store: str, decode: str, seed: int = 0, workers: int = 0, count: int = 2) -> list[dict]:
    cfg = DataConfig(path=store, image_size=32, batch_size=8, workers=workers, augment=AUG, decode=decode,
                     pin_memory=False, channels_last=False)
    ld = build_loader(cfg, "train", train=True, task="dino", rank=0, world_size=1, seed=seed, device=CPU)
    ld.set_epoch(0)
    out = []
    for batch in ld:
        out.append(batch)
        if len(out) == count:
            break
    return out


def test_gpu_batches_have_the_cpu_batches_structure_and_are_a_function_of_the_seed(store):
    cpu, gpu = first_batches(store, "cpu"), first_batches(store, "gpu")
    for a, b in zip(cpu, gpu, strict=True):
        assert a.keys() == b.keys() == {"crops"}
        assert [(c.shape, c.dtype) for c in a["crops"]] == [(c.shape, c.dtype) for c in b["crops"]]
        assert [tuple(c.shape) for c in b["crops"]] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3
        # normalised photos, augmented alike: similar statistics (not the same draws as albumentations')
        for x, y in zip(a["crops"], b["crops"]):
            assert abs(x.mean() - y.mean()) < 0.5 and abs(x.std() - y.std()) < 0.5
    again = first_batches(store, "gpu", workers=2)  # in workers, the same pixels
    other = first_batches(store, "gpu", seed=1)
    for b, c, d in zip(gpu, again, other, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(b["crops"], c["crops"], strict=True))
        assert not any(torch.equal(x, y) for x, y in zip(b["crops"], d["crops"], strict=True))


def test_greyed_views_come_out_grey_in_their_drawn_share(store):
    mean = torch.tensor(AUG.mean)[:, None, None] * 255
    std = torch.tensor(AUG.std)[:, None, None] * 255
    grey = total = 0
    for batch in first_batches(store, "gpu", count=4):
        for crops in batch["crops"]:
            pixels = crops * std + mean
            grey += int(((pixels.amax(1) - pixels.amin(1)).flatten(1).amax(1) < 0.5).sum())
            total += len(crops)
    # 4 batches x 8 images x 5 views = 160 views, 20% drawn grey; a photo crop is grey only when drawn so
    assert total == 160 and 0.1 * total <= grey <= 0.3 * total


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_views_on_cuda_match_the_same_code_on_the_cpu(store):
    cfg = DataConfig(path=store, image_size=32, batch_size=8, workers=2, augment=AUG, decode="gpu",
                     channels_last=False)
    ld = build_loader(cfg, "train", train=True, task="dino", rank=0, world_size=1, seed=0, device=torch.device("cuda"))
    ld.set_epoch(0)
    for got, want in zip(ld, first_batches(store, "gpu", count=len(ld)), strict=True):
        assert all(c.is_cuda for c in got["crops"])
        for x, y in zip(got["crops"], want["crops"], strict=True):
            assert (x.cpu() - y).abs().mean() < 0.05  # nvJPEG against libjpeg: IDCT and upsampling differ
