"""The training loop, top to bottom: set up, resume, train with periodic eval and checkpoints, finish.

Runs inside a torchrun worker (or as a single process). Components live beside it:
dist (process group), tasks (model/loss/eval), optim (optimizer, step plan, schedule),
checkpoint + storage + resume (saving and finding checkpoints), metrics + progress (records).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from pipelines import build_loader
from training import checkpoint, dist, metrics, resume
from training.config import RunConfig, TrainError, run_dir, to_dict
from training.optim import StepPlan, build_optimizer, build_scheduler, scaled_lr
from training.preempt import EXIT_PREEMPTED, PREEMPTED_FILE, Preemption
from training.progress import Reporter
from training.storage import Uploader
from training.tasks import build_task, hook


@dataclass
class Progress:
    """Where the run is: what a checkpoint stores besides the modules' states."""

    step: int = 0
    epoch: int = 0  # completed (trained and evaluated) epochs
    batch: int = 0  # batches of epoch `epoch` already trained
    best: float | None = None
    best_step: int | None = None
    last_eval_step: int = -1
    epoch_loss: float = 0.0  # this epoch's train loss so far, summed over batches and ranks (for results.csv)
    epoch_batches: int = 0  # batches per rank behind epoch_loss
    skipped: int = 0  # corrupt train samples skipped (data.on_error=skip), all ranks, the whole run


class Preempted(Exception):
    """Raised after the preemption checkpoint is saved; `__main__` exits with EXIT_PREEMPTED."""


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 where the GPU has it, else fp16 (with a GradScaler); off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(cfg: RunConfig) -> dict:
    """Train `cfg` in this process (one rank of torchrun, or alone); returns the metrics.json content."""
    world = dist.setup()
    try:
        with Preemption() as preemption:
            return train(cfg, world, preemption)
    finally:
        dist.teardown(world)


