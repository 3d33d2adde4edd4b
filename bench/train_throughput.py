"""GPU training throughput: shardtrain's own loop from a shard store against the synthetic-data ceiling.

Run on a GPU host, from the repo root (everything that belongs together, in one go):

    python bench/train_throughput.py                      # ceilings + end-to-end, resnet50 and deit_small
    python bench/train_throughput.py --models resnet50    # one model
    torchrun is not needed: each end-to-end run is `python -m training CONFIG` in a subprocess
    python bench/train_throughput.py --scaling 1,2        # DDP: images/s per GPU on 1 and 2 GPUs, each model
    python bench/train_throughput.py --models resnet50 --paths wds-dali --workers 4 --profile-at 70 \
        --set 'data.pin_memory=false'                     # a setting's effect on a path, and where its steps go
    python bench/train_throughput.py --models resnet50 --paths wds-hw --workers 4 --steps 400 --py-spy-at 150
                                                          # which threads of the trainer hold its interpreter lock

What it does:
1. Makes `--images` JPEGs of ImageNet-like size (~500x375) from the bundled real photos (one class
   per photo) and converts them with `shards.convert(..., max_side=--max-side)` to WebDataset and LMDB,
   as a user would.
2. Ceiling: the same model, optimizer (AdamW), bf16 autocast, channels_last and torch.compile, stepping
   on one fixed random batch already on the GPU.
3. End to end: `python -m training` on the store with the production settings, for each input path
   (cpu decode from wds and lmdb, nvJPEG gpu decode and the hardware decoder from wds, `--workers` CPU
   workers); images/s is the median of the loop's own logged windows (train/images_per_s in TensorBoard)
   after warm-up; `wds-dali` is ours with DALI's engine as the device half (`data.decode: dali`, pipelines/dali.py:
   our workers' boxes and order, DALI's decode, crop and resize). The peer path `wds-peer` (bench/dali_peer.py,
   `wds-dali` before 2026-12-06) feeds the ceiling's own step from NVIDIA DALI alone (its reader, crops and
   shuffle), `--workers` threads, in this process: no logging or checkpoints, which favours it.
4. Checkpoints: the training stall per checkpoint save, and the time from process start to the first
   step of a resumed run.
The last line is one JSON object, also appended to bench/results/train_throughput.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import yaml

import dali_peer
from common import machine, print_table, record, record_if_stopped, train_loader_rate
from pipelines.cpus import auto_workers, usable_cpus
from shards import ConvertOptions, convert
from shards.samples import photo_paths
from training.config import apply_override

ROOT = Path(__file__).resolve().parents[1]


# ---- data ---------------------------------------------------------------------------------------------------------


def _make_one(args: tuple[str, int, str]) -> None:
    from PIL import Image

    photo, seed, out = args
    rng = random.Random(seed)
    img = Image.open(photo).convert("RGB")
    w, h = img.size
    aspect = rng.uniform(3 / 4, 4 / 3)
    cw = rng.randint(min(w, h) // 2, min(w, h))
    ch = min(h, round(cw / aspect))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    tw = rng.randint(440, 560)
    crop = img.crop((x, y, x + cw, y + ch)).resize((tw, round(tw * ch / cw)), Image.Resampling.BICUBIC)
    crop.save(out, quality=90)


def make_raw(dest: Path, n_train: int, n_val: int, workers: int) -> Path:
    """`dest/{train,val}/<photo>/<i>.jpg`: random crops of the bundled photos at ~500x375."""
    photos = photo_paths()
    jobs = []
    for s, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        for i in range(n):
            photo = photos[i % len(photos)]
            folder = dest / split / photo.stem
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((str(photo), 2 * i + s, str(folder / f"{i:06d}.jpg")))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make_one, jobs, chunksize=64))
    return dest


def make_stores(work: Path, n_train: int, n_val: int, max_side: int | None) -> dict[str, str]:
    raw = work / "raw"
    if not (raw / "train").exists():
        t = time.perf_counter()
        make_raw(raw, n_train, n_val, os.cpu_count() or 1)
        print(f"made {n_train + n_val} JPEGs in {time.perf_counter() - t:.1f}s", flush=True)
    stores = {}
    for fmt in ("wds", "lmdb"):
        dest = work / f"store-{fmt}"
        if not (dest / "manifest.json").exists():
            t = time.perf_counter()
            convert(ConvertOptions(src=str(raw), dest=str(dest), format=fmt, max_side=max_side,
                                   workers=os.cpu_count() or 1), progress=False)
            print(f"converted {fmt} in {time.perf_counter() - t:.1f}s", flush=True)
        stores[fmt] = str(dest)
    return stores


# ---- ceiling ------------------------------------------------------------------------------------------------------


def make_step(model_name: str, num_classes: int, compile: bool,
              mode: str | None = None) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One training step on a GPU batch: the loop's own model and optimizer builders and cuDNN settings (those of
    `run_config`), bf16 autocast, channels_last; no logging, no checkpoints. `mode`: torch.compile's."""
    from training.config import ModelConfig, OptimConfig, TrainConfig
    from training.model import build_model
    from training.optim import build_optimizer
    from training.train import set_algorithms

    set_algorithms(TrainConfig())  # the loop's cuDNN settings: without its benchmark the ceiling fell below the loop
    model = build_model(ModelConfig(name=model_name), num_classes, Path("/tmp")).to(torch.device("cuda"))
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05), model, 1e-3)
    step_model = torch.compile(model, mode=mode) if compile else model

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(step_model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def ceiling(step: Callable[[torch.Tensor, torch.Tensor], None], batch: int, num_classes: int, warmup: int,
            steps: int) -> float:
    """images/s of the bare step on one random batch already on the GPU: no data."""
    device = torch.device("cuda")
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    for _ in range(warmup):
        step(x, y)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


# ---- input alone ---------------------------------------------------------------------------------------------------


def loader_rate(store: str, decode: str, batch: int, workers: int, batches: int = 40) -> float:
    """images/s of the classify train loader alone at 224 px (common.train_loader_rate)."""
    from pipelines import DataConfig

    cfg = DataConfig(path=store, image_size=224, batch_size=batch, workers=workers, decode=decode)
    return train_loader_rate(cfg, "classify", batches)


# ---- end to end ---------------------------------------------------------------------------------------------------


def run_config(name: str, store: str, model: str, decode: str, batch: int, workers: int, steps: int,
               compile: bool, runs: Path, every_steps: int, storage: str | None, compile_mode: str = "default",
               profile_at: int | None = None) -> dict:
    return {
        "name": name,
        "runs_dir": str(runs),
        "task": "classify",
        "seed": 0,
        "data": {"path": store, "image_size": 224, "batch_size": batch, "workers": workers, "decode": decode,
                 "prefetch_factor": 4},
        "model": {"name": model},
        "optim": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.05},
        "train": {"epochs": 1000, "max_steps": steps, "amp": "bf16", "compile": compile, "compile_mode": compile_mode,
                  "log_every": 10, "profile": None if profile_at is None else [profile_at, 5]},
        "checkpoint": {"every_steps": every_steps, "keep": 2, "storage": storage},
        "eval": {"every_epochs": 1000},
        "resume": "never",
    }


