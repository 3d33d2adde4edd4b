"""`launch`: run the loop under torchrun in a subprocess, stream its output, return its exit code."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from training.config import TrainError, load_config, make_dir, run_dir
from training.metrics import SUMMARY_FILE
from training.preempt import EXIT_PREEMPTED, PREEMPTED_FILE, StopSignals, insist_message
from training.processes import kill_tree


def torchrun_command(
    config: str | Path,
    overrides: Sequence[str],
    *,
    run_id: str,
    nproc_per_node: int,
    nnodes: int,
    node_rank: int,
    rdzv_endpoint: str | None,
) -> list[str]:
    cmd = [sys.executable, "-m", "training.torchrun", f"--nproc-per-node={nproc_per_node}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise TrainError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={run_id}"]
    elif rdzv_endpoint:
        cmd += ["--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={run_id}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "training", str(config), *overrides]
    return cmd


def launch(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    stream: Callable[[str], None] | None = None,
    ignore_signals_after: bool = False,
) -> int:
    """Run `torchrun ... -m training CONFIG OVERRIDES` (through training.torchrun); return its exit code.

    The config is validated and checked here first (training.preflight: the model name, the store and its
    splits, the weights, the run dir's checkpoint), so those mistakes fail before any process starts (TrainError).
    With `stream=None` the workers inherit this process's stdout (a terminal keeps its live progress bar);
    otherwise each output line goes to `stream`.
    After a SIGTERM/SIGINT the workers save a checkpoint and the result is EXIT_PREEMPTED; after a second
    one (past training.preempt.DUPLICATE_WINDOW_S) torchrun is killed at once and the result is 128 + signal.
    `ignore_signals_after`: from torchrun's end on, stop signals are ignored rather than given back to the handlers
    before the launch: for a process that only exits after it (the CLI), where a late one would turn the run's
    decided exit code into a signal death or a preemption.
    """
    if nproc_per_node < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise TrainError("need --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes")
    host, _, port = (rdzv_endpoint or "").rpartition(":")
    if rdzv_endpoint and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise TrainError(f"--rdzv-endpoint must be HOST:PORT, such as node0:29500, not {rdzv_endpoint}")
    cfg = load_config(config, overrides)
    from training.preflight import preflight  # timm and torch, for the model and checkpoint checks: only here

    preflight(cfg)
    cmd = torchrun_command(
        config, overrides, run_id=cfg.name, nproc_per_node=nproc_per_node, nnodes=nnodes,
        node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
    )
    # How long torchrun waits for its workers to save after a SIGTERM. Set through the environment: the
    # --shutdown-timeout flag is newer than torch 2.11 (the image's 2.6 lacks it too), whose torchrun refuses
    # it; those wait a fixed 30 s.
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(cfg.checkpoint.preempt_timeout) + 60)}
    started = time.time()
    pipe = subprocess.PIPE if stream is not None else None
    with run_dir_lock(run_dir(cfg), node_rank):
        proc = subprocess.Popen(cmd, stdout=pipe, stderr=subprocess.STDOUT if pipe else None, text=True, env=env)
        relay = Relay(proc)
        with StopSignals(relay.first, relay.insist, signal.SIG_IGN if ignore_signals_after else None) as signals:
            if stream is not None and proc.stdout is not None:  # both or neither
                for line in proc.stdout:
                    stream(line.rstrip("\n"))
            code = proc.wait()
    if relay.insisted is not None:
        say = stream or (lambda line: print(line, file=sys.stderr))
        say(insist_message(relay.insisted))
        return 128 + relay.insisted
    return exit_code(code, run_dir(cfg), started, signals.requested)


@contextlib.contextmanager
def run_dir_lock(directory: Path, node_rank: int) -> Iterator[None]:
    """One launch of a run at a time on each node. A second one (the same name twice, or a rerun while the first
    still saves after a Ctrl-C) trained beside the first, both writing and pruning the same checkpoints. The lock
    is the kernel's (flock), so it ends with the process however that ends; one per node rank, as nodes may share
    the run dir on a NAS."""
    make_dir(directory, "run dir")
    fd = os.open(directory / f".launch-node{node_rank}.lock", os.O_RDWR | os.O_CREAT, 0o644)  # not inherited
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace") or "another launch"
        os.close(fd)
        raise TrainError(f"run dir {directory} is in use by {holder}: wait for that run to end, "
                         "or give this one another name") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def exit_code(code: int, directory: Path, started: float, signalled: bool) -> int:
    """The launch's exit code: torchrun answers a SIGTERM with 143 (or dies of it) whatever its workers did.

    A worker saved on the signal: EXIT_PREEMPTED. Signalled and the run finished anyway (the signal came
    after its last step): 0. Signalled before the workers could save (they were still starting, with no
    step of this launch to lose): EXIT_PREEMPTED, as the newest checkpoint is where a rerun resumes.
    """
    if code in (0, EXIT_PREEMPTED):
        return code
    if preempted_since(directory, started):
        return EXIT_PREEMPTED
    if signalled:
        return 0 if written_since(directory / SUMMARY_FILE, started) else EXIT_PREEMPTED
    return code


class Relay:
    """The launcher's answers to stop signals: pass the first on to torchrun (which passes it to the workers,
    who save and stop), and kill torchrun, the ranks and their DataLoader workers at once on an insisting one.

    SIGINT is passed on as well: a terminal's Ctrl-C reaches torchrun directly too, and torchrun takes the
    two as one request (training.torchrun); `kill -INT` of the launcher reaches only the launcher.
    """

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.insisted: int | None = None

    def first(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def insist(self, signum: int) -> None:
        self.insisted = signum
        if self.proc.poll() is None:
            # torchrun's death alone would leave the ranks saving (and writing to our output) in their own groups
            kill_tree(self.proc.pid)


def preempted_since(directory: Path, started: float) -> bool:
    """Did a worker of this launch save on a signal? (It leaves PREEMPTED_FILE in the run dir.)"""
    return written_since(directory / PREEMPTED_FILE, started)


def written_since(path: Path, started: float) -> bool:
    return path.exists() and path.stat().st_mtime >= started - 1
