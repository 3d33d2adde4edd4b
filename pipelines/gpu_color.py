"""Colour ops with one parameter per image, on a batch of float 0..255 (N,3,H,W) images on any device.

torchvision's functional ops take one factor per call; these are their formulas with a factor per image
(tests/test_pipelines_gpu_dino.py holds each against torchvision's one-image function). They serve DINO's views in
`data.decode: gpu` and `hw` (pipelines/gpu.py), and classify's colour jitter there and in `dali`, as albumentations'
ColorJitter, ToGray, GaussianBlur and Solarize do in the CPU workers; `jitter` applies each image's four jitter ops
in its own order in a fixed number of passes over the whole batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.utils._triton import has_triton
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


HUE = 3  # jitter ops by index, in factors and orders (DINO_JITTER's): 0 brightness, 1 contrast, 2 saturation, 3 hue
SLOTS = 7  # an order shifted to put hue in the middle slot: up to 3 blends before it and 3 after


def blend_op(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast or saturation, whichever each image's op (0, 1, 2) is, with its own factor: each is
    torchvision's blend of the image with a target (black, the mean of its grey, its grey)."""
    grey = TF.rgb_to_grayscale(x)
    target = torch.where(per_image(op == 1), grey.mean(dim=(-3, -2, -1), keepdim=True),
                         torch.where(per_image(op == 2), grey, 0.0))
    return blend(x, target, factor)


def hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue turned by `shift` of the circle (-0.5..0.5); torchvision's HSV conversions take batches."""
    hsv = _rgb_to_hsv(x / 255)
    h = (hsv[:, 0] + shift.reshape(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.cat([h[:, None], hsv[:, 1:]], dim=1)).mul_(255)


def jitter_slots(order: torch.Tensor, factors: torch.Tensor, on: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Each image's jitter spread over passes: its op (-1: none) and factor in each slot, (N, slots) each, and the
    slot of the hue pass.

    Every jittered image turns its hue exactly once; with each order shifted so that hue lands in the middle of
    SLOTS, that slot is one hue pass over the batch and every other slot one blend pass (`blend_op`), in each
    image's own order. Where no image turns its hue (classify's jitter), each image's three other ops fill three
    blend passes and there is no hue pass (None). order: (N,4) op indices; factors: (N,4) by op; on: (N,) the
    images jittered."""
    if not factors[on, HUE].any():
        kept = order[order != HUE].reshape(-1, 3)
        return kept.masked_fill(~on[:, None], -1), factors.gather(1, kept), None
    slot = torch.arange(4) + (SLOTS // 2 - (order == HUE).int().argmax(1, keepdim=True))
    ops = torch.full((len(order), SLOTS), -1).scatter_(1, slot, order)
    ops[~on] = -1
    return ops, torch.zeros(ops.shape).scatter_(1, slot, factors.gather(1, order)), SLOTS // 2


def jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """ColorJitter on the images where `on` (CPU tensors, as `jitter_slots` takes them), each with its own factors
    in its own order, in a fixed number of full-batch passes: no gathers, no host syncs. An image with nothing in
    a slot keeps its pixels exactly (a hue turn by 0 would not: HSV and back rounds). On a GPU that Triton
    supports the passes run compiled (`fused_passes`)."""
    ops, factor, hue_at = jitter_slots(order, factors, on)
    ops, factor = upload(ops, x.device), upload(factor, x.device)
    return (fused_passes() if fusable(x.device) else passes)(x, ops, factor, hue_at)


@functools.cache
def fusable(device: torch.device) -> bool:
    """Whether inductor builds kernels for `device`: its GPU kernels are Triton's, so Triton must be installed
    (Linux wheels of torch bring it; Windows ones do not) and the GPU new enough for it (compute capability 7.0);
    elsewhere the passes run eager rather than fail. This is the input path's choice, apart from `train.compile`
    (the model's). On the CPU (the tests, small runs) they stay eager: inductor's C++ build takes longer than such
    runs gain."""
    return device.type == "cuda" and has_triton()


def passes(x: torch.Tensor, ops: torch.Tensor, factor: torch.Tensor, hue_at: int | None) -> torch.Tensor:
    """`jitter`'s passes over the batch: slot s applies each image's op ops[:, s] (-1: none) with factor[:, s]."""
    for s in range(ops.shape[1]):
        y = hue(x, factor[:, s]) if s == hue_at else blend_op(x, ops[:, s], factor[:, s])
        x = torch.where(per_image(ops[:, s] >= 0), y, x)
    return x


@functools.cache
def fused_passes() -> Callable[..., torch.Tensor]:
    """`passes` compiled: ~100 elementwise ops over the whole batch, each a kernel and a round trip through memory
    in eager mode, fused by inductor into a few. Made on first use (importing torch.compile costs a second).

    It runs in the decode thread while the main thread may be compiling the train step, and the other way round.
    Torch 2.11 keeps FX's tracing flag process-wide (2.14 keeps it per thread), so dynamo took one thread's compile
    for an FX trace of the other's compiled call and raised (H100, `train.compile_mode=reduce-overhead`). With that
    error off, such a call runs its function eager instead."""
    torch._dynamo.config.error_on_nested_fx_trace = False
    return torch.compile(passes)


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
