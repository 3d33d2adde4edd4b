"""DINO and detection throughput: each task's own step on a GPU batch (the ceiling) against shardtrain's loop
from a full-size JPEG store (end to end), their ratio, and the TFLOP/s achieved.

Run on a GPU host, from the repo root:

    python bench/task_throughput.py                          # both tasks as shipped (configs/dino_vits16.yaml,
                                                             # configs/detector.yaml): ceiling, end to end, ratio
    python bench/task_throughput.py --tasks dino --variants ';train.compile=false;data.batch_size=64 optim.fused=false'
    python bench/task_throughput.py --tasks dino --gpus 1,2  # DDP: efficiency_dino_2 = per-GPU rate on 2 / on 1
    python bench/task_throughput.py --tasks dino --no-e2e --profile  # where each ceiling's GPU time goes
    python bench/task_throughput.py --tasks dino --no-e2e --input-alone 40 --variants data.batch_size=256 \
        --data-variants 'data.decode=gpu'                    # the loader alone, with each data setting

A variant is the shipped config with space-separated dotted overrides (`shardtrain train`'s); variants are
separated by ';', the empty one is the shipped config. Every variant's ceiling is measured; the first variant
also runs end to end and gives the headline keys (ratio_dino, images_per_s_dino, tflops_dino, ...).
`--data-variants` adds overrides to the first variant that leave the step alone (data.decode, data.workers) and
runs each end to end against the first variant's ceiling:

    python bench/task_throughput.py --tasks dino --variants data.decode=gpu \
        --data-variants 'data.decode=cpu;data.decode=gpu data.workers=7;data.decode=cpu data.workers=7'

- Data: `--images` JPEGs of ImageNet-like size (~500x375, bench/train_throughput.py's `make_raw`) converted at
  full size to WebDataset for DINO; for detection, windows of the bundled coins photo at 2 to 3 times their size
  (about 200 to 1,500 px a side, every coin boxed) converted from YOLO layout.
- Ceiling: the loop's own `Trainer` built from the variant's config, stepping with its own `train_step` (task
  loss, backward, clipping, the task's hooks, optimizer, schedules, logging) on --ceiling-batches (8) real
  batches of the store in turn, already on the GPU; no data loading. Distinct batches, because a detection
  batch's box count sets the shapes of its loss (compiled: a graph for dynamic counts after the first). The
  ceilings in bench/RESULTS.md up to "Detection without host syncs, measured" stepped on one batch. Each
  variant runs in a process of its own (`--ceiling CONFIG`).
- FLOPs: torch.utils.flop_counter over one eager forward and backward of the task's loss (the optimizer's
  few FLOPs left out), per image; TFLOP/s = FLOPs per image x images/s.
- End to end: `python -m training CONFIG` (torchrun for --gpus), images/s the median of the loop's logged
  windows (train_throughput's `steady_rate`) after --warmup-steps and after the first epoch: while the model
  compiles, the loader's workers fill their prefetch queues, which the first epoch then drains faster than
  the workers could produce (a run is lengthened to 100 steps past the skipped ones).
The last line is one JSON object, also appended to bench/results/task_throughput.jsonl (with `"partial": true`
when a SIGTERM cut the run: the figures measured until then).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
import yaml

from common import machine, print_table, profile_steps, record, record_if_stopped, train_loader_rate
from pipelines.cpus import auto_workers, usable_cpus, worker_count
from shards import ConvertOptions, convert, samples
from train_throughput import launch, make_raw, steady_rate
from training.config import apply_override

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"dino": ROOT / "configs" / "dino_vits16.yaml", "detect": ROOT / "configs" / "detector.yaml"}


# ---- data ---------------------------------------------------------------------------------------------------------


def make_store(work: Path, task: str, n_train: int, n_val: int) -> str:
    # Named by its counts: a warm host keeps --work between calls, and another --images must not reuse it.
    dest = work / f"store-{task}-{n_train}-{n_val}"
    if not (dest / "manifest.json").exists():
        t = time.perf_counter()
        raw = work / f"raw-{task}-{n_train}-{n_val}"
        if task == "dino":
            make_raw(raw, n_train, n_val, os.cpu_count() or 1)
        else:
            samples.make_coins(raw, per_split={"train": n_train, "val": n_val}, seed=0,
                               scale={"train": (2.0, 3.0), "val": (2.0, 3.0)})
        convert(ConvertOptions(src=str(raw), dest=str(dest), format="wds", workers=os.cpu_count() or 1),
                progress=False)
        print(f"made the {task} store ({n_train} + {n_val} images) in {time.perf_counter() - t:.1f}s", flush=True)
    return str(dest)


def steps_per_epoch(cfg: dict, n_train: int, gpus: int = 1) -> int:
    return n_train // (cfg["data"]["batch_size"] * gpus)


def bench_config(task: str, variant: str, name: str, store: str, runs: Path, steps: int,
                 workers: int | None) -> dict:
    """The shipped config of `task` with the variant's overrides, on `store`, for `steps` steps, no checkpoints."""
    raw = yaml.safe_load(CONFIGS[task].read_text())
    raw.update(name=name, runs_dir=str(runs), resume="never")
    raw["data"]["path"] = store
    if workers is not None:
        raw["data"]["workers"] = workers
    raw["model"]["pretrained"] = None  # no model hub here; the step's speed is the same
    raw["train"].update(epochs=1000, max_steps=steps, log_every=10)
    raw["checkpoint"].update(every_steps=10**9, storage=None)
    raw["eval"]["every_epochs"] = 1000
    if task == "dino":
        raw["eval"]["knn_path"] = None  # the store is an ImageFolder: its own labels for the k-NN at the end
    for item in variant.split():
        apply_override(raw, item)
    return raw


