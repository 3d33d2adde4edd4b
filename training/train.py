"""The training loop: a `Trainer` set up in `__init__`, then `train()`, which reads top to bottom.

Runs inside a torchrun worker (or as a single process). Components live beside it: dist (process group),
tasks (model, loss, eval), optim (optimizer, step plan, schedule), checkpoint + storage + resume (saving and
finding checkpoints), metrics + progress (records). A checkpoint is every component's `state_dict()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.utils import random_seed
from torch.nn.parallel import DistributedDataParallel as DDP

from pipelines import build_loader
from training import checkpoint, dist, metrics, resume
from training.config import RunConfig, TrainConfig, TrainError, run_dir, to_dict
from training.metrics import RunSummary
from training.optim import (
    StepPlan,
    build_optimizer,
    build_scheduler,
    current_lr,
    scaled_lr,
    schedule_origin,
    schedule_steps,
    warmup_steps,
)
from training.preempt import EXIT_PREEMPTED, PREEMPTED_FILE, StopSignals, preemption_signals
from training.profiling import StepProfiler
from training.progress import Reporter
from training.storage import Uploader
from training.tasks import build_task


@dataclasses.dataclass
class Progress:
    """Where the run is, besides the train loader's position (its epoch and batch): a checkpoint's `progress`."""

    step: int = 0  # optimizer steps done
    best: float | None = None
    best_step: int | None = None
    last_eval_step: int = -1
    epoch_loss: float = 0.0  # this epoch's train loss so far, summed over batches and ranks (for results.csv)
    epoch_batches: float = 0  # batches per rank behind epoch_loss (fractional after a resume on another process count)
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


def set_algorithms(train: TrainConfig) -> None:
    """Deterministic kernels only (train.deterministic), else the fastest cuDNN convolutions for each input shape,
    timed on its first batch (train.cudnn_benchmark)."""
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = train.cudnn_benchmark and not train.deterministic


def run(cfg: RunConfig) -> RunSummary | None:
    """Train `cfg` in this process (one rank of torchrun, or alone); the run's summary (rank 0; None elsewhere)."""
    world = dist.setup()
    try:
        with preemption_signals() as preemption:
            return Trainer(cfg, world, preemption).train()
    finally:
        dist.teardown(world)


