"""Accuracy, not speed: the same model and recipe trained from our stores and from a plain loop.

    python bench/quality.py --device cuda --workers 6        # the figures in bench/RESULTS.md (one GPU, ~6 min)
    python bench/quality.py --size 32 --epochs 4 --seeds 0     # a quick look on a CPU

The data is real and class-sorted on disk, as users' data is: the bundled photos cut into
`--grid` x `--grid` regions, each region a class of random crops inside it
(`shards.samples.make_imagefolder(grid=...)`), written class by class into
`raw/{train,val}/<class>/`. It is converted to a wds and an LMDB store (`shards.convert`).
Each seed then trains the same timm model three ways, with the same optimizer, schedule, epochs,
batch size and augmentation:

- `imagefolder`: what a user writes with torchvision and timm: `ImageFolder` +
  `DataLoader(shuffle=True, drop_last=True)`, torchvision's RandomResizedCrop, flip and ColorJitter
  with our preset's numbers (eval: resize to size/crop_pct, centre crop), timm's model,
  `create_optimizer_v2`, `CosineLRScheduler` stepped per step, cross entropy;
- `wds`, `lmdb`: `shardtrain train` (torchrun, one process) on the stores, CPU decode;
- `wds-gpu`, `wds-hw` (with `--ways`): the same with `data.decode` gpu or hw: crops, flips and colour jitter drawn
  by the workers and applied in the training process (gpu runs on the CPU where there is no GPU).

Each run's val top-1 is measured on the same held-out images (the val split, centre crop). The
aim is both stores within 0.5 points of the plain loop (mean over seeds). The last line is one
JSON object, also appended to bench/results/quality.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from common import machine, record
from pipelines import AugmentConfig
from pipelines.presets import classify_eval_resize
from shards import ConvertOptions, convert, samples
from training import launch

ROOT = Path(__file__).resolve().parent.parent


def recipe(args) -> dict:
    """The run config both ways share (the plain loop reads its numbers from it)."""
    return {
        "task": "classify",
        "data": {"image_size": args.size, "batch_size": args.batch_size, "workers": args.workers, "decode": "cpu",
                 "pin_memory": args.device == "cuda", "channels_last": False},
        "model": {"name": args.model},
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 0.05, "warmup_epochs": 1, "min_lr": 1.0e-5},
        "train": {"epochs": args.epochs, "amp": "off", "log_every": 50},
        "checkpoint": {"every_steps": 100_000, "keep": 1},
        "eval": {"metric": "val_top1", "every_epochs": args.epochs},
        "resume": "never",
    }


def make_data(work: Path, args) -> dict[str, str]:
    raw = work / "raw"
    if not (raw / "train").exists():
        samples.make_imagefolder(raw, {"train": args.train_per_class, "val": args.val_per_class}, size=args.source_size,
                                 grid=args.grid)
    stores = {}
    for fmt in ("wds", "lmdb"):
        dest = work / f"store-{fmt}"
        if not (dest / "manifest.json").exists():
            convert(ConvertOptions(src=str(raw), dest=str(dest), format=fmt, shard_size="1000samples"), progress=False)
        stores[fmt] = str(dest)
    return {"raw": str(raw), **stores}


def torchvision_transforms(size: int, aug: AugmentConfig) -> tuple[T.Compose, T.Compose]:
    """Train and eval transforms with the numbers of our classify presets (pipelines/presets.py)."""
    cj, tail = aug.color_jitter, [T.ToTensor(), T.Normalize(aug.mean, aug.std)]
    train = T.Compose([T.RandomResizedCrop(size, scale=aug.scale, ratio=aug.ratio), T.RandomHorizontalFlip(aug.hflip),
                       T.ColorJitter(cj, cj, cj), *tail])
    return train, T.Compose([T.Resize(classify_eval_resize(size, aug)), T.CenterCrop(size), *tail])


def plain_loop(raw: Path, cfg: dict, seed: int, device: torch.device) -> float:
    """The reference: what a user writes with torchvision and timm. Returns val top-1 (%)."""
    torch.manual_seed(seed)
    d, o = cfg["data"], cfg["optim"]
    train_tf, eval_tf = torchvision_transforms(d["image_size"], AugmentConfig())
    train, val = ImageFolder(str(raw / "train"), transform=train_tf), ImageFolder(str(raw / "val"), transform=eval_tf)
    loader = DataLoader(train, batch_size=d["batch_size"], shuffle=True, drop_last=True, num_workers=d["workers"],
                        persistent_workers=d["workers"] > 0, generator=torch.Generator().manual_seed(seed))
    model = timm.create_model(cfg["model"]["name"], num_classes=len(train.classes)).to(device)
    optimizer = create_optimizer_v2(model, opt=o["name"], lr=o["lr"], weight_decay=o["weight_decay"])
    steps_per_epoch, epochs = len(loader), cfg["train"]["epochs"]
    warmup = round(o["warmup_epochs"] * steps_per_epoch)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, steps_per_epoch * epochs - warmup), lr_min=o["min_lr"],
                                  warmup_t=warmup, warmup_lr_init=o["min_lr"], warmup_prefix=True, t_in_epochs=False)
    step = 0
    for _ in range(epochs):
        model.train()
        for images, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
    model.eval()
    hits = 0
    with torch.no_grad():
        for images, labels in DataLoader(val, batch_size=256, num_workers=d["workers"]):
            hits += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
    return 100 * hits / len(val)


def shardtrain(store: str, decode: str, cfg: dict, seed: int, work: Path, name: str) -> float:
    """`shardtrain train` on a store (`training.launch`: torchrun, one process) with `data.decode` `decode`.
    Returns the final val top-1 (%)."""
    config = {"name": name, "runs_dir": str(work / "runs"), "seed": seed, **cfg,
              "data": {**cfg["data"], "path": store, "decode": decode}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log: list[str] = []
    if launch(path, stream=log.append) != 0:
        raise SystemExit(f"{name} failed:\n" + "\n".join(log[-20:]))
    metrics = json.loads((work / "runs" / name / "metrics.json").read_text())
    return float(metrics["final"]["val_top1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "quality")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ways", default="imagefolder,wds,lmdb", help="of imagefolder, wds, lmdb, wds-gpu, wds-hw")
    parser.add_argument("--grid", type=int, default=4, help="regions per photo side: 6 photos x grid^2 classes")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=15)
    parser.add_argument("--source-size", type=int, default=80, help="side of the stored crops")
    parser.add_argument("--size", type=int, default=64, help="data.image_size")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="of the plain loop; shardtrain "
                        "takes the GPU when there is one")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = make_data(args.work, args)
    cfg = recipe(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    top1: dict[str, list[float]] = {way: [] for way in args.ways.split(",")}
    for seed in seeds:
        for way in top1:
            start = time.perf_counter()
            if way == "imagefolder":
                top1[way].append(plain_loop(Path(data["raw"]), cfg, seed, torch.device(args.device)))
            else:
                fmt, _, decode = way.partition("-")
                top1[way].append(shardtrain(data[fmt], decode or "cpu", cfg, seed, args.work, f"{way}-seed{seed}"))
            print(f"seed {seed} {way:12s} val top-1 {top1[way][-1]:6.2f}  ({time.perf_counter() - start:.0f}s)",
                  flush=True)
    mean = {way: float(np.mean(v)) for way, v in top1.items()}
    base = "imagefolder" if "imagefolder" in mean else "wds"
    for way in (w for w in mean if w != base):
        print(f"{way}: mean top-1 {mean[way]:.2f} vs {base} {mean[base]:.2f} "
              f"({mean[way] - mean[base]:+.2f} points; aim within 0.5)")
    classes = 6 * args.grid**2
    record("quality", {
        "bench": "quality", "model": args.model, "size": args.size, "epochs": args.epochs, "classes": classes,
        "train_images": classes * args.train_per_class, "val_images": classes * args.val_per_class, "seeds": seeds,
        **{f"top1_{way}": [round(v, 2) for v in values] for way, values in top1.items()},
        **{f"mean_top1_{way}": round(m, 2) for way, m in mean.items()},
        **{f"delta_{way}": round(m - mean[base], 2) for way, m in mean.items() if way != base}, "delta_from": base,
        "device": args.device, **machine(),
    })


if __name__ == "__main__":
    main()