# ---- ceiling (in a process of its own) ----------------------------------------------------------------------------


def step_flops(trainer, batch: dict) -> float:  # noqa: ANN001 (training.train.Trainer, imported in the child)
    """FLOPs of one eager forward and backward of the task's loss on `batch`."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        with torch.autocast(trainer.world.device.type, dtype=trainer.dtype, enabled=trainer.dtype is not None):
            loss = trainer.task.train_loss(trainer.train_model, batch)
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def ceiling(config: Path, warmup: int, steps: int, n_batches: int, profile: bool = False,
            torchvision_loss: bool = False) -> dict:
    """images/s of the loop's own `train_step` on `n_batches` batches of the store already on the device, in turn,
    and the FLOPs (and, with `profile`, where the GPU's time goes, printed before them). With `torchvision_loss`
    (FCOS), the same trainer's step with torchvision's own transform and loss too, alternating with ours, best of
    2 each. Distinct batches, as training meets them: a detection batch's box count sets its loss's shapes."""
    from training import dist
    from training.config import load_config
    from training.preempt import preemption_signals
    from training.train import Trainer

    cfg = load_config(config)
    world = dist.setup()
    with preemption_signals() as preemption:
        trainer = Trainer(cfg, world, preemption)
        loader = trainer.train_loader
        batches = list(itertools.islice(iter(loader), n_batches))
        flops = step_flops(trainer, batches[0]) / loader.batch_size(batches[0])
        sync = torch.cuda.synchronize if world.device.type == "cuda" else lambda: None

        def rate(step_batches: list[dict]) -> float:
            turn = itertools.cycle(step_batches)
            for _ in range(warmup):
                trainer.train_step(next(turn), 0, 0, len(loader))
            sync()
            t, images = time.perf_counter(), 0
            for _ in range(steps):
                batch = next(turn)
                trainer.train_step(batch, 0, 0, len(loader))
                images += loader.batch_size(batch)
            sync()
            return images / (time.perf_counter() - t)

        out = {"images_per_s": rate(batches), "flops_per_image": flops, "batches": len(batches)}
        if torchvision_loss:
            ours, theirs = torchvision_detector(trainer.model, cfg.data.image_size)
            stock_batches = [b | {k: [t.to(world.device) for t in b[k]] for k in ("boxes", "labels")}
                             for b in batches]
            ours()
            rates = [out["images_per_s"]]
            theirs()
            stock = [rate(stock_batches)]
            ours()
            rates.append(rate(batches))
            theirs()
            stock.append(rate(stock_batches))
            ours()
            out |= {"images_per_s": max(rates), "images_per_s_torchvision_loss": max(stock)}
        if profile and world.device.type == "cuda":
            turn = itertools.cycle(batches)
            profile_steps(lambda: trainer.train_step(next(turn), 0, 0, len(loader)))
    dist.teardown(world)
    return out


def torchvision_detector(detector: Any, size: int) -> tuple:
    """Two switches of `detector` (training.tasks.detect's BatchFCOS or BatchRetinaNet): to torchvision's own
    transform (resize by 1, normalise by (0, 1)), anchor generator and loss, the step before they were replaced,
    and back to ours."""
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    ours = detector.transform, detector.anchor_generator, type(detector).compute_loss
    anchors = detector.anchor_generator
    stock_loss = FCOS.compute_loss if isinstance(detector, FCOS) else RetinaNet.compute_loss
    stock = (GeneralizedRCNNTransform(size, size, [0.0] * 3, [1.0] * 3),
             AnchorGenerator(anchors.sizes, anchors.aspect_ratios), stock_loss)

    def use(transform: torch.nn.Module, anchor_generator: torch.nn.Module, loss: Any) -> None:
        detector.transform, detector.anchor_generator = transform, anchor_generator
        detector.compute_loss = types.MethodType(loss, detector)

    return (lambda: use(*ours)), (lambda: use(*stock))


def input_alone(task: str, raw: dict, batches: int) -> float:
    """images/s of the config's train loader alone (common.train_loader_rate)."""
    from training.config import validate

    return train_loader_rate(validate(raw).data, task, batches)


def run_ceiling(cfg: dict, runs: Path, warmup: int, steps: int, n_batches: int, profile: bool = False,
                torchvision_loss: bool = False) -> dict:
    path = runs / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, __file__, "--ceiling", str(path), "--ceiling-warmup", str(warmup),
           "--ceiling-steps", str(steps), "--ceiling-batches", str(n_batches)] \
        + (["--profile"] if profile else []) + (["--torchvision-loss"] if torchvision_loss else [])
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise RuntimeError(f"ceiling of {cfg['name']} failed:\n" + "\n".join(lines[-30:]))
    if profile:
        print("\n".join(line for line in lines if line.startswith(("profile:", "  "))), flush=True)
    return json.loads(lines[-1])


def end_to_end(task: str, variant: str, name: str, store: str, runs: Path, args: argparse.Namespace,
               n_train: int) -> tuple[float, float, int]:
    """images/s and data wait of `python -m training` on the variant's config (train_throughput's `steady_rate`),
    and the data.workers it ran (auto as a number: one process)."""
    cfg = bench_config(task, variant, name, store, runs, args.steps, args.workers)
    skip = max(args.warmup_steps, steps_per_epoch(cfg, n_train))
    # the windows after the skipped ones are the measurement: a run that ends first measures nothing
    cfg["train"]["max_steps"] = max(args.steps, skip + 100)
    rate, wait = steady_rate(launch(cfg, runs)[0], skip)
    print(f"{task} [{variant.strip() or 'shipped'}] end to end {rate:.0f} images/s, data wait {wait:.0%}", flush=True)
    return rate, wait, worker_count(cfg["data"]["workers"], 1)[0]


# ---- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/shardtrain-task-bench")
    p.add_argument("--tasks", default="dino,detect")
    p.add_argument("--variants", default="", help="';'-separated override sets; the first runs end to end too")
    p.add_argument("--data-variants", default="",
                   help="';'-separated overrides added to the first variant and run end to end only, against its "
                        "ceiling: data settings (decode mode, workers) that do not change the step")
    p.add_argument("--images", type=int, default=8192, help="DINO train images (detection: a quarter of it)")
    p.add_argument("--workers", type=int, default=None, help="data.workers (default: the shipped config's)")
    p.add_argument("--steps", type=int, default=200, help="end-to-end steps (the ceiling: --ceiling-steps)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--ceiling-steps", type=int, default=30)
    p.add_argument("--ceiling-warmup", type=int, default=10)
    p.add_argument("--ceiling-batches", type=int, default=8,
                   help="distinct batches the ceiling steps on in turn (detection's box counts differ)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU counts: DINO end to end under DDP only")
    p.add_argument("--no-e2e", action="store_true", help="ceilings only")
    p.add_argument("--profile", action="store_true", help="print where each ceiling's GPU time goes (torch.profiler)")
    p.add_argument("--input-alone", type=int, default=0, metavar="BATCHES",
                   help="also time the first variant's and each data variant's loader alone, BATCHES batches after "
                        "its workers' prefetched ones (0: not)")
    p.add_argument("--torchvision-loss", action="store_true",
                   help="detect (FCOS or RetinaNet): each ceiling also with torchvision's own transform and loss on "
                        "targets on the GPU (the step before they were replaced), side by side in the same process")
    p.add_argument("--ceiling", type=Path, help=argparse.SUPPRESS)  # the child process measuring one ceiling
    args = p.parse_args()
    if args.ceiling:
        print(json.dumps(ceiling(args.ceiling, args.ceiling_warmup, args.ceiling_steps, args.ceiling_batches,
                                 args.profile, args.torchvision_loss)))
        return
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU")

    work = Path(args.work)
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    out: dict = {"bench": "task_throughput", "machine": machine(), "gpu": machine()["gpu"], "images": args.images}
    table: list[tuple[str, float, float | None, float | None, float | None]] = []  # rate, ratio, wait, TFLOP/s
    record_if_stopped("task_throughput", out)
    tasks = ["dino"] if args.gpus else args.tasks.split(",")
    for task in tasks:
        n_train = args.images if task == "dino" else args.images // 4
        store = make_store(work, task, n_train, 512 if task == "dino" else 64)
        if args.gpus:
            counts = [int(c) for c in args.gpus.split(",")]
            # The same CPU share per GPU in every run: data.workers: auto for the most GPUs.
            workers = auto_workers(usable_cpus(), max(counts))
            variant = args.variants.split(";")[0]
            out.update(variant=variant, workers=workers)
            per_gpu = {}
            for n in counts:
                cfg = bench_config(task, variant, f"{task}-ddp{n}", store, runs, args.steps, workers)
                skip = max(args.warmup_steps, steps_per_epoch(cfg, n_train, n))
                cfg["train"]["max_steps"] = max(args.steps, skip + 100)
                total, wait = steady_rate(launch(cfg, runs, nproc=n)[0], skip)
                per_gpu[n] = total / n
                table.append((f"{task} DDP x{n}, per GPU", per_gpu[n], None, wait, None))
                out[f"images_per_s_per_gpu_{task}_{n}"] = round(per_gpu[n], 1)
                if 1 in per_gpu:
                    out[f"efficiency_{task}_{n}"] = round(per_gpu[n] / per_gpu[1], 3)
            continue
        if args.input_alone:
            out[f"input_alone_{task}"] = []
            first = args.variants.split(";")[0]
            for extra in [""] + [v for v in args.data_variants.split(";") if v]:
                label = f"{first} {extra}".strip() or "shipped"
                raw = bench_config(task, f"{first} {extra}", f"{task}-input", store, runs, 10**6, args.workers)
                rate = input_alone(task, raw, args.input_alone)
                print(f"{task} [{label}] input alone {rate:.0f} images/s", flush=True)
                table.append((f"{task} [{label}] input alone", rate, None, None, None))
                workers = worker_count(raw["data"]["workers"], 1)[0]
                out[f"input_alone_{task}"].append({"variant": label, "workers": workers,
                                                   "images_per_s": round(rate, 1)})
        out[f"variants_{task}"] = []
        for i, variant in enumerate(args.variants.split(";")):
            label = variant or "shipped"
            name = f"{task}-ceiling-{i}"
            cfg = bench_config(task, variant, name, store, runs, 10**6, args.workers)
            c = run_ceiling(cfg, runs, args.ceiling_warmup, args.ceiling_steps, args.ceiling_batches, args.profile,
                            args.torchvision_loss and task == "detect")
            gflop = c["flops_per_image"] / 1e9
            ceil = c["images_per_s"]
            row = {"variant": label, "ceiling": round(ceil, 1), "gflop_per_image": round(gflop, 2),
                   "ceiling_tflops": round(gflop * ceil / 1e3, 1)}
            out[f"variants_{task}"].append(row)  # filled in below: a cut run records its ceiling already
            if "images_per_s_torchvision_loss" in c:
                stock = c["images_per_s_torchvision_loss"]
                row |= {"ceiling_torchvision_loss": round(stock, 1), "batch_loss_speedup": round(ceil / stock, 3)}
                print(f"{task} [{label}] ceiling with torchvision's transform and loss {stock:.0f} images/s "
                      f"(ours {ceil / stock:.2f}x)", flush=True)
                table.append((f"{task} [{label}] ceiling, torchvision's loss", stock, None, None, gflop * stock / 1e3))
            print(f"{task} [{label}] ceiling {ceil:.0f} images/s, {gflop:.1f} GFLOP/image, "
                  f"{gflop * ceil / 1e3:.0f} TFLOP/s", flush=True)
            table.append((f"{task} [{label}] ceiling", ceil, None, None, gflop * ceil / 1e3))
            if i == 0 and not args.no_e2e:
                rate, wait, workers = end_to_end(task, variant, f"{task}-e2e", store, runs, args, n_train)
                row |= {"images_per_s": round(rate, 1), "ratio": round(rate / ceil, 3), "data_wait": wait}
                table.append((f"{task} [{label}] end to end", rate, rate / ceil, wait, gflop * rate / 1e3))
                out |= {f"images_per_s_{task}": round(rate, 1), f"ceiling_{task}": round(ceil, 1),
                        f"ratio_{task}": round(rate / ceil, 3), f"tflops_{task}": round(gflop * rate / 1e3, 1),
                        f"gflop_per_image_{task}": round(gflop, 2), f"config_{task}": label,
                        f"workers_{task}": workers, f"train_images_{task}": n_train}
                out[f"data_variants_{task}"] = []
                for j, extra in enumerate(v for v in args.data_variants.split(";") if v):
                    name = f"{label} {extra}"
                    try:
                        rate, wait, workers = end_to_end(task, f"{variant} {extra}", f"{task}-e2e-{j}", store, runs,
                                                         args, n_train)
                    except RuntimeError as e:  # the other data variants still run
                        print(f"{task} [{name}] failed: {e}", flush=True)
                        out[f"data_variants_{task}"].append({"variant": name, "error": str(e).splitlines()[0]})
                        continue
                    table.append((f"{task} [{name}] end to end", rate, rate / ceil, wait, gflop * rate / 1e3))
                    out[f"data_variants_{task}"].append(
                        {"variant": name, "workers": workers, "images_per_s": round(rate, 1),
                         "ratio": round(rate / ceil, 3), "data_wait": wait})

    print_table({"images/s": ".0f", "ratio": ".3f", "wait": ".0%", "TFLOP/s": ".0f"}, table)
    record("task_throughput", out)


if __name__ == "__main__":
    main()
