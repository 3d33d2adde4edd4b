"""Does the detector learn? COCO mAP on held-out images after a short FCOS run vs the same model at random init.

Data, all made by `shards.samples.make_yolo` from the bundled real photos (see shards/samples/LICENSE.md):
each image is a random crop of one of two real texture photos (brick, coins), on which 1-3 non-overlapping
"objects" are pasted, each the whole of one of the 6 other photos (astronaut, chelsea, coffee, hubble, retina,
rocket) resized to a random box of 1/5 to 1/2 of the image side, its class being the photo. Train and val images are different draws (other texture crops, other boxes) of the
same 6 objects. It is a real-photo set, but a much easier one than natural scenes: the objects are never
occluded and always look the same apart from their size and aspect ratio.

The model is FCOS (torchvision) on a timm resnet18 body with an FPN, from random init (no pretrained weights:
nothing is downloaded). The baseline is the same model built with the same seed, evaluated by the same code
before any step. CPU is enough:

    .venv/bin/python bench/detect_map.py [--epochs 12] [--size 96] [--work /tmp/detect-bench]

The last line is one JSON object, also appended to bench/results/detect_map.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import build_loader  # noqa: E402
from common import machine, record  # noqa: E402
from shards import ConvertOptions, convert, samples  # noqa: E402
from training import run  # noqa: E402
from training.config import RunConfig, validate  # noqa: E402
from training.dist import World  # noqa: E402
from training.tasks.detect import DetectTask  # noqa: E402
from training.train import seed_everything  # noqa: E402



def make_store(work: Path, raw_size: int, train: int, val: int) -> str:
    dest = work / "store"
    if not (dest / "manifest.json").exists():
        raw = samples.make_yolo(work / "raw", per_split={"train": train, "val": val}, size=raw_size, seed=5)
        convert(ConvertOptions(src=str(raw), dest=str(dest), format="wds"), progress=False)
    return str(dest)


def run_config(work: Path, store: str, size: int, epochs: int, batch: int, model: str) -> RunConfig:
    return validate({
        "name": f"detect_map_{int(time.time())}", "runs_dir": str(work / "runs"), "task": "detect", "seed": 0,
        "data": {"path": store, "image_size": size, "batch_size": batch, "workers": 1, "pin_memory": False,
                 "channels_last": False, "augment": {"mosaic": 0.25, "scale_jitter": 0.25}},
        "model": {"name": model},
        "detect": {"fpn_channels": 64, "head_convs": 2, "p6p7": False},
        "optim": {"lr": 2e-3, "weight_decay": 1e-4, "warmup_epochs": 1, "min_lr": 1e-5, "clip_grad": 10.0},
        "train": {"epochs": epochs, "log_every": 20},
        "checkpoint": {"every_steps": 10_000, "keep": 1},
        "resume": "never",
        "eval": {"every_epochs": max(1, epochs // 4)},
    })


def random_init_map(cfg: RunConfig) -> dict[str, float]:
    """mAP of the model the run starts from (the loop seeds the same way before building it)."""
    world = World(0, 0, 1, torch.device("cpu"))
    seed_everything(cfg.seed)
    loader = build_loader(cfg.data, cfg.data.val_split, train=False, task="detect", rank=0, world_size=1,
                          seed=cfg.seed, device=world.device)
    task = DetectTask(cfg, loader.classes, world, Path(cfg.runs_dir) / "pretrained")
    model = task.build_model()
    loader.set_epoch(0)
    return task.evaluate(model, loader)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--size", type=int, default=96, help="training image size (letterboxed)")
    p.add_argument("--raw-size", type=int, default=128, help="side of the made images")
    p.add_argument("--train", type=int, default=192)
    p.add_argument("--val", type=int, default=48)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--work", type=Path, default=Path("/tmp/detect-bench"))
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    store = make_store(args.work, args.raw_size, args.train, args.val)
    cfg = run_config(args.work, store, args.size, args.epochs, args.batch, args.model)
    baseline = random_init_map(cfg)
    print(f"random init: mAP@0.5 {baseline['map50']:.4f}, mAP@0.5:0.95 {baseline['map']:.4f}")
    start = time.perf_counter()
    summary = run(cfg)
    train_s = time.perf_counter() - start
    final = summary["final"]
    print(f"after {summary['epoch']} epochs ({summary['step']} steps, {train_s:.0f}s): mAP@0.5 {final['val_map50']:.4f}, "
          f"mAP@0.5:0.95 {final['val_map']:.4f} (best {summary['best']:.4f})")
    out = {"bench": "detect_map", "random_init_map50": round(baseline["map50"], 4),
           "random_init_map": round(baseline["map"], 4), "map50": final["val_map50"], "map": final["val_map"],
           "best_map": round(summary["best"], 4), "epochs": summary["epoch"], "steps": summary["step"],
           "train_s": round(train_s, 1),
           "images": {"train": args.train, "val": args.val, "raw_size": args.raw_size, "size": args.size,
                      "classes": 6, "source": "shards.samples.make_yolo (real photos pasted on real textures)"},
           "model": f"FCOS, timm {args.model} features_only + FPN 64ch, head 2 convs, random init",
           "machine": machine()}
    record("detect_map", out)


if __name__ == "__main__":
    main()
