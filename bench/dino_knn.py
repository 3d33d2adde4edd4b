"""Does DINO learn? k-NN top-1 of a short DINO run's teacher vs the same backbone at random init.

Data, all cut from the bundled real photos by `shards.samples` and turned to grayscale (so that a
photo's colours alone, which even random features pick up, do not give the class away):
- DINO trains on an unlabeled store: `make_unlabeled` random crops of all 8 photos;
- the k-NN eval (k=20, cosine, T=0.07, as in DINO) reads a labeled store (`eval.knn_path`):
  `make_imagefolder`, one class per photo (6), a small bank (train split) and the queries (val split).
The baseline is the same model built with the same seed, evaluated by the same code before any step.
CPU is enough:

    .venv/bin/python bench/dino_knn.py [--epochs 20] [--size 32] [--work /tmp/dino-bench]

The last line is one JSON object, also appended to bench/results/dino_knn.jsonl.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from timm.utils import random_seed

from common import machine, record
from shards import ConvertOptions, convert, samples
from training import run
from training.config import RunConfig, apply_override, validate
from training.dist import World
from training.tasks.dino import DinoTask


def grayscale(folder: Path) -> None:
    for path in folder.rglob("*.jpg"):
        Image.open(path).convert("L").convert("RGB").save(path, quality=90)


def make_stores(work: Path, size: int, unlabeled: int, bank: int, val: int) -> tuple[str, str]:
    """(unlabeled store for DINO, labeled store for the k-NN eval), made once per work folder."""
    stores = []
    for name, make in (("unlabeled", lambda raw: samples.make_unlabeled(raw, count=unlabeled, size=size, seed=3)),
                       ("labeled", lambda raw: samples.make_imagefolder(
                           raw, per_class={"train": bank, "val": val}, size=size, seed=7))):
        dest = work / name
        if not (dest / "manifest.json").exists():
            raw = make(work / f"raw-{name}")
            grayscale(raw)
            convert(ConvertOptions(src=str(raw), dest=str(dest), format="wds"), progress=False)
        stores.append(str(dest))
    return stores[0], stores[1]


def run_config(work: Path, stores: tuple[str, str], size: int, epochs: int, batch: int,
               overrides: list[str]) -> RunConfig:
    raw = {
        "name": f"dino_knn_{int(time.time())}", "runs_dir": str(work / "runs"), "task": "dino", "seed": 0,
        "data": {"path": stores[0], "image_size": size, "batch_size": batch, "workers": 1, "pin_memory": False,
                 "channels_last": False, "augment": {"local_crops": 4, "local_size": size // 2}},
        "model": {"name": "vit_tiny_patch16_224",
                  "kwargs": {"img_size": size, "patch_size": 8, "depth": 2, "dynamic_img_size": True}},
        "optim": {"lr": 1e-3, "weight_decay": 0.04, "warmup_epochs": max(1, epochs // 10), "min_lr": 1e-5,
                  "clip_grad": 3.0},
        "train": {"epochs": epochs, "log_every": 20},
        "checkpoint": {"every_steps": 10_000, "keep": 1},
        "resume": "never",
        "eval": {"every_epochs": max(1, epochs // 4), "knn_path": stores[1]},
        # A short run on little data: a teacher that follows faster (0.99), and no temperature warm-up
        # (a warmer teacher, 0.07, let this run collapse to uniform outputs).
        "dino": {"out_dim": 1024, "hidden_dim": 512, "bottleneck_dim": 128, "momentum_teacher": 0.99,
                 "teacher_temp": 0.04},
    }
    for item in overrides:
        apply_override(raw, item)
    return validate(raw)


def random_init_top1(cfg: RunConfig) -> float:
    """The k-NN top-1 of the model the run starts from (the loop seeds the same way before building it)."""
    world = World(0, 0, 1, torch.device("cpu"))
    random_seed(cfg.seed)  # as the loop seeds rank 0 (training/train.py)
    task = DinoTask(cfg, [], world, Path(cfg.runs_dir) / "pretrained")
    model = task.build_model()
    queries = task.val_loader(task="dino", rank=0, world_size=1, seed=cfg.seed, device=world.device)
    return task.evaluate(model, queries)["knn_top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--size", type=int, default=32, help="image and global crop size (local crops: half)")
    p.add_argument("--unlabeled", type=int, default=512, help="images DINO trains on")
    p.add_argument("--bank", type=int, default=8, help="k-NN bank images per class (6 classes)")
    p.add_argument("--val", type=int, default=32, help="k-NN query images per class")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (more oversubscribe a shared CPU)")
    p.add_argument("--work", type=Path, default=Path("/tmp/dino-bench"))
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. dino.teacher_temp=0.04")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    stores = make_stores(args.work, args.size, args.unlabeled, args.bank, args.val)
    cfg = run_config(args.work, stores, args.size, args.epochs, args.batch, args.overrides)
    baseline = random_init_top1(cfg)
    print(f"random init: k-NN top-1 {baseline:.2f}%")
    start = time.perf_counter()
    summary = run(cfg)
    assert summary is not None and summary.best is not None  # one process: rank 0, and k-NN evals ran
    train_s = time.perf_counter() - start
    final = summary.final["val_knn_top1"]
    assert final is not None
    print(f"after {summary.epoch} epochs ({summary.step} steps, {train_s:.0f}s): k-NN top-1 {final:.2f}% "
          f"(best {summary.best:.2f}%), {final / baseline:.3f}x the random init")
    out = {"bench": "dino_knn", "random_init_knn_top1": round(baseline, 2), "dino_knn_top1": round(final, 2),
           "best_knn_top1": round(summary.best, 2), "ratio": round(final / baseline, 3),
           "epochs": summary.epoch, "steps": summary.step, "train_s": round(train_s, 1),
           "images": {"dino_unlabeled": args.unlabeled, "knn_bank": 6 * args.bank, "knn_queries": 6 * args.val,
                      "size": args.size, "grayscale": True},
           "model": "vit_tiny_patch16_224 depth 2 patch 8", "overrides": args.overrides, "machine": machine()}
    record("dino_knn", out)


if __name__ == "__main__":
    main()
