"""train.profile: torch.profiler over a few optimizer steps of a run, to see where a step's time goes.

Each process writes a Chrome trace (Perfetto and TensorBoard's profiler read it) to the run dir's `profile/`; the
main process logs the steps' wall time, the share of it the GPU spent running kernels and copies, and the top
kernels (the top CPU ops on a CPU run). A step the GPU leaves idle waits for the host: for its data, its Python, or
a sync.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def summary(prof: profile, steps: int, wall_s: float, top: int = 10) -> list[str]:
    """Lines on `steps` steps profiled over `wall_s` seconds: the time a step, the GPU's busy share and the `top`
    kernels by time (on a CPU run: the top ops by their own CPU time)."""
    events = prof.key_averages()
    # the device's own events (kernels, copies): the ops that launched them carry the same time again
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    wall_us = wall_s * 1e6
    if kernels:
        busy = sum(e.self_device_time_total for e in kernels)
        head = (f"profile: {steps} steps, {wall_us / steps / 1e3:.1f} ms a step, GPU busy {busy / wall_us:.0%} "
                f"({sum(e.count for e in kernels) // steps} kernels and copies a step); the top kernels:")
        rows = [(e.self_device_time_total, e) for e in kernels]
    else:
        busy = sum(e.self_cpu_time_total for e in events)
        head = f"profile: {steps} steps, {wall_us / steps / 1e3:.1f} ms a step (no GPU kernels); the top CPU ops:"
        rows = [(e.self_cpu_time_total, e) for e in events if e.self_cpu_time_total > 0]
    lines = [head]
    for us, e in sorted(rows, key=lambda row: -row[0])[:top]:
        lines.append(f"  {us / max(busy, 1):6.1%} {us / steps / 1e3:7.2f} ms x{e.count // steps:<4d} {e.key[:110]}")
    return lines


class StepProfiler:
    """Profiles optimizer steps `first` .. `first + count - 1` (train.profile: [first, count]) of this process:
    `after_step(done)` with the steps done, also once before the loop (a run may start or resume just before
    `first`); it starts after step `first - 1` and stops after the last. None of it where the run has passed
    `first` already."""

    def __init__(self, span: tuple[int, int] | None, out: Path, rank: int, device: torch.device):
        self.first, self.count = span or (0, 0)
        self.out, self.rank, self.device = out, rank, device
        self.prof: profile | None = None
        self.started = 0.0

    def after_step(self, done: int) -> list[str]:
        """Starts or stops the profiler at `done` steps; the summary's lines when it stopped, else none."""
        if not self.count:
            return []
        if done == self.first - 1:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities)
            self.sync()
            self.prof.start()
            self.started = time.perf_counter()
            return []
        if self.prof is None or done != self.first + self.count - 1:
            return []
        self.sync()
        wall = time.perf_counter() - self.started
        self.prof.stop()
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"rank{self.rank}-steps{self.first}-{done}.json"
        self.prof.export_chrome_trace(str(trace))
        lines = [f"profiled steps {self.first}-{done}: trace {trace}", *summary(self.prof, self.count, wall)]
        self.prof = None
        return lines

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
