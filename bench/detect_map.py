"""Does the detector learn real objects, and does each augmentation help? Held-out COCO mAP after FCOS from scratch.

Data, made by `shards.samples.make_coins` from the bundled coins photo (see shards/samples/LICENSE.md): one
class, "coin"; every image is a window of the photo whose edges cut no coin, with each coin's box from a
segmentation of the photo. Train windows come from the top three rows of coins (18 coins), held-out ones from
the fourth row (6 coins no train image shows), so mAP is on objects never seen in training:
- `train`: windows of 3 to 18 coins (a coin's mean side per image, once letterboxed, 0.12 to 0.37 of the
  image side, median 0.19: 70 px at 384);
- `val`: held-out windows of 2 to 6 coins (0.13 to 0.44, median 0.28);
- `val_far`, `val_near`: held-out windows of 2 to 6 coins photographed from farther or nearer (`make_coins`'
  zoom): coins 0.3 to 0.5 times (0.06 to 0.20, median 0.12) and 1.5 to 2 times (0.22 to 0.66, median 0.37)
  the size of a plain window's, scales the train set shows rarely or never but the scale jitter (0.5 to 1.5
  times) reaches.

Every variant trains the same model (FCOS, torchvision, on a timm body with an FPN, from random init: no
pretrained weights) with `configs/detector.yaml`'s optimizer (SGD 0.01, momentum 0.9) and schedule for the
same steps, and differs only in `data.augment`: the shipped augmentation, none, each augmentation alone, and
the shipped one less one of its parts. Variants run side by side, one process each (--parallel), all on the
one GPU where there is one; each variant's line is appended to --partial as it finishes:

    V=shipped,none,mosaic_only,scale_jitter_only,translate_only,hflip_only,hsv_only  # the H200 run of RESULTS.md:
    python bench/detect_map.py --eval-every 10 --variants $V,shipped_no_close,shipped_no_mosaic
    python bench/detect_map.py --size 128 --steps 120 --train 64 --batch 8 --workers 0 --model test_resnet \
        --fpn-channels 64 --head-convs 2 --parallel 2 --variants shipped,none,hsv_only,shipped_no_close  # the CPU run
    python bench/detect_map.py --variants shipped --batch 32 --steps 250 --set optim.warmup_epochs=5  # a recipe

The last line is one JSON object, also appended to bench/results/detect_map.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from io import TextIOWrapper
from pathlib import Path

import torch
import yaml

from common import machine, record
from pipelines import build_loader
from shards import ConvertOptions, convert, samples
from training import run
from training.config import RunConfig, apply_override, load_config
from training.dist import World
from training.tasks.detect import DetectTask

ROOT = Path(__file__).resolve().parents[1]

OFF = {"mosaic": 0.0, "scale_jitter": 0.0, "translate": 0.0, "hflip": 0.0, "hsv": [0.0, 0.0, 0.0]}
SHIPPED = yaml.safe_load((ROOT / "configs" / "detector.yaml").read_text())
AUG = SHIPPED["data"]["augment"]
VARIANTS = {
    "shipped": {},
    "none": OFF,
    **{f"{k}_only": {**OFF, k: AUG[k]} for k in ("mosaic", "scale_jitter", "translate", "hflip", "hsv")},
    "shipped_vis10": {"min_visibility": 0.1},  # ultralytics' area threshold instead of ours
    "shipped_no_close": {"close_mosaic": 0},  # mosaic to the last epoch
    "shipped_no_mosaic": {"mosaic": 0.0},
}
# split: (coins per image, images, zoom or None)
SPLITS = {"train": ((3, 18), 160, None), "val": ((2, 6), 32, None), "val_far": ((2, 6), 32, (0.3, 0.5)),
          "val_near": ((2, 6), 32, (1.5, 2.0))}
HELD_OUT = [s for s in SPLITS if s != "train"]


def make_store(work: Path, train: int) -> str:
    dest = work / f"store_{train}"
    if not (dest / "manifest.json").exists():
        per_split = {s: train if s == "train" else n for s, (_, n, _) in SPLITS.items()}
        raw = samples.make_coins(work / f"raw_{train}", per_split=per_split, seed=5,
                                 coins={s: c for s, (c, _, _) in SPLITS.items()},
                                 zoom={s: z for s, (_, _, z) in SPLITS.items() if z})
        convert(ConvertOptions(src=str(raw), dest=str(dest), format="wds"), progress=False)
    return str(dest)


def write_config(work: Path, store: str, variant: str, args: argparse.Namespace) -> Path:
    """detector.yaml with the bench's data, model size and length, and the --set overrides; only data.augment
    differs between variants."""
    cfg = yaml.safe_load((ROOT / "configs" / "detector.yaml").read_text())
    steps_per_epoch = -(-args.train // args.batch)
    cfg.update(name=variant, runs_dir=str(work / "runs"), resume="never")
    cfg["data"].update(path=store, image_size=args.size, batch_size=args.batch, workers=args.workers,
                       augment={**cfg["data"]["augment"], **VARIANTS[variant]})
    cfg["model"].update(name=args.model, pretrained=None)  # from scratch
    cfg["detect"].update(fpn_channels=args.fpn_channels, head_convs=args.head_convs)
    cfg["train"].update(epochs=-(-args.steps // steps_per_epoch), max_steps=args.steps, log_every=50)
    cfg["eval"].update(every_epochs=args.eval_every)  # val mAP in the run's results.csv; and after the last epoch
    cfg["checkpoint"].update(every_steps=100_000, keep=1)
    for item in args.set:
        apply_override(cfg, item)
    path = work / "configs" / f"{variant}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def held_out_maps(cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """mAP of the run's last weights on each held-out split."""
    world = World(0, 0, 1, device)
    ckpt = torch.load(Path(cfg.runs_dir) / cfg.name / "checkpoints" / "last.pt", weights_only=True, map_location=device)
    out: dict[str, float] = {}
    for split in HELD_OUT:
        loader = build_loader(cfg.data, split, train=False, task="detect", rank=0, world_size=1, seed=cfg.seed,
                              device=device)
        task = DetectTask(cfg, loader.classes, world, Path(cfg.runs_dir) / "pretrained")
        model = task.build_model().to(device)
        model.load_state_dict(ckpt["model"])
        loader.set_epoch(0)
        scores = task.evaluate(model, loader)
        out |= {f"{split}_map": round(scores["map"], 4), f"{split}_map50": round(scores["map50"], 4)}
    return out