def launch(cfg: dict, runs: Path, nproc: int = 1,
           py_spy_at: int | None = None) -> tuple[list[tuple[float, str]], float]:
    """Run the config (under torchrun when nproc > 1); returns (seconds since start, line) pairs and the total.
    With `py_spy_at` (one process), who holds the trainer's interpreter lock from that step on (`py_spy_lock`)."""
    if cfg["resume"] == "never":
        shutil.rmtree(runs / cfg["name"], ignore_errors=True)  # a fresh run, not the last bench's checkpoints
    path = runs / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "training", str(path)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "training", str(path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    assert proc.stdout is not None
    spy, spied = None, runs / f"{cfg['name']}.py-spy.txt"
    for line in proc.stdout:
        lines.append((time.perf_counter() - start, line.rstrip()))
        print(f"  [{cfg['name']} {lines[-1][0]:6.1f}s] {line.rstrip()}", flush=True)
        if py_spy_at is not None and spy is None and (m := STEP_LINE.match(line)) and int(m.group(1)) >= py_spy_at:
            spy = subprocess.Popen(["py-spy", "record", "-p", str(proc.pid), "-d", str(PY_SPY_SECONDS), "-r",
                                    str(PY_SPY_RATE), "--gil", "--threads", "--nonblocking", "-f", "raw", "-o",
                                    str(spied)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if spy is not None:
        said = spy.communicate()[0].strip().splitlines()
        print("\n".join(py_spy_lock(spied.read_text())) if spy.returncode == 0 else
              f"py-spy failed (exit {spy.returncode}): {said[-1] if said else ''}", flush=True)
    if proc.wait() != 0:
        tail = "\n".join(text for _, text in lines[-30:])
        raise RuntimeError(f"{cfg['name']} failed:\n{tail}")
    return lines, time.perf_counter() - start


PY_SPY_SECONDS, PY_SPY_RATE = 8, 100


def py_spy_lock(raw: str, top: int = 6) -> list[str]:
    """py-spy's raw `--gil --threads` samples summed by thread name (a checkpoint writer is a new thread each
    time): the share of the window each held the interpreter lock, and the frames it held it in most (lines to
    print)."""
    held: dict[str, int] = {}
    frames: dict[tuple[str, str], int] = {}
    for line in raw.splitlines():
        stack, count = line.rsplit(" ", 1)
        thread, *calls = stack.split(";")
        thread = thread.split(": ", 1)[-1]  # "thread (1718): MainThread"
        held[thread] = held.get(thread, 0) + int(count)
        leaf = (thread, calls[-1] if calls else "?")
        frames[leaf] = frames.get(leaf, 0) + int(count)
    window = PY_SPY_SECONDS * PY_SPY_RATE
    out = [f"interpreter lock held (py-spy, {PY_SPY_SECONDS} s): {sum(held.values()) / window:.0%} of the time"]
    for thread, n in sorted(held.items(), key=lambda kv: -kv[1]):
        out.append(f"  {n / window:4.0%} {thread}")
        leaves = sorted(((n, leaf) for (t, leaf), n in frames.items() if t == thread), reverse=True)[:top]
        out += [f"        {n / window:4.0%} {leaf}" for n, leaf in leaves]
    return out


STEP_LINE = re.compile(r"^step (\d+) epoch (\d+) .* ([\d.]+) img/s data-wait (\d+)%")


def steady_rate(lines: list[tuple[float, str]], skip_steps: int) -> tuple[float, float]:
    """Median images/s and data-wait share of the logged windows after `skip_steps` (compile, warm-up).

    Windows that span an epoch boundary are left out: the bench's epochs are a few dozen steps
    (ImageNet's are thousands), so their restart and epoch-end checkpoint would weigh far more here
    than in a real run. The epoch-end cost is measured on its own (--checkpoint).
    """
    rates, waits, last_epoch = [], [], None
    for _, text in lines:
        m = STEP_LINE.match(text)
        if not m:
            continue
        epoch = int(m.group(2))
        if int(m.group(1)) > skip_steps and epoch == last_epoch:
            rates.append(float(m.group(3)))
            waits.append(float(m.group(4)) / 100)
        last_epoch = epoch
    if not rates:
        raise RuntimeError("no step lines after warm-up: raise --steps")
    return statistics.median(rates), statistics.median(waits)


def profile_lines(lines: list[tuple[float, str]]) -> list[str]:
    """train.profile's summary among a run's log lines (--profile-at): its trace, its step, the top kernels."""
    start = next((i for i, (_, text) in enumerate(lines) if text.startswith("profiled steps")), len(lines))
    summary = lines[start:start + 2]
    summary += itertools.takewhile(lambda line: line[1].startswith("  "), lines[start + 2:])
    return [text for _, text in summary]


def checkpoint_costs(lines: list[tuple[float, str]]) -> list[float]:
    """Stall of each checkpoint save, from the loop's own `checkpoint ... stalled X.XXXs` lines."""
    return [float(m.group(1)) for _, text in lines if (m := re.search(r"stalled ([\d.]+)s", text))]


def first_step_after(lines: list[tuple[float, str]]) -> float:
    for t, text in lines:
        if text.startswith("step "):
            return t
    raise RuntimeError("the resumed run logged no step")


# ---- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/shardtrain-bench")
    p.add_argument("--images", type=int, default=16384)
    p.add_argument("--val-images", type=int, default=512)
    p.add_argument("--max-side", type=int, default=256, help="convert's --max-side; 0 keeps the images' full size")
    p.add_argument("--models", default="resnet50,deit_small_patch16_224")
    p.add_argument("--paths", default="wds-cpu,lmdb-cpu,wds-gpu,wds-hw",
                   help="end-to-end input paths, FORMAT-DECODE (decode: cpu, gpu = nvJPEG, hw = the hardware "
                   "decoder, dali = ours with NVIDIA DALI as the device half (data.decode: dali), peer = the peer "
                   "NVIDIA DALI alone on the same tars, wds only: bench/dali_peer.py); "
                   "--scaling uses the first")
    p.add_argument("--dali-hw-load", type=float, default=0.9,
                   help="the peer DALI's share of each batch for the hardware JPEG decoder (data.decode: dali "
                   "uses pipelines.dali.HW_DECODER_LOAD, 0.9)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="DataLoader workers (CPU decode processes) per GPU: lower it to measure a host with few "
                   "cores per GPU")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile's mode for the ceiling, DALI's step and the runs (train.compile_mode)")
    p.add_argument("--profile-at", type=int, default=None, metavar="STEP",
                   help="each end-to-end run profiles its optimizer steps STEP..STEP+4 (train.profile): where the "
                   "step's time goes beside its input path, in its log lines")
    p.add_argument("--py-spy-at", type=int, default=None, metavar="STEP",
                   help=f"each end-to-end run of ours: which threads of the training process hold its interpreter "
                   f"lock for {PY_SPY_SECONDS} s from step STEP on (py-spy, installed apart: pip install py-spy)")
    p.add_argument("--set", default="", metavar="OVERRIDES",
                   help="space-separated dotted overrides (shardtrain train's) for the end-to-end runs of our paths, "
                   "e.g. 'data.pin_memory=false data.prefetch_factor=2'")
    p.add_argument("--scaling", default=None, help="comma-separated GPU counts for the DDP scaling runs")
    p.add_argument("--checkpoint", action="store_true", help="also measure checkpoint stall and resume time")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU")
    if args.py_spy_at is not None and not shutil.which("py-spy"):
        sys.exit("error: --py-spy-at needs py-spy on the PATH (pip install py-spy)")

    work = Path(args.work)
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stores = make_stores(work, args.images, args.val_images, args.max_side or None)
    compile = not args.no_compile
    num_classes = len(photo_paths())
    out: dict = {"bench": "train_throughput", "machine": machine(), "images": args.images,
                 "max_side": args.max_side, "batch": args.batch, "workers": args.workers, "compile": compile,
                 "compile_mode": args.compile_mode, "set": args.set}
    table: list[tuple[str, float, float | None, float | None]] = []
    record_if_stopped("train_throughput", out)

    if args.scaling:
        counts = [int(c) for c in args.scaling.split(",")]
        # The same CPU share per GPU in every run: data.workers: auto for the most GPUs.
        workers = auto_workers(usable_cpus(), max(counts))
        out["workers"] = workers
        fmt, decode = args.paths.split(",")[0].split("-")
        out["path"] = f"{fmt}-{decode}"
        for model in args.models.split(","):
            key = model.split("_patch")[0]
            per_gpu = {}
            for n in counts:
                cfg = run_config(f"scale-{model}-{n}", stores[fmt], model, decode, args.batch, workers, args.steps,
                                 compile, runs, 10**9, None)
                lines, _ = launch(cfg, runs, nproc=n)
                total, wait = steady_rate(lines, args.warmup_steps)
                per_gpu[n] = total / n
                table.append((f"{model} DDP x{n} ({fmt}, {decode} decode), per GPU", total, total / n, wait))
                print(f"{model} DDP x{n}: {total:.0f} images/s, {total / n:.0f} per GPU", flush=True)
                out[f"images_per_s_per_gpu_{key}_{n}"] = round(per_gpu[n], 1)
                if 1 in per_gpu:
                    out[f"efficiency_{key}_{n}"] = round(per_gpu[n] / per_gpu[1], 3)
    else:
        for path in args.paths.split(","):
            fmt, decode = path.split("-")
            if decode == "peer":
                rate = dali_peer.input_rate(stores[fmt], args.batch, args.workers, args.dali_hw_load)
            else:
                rate = loader_rate(stores[fmt], decode, args.batch, args.workers)
            table.append((f"input alone: {fmt} {decode}-decode", rate, None, None))
            out[f"loader_images_per_s_{fmt}_{decode}"] = round(rate, 1)
            print(f"input alone {path}: {rate:.0f} images/s", flush=True)
        for model in args.models.split(","):
            key = model.split("_patch")[0].replace("_patch16_224", "")
            step = make_step(model, num_classes, compile, mode=args.compile_mode)
            ceil = ceiling(step, args.batch, num_classes, warmup=40, steps=100)
            table.append((f"{model} ceiling (synthetic)", ceil, None, None))
            print(f"ceiling {model}: {ceil:.0f} images/s", flush=True)
            out[f"ceiling_{key}"] = round(ceil, 1)
            for path in args.paths.split(","):
                fmt, decode = path.split("-")
                name = f"e2e-{key}-{path}"
                if decode == "peer":  # in this process, on the ceiling's own compiled step
                    rate, wait = dali_peer.train_rate(stores[fmt], step, args.batch, args.workers, args.dali_hw_load,
                                                      args.warmup_steps, args.steps - args.warmup_steps)
                else:
                    cfg = run_config(name, stores[fmt], model, decode, args.batch, args.workers, args.steps, compile,
                                     runs, 10**9, None, args.compile_mode, args.profile_at)
                    for item in args.set.split():
                        apply_override(cfg, item)
                    lines, _ = launch(cfg, runs, py_spy_at=args.py_spy_at)
                    rate, wait = steady_rate(lines, args.warmup_steps)
                    print("\n".join(profile_lines(lines)), flush=True)
                table.append((f"{model} {fmt} {decode}-decode", rate, rate / ceil, wait))
                alone = out[f"loader_images_per_s_{fmt}_{decode}"]
                if rate > 1.05 * alone:  # a short run's windows can all fall before the prefetched batches run out
                    print(f"{name}: above its input alone ({alone:.0f}): the workers' prefetched batches lasted the "
                          "run, so this is not a steady rate; raise --steps", flush=True)
                    out[f"above_input_alone_{key}_{fmt}_{decode}"] = True
                print(
                    f"{name}: {rate:.0f} images/s, {rate / ceil:.3f} of the ceiling, data wait {wait:.0%}", flush=True
                )
                out[f"images_per_s_{key}_{fmt}_{decode}"] = round(rate, 1)
                out[f"ratio_{key}_{fmt}_{decode}"] = round(rate / ceil, 3)
            # The headline ratio is the best of our input paths: the one a user should pick on this host.
            paths = {k: v for k, v in out.items() if k.startswith(f"ratio_{key}_") and not k.endswith("_peer")}
            best = max(paths, key=lambda k: paths[k])
            out[f"ratio_{key}"], out[f"best_path_{key}"] = paths[best], best.removeprefix(f"ratio_{key}_")
        if args.checkpoint:
            model = args.models.split(",")[0]
            name = "ckpt-" + model
            storage = str(work / "nas")
            fmt, decode = args.paths.split(",")[0].split("-")
            cfg = run_config(name, stores[fmt], model, decode, args.batch, args.workers, 120, compile, runs, 25,
                             storage)
            lines, _ = launch(cfg, runs)
            stalls = checkpoint_costs(lines)
            cfg["resume"] = "auto"
            cfg["train"]["max_steps"] = 130
            cfg["train"]["log_every"] = 1
            lines, _ = launch(cfg, runs)
            out["checkpoint_stall_s"] = round(statistics.median(stalls), 3) if stalls else None
            out["checkpoint_stall_max_s"] = round(max(stalls), 3) if stalls else None
            out["resume_to_first_step_s"] = round(first_step_after(lines), 1)

    print_table({"images/s": ".0f", "ratio": ".3f", "wait": ".0%"}, table)
    record("train_throughput", out)


if __name__ == "__main__":
    main()
