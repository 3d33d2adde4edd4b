"""Stop signals to `shardtrain train`, delivered the ways the world sends them.

Mid-training, SIGTERM to the launcher alone (Kubernetes, `docker stop`), to its process group, or to every
process of the run (Slurm's `scancel`, systemd), and SIGINT to the launcher alone, must each make every rank
finish its step, save a checkpoint at that step and exit 75, with no traceback; the runs have a DataLoader
worker, which the signal reaches too. A second signal stops at once with one line.

Outside the loop's steps the exit code must still say what happened: torchrun answers a SIGTERM with 143
whatever its workers did; the launcher must turn that into 75 (preempted, resume me) when the workers were
still starting, and 0 when the run had finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest
import torch
import yaml

from shards import ConvertOptions, convert
from training import EXIT_PREEMPTED
from training.preempt import DUPLICATE_WINDOW_S
from training.processes import descendants

SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))


@pytest.fixture(scope="module")
def store(imagefolder_src, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("preempt-store") / "store"
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(dest), format="wds"), progress=False)
    return str(dest)


def write_config(tmp_path: Path, store: str, max_steps: int, workers: int = 0, **checkpoint) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "t", "runs_dir": str(tmp_path / "runs"), "seed": 0,
        "data": {"path": store, "image_size": 32, "batch_size": 8, "workers": workers, "pin_memory": False,
                 "channels_last": False},
        "model": {"name": "test_resnet"},
        "train": {"epochs": 10, "max_steps": max_steps, "log_every": 1},
        "checkpoint": {"every_steps": 1000, **checkpoint},
    }))
    return config


class Run(subprocess.Popen[bytes]):
    """A `shardtrain train` that `start` started: its output goes to `log`, a file open for reading it back."""

    log: IO[str]


def start(tmp_path: Path, store: str, max_steps: int = 2, *args: str, **settings) -> Run:
    config = write_config(tmp_path, store, max_steps, **settings)
    log = open(tmp_path / "log.txt", "w+")
    proc = Run([SHARDTRAIN, "train", str(config), *args], stdout=log, stderr=subprocess.STDOUT,
               start_new_session=True)
    proc.log = log
    return proc


def text(proc: Run) -> str:
    return Path(proc.log.name).read_text()


def wait_until(cond, proc: Run | None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc is None or proc.poll() is None, f"the run ended first:\n{text(proc)[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def torchrun_started(pid: int) -> bool:
    """Has the launcher started torchrun? (Its children also include forks that imports make for a moment.)"""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"training.torchrun" in Path(f"/proc/{child}/cmdline").read_bytes():
                return True
        except OSError:  # gone already
            continue
    return False


def finish(proc: Run) -> tuple[int, str]:
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    proc.log.seek(0)
    return proc.returncode, proc.log.read()


def test_sigterm_while_workers_start_exits_preempted(store, tmp_path):
    proc = start(tmp_path, store)
    wait_until(lambda: torchrun_started(proc.pid), proc)  # from here on the launcher forwards signals
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert not (tmp_path / "runs" / "t" / "preempted.json").exists()  # nothing trained, nothing saved


def test_sigterm_after_the_last_step_exits_0(store, tmp_path):
    proc = start(tmp_path, store)
    wait_until((tmp_path / "runs" / "t" / "metrics.json").exists, proc)  # the run is finishing
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    assert "done: step 2" in out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_stop_signal_after_torchrun_ended_keeps_the_finished_run_s_0(store, tmp_path, sig):
    # A SIGINT while the launcher exited, after the run was done, made it die of the signal (-2): the fault
    # campaign's late signals. Sent once torchrun is reaped, the launcher is past `launch`, in its exit.
    proc = start(tmp_path, store)
    wait_until(lambda: torchrun_started(proc.pid), proc)
    torchrun = next(int(child) for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                    if b"training.torchrun" in Path(f"/proc/{child}/cmdline").read_bytes())
    wait_until(lambda: not Path(f"/proc/{torchrun}").exists(), proc)
    proc.send_signal(sig)
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    assert "done: step 2" in out


def test_a_second_launch_of_a_running_run_is_refused_in_one_line(store, tmp_path):
    # it trained beside the first (a rerun while the first still saved after Ctrl-C), both writing one run dir
    from training import TrainError, launch
    from training.launch import run_dir_lock

    proc = start(tmp_path, store, 10**6)
    try:
        wait_until(lambda: torchrun_started(proc.pid), proc)
        with pytest.raises(TrainError) as err:
            launch(tmp_path / "run.yaml")
        assert re.fullmatch(rf"run dir {tmp_path}/runs/t is in use by pid {proc.pid} on \S+: wait for that run to "
                            "end, or give this one another name", str(err.value)), err.value
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with run_dir_lock(tmp_path / "runs" / "t", node_rank=0):  # a kill -9 leaves no lock behind
        pass


SWALLOWED = """
import time
from training.cli import preempted_on_sigterm
with preempted_on_sigterm():
    print("ready", flush=True)
    try:
        time.sleep(60)
    except BaseException:  # as C code that clears any error does: torch's numpy probe while torch imports
        pass
    print("went on", flush=True)