def train(cfg: RunConfig, world: dist.World, preemption: Preemption) -> dict:
    # ---- setup -------------------------------------------------------------------------------------------------
    rdir, ckpt_dir = run_dir(cfg), resume.checkpoint_dir(cfg)
    if world.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (rdir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (rdir / PREEMPTED_FILE).unlink(missing_ok=True)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed + world.rank)  # per rank: different dropout/mixup draws on each rank
    vote = dist.StopVote(world)

    loader_args = dict(task=cfg.task, rank=world.rank, world_size=world.size, seed=cfg.seed, device=world.device)
    train_loader = build_loader(cfg.data, cfg.data.train_split, train=True, **loader_args)
    task = build_task(cfg, train_loader.classes, world, rdir / "pretrained")
    val_loader = task.val_loader(**loader_args) if hasattr(task, "val_loader") else \
        build_loader(cfg.data, cfg.data.val_split, train=False, **loader_args)
    start_hook, before_step, after_step = (hook(task, name) for name in ("start", "before_step", "after_step"))

    model = task.build_model().to(world.device)
    if cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = None
    if cfg.train.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)

    plan = StepPlan(len(train_loader), cfg.train.accum_steps, cfg.train.batch_ramp, cfg.train.epochs,
                    cfg.train.max_steps)
    global_batch = cfg.data.batch_size * world.size * cfg.train.accum_steps
    optimizer = build_optimizer(cfg.optim, model, scaled_lr(cfg.optim, global_batch))
    scheduler = build_scheduler(cfg.optim, optimizer, plan)
    dtype = amp_dtype(cfg.train.amp, world.device)
    scaler = torch.amp.GradScaler(world.device.type, enabled=dtype == torch.float16)

    # ---- resume ------------------------------------------------------------------------------------------------
    state, rng = Progress(), None
    source = dist.broadcast(world, str(resume.fetch(cfg) or "") if world.is_main else None)
    if source:
        state, rng = restore(load_on_node(cfg, world, source), world, model, optimizer, scaler, ema, cfg)
    if rng is not None and state.batch == 0:
        checkpoint.set_rng_state(rng)  # mid-epoch states are set after the epoch's first batch (see below)
        rng = None
    scheduler.step_update(state.step)
    start_hook(optimizer, plan, state.step)

    # Gradients as views into the all-reduce buckets: one copy fewer per step, less memory.
    train_model: torch.nn.Module = DDP(model, gradient_as_bucket_view=True) if world.distributed else model
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    uploader = Uploader(cfg.checkpoint.storage, cfg.name, log=print) if cfg.checkpoint.storage and world.is_main \
        else None
    reporter = Reporter(rdir, world, plan.total_steps, state.step, cfg.train.log_every)
    reporter.line(f"{cfg.task} {cfg.model.name}: {world.size} process(es) on {world.device.type}, "
                  f"amp {str(dtype).removeprefix('torch.') if dtype else 'off'}, {plan.total_steps} steps, "
                  f"global batch {global_batch}")
    if world.is_main and source:
        metrics.keep_results_until(rdir / "results.csv", state.last_eval_step)
        reporter.line(f"resumed from {source} at step {state.step} (epoch {state.epoch}, batch {state.batch})")
    if source:
        reporter.resume_epoch(state.epoch_loss, state.epoch_batches)

    writer = checkpoint.Writer(ckpt_dir, cfg.checkpoint.keep)
    tallied = 0  # this process's train_loader.skipped already in state.skipped

    def tally_skipped() -> None:
        """Add the corrupt samples skipped since the last tally, summed over ranks. Collective."""
        nonlocal tallied
        new = int(dist.sum_tensor(world, torch.tensor([train_loader.skipped - tallied], device=world.device)).item())
        tallied = train_loader.skipped
        if new:
            state.skipped += new
            reporter.line(f"skipped {new} corrupt train samples (data.on_error=skip), {state.skipped} in this run")

    def save(best_info: dict | None = None) -> None:
        started = time.perf_counter()
        tally_skipped()  # before the state is taken, so a resumed run keeps the count
        state.epoch_loss, state.epoch_batches = reporter.epoch_totals()
        ckpt = checkpoint_state(cfg, state, world, model, optimizer, scheduler, scaler, ema, train_loader)
        if not world.is_main:
            return
        info = {"step": state.step, "epoch": state.epoch}

        def then(path: Path) -> None:  # in the writer's thread, once the file is in place
            if uploader:
                uploader.submit(path, f"checkpoints/{path.name}", info, keep=cfg.checkpoint.keep)
            if best_info is not None:
                best = checkpoint.mark_best(ckpt_dir, path, best_info)
                if uploader:
                    uploader.submit(best, "checkpoints/best.pt", best_info)

        writer.submit(ckpt, then)
        reporter.line(f"checkpoint step {state.step}: training stalled {time.perf_counter() - started:.3f}s, "
                      "written in the background")

    def evaluate_on_val(m: torch.nn.Module) -> dict[str, float]:
        val_loader.set_epoch(0)  # the whole split, from its first batch, every time
        dist.broadcast_buffers(world, m)
        before = val_loader.skipped
        results = task.evaluate(m, val_loader)
        skipped = int(dist.sum_tensor(world, torch.tensor([val_loader.skipped - before], device=world.device)).item())
        if skipped:
            reporter.line(f"evaluation skipped {skipped} corrupt val samples (data.on_error=skip)")
        return results

    def evaluate() -> None:
        results = {f"val_{k}": v for k, v in evaluate_on_val(model).items()}
        if ema is not None:
            results |= {f"ema_val_{k}": v for k, v in evaluate_on_val(ema.module).items()}
        state.last_eval_step = state.step
        improved = state.best is None or results[cfg.eval.metric] > state.best
        if improved:
            state.best, state.best_step = results[cfg.eval.metric], state.step
        reporter.eval_row(state.epoch, state.step, results, optimizer.param_groups[0]["lr"])
        save({"step": state.step, "epoch": state.epoch, cfg.eval.metric: state.best} if improved else None)

    # ---- train -------------------------------------------------------------------------------------------------
    optimizer.zero_grad(set_to_none=True)
    done = state.step >= plan.total_steps
    while not done and state.epoch < cfg.train.epochs:
        accum, n_batches = plan.accum(state.epoch), len(train_loader)
        if state.batch < n_batches:
            train_loader.set_epoch(state.epoch, start_batch=state.batch)
            batches = iter(train_loader)
        else:
            batches = iter(())  # the epoch was trained before a preemption; only its eval is left
        reporter.start_epoch(state.epoch)
        for i in range(state.batch, n_batches):
            with reporter.data_wait():
                batch = next(batches)
            if rng is not None:
                # Starting an epoch's iteration may draw from torch's RNG (DataLoader's base seed); the
                # uninterrupted run drew before this checkpoint's RNG state was taken, so restore it after.
                checkpoint.set_rng_state(rng)
                rng = None
            group_start = i - i % accum
            micro = min(accum, n_batches - group_start)  # the epoch's last group may be short
            last_micro = i + 1 == group_start + micro
            # DDP all-reduces gradients only on a group's last micro-batch.
            with contextlib.nullcontext() if last_micro or not world.distributed else train_model.no_sync():
                with torch.autocast(world.device.type, dtype=dtype, enabled=dtype is not None):
                    loss = task.train_loss(train_model, batch)
                scaler.scale(loss / micro).backward()
            reporter.add_loss(loss.detach(), batch_size(batch))
            state.batch = i + 1
            if not last_micro:
                continue

            log_now = (state.step + 1) % cfg.train.log_every == 0
            grad_norm = None
            if cfg.optim.clip_grad or log_now:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad or float("inf"))
            before_step(model, state.step)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            scheduler.step_update(state.step)
            after_step(model, state.step)
            if ema is not None:
                ema.update(model, step=state.step)
            reporter.step(state.step, optimizer.param_groups[0]["lr"], grad_norm, log_now)

            stop = vote.poll(preemption.requested)
            done = state.step >= plan.total_steps
            if stop:
                save()
                finish_preempted(cfg, world, writer, uploader, reporter, state)
            if state.step % cfg.checkpoint.every_steps == 0 and state.batch < n_batches and not done:
                save()  # the epoch's end and the run's end save after their eval
            if done:
                break
        if state.batch >= n_batches:
            state.epoch, state.batch = state.epoch + 1, 0
            if state.epoch % cfg.eval.every_epochs == 0 or done or state.epoch == cfg.train.epochs:
                evaluate()
            else:
                save()
        done = done or state.step >= plan.total_steps

    # ---- finish ------------------------------------------------------------------------------------------------
    vote.result()  # every rank posted the same votes; settle the last before other collectives
    if state.last_eval_step != state.step:
        evaluate()
    return finish(cfg, world, writer, uploader, reporter, state)


