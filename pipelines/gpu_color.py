"""Colour ops with one parameter per image, on a batch of float 0..255 (N,3,H,W) images on any device.

torchvision's functional ops take one factor per call; these are their formulas with a factor per image
(tests/test_pipelines_gpu_dino.py holds each against torchvision's one-image function). They serve DINO's
views in `data.decode: gpu` and `hw` (pipelines/gpu.py), as albumentations' ColorJitter, ToGray,
GaussianBlur and Solarize do in the CPU workers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on `device` without waiting: through pinned memory, non-blocking. (A copy from pageable
    memory first waits for all the work queued on the stream; per op, that serialised the views' augmentation
    with the GPU's other work.)"""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def per_image(factor: torch.Tensor) -> torch.Tensor:
    return factor.reshape(-1, 1, 1, 1)


def blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * a + (1 - factor) * b, clamped to 0..255 (torchvision's `_blend`)."""
    f = per_image(factor)
    return (f * a + (1 - f) * b).clamp_(0, 255)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * per_image(factor)).clamp_(0, 255)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, TF.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, TF.rgb_to_grayscale(x), factor)


def hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue turned by `shift` of the circle (-0.5..0.5); torchvision's HSV conversions take batches."""
    hsv = _rgb_to_hsv(x / 255)
    h = (hsv[:, 0] + shift.reshape(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.cat([h[:, None], hsv[:, 1:]], dim=1)).mul_(255)


JITTER = (brightness, contrast, saturation, hue)  # the order of DINO_JITTER's factors


def gray(x: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(x, num_output_channels=3)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (on the CPU: the widest kernel sizes the convolution without a device
    sync): a kernel of int(3.5 sigma) * 2 + 1 taps (PIL's and albumentations' size), borders reflected
    (OpenCV's default), as two 1-D convolutions grouped by image and channel."""
    n, c, h, w = x.shape
    half = (sigma.double() * 3.5).int()  # each image's kernel radius
    r = int(half.max()) if n else 0
    taps = torch.arange(-r, r + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma.double()[:, None]) ** 2) * (taps.abs() <= half[:, None])
    kernel = upload((kernel / kernel.sum(1, keepdim=True)).to(x.dtype), x.device).repeat_interleave(c, dim=0)
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def solarize(x: torch.Tensor, threshold: float = 127.5) -> torch.Tensor:
    return torch.where(x >= threshold, 255 - x, x)