class Trainer:
    def __init__(self, cfg: RunConfig, world: dist.World, preemption: StopSignals) -> None:
        self.cfg, self.world, self.preemption = cfg, world, preemption
        self.rdir, self.ckpt_dir = run_dir(cfg), resume.checkpoint_dir(cfg)
        if world.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.rdir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            (self.rdir / PREEMPTED_FILE).unlink(missing_ok=True)
        set_algorithms(cfg.train)
        random_seed(cfg.seed, world.rank)  # per rank: different dropout/mixup draws on each rank
        self.vote = dist.StopVote(world)

        loader_args: dict[str, Any] = dict(task=cfg.task, rank=world.rank, world_size=world.size, seed=cfg.seed,
                                           device=world.device, host_processes=world.local_size)
        self.train_loader = build_loader(cfg.data, cfg.data.train_split, train=True, **loader_args)
        self.task = build_task(cfg, self.train_loader.classes, world, self.rdir / "pretrained")
        self.val_loader = self.task.val_loader(**loader_args)
        self.model = self.task.build_model().to(world.device)
        if cfg.data.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = None
        if cfg.train.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.train.ema_decay)

        self.plan = StepPlan(len(self.train_loader), cfg.train.accum_steps, cfg.train.batch_ramp, cfg.train.epochs,
                             cfg.train.max_steps)
        self.global_batch = cfg.data.batch_size * world.size * cfg.train.accum_steps
        self.optimizer = build_optimizer(cfg.optim, self.model, scaled_lr(cfg.optim, self.global_batch))
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, self.plan)
        self.dtype = amp_dtype(cfg.train.amp, world.device)
        self.scaler = torch.amp.GradScaler(world.device.type, enabled=self.dtype == torch.float16)
        self.progress = Progress()
        self.stored_results: list[dict] | None = None  # the resumed checkpoint's results.csv rows
        self.stored_events: dict[str, bytes] | None = None  # and its TensorBoard event files
        self.layout_change: str | None = None  # a resume on another process count or batch: what changed, in one line
        self.source = dist.broadcast(world, str(resume.fetch(cfg) or "") if world.is_main else None)
        if self.source:
            self.load_state_dict(load_on_node(cfg, world, self.source))
        p, loader = self.progress, self.train_loader
        loader.plan_epochs(self.plan.epochs_from(p.step, loader.epoch, loader.batch))
        self.check_schedule_start()
        self.scheduler.step_update(self.lr_step(self.schedule_step()))
        self.task.start(self.optimizer, self.plan, self.schedule_step())

        # Gradients as views into the all-reduce buckets: one copy fewer per step, less memory.
        self.train_model: torch.nn.Module = DDP(self.model, gradient_as_bucket_view=True) \
            if world.distributed else self.model
        if cfg.train.compile:
            self.train_model = self.task.compile(self.train_model, mode=cfg.train.compile_mode)
        self.uploader = Uploader(cfg.checkpoint.storage, cfg.name, log=print) \
            if cfg.checkpoint.storage and world.is_main else None
        self.writer = checkpoint.Writer(self.ckpt_dir, cfg.checkpoint.keep)
        self.total_steps = p.step + self.plan.steps_left(p.step, loader.epoch, loader.batch)  # the run's, all told
        self.reporter = Reporter(self.rdir, world, self.total_steps, p.step, cfg.train.log_every)
        self.profiler = StepProfiler(cfg.train.profile, self.rdir / "profile", world.rank, world.device)
        self.tallied = 0  # this process's train_loader.skipped already in progress.skipped
        self.announce()

    def announce(self) -> None:
        amp = str(self.dtype).removeprefix("torch.") if self.dtype else "off"
        self.reporter.line(f"{self.cfg.task} {self.cfg.model.name}: {self.world.size} process(es) on "
                           f"{self.world.device.type}, amp {amp}, {self.total_steps} steps, "
                           f"global batch {self.global_batch}")
        lr_steps = schedule_steps(self.cfg.optim, self.plan)
        if warmup_steps(self.cfg.optim, self.plan) >= lr_steps:
            self.reporter.line(f"optim.warmup_epochs {self.cfg.optim.warmup_epochs:g} covers all "
                               f"{lr_steps} steps of the lr schedule: the lr only warms up, to "
                               f"{scaled_lr(self.cfg.optim, self.global_batch):g}, and does not decay")
        if self.cfg.train.compile:
            self.reporter.line(f"compiled: {self.task.compiled}")
        self.reporter.line(self.train_loader.workers_choice)
        self.reporter.line(self.train_loader.decode_choice)
        if self.source:
            if self.world.is_main:
                metrics.restore_results(self.rdir / "results.csv", self.stored_results, self.progress.last_eval_step)
                metrics.restore_events(self.rdir / "tb", self.stored_events)
            self.reporter.line(f"resumed from {self.source} at step {self.progress.step} "
                               f"(epoch {self.train_loader.epoch}, batch {self.train_loader.batch})")
            if self.layout_change:
                self.reporter.line(self.layout_change)
            self.reporter.resume_epoch(self.progress.epoch_loss, self.progress.epoch_batches)

    # ---- the loop ----------------------------------------------------------------------------------------------

    def train(self) -> RunSummary | None:
        p, loader = self.progress, self.train_loader
        self.optimizer.zero_grad(set_to_none=True)
        self.profile()
        while not self.done():
            epoch, first, n_batches = loader.epoch, loader.batch, len(loader)
            batches = iter(loader) if first < n_batches else iter(())  # a trained epoch may wait for its eval
            self.reporter.start_epoch(epoch)
            for i in range(first, n_batches):
                with self.reporter.data_wait():
                    batch = next(batches)
                if not self.train_step(batch, i, first, n_batches):
                    continue  # a micro-batch: the optimizer steps on its group's last
                self.profile()
                if self.vote.poll(self.preemption.requested):
                    self.save()
                    self.finish_preempted()
                if self.done():
                    break
                if p.step % self.cfg.checkpoint.every_steps == 0 and loader.batch < n_batches:
                    self.save()  # the epoch's end saves after its eval
            if loader.batch >= n_batches:
                self.end_epoch(epoch)
        self.vote.result()  # every rank posted the same votes; settle the last before other collectives
        if p.last_eval_step != p.step:
            self.evaluate()
        return self.finish()

    def done(self) -> bool:
        p, loader = self.progress, self.train_loader
        return self.plan.steps_left(p.step, loader.epoch, loader.batch) == 0 or loader.epoch >= self.cfg.train.epochs

    def schedule_step(self) -> int:
        """Where the lr schedule (and the task's) is: the optimizer steps done, unless an earlier part of the run had
        another process count (StepPlan)."""
        return self.plan.step_at(self.train_loader.epoch, self.train_loader.batch)

    def lr_step(self, at: int) -> int:
        """The lr schedule's step at schedule step `at`: counted from optim.schedule_start_epoch, where this part of
        the run (a night of the nightly flow) began it."""
        return at - schedule_origin(self.cfg.optim, self.plan)

    def check_schedule_start(self) -> None:
        """The lr schedule must begin where the data is or before (a resumed night is past its start)."""
        start, done = self.cfg.optim.schedule_start_epoch, self.train_loader.epoch
        if start > done:
            raise TrainError(f"optim.schedule_start_epoch {start} is past the run's position ({done} epochs done"
                             f"{' in ' + self.source if self.source else ''}): set it to at most {done}")

    def train_step(self, batch: dict, i: int, first: int, n_batches: int) -> bool:
        """Forward and backward on batch `i` of the epoch (which this process began at `first`); the optimizer step
        on the last micro-batch of its accumulation group. Returns whether it stepped."""
        p, cfg = self.progress, self.cfg
        accum = self.plan.accum(self.train_loader.epoch)
        group_start = max(i - i % accum, first)  # a resume on another process count may begin mid-group
        micro = min(i - i % accum + accum, n_batches) - group_start  # the epoch's last group may be short
        last_micro = i + 1 == group_start + micro
        # DDP all-reduces gradients only on a group's last micro-batch.
        no_sync = contextlib.nullcontext()
        if self.world.distributed and not last_micro:
            no_sync = self.train_model.no_sync()  # type: ignore[operator]  # DDP's, also through torch.compile
        with no_sync:
            with torch.autocast(self.world.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                loss = self.task.train_loss(self.train_model, batch)
            self.scaler.scale(loss / micro).backward()
        self.reporter.add_loss(loss.detach(), self.train_loader.batch_size(batch))
        if not last_micro:
            return False
        log_now = (p.step + 1) % cfg.train.log_every == 0
        grad_norm = None
        if cfg.optim.clip_grad or log_now:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad or float("inf"))
        at = self.schedule_step()  # with this step done: the loader is past its group
        self.task.before_step(self.model, at - 1)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        p.step += 1
        self.scheduler.step_update(self.lr_step(at))
        self.task.after_step(self.model, at)
        if self.ema is not None:
            self.ema.update(self.model, step=p.step)
        self.reporter.step(p.step, current_lr(self.optimizer), grad_norm, log_now)
        return True

    def profile(self) -> None:
        """train.profile's start or end at this step, and its summary in the log."""
        for line in self.profiler.after_step(self.progress.step):
            self.reporter.line(line)

    def end_epoch(self, epoch: int) -> None:
        """Evaluate (every eval.every_epochs, and after the last) and save; the loader moves to the next epoch."""
        self.train_loader.set_epoch(epoch + 1)
        if (epoch + 1) % self.cfg.eval.every_epochs == 0 or self.done():
            self.evaluate()
        else:
            self.save()

    # ---- evaluation --------------------------------------------------------------------------------------------

    def evaluate(self) -> None:
        """Metrics of the model (and its EMA), a results.csv row, best.pt when the eval metric improved."""
        p, metric = self.progress, self.cfg.eval.metric
        results = {f"val_{k}": v for k, v in self.evaluate_model(self.model).items()}
        if self.ema is not None:
            results |= {f"ema_val_{k}": v for k, v in self.evaluate_model(self.ema.module).items()}
        p.last_eval_step = p.step
        improved = p.best is None or results[metric] > p.best
        if improved:
            p.best, p.best_step = results[metric], p.step
        self.reporter.eval_row(self.train_loader.epoch, p.step, results, current_lr(self.optimizer))
        self.save({"step": p.step, "epoch": self.train_loader.epoch, metric: p.best} if improved else None)

    def evaluate_model(self, model: torch.nn.Module) -> dict[str, float]:
        self.val_loader.set_epoch(0)  # the whole split, from its first batch, every time
        dist.broadcast_buffers(self.world, model)
        before = self.val_loader.skipped
        results = self.task.evaluate(model, self.val_loader)
        skipped = self.sum_over_ranks(self.val_loader.skipped - before)
        if skipped:
            self.reporter.line(f"evaluation skipped {skipped} corrupt val samples (data.on_error=skip)")
        return results

    def sum_over_ranks(self, count: int) -> int:
        return int(dist.sum_tensor(self.world, torch.tensor([count], device=self.world.device)).item())

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit. Collective: every rank must call it (RNG gather)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "loader": self.train_loader.state_dict(),
            "progress": dataclasses.asdict(self.progress),
            "rng": dist.gather(self.world, checkpoint.rng_state()),  # one entry per rank
            "step": self.progress.step,
            "epoch": self.train_loader.epoch,  # epochs trained and evaluated
            "world_size": self.world.size,
            "config": to_dict(self.cfg),
            "classes": self.train_loader.classes,  # so predictions can be named without the store
            # the run's history, for a resume on a machine without this run dir (storage holds checkpoints only)
            "results": metrics.read_results(self.rdir / "results.csv") if self.world.is_main else [],
            "tb": self.reporter.events() if self.world.is_main else {},
        }

    def load_state_dict(self, ckpt: dict) -> None:
        cfg, world = self.cfg, self.world
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:  # another model's checkpoint: one line, not load_state_dict's list of every key
            raise TrainError(f"the checkpoint to resume from holds another model than {cfg.model.name} "
                             f"({str(e).splitlines()[1].strip()[:160]}): give the run another name, "
                             "or set resume") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        # The schedule is a pure function of (config, step), so it is rebuilt rather than loaded: a run given
        # more epochs (the nightly flow, which also moves optim.schedule_start_epoch) gets a schedule over them.
        # ckpt["scheduler"] is for the record.
        if ckpt["scaler"] and self.scaler.is_enabled():  # fp16 both then and now; a run switched to it starts afresh
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt["ema"] is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        old_world = ckpt.get("world_size", world.size)
        old_layout = (old_world, ckpt["loader"].get("batch_size", cfg.data.batch_size),
                      ckpt["config"]["train"].get("accum_steps", cfg.train.accum_steps))
        self.train_loader.load_state_dict({"world_size": old_world, **ckpt["loader"]})
        progress = {"step": ckpt["step"], **ckpt["progress"]}
        progress.pop("batch", None)  # checkpoints before the loader's own state kept its batch here too
        self.progress = Progress(**progress)
        self.stored_results = ckpt.get("results")  # None in checkpoints from before they held it
        self.stored_events = ckpt.get("tb")  # the same
        if old_world == world.size:  # starting the loader's iteration draws nothing from these (its DataLoader has a
            checkpoint.set_rng_state(ckpt["rng"][world.rank])  # generator)
        else:
            self.progress.epoch_batches *= old_world / world.size  # the epoch's loss so far, in this count's batches
        if old_layout != (world.size, cfg.data.batch_size, cfg.train.accum_steps):
            self.layout_change = self.layout_change_line(ckpt, *old_layout)
        if world.is_main and ckpt["config"] != to_dict(cfg):
            diff = ", ".join(diff_keys(ckpt["config"], to_dict(cfg)))
            print(f"warning: config differs from the checkpoint's: {diff}")

    def layout_change_line(self, ckpt: dict, old_world: int, old_batch: int, old_accum: int) -> str:
        """What a resume on another process count, data.batch_size or train.accum_steps changes, in one line: the
        global batch, the steps an epoch, the lr (under optim.lr_base_batch), the rest of the epoch, the schedule's
        place, the random streams. A run that train.max_steps ends is refused where the global batch changes: its
        length and schedule count optimizer steps."""
        cfg, loader, world = self.cfg, self.train_loader, self.world
        old_global = old_batch * old_world * old_accum
        old_plan = dataclasses.replace(self.plan, batches_per_epoch=loader.num_samples // (old_world * old_batch),
                                       accum_steps=old_accum)
        settings = [(key, old, new) for key, old, new in (("data.batch_size", old_batch, cfg.data.batch_size),
                                                          ("train.accum_steps", old_accum, cfg.train.accum_steps))
                    if old != new]
        if (old_plan.by_steps or self.plan.by_steps) and old_global != self.global_batch:
            back = "".join(f" with {key} {old}" for key, old, _ in settings)
            raise TrainError(f"train.max_steps {cfg.train.max_steps} ends this run, and counts optimizer steps of "
                             f"{old_global} samples on {old_world} process(es) but of {self.global_batch} on "
                             f"{world.size}: its length and lr schedule would not go on where they were; resume it on "
                             f"{old_world} process(es){back}")
        old_at = (old_plan.step_at(ckpt["loader"]["epoch"], ckpt["loader"]["batch"])
                  - schedule_origin(cfg.optim, old_plan))
        old_lr, lr = scaled_lr(cfg.optim, old_global), scaled_lr(cfg.optim, self.global_batch)
        at, total = self.lr_step(self.schedule_step()), schedule_steps(cfg.optim, self.plan)
        changed = ", ".join(f"{key} {old} -> {new}" for key, old, new in settings)
        head = f"resumed on {world.size} process(es) from {old_world}" + (f" ({changed})" if changed else "")
        parts = [f"{head}: global batch {old_global} -> "
                 f"{self.global_batch}, steps an epoch {old_plan.steps_in(loader.epoch)} -> "
                 f"{self.plan.steps_in(loader.epoch)}, "
                 + (f"lr {old_lr:g} -> {lr:g} (optim.lr_base_batch {cfg.optim.lr_base_batch})" if lr != old_lr
                    else f"lr {lr:g}")]
        left, taken = loader.rest()
        if ckpt["loader"]["batch"] and left:
            parts.append(f"epoch {loader.epoch + 1} goes on with its {left} samples not yet trained"
                         + (f" ({left - taken} left out: less than a batch on each process)" if taken < left else ""))
        parts.append(f"the lr schedule goes on from the same point of the data: its step {old_at} of "
                     f"{schedule_steps(cfg.optim, old_plan)} on {old_world} is step {at} of {total} on {world.size} "
                     f"({at / total:.0%} done)")
        if old_world != world.size:  # each rank's streams are in the checkpoint: restored on the same count
            parts.append("random streams restart from the seed")
        return "; ".join(parts)

    def save(self, best_info: dict | None = None) -> None:
        """A checkpoint in the background (best.pt too, with `best_info`), then to storage. Collective."""
        started = time.perf_counter()
        self.tally_skipped()  # before the state is taken, so a resumed run keeps the count
        self.progress.epoch_loss, self.progress.epoch_batches = self.reporter.epoch_totals()
        state = self.state_dict()
        if not self.world.is_main:
            return
        info = checkpoint.marker(state)

        def then(path: Path) -> None:  # in the writer's thread, once the file is in place
            if self.uploader:
                self.uploader.submit(path, f"checkpoints/{path.name}", info, keep=self.cfg.checkpoint.keep)
            if best_info is not None:
                best = checkpoint.mark_best(self.ckpt_dir, path, best_info)
                if self.uploader:
                    self.uploader.submit(best, "checkpoints/best.pt", best_info)

        self.writer.submit(state, then)
        self.reporter.line(f"checkpoint step {self.progress.step}: training stalled "
                           f"{time.perf_counter() - started:.3f}s, written in the background")

    def tally_skipped(self) -> None:
        """Add the corrupt samples skipped since the last tally, summed over ranks. Collective."""
        new = self.sum_over_ranks(self.train_loader.skipped - self.tallied)
        self.tallied = self.train_loader.skipped
        if new:
            self.progress.skipped += new
            self.reporter.line(f"skipped {new} corrupt train samples (data.on_error=skip), "
                               f"{self.progress.skipped} in this run")

    # ---- the end -----------------------------------------------------------------------------------------------

    def finish(self) -> RunSummary | None:
        """metrics.json and plot.png in the run dir, uploaded beside the checkpoints; wait for uploads (bounded)."""
        p, cfg = self.progress, self.cfg
        summary = None
        self.writer.wait()
        if self.world.is_main:
            rows = metrics.read_results(self.rdir / "results.csv")
            summary = RunSummary(metric=cfg.eval.metric, best=p.best, best_step=p.best_step,
                                 final=rows[-1] if rows else {}, epoch=self.train_loader.epoch, step=p.step,
                                 skipped_samples=p.skipped)
            summary.write(self.rdir / metrics.SUMMARY_FILE)
            metrics.plot(rows, self.rdir / "plot.png")
            if self.uploader:
                self.uploader.submit(self.rdir / metrics.SUMMARY_FILE, f"checkpoints/{metrics.SUMMARY_FILE}")
                if not self.uploader.wait(cfg.checkpoint.upload_timeout):
                    self.reporter.line(f"warning: uploads to {cfg.checkpoint.storage} not done after "
                                       f"{cfg.checkpoint.upload_timeout:.0f}s; the local copies in {self.rdir} are "
                                       "complete")
                self.uploader.close()
            self.reporter.line(f"done: step {p.step}, best {cfg.eval.metric} {metrics.fmt(p.best)} "
                               f"(step {p.best_step}); run dir {self.rdir}")
        self.reporter.close()
        dist.barrier(self.world)
        return summary

    def finish_preempted(self) -> None:
        """After the preemption checkpoint: wait for it (and its upload, bounded), leave the marker, stop."""
        self.writer.wait()
        if self.world.is_main:
            if self.uploader and not self.uploader.wait(self.cfg.checkpoint.preempt_timeout):
                self.reporter.line("warning: preempted before the last upload finished; the local checkpoint is "
                                   "complete")
            (self.rdir / PREEMPTED_FILE).write_text(json.dumps({"step": self.progress.step, "time": time.time()}))
            self.reporter.line(f"preempted: saved step {self.progress.step}; exiting with {EXIT_PREEMPTED}")
        self.reporter.close()
        raise Preempted


def load_on_node(cfg: RunConfig, world: dist.World, source: str) -> dict:
    """Rank 0 chose `source`; a node that cannot see that path (no shared disk) fetches the same file from storage."""
    path = Path(source)
    if world.local_rank == 0 and not path.exists():
        resume.fetch_named(cfg, path.name)
    dist.barrier(world)
    return checkpoint.load(path if path.exists() else resume.checkpoint_dir(cfg) / path.name)


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += diff_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(f"{prefix}{k}")
    return keys