def batch_size(batch: dict) -> int:
    first = batch["image"] if "image" in batch else batch["crops"][0]
    return len(first)


def finish(cfg: RunConfig, world: dist.World, writer: checkpoint.Writer, uploader: Uploader | None,
           reporter: Reporter, state: Progress) -> dict:
    """metrics.json and plot.png in the run dir, uploaded beside the checkpoints; wait for uploads (bounded)."""
    rdir = run_dir(cfg)
    summary: dict = {}
    writer.wait()
    if world.is_main:
        rows = metrics.read_results(rdir / "results.csv")
        metrics.write_metrics(rdir / "metrics.json", cfg.eval.metric, state.best, state.best_step,
                              rows[-1] if rows else {}, state.epoch, state.step, state.skipped)
        metrics.plot(rows, rdir / "plot.png")
        summary = {"metric": cfg.eval.metric, "best": state.best, "best_step": state.best_step,
                   "final": rows[-1] if rows else {}, "epoch": state.epoch, "step": state.step,
                   "skipped_samples": state.skipped}
        if uploader:
            uploader.submit(rdir / "metrics.json", "checkpoints/metrics.json")
            if not uploader.wait(cfg.checkpoint.upload_timeout):
                reporter.line(f"warning: uploads to {cfg.checkpoint.storage} not done after "
                              f"{cfg.checkpoint.upload_timeout:.0f}s; the local copies in {rdir} are complete")
            uploader.close()
        reporter.line(f"done: step {state.step}, best {cfg.eval.metric} {metrics.fmt(state.best)} "
                      f"(step {state.best_step}); run dir {rdir}")
    reporter.close()
    dist.barrier(world)
    return summary