def one(config: Path) -> None:
    """Train one variant (in this process) and print its figures as one JSON line."""
    cfg = load_config(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    summary = run(cfg)
    train_s = time.perf_counter() - start
    assert summary is not None  # one process: rank 0
    loss = summary.final["train_loss"]
    assert loss is not None
    print("RESULT " + json.dumps({"variant": cfg.name, "train_loss": round(float(loss), 4),
                                  "steps": summary.step, "train_s": round(train_s, 1),
                                  **held_out_maps(cfg, device)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--size", type=int, default=384, help="training image size (letterboxed)")
    p.add_argument("--train", type=int, default=160, help="train images")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="loader workers per variant")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--fpn-channels", type=int, default=SHIPPED["detect"]["fpn_channels"])
    p.add_argument("--head-convs", type=int, default=SHIPPED["detect"]["head_convs"])
    p.add_argument("--parallel", type=int, default=len(VARIANTS), help="variants trained at the same time")
    p.add_argument("--work", type=Path, default=Path("/tmp/detect-bench"))
    p.add_argument("--partial", type=Path, help="append each variant's JSON line here as it finishes")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for every variant's config, as `shardtrain train` takes them (optim.lr=0.02)")
    p.add_argument("--eval-every", type=int, default=10_000, help="epochs between the runs' own val evaluations")
    p.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args.one)

    store = make_store(args.work, args.train)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        sys.exit(f"error: unknown variants {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    results: dict[str, dict] = {}
    running: dict[str, tuple[subprocess.Popen, TextIOWrapper]] = {}
    queue = [(n, write_config(args.work, store, n, args)) for n in names]
    while queue or running:
        while queue and len(running) < args.parallel:
            name, config = queue.pop(0)
            log = open(args.work / f"{name}.log", "w")
            running[name] = (subprocess.Popen([sys.executable, __file__, "--one", str(config)], stdout=log,
                                              stderr=subprocess.STDOUT, env=env), log)
        time.sleep(2)
        for name, (proc, done_log) in list(running.items()):
            if proc.poll() is None:
                continue
            done_log.close()
            text = (args.work / f"{name}.log").read_text()
            lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
            results[name] = json.loads(lines[-1][7:]) if proc.returncode == 0 and lines else \
                {"variant": name, "error": text[-1500:]}
            print(json.dumps(results[name]), flush=True)
            if args.partial:
                with open(args.partial, "a") as f:
                    f.write(json.dumps(results[name]) + "\n")
            del running[name]
    print(f"{'variant':18s} {'train loss':>10s}" + "".join(f" {s + ' mAP':>13s} {s + ' mAP50':>15s}" for s in HELD_OUT))
    for name in names:
        r = results[name]
        if "error" in r:
            print(f"{name:18s} failed")
            continue
        print(f"{name:18s} {r['train_loss']:10.3f}" +
              "".join(f" {r[s + '_map']:13.3f} {r[s + '_map50']:15.3f}" for s in HELD_OUT))
    record("detect_map", {
        "bench": "detect_map", "variants": results, "wall_s": round(time.perf_counter() - start, 1),
        "settings": {"set": args.set, "steps": args.steps, "size": args.size, "batch": args.batch, "train": args.train,
                     "model": f"FCOS, timm {args.model} + FPN {args.fpn_channels}ch, {args.head_convs} head convs, "
                              "random init",
                     "optim": SHIPPED["optim"], "shipped_augment": AUG,
                     "data": "shards.samples.make_coins: windows of the coins photo, boxes by segmentation; "
                             f"splits (coins per image, images, zoom): {SPLITS}"},
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
