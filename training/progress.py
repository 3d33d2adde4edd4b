"""What the loop reports as it goes: a rich progress bar and log lines on rank 0, TensorBoard, results.csv.

Per-step values stay on the device; they are read (one host sync) only on log steps and evals.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from training import metrics
from training.dist import World, sum_tensor


class Reporter:
    def __init__(self, rdir: Path, world: World, total_steps: int, step: int, log_every: int) -> None:
        self.rdir, self.world, self.log_every = rdir, world, log_every
        self.console = Console(soft_wrap=True)  # one line per record when piped (flow logs, log files)
        self.writer = None
        self.bar: Progress | None = None
        if world.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # Hides the events a killed run wrote past its checkpoint at `step`; step `step`'s own came before it.
            self.writer = SummaryWriter(str(rdir / "tb"), purge_step=step + 1)
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=self.console, transient=False, disable=not self.console.is_terminal)
            self.task = self.bar.add_task("train", total=total_steps, completed=step, info="")
            self.bar.start()
        # Running sums since the last log / eval, kept on the device.
        self.loss_sum = torch.zeros((), device=world.device)
        self.samples = 0
        self.window_batches = 0
        self.epoch = 0
        self.epoch_loss = torch.zeros((), device=world.device)
        self.epoch_batches: float = 0  # per rank (fractional after a resume on another process count)
        self.window_start = time.perf_counter()
        self.wait_s = 0.0
        self.images_per_s = 0.0
        # Since the last results row: samples and training time (up to the last step, so the eval is left out).
        self.row_samples = 0
        self.row_start = time.perf_counter()
        self.row_train_s = 0.0

    def events(self) -> dict[str, bytes]:
        """This run dir's TensorBoard event files so far, by name (flushed first): checkpoints keep them, so that a
        run resumed on a machine without its run dir keeps its curves. Main process only."""
        assert self.writer is not None
        self.writer.flush()
        return {path.name: path.read_bytes() for path in sorted((self.rdir / "tb").glob("events.out.tfevents.*"))}

    def line(self, text: str) -> None:
        if self.world.is_main:
            self.console.print(text, markup=False, highlight=False)

    def start_epoch(self, epoch: int) -> None:
        """`epoch` counts from 0; log lines count from 1, as results.csv's `epoch` (epochs done) does."""
        self.epoch = epoch

    @contextlib.contextmanager
    def data_wait(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.wait_s += time.perf_counter() - start

    def add_loss(self, loss: torch.Tensor, n: int) -> None:
        self.loss_sum += loss
        self.window_batches += 1
        self.epoch_loss += loss
        self.epoch_batches += 1
        self.samples += n
        self.row_samples += n

    def step(self, step: int, lr: float, grad_norm: torch.Tensor | None, log_now: bool) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)
        self.row_train_s = time.perf_counter() - self.row_start
        if not log_now:
            return
        # .item() waits for the window's last step: timed before it, a GPU run's rate counted the steps the host
        # had queued but the GPU had not run (~10% over a 10-step window).
        loss = self.loss_sum.item() / max(1, self.window_batches)
        elapsed = time.perf_counter() - self.window_start
        self.images_per_s = self.samples * self.world.size / max(elapsed, 1e-9)
        wait_share = self.wait_s / max(elapsed, 1e-9)
        if self.writer is not None:
            scalars = {"train/loss": loss, "train/lr": lr, "train/images_per_s": self.images_per_s,
                       "train/data_wait_share": wait_share}
            if grad_norm is not None:
                scalars["train/grad_norm"] = float(grad_norm)
            scalars |= gpu_scalars(self.world)
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            info = f"loss {loss:.4f} lr {lr:.2e} {self.images_per_s:.0f} img/s"
            assert self.bar is not None
            self.bar.update(self.task, info=info)
            self.line(f"step {step} epoch {self.epoch + 1} {info} data-wait {100 * wait_share:.0f}%")
        self.window_batches = 0
        self.loss_sum.zero_()
        self.samples, self.wait_s, self.window_start = 0, 0.0, time.perf_counter()

    def epoch_totals(self) -> tuple[float, float]:
        """This epoch's loss summed over batches and ranks, and the batches per rank. Collective."""
        return sum_tensor(self.world, self.epoch_loss.clone()).item(), self.epoch_batches

    def resume_epoch(self, loss: float, batches: float) -> None:
        """Carry a resumed epoch's loss so far (the sum over ranks goes to rank 0 alone)."""
        self.epoch_loss.fill_(loss if self.world.is_main else 0.0)
        self.epoch_batches = batches

    def eval_row(self, epoch: int, step: int, results: dict[str, float], lr: float) -> None:
        """One results.csv row (rank 0) and the eval scalars; the train loss is this epoch's mean over all ranks,
        images/s the mean over the training since the last row (none if it trained no step)."""
        train_loss = sum_tensor(self.world, self.epoch_loss.clone()) / max(1, self.epoch_batches * self.world.size)
        images_per_s = self.row_samples * self.world.size / self.row_train_s if self.row_samples else None
        row = {"epoch": epoch, "step": step, "train_loss": round(train_loss.item(), 6),
               **{k: round(v, 6) for k, v in results.items()},
               "lr": float(f"{lr:.6g}"), "images_per_s": None if images_per_s is None else round(images_per_s, 2)}
        self.epoch_loss.zero_()
        self.epoch_batches = 0
        self.row_samples, self.row_train_s, self.row_start = 0, 0.0, time.perf_counter()
        if not self.world.is_main:
            return
        metrics.append_result(self.rdir / "results.csv", row)
        assert self.writer is not None
        for key, value in results.items():
            self.writer.add_scalar(f"val/{key.removeprefix('val_')}", value, step)
        self.writer.flush()
        self.line("eval " + " ".join(f"{k} {metrics.fmt(v)}" for k, v in row.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def gpu_scalars(world: World) -> dict[str, float]:
    if world.device.type != "cuda":
        return {}
    out = {"gpu/memory_allocated_gb": torch.cuda.max_memory_allocated(world.device) / 2**30}
    with contextlib.suppress(Exception):  # needs pynvml; absent on some images
        out["gpu/utilization"] = float(torch.cuda.utilization(world.device))
    return out