def finish_preempted(cfg: RunConfig, world: dist.World, writer: checkpoint.Writer, uploader: Uploader | None,
                     reporter: Reporter, state: Progress) -> None:
    writer.wait()
    if world.is_main:
        if uploader and not uploader.wait(cfg.checkpoint.preempt_timeout):
            reporter.line("warning: preempted before the last upload finished; the local checkpoint is complete")
        (run_dir(cfg) / PREEMPTED_FILE).write_text(json.dumps({"step": state.step, "time": time.time()}))
        reporter.line(f"preempted: saved step {state.step}; exiting with {EXIT_PREEMPTED}")
    reporter.close()
    raise Preempted


def checkpoint_state(cfg: RunConfig, state: Progress, world: dist.World, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler, ema,
                     loader) -> dict:
    """Everything needed to continue bit for bit. Collective: every rank must call it (RNG gather)."""
    rng = dist.gather(world, checkpoint.rng_state())
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "step": state.step,
        "epoch": state.epoch,
        "progress": {"batch": state.batch, "best": state.best, "best_step": state.best_step,
                     "last_eval_step": state.last_eval_step, "epoch_loss": state.epoch_loss,
                     "epoch_batches": state.epoch_batches, "skipped": state.skipped},
        "rng": rng,  # one entry per rank
        "loader": {"epoch": state.epoch, "batch": state.batch},
        "world_size": world.size,
        "config": to_dict(cfg),
        "classes": loader.classes,  # so predictions can be named without the store
    }


def load_on_node(cfg: RunConfig, world: dist.World, source: str) -> dict:
    """Rank 0 chose `source`; a node that cannot see that path (no shared disk) fetches the same file from storage."""
    path = Path(source)
    if world.local_rank == 0 and not path.exists():
        resume.fetch_named(cfg, path.name)
    dist.barrier(world)
    return checkpoint.load(path if path.exists() else resume.checkpoint_dir(cfg) / path.name)


def restore(ckpt: dict, world: dist.World, model, optimizer, scaler, ema,
            cfg: RunConfig) -> tuple[Progress, dict | None]:
    """Load the states into the modules; returns the progress and this rank's RNG state (set by the caller)."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # another model's checkpoint: one line, not load_state_dict's list of every key
        raise TrainError(f"the checkpoint to resume from holds another model than {cfg.model.name} "
                         f"({str(e).splitlines()[1].strip()[:160]}): give the run another name, or set resume") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    # The schedule is a pure function of (config, step), so it is rebuilt rather than loaded: a run given
    # more epochs (the nightly flow) gets a schedule over its new length. ckpt["scheduler"] is for the record.
    scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt["ema"] is not None:
        ema.module.load_state_dict(ckpt["ema"])
    rng = ckpt["rng"][world.rank] if ckpt.get("world_size") == world.size else None
    if rng is None and world.is_main:
        print(f"warning: checkpoint was written by {ckpt.get('world_size')} processes, this run has {world.size}; "
              "random streams restart from the seed")
    if world.is_main and ckpt["config"] != to_dict(cfg):
        changed = diff_keys(ckpt["config"], to_dict(cfg))
        print(f"warning: config differs from the checkpoint's: {', '.join(changed)}")
    p = ckpt["progress"]
    return Progress(step=ckpt["step"], epoch=ckpt["epoch"], **p), rng


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += diff_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(f"{prefix}{k}")
    return keys