"""


def test_sigterm_before_torchrun_exits_preempted_even_where_the_code_swallows_exceptions():
    # An exception from the handler landed in torch's import of numpy, was cleared there, and the next import of
    # numpy failed with a traceback and exit 1 (CI, 2026-12-04).
    proc = subprocess.Popen([sys.executable, "-c", SWALLOWED], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED and "went on" not in out, out


def test_sigterm_while_the_cli_imports_exits_preempted(store, tmp_path):
    proc = start(tmp_path, store)
    time.sleep(0.5)  # importing torch, prefect and the rest takes seconds: the signal lands in the imports
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == EXIT_PREEMPTED, out[-2000:]
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()


def test_an_in_process_run_gives_the_signal_handlers_back(store, tmp_path):
    # `training.run` called from a program (a notebook, an in-process flow) must not keep Ctrl-C to itself
    from training import load_config, run

    config = write_config(tmp_path, store, max_steps=1)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    run(load_config(str(config)))
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ---- mid-training: each way a stop signal arrives ------------------------------------------------------------


def send(proc: subprocess.Popen, how: str) -> None:
    if how == "launcher":
        proc.send_signal(signal.SIGTERM)
    elif how == "group":  # the launcher's process group, as `kill -- -PGID` or a terminal sends it
        os.killpg(proc.pid, signal.SIGTERM)
    elif how == "every-process":  # as Slurm's scancel and systemd do
        processes = descendants(proc.pid)
        assert len(processes) >= 6, processes  # launcher, torchrun, 2 ranks, a DataLoader worker each
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):  # a fork of an import's, gone already
                os.kill(pid, signal.SIGTERM)
    elif how == "sigint-launcher":  # `kill -INT PID`: what Ctrl-C does, for a launcher without a terminal
        proc.send_signal(signal.SIGINT)


@pytest.mark.parametrize("how", ["launcher", "group", "every-process", "sigint-launcher"])
def test_a_signal_mid_training_saves_at_its_step_and_exits_75(store, tmp_path, how):
    nproc = 2 if how == "every-process" else 1
    proc = start(tmp_path, store, 60, f"--nproc-per-node={nproc}", workers=1)
    wait_until(lambda: "\nstep 3 epoch" in text(proc), proc)
    send(proc, how)
    code, out = finish(proc)
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    saved = json.loads((tmp_path / "runs" / "t" / "preempted.json").read_text())["step"]
    steps = [int(s) for s in re.findall(r"^step (\d+) epoch", out, re.MULTILINE)]
    # The signal came after step 3's line. One process saves at the step it sees the request at: step 3 itself when
    # the signal lands between that line and the step's check (the step is done; nothing is lost), else a later one.
    # Two agree one step late (training.dist.StopVote): a rank's flag posted at step 3 at the earliest is read at 4.
    assert (3 if nproc == 1 else 4) <= saved == steps[-1] < 60
    ckpt = tmp_path / "runs" / "t" / "checkpoints" / f"step_{saved:08d}.pt"
    assert (ckpt.parent / f"{ckpt.name}.complete").exists()
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["world_size"] == nproc


def test_a_second_signal_stops_at_once_with_one_line(store, moto_server, s3_bucket, tmp_path):
    # S3 goes down: the preempted run waits for its last upload (up to preempt_timeout); the user insists.
    proc = start(tmp_path, store, 60, workers=1, storage=s3_bucket, preempt_timeout=300)
    wait_until(lambda: "\nstep 3 epoch" in text(proc), proc)
    moto_server.stop()
    try:
        proc.send_signal(signal.SIGTERM)
        saved = tmp_path / "runs" / "t" / "checkpoints" / "last.pt.complete"
        wait_until(saved.exists, proc)  # written; now its upload is waited for
        time.sleep(DUPLICATE_WINDOW_S + 0.5)  # a repeat within the window is the same request; this one insists
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code, out = finish(proc)
        took = time.monotonic() - sent
    finally:
        moto_server.start(buckets=(s3_bucket.removeprefix("s3://"),))
    assert code == 128 + signal.SIGTERM, out[-3000:]
    # at once: not the 300 s the save waits, nor the ranks' own ending, nor the launcher's teardown (each took 5 s)
    assert took < 3, took
    assert "Traceback" not in out, out[-3000:]
    assert out.rstrip().splitlines()[-1].startswith("stopped at once on a second SIGTERM, without saving")
    assert not running(tmp_path / "run.yaml")  # the ranks and DataLoader workers are gone with the launcher


def running(config: Path) -> list[int]:
    """The processes of a run: every command line names its config."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if str(config).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found
