"""Accuracy, not speed: which lr schedule suits the nightly flow, night after night on a growing store.

    python bench/nightly_schedule.py                          # the figures in bench/RESULTS.md (2 CPU cores, ~20 min)
    python bench/nightly_schedule.py --nights 3 --seeds 0     # a quick look

Each night, as `shardtrain demo` does: `--images` new photos per class (the bundled photos,
`shards.samples.make_imagefolder`, class-sorted on disk, flat folders) are appended to one wds store
(`shards.convert --append`, a fifth held out as val), then each option's run resumes from its newest
checkpoint and trains `--epochs` more epochs (`flows.nightly.continue_from_latest`, configs/demo.yaml:
resnet18 at 64 px, adamw, lr 2e-3, warmup 1 epoch, min_lr 1e-5). Night 1 trains from scratch, the same way for
every option but `constant_ema` (whose EMA starts there). The options:

- `whole_run`: one warm-up and cosine over the whole run so far, at the data's position
  (`optim.schedule_start_epoch=0`, the behaviour before the per-night schedule): night n begins at (n-1)/n of a
  cosine that each night lengthens;
- `restart`: the product: each night a warm restart, warm-up then cosine over that night's epochs;
- `restart_short_warmup`: the same with `optim.warmup_epochs=0.25` from night 2 on;
- `constant_ema`: from night 2 on a constant lr (`optim.min_lr` = `optim.lr`), with an EMA of the weights
  (`train.ema_decay`, from night 1), its `ema_val_top1` reported.

Val top-1 is read after each night (the run's last results.csv row); every option meets the same val split that
night. The last line is one JSON object, also appended to bench/results/nightly_schedule.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common import machine, record
from flows.nightly import continue_from_latest
from shards import ConvertOptions, convert, samples
from training import launch, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"
EMA_DECAY = 0.95  # nights of 6 to 30 steps here: a longer memory would hardly move

# Extra overrides of each option for night n (after continue_from_latest's own).
OPTIONS: dict[str, Callable[[int], list[str]]] = {
    "whole_run": lambda night: ["optim.schedule_start_epoch=0"],
    "restart": lambda night: [],
    "restart_short_warmup": lambda night: ["optim.warmup_epochs=0.25"] if night > 1 else [],
    "constant_ema": lambda night: [f"train.ema_decay={EMA_DECAY}"]
    + ([f"optim.min_lr={load_config(CONFIG).optim.lr}"] if night > 1 else []),
}


def append_night(raw: Path, store: Path, night: int, seed: int, args: argparse.Namespace) -> None:
    """The day's new images into `raw` (beside the older ones), then appended to the store."""
    samples.make_imagefolder(raw, {"train": args.images}, size=args.size, seed=1000 * seed + night,
                             start=(night - 1) * args.images, grid=args.grid, flat=True)
    convert(ConvertOptions(src=str(raw), dest=str(store), format="wds", append=True, val_fraction=0.2),
            progress=False)


def train_night(option: str, night: int, seed: int, store: Path, work: Path, args: argparse.Namespace) -> dict:
    """One option's night: resume and train `--epochs` more; its last results row."""
    name = f"{option}-s{seed}"
    base = [f"name={name}", f"runs_dir={work / 'runs'}", f"seed={seed}", f"data.path={store}",
            f"data.image_size={args.size}", "checkpoint.keep=1"]
    overrides = [*continue_from_latest(str(CONFIG), base, args.epochs), *OPTIONS[option](night)]
    log: list[str] = []
    if launch(CONFIG, overrides, stream=log.append) != 0:
        raise SystemExit(f"{name} night {night} failed:\n" + "\n".join(log[-20:]))
    return json.loads((work / "runs" / name / "metrics.json").read_text())["final"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "nightly_schedule")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--nights", type=int, default=4)
    parser.add_argument("--images", type=int, default=20, help="new images per class each night (as the demo's)")
    parser.add_argument("--grid", type=int, default=1, help="regions per photo side: 6 photos x grid^2 classes (the "
                        "demo's 1: 6 classes)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1, help="epochs each night (the nightly flow's default)")
    parser.add_argument("--options", default=",".join(OPTIONS))
    args = parser.parse_args()
    seeds, options = [int(s) for s in args.seeds.split(",")], args.options.split(",")
    shutil.rmtree(args.work, ignore_errors=True)
    top1 = {o: np.zeros((len(seeds), args.nights)) for o in options}
    lr = {o: np.zeros((len(seeds), args.nights)) for o in options}
    for s, seed in enumerate(seeds):
        work = args.work / f"seed{seed}"
        for night in range(1, args.nights + 1):
            append_night(work / "raw", work / "store", night, seed, args)
            for option in options:
                start = time.perf_counter()
                final = train_night(option, night, seed, work / "store", work, args)
                metric = "ema_val_top1" if option == "constant_ema" else "val_top1"
                top1[option][s, night - 1], lr[option][s, night - 1] = final[metric], final["lr"]
                print(f"seed {seed} night {night} {option:21s} {metric} {final[metric]:6.2f} "
                      f"(val_top1 {final['val_top1']:6.2f}, lr at its end {final['lr']:.2e}, "
                      f"{time.perf_counter() - start:.0f}s)", flush=True)
    for option in options:
        print(f"{option:21s} mean over seeds, night by night: "
              + " ".join(f"{v:6.2f}" for v in top1[option].mean(0)))
    record("nightly_schedule", {
        "bench": "nightly_schedule", "config": "configs/demo.yaml", "nights": args.nights,
        "epochs_per_night": args.epochs, "images_per_class_per_night": args.images, "classes": 6 * args.grid**2,
        "size": args.size, "seeds": seeds, "ema_decay": EMA_DECAY,
        **{f"top1_{o}": top1[o].round(2).tolist() for o in options},
        **{f"mean_top1_{o}": top1[o].mean(0).round(2).tolist() for o in options},
        **{f"end_lr_{o}": lr[o].mean(0).tolist() for o in options},
        **machine(),
    })


if __name__ == "__main__":
    main()
