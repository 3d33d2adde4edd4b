"""train.profile: torch.profiler over a few optimizer steps of a run, to see where a step's time goes.

Each process writes a Chrome trace (Perfetto and TensorBoard's profiler read it) to the run dir's `profile/`; the
main process logs the steps' wall time, the share of it the GPU ran kernels or copies on any stream and on its
busiest one (the step's, where an input pipeline has streams of its own), and the top kernels (the top CPU ops on a
CPU run). A step whose stream idles waits for the host: for its data, its kernel launches, or a sync. The profiler
adds host time to every launch, so part of that idle time can be its own (docs/training.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def covered(spans: list[tuple[float, float]]) -> float:
    """The time at least one of `spans` (start, end) runs: kernels of several streams that overlap count once."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def summary(prof: profile, steps: int, wall_s: float, top: int = 10) -> list[str]:
    """Lines on `steps` steps profiled over `wall_s` seconds: the time a step, the share of it the GPU ran anything
    and the share its busiest stream (the step's, beside an input pipeline's) ran, and the `top` kernels by time (on
    a CPU run: the top ops by their own CPU time)."""
    events = prof.key_averages()
    # the device's own events (kernels, copies): the ops that launched them carry the same time again, and a
    # record_function range projected onto the GPU's timeline (a user annotation) spans its kernels
    kernels = [e for e in events
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation and e.self_device_time_total > 0]
    wall_us = wall_s * 1e6
    if kernels:
        busy = sum(e.self_device_time_total for e in kernels)
        streams: dict[int, list[tuple[float, float]]] = {}
        for e in prof.events():
            if e.device_type == DeviceType.CUDA and not e.is_user_annotation:
                streams.setdefault(e.device_resource_id, []).append((e.time_range.start, e.time_range.end))
        anything = covered([span for spans in streams.values() for span in spans])
        busiest = max(covered(spans) for spans in streams.values())
        head = (f"profile: {steps} steps, {wall_us / steps / 1e3:.1f} ms a step, GPU busy {anything / wall_us:.0%} "
                f"(its busiest stream {busiest / wall_us:.0%}; {sum(e.count for e in kernels) // steps} kernels and "
                "copies a step); the top kernels:")
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
