"""DINO's views on the GPU (data.decode: gpu, issue 18) in isolation, on one GPU: the colour jitter in one pass
per order position against the per-op row gathers it replaced, side by side in one process.

    python bench/dino_views.py --images 2048

On worker batches already in memory (the loader's own workers drew them from a store of full-size JPEGs):
1. augment: `gpu.dino_augment` on each batch's cropped views of one size, before and now;
2. device half: `gpu.dino_device_batch` (decode, crop, augment), before and now;
3. run ahead: the device half as the loader runs it, in its thread one batch ahead, before and now.
Every figure is images/s (a DINO image is its 12 views); the last line is one JSON object, also appended to
bench/results/dino_views.jsonl.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF

from common import machine, record
from hw_decode import make_store, rate, worker_batches
from pipelines import AugmentConfig, gpu, gpu_color, presets
from pipelines.tasks import TASKS

SPEC = TASKS["dino"].spec(True, 224, AugmentConfig())  # the shipped recipe's 2 x 224 and 10 x 96 views


def jitter_op_before(j: int, images: torch.Tensor, rows: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """One jitter op on the rows drawn for it, as before: brightness, contrast, saturation or hue."""
    f = gpu_color.upload(factors[rows], images.device)
    if j == 0:
        return (images * gpu_color.per_image(f)).clamp_(0, 255)
    if j == 1:
        return gpu_color.blend(images, TF.rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), f)
    if j == 2:
        return gpu_color.blend(images, TF.rgb_to_grayscale(images), f)
    return gpu_color.hue(images, f)


def augment_before(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """The baseline: `gpu.dino_augment` before the jitter's full-batch passes, one row gather and scatter per
    jitter op and order position (16 per view size)."""
    gpu.on_rows(x, p["flip"], lambda imgs, _: imgs.flip(-1))
    for k in range(4):
        for j in range(4):
            gpu.on_rows(x, p["jitter"] & (p["order"][:, k] == j),
                        functools.partial(jitter_op_before, j, factors=p["factors"][:, j]))
    gpu.on_rows(x, p["gray"], lambda imgs, _: gpu_color.gray(imgs))
    gpu.on_rows(x, p["sigma"] > 0, lambda imgs, r: gpu_color.gaussian_blur(imgs, p["sigma"][r]))
    gpu.on_rows(x, p["solarize"], lambda imgs, _: gpu_color.solarize(imgs))
    return x


def cropped(batch: dict, size: int, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One view size's crops of a worker batch, their augment parameters, as `dino_device_batch` makes them, and
    the number of images."""
    group = [v for v, view in enumerate(presets.dino_view_specs(SPEC.size, SPEC.aug)) if view.size == size]
    (x,), keep, _ = gpu.decoded_crops(batch, [(gpu_color.upload(batch["box"][:, group], device), size)], device,
                                      gpu.decode_batch)
    return x.flatten(0, 1), {k: batch[k][:, group].flatten(0, 1) for k in gpu.DINO_PARAMS}, len(keep)


def with_augment(augment, fn):
    """fn with `gpu.dino_device_batch`'s augment swapped for `augment` while it runs."""
    def run(*args):
        now, gpu.dino_augment = gpu.dino_augment, augment
        try:
            return fn(*args)
        finally:
            gpu.dino_augment = now
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/shardtrain-hw")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=12, help="worker batches held in memory")
    p.add_argument("--device", default="cuda", help="cpu: a quick check that the script runs, not a figure")
    args = p.parse_args()
    device = torch.device(args.device)

    batches = worker_batches(make_store(Path(args.work), args.images), args.batches, args.batch, "dino", "gpu", device)
    out: dict = {"bench": "dino_views", "machine": machine(), "batch": args.batch}
    variants = {"before": augment_before, "now": gpu.dino_augment}

    def put(key: str, value: float) -> None:
        out[key] = round(value, 1)
        print(f"{key:<28} {value:>9.1f} images/s", flush=True)

    for size in dict.fromkeys(view.size for view in presets.dino_view_specs(SPEC.size, SPEC.aug)):
        views = [cropped(b, size, device) for b in batches]
        for name, augment in variants.items():
            def augment_views(v, augment=augment):
                augment(v[0].clone(), v[1])
                return v[2]
            put(f"augment_{size}_{name}", rate(augment_views, views, 3, device))

    def device_half(b):
        return len(gpu.dino_device_batch(b, SPEC, device)[0]["crops"][0])

    def ahead(bs):
        fn = functools.partial(gpu.dino_device_batch, spec=SPEC, device=device)
        return sum(len(o[0]["crops"][0]) for o in gpu.run_ahead(bs, fn, device))

    for name, augment in variants.items():
        put(f"device_half_{name}", rate(with_augment(augment, device_half), batches, 3, device))
        put(f"run_ahead_{name}", rate(with_augment(augment, ahead), [batches], 3, device))
    for stage in ("device_half", "run_ahead"):
        out[f"ratio_{stage}"] = round(out[f"{stage}_now"] / out[f"{stage}_before"], 3)
    record("dino_views", out)


if __name__ == "__main__":
    main()
