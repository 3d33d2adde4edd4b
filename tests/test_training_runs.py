"""Real training runs: torchrun subprocesses (gloo on CPU), kills, resume, S3 (moto) and NAS storage.

Every run trains timm's `test_resnet` at 32 px on the small ImageFolder store, with deterministic
algorithms, so an interrupted-and-resumed run must end with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import IO, Any

import pytest
import torch
import yaml
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from pipelines.cpus import worker_count
from shards import ConvertOptions, convert
from training.processes import descendants

SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))
STEPS = 18  # 1 process: 12 batches of 8 per epoch, so the run ends mid-epoch 2 (and checkpoints fall mid-epoch)
# 2 processes: 96 samples / (2 ranks x 8) = 6 batches per rank per epoch, 2 per step (DDP's no_sync on the first)
TWO_PROC = {"max_steps": None, "epochs": 2, "accum_steps": 2}


@pytest.fixture(scope="module")
def store(imagefolder_src, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("train-store") / "store"
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(dest), format="wds"), progress=False)
    return str(dest)


def write_config(path: Path, store: str, **sections) -> Path:
    cfg: dict[str, Any] = {
        "name": "t",
        "runs_dir": str(path.parent / "runs"),
        "seed": 3,
        "data": {"path": store, "image_size": 32, "batch_size": 8, "workers": 0, "pin_memory": False,
                 "channels_last": False},
        "model": {"name": "test_resnet"},
        "optim": {"lr": 3e-3, "warmup_epochs": 0.5},
        "train": {"epochs": 3, "max_steps": STEPS, "log_every": 3, "deterministic": True},
        "checkpoint": {"every_steps": 3, "keep": 2, "upload_timeout": 120},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg[section] = {**cfg.get(section, {}), **values}
        else:
            cfg[section] = values
    path.write_text(yaml.safe_dump(cfg))
    return path


class Run(subprocess.Popen[str]):
    """A run `start` started: its output goes to `log`, a file open for reading it back."""

    log: IO[str]


def start(config: Path, *args: str, torchrun: bool = True, env: dict | None = None) -> Run:
    """`shardtrain train CONFIG ...` (or, cheaper, the worker alone: `python -m training CONFIG [overrides]`) in its
    own process group, its output in a log file beside the config."""
    log = open(config.with_name(f"log-{time.monotonic_ns()}.txt"), "w+")
    cmd = [SHARDTRAIN, "train", str(config), *args] if torchrun else [sys.executable, "-m", "training", str(config),
                                                                       *args]
    proc = Run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
               env={**os.environ, **(env or {})})
    proc.log = log
    return proc


def output(proc: Run) -> str:
    proc.log.seek(0)
    return proc.log.read()


def finish(proc: Run, timeout: float = 240) -> tuple[int, str]:
    proc.wait(timeout=timeout)
    return proc.returncode, output(proc)


def train(config: Path, *args: str, torchrun: bool = True) -> str:
    code, out = finish(start(config, *args, torchrun=torchrun))
    assert code == 0, out[-3000:]
    return out


def wait_for(path: Path, proc: Run, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared:\n{output(proc)[-3000:]}"
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to `shardtrain train` and torchrun (one group); the workers die with torchrun (PDEATHSIG)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def final_state(runs: Path) -> dict:
    return torch.load(runs / "t" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"{key} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"optimizer {key} differs after resume"


def results(runs: Path) -> list[dict]:
    with open(runs / "t" / "results.csv") as f:
        return list(csv.DictReader(f))


def kill_at_random_checkpoint(config: Path, runs: Path, steps: list[int], *args: str, torchrun: bool = True) -> int:
    """Start a run, SIGKILL its whole process group once the checkpoint of a random step is complete."""
    step = random.choice(steps)
    print(f"killing after the checkpoint of step {step}")
    proc = start(config, *args, torchrun=torchrun)
    wait_for(runs / "t" / "checkpoints" / f"step_{step:08d}.pt.complete", proc)
    kill_group(proc)
    return step


# ---- one process -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_1proc_runs(store, tmp_path_factory) -> Path:
    """The uninterrupted single-process run every interrupted one must match; returns its runs_dir."""
    tmp = tmp_path_factory.mktemp("baseline1")
    train(write_config(tmp / "run.yaml", store), torchrun=False)
    return tmp / "runs"


@pytest.fixture(scope="module")
def baseline_1proc(baseline_1proc_runs) -> dict:
    return final_state(baseline_1proc_runs)


def test_kill9_mid_epoch_during_upload_then_resume_from_s3(store, baseline_1proc, s3_bucket, tmp_path):
    """kill -9 mid-epoch while uploads run; the run dir is lost; resume: auto takes the newest complete
    checkpoint from S3 (never a partial one) and ends with exactly the uninterrupted weights."""
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "run.yaml", store, checkpoint={"storage": f"{s3_bucket}/ckpt"})
    step = random.choice([6, 9, 15])
    proc = start(config, torchrun=False)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    remote = f"{s3_bucket}/ckpt/t/checkpoints"
    # Once storage holds a complete checkpoint and the local one of `step` is written, kill: the
    # uploads of the newer checkpoints are then in flight.
    wait_for(runs / "t" / "checkpoints" / f"step_{step:08d}.pt.complete", proc)
    deadline = time.monotonic() + 60
    while not fs.glob(f"{remote}/step_*.pt.complete"):
        assert time.monotonic() < deadline, "no checkpoint reached storage"
        fs.invalidate_cache()
        time.sleep(0.05)
    kill_group(proc)
    shutil.rmtree(runs)  # a new machine: only storage is left

    out = train(config, torchrun=False)
    assert "resumed from" in out
    assert_same_weights(baseline_1proc, final_state(runs))
    assert [int(r["step"]) for r in results(runs)] == [12, STEPS]
    marker = json.loads(fs.cat_file(f"{s3_bucket}/ckpt/t/checkpoints/step_{STEPS:08d}.pt.complete"))
    assert marker["step"] == STEPS and len(marker["sha256"]) == 64
    assert json.loads(fs.cat_file(f"{s3_bucket}/ckpt/t/checkpoints/metrics.json"))["step"] == STEPS

    # The finished run, on another new machine: nothing left to train, and the run dir is whole again (last.pt
    # too; the first run may itself have finished before its kill, when its first upload was slow)
    shutil.rmtree(runs)
    out = train(config, torchrun=False)
    assert f"at step {STEPS}" in out and f"done: step {STEPS}" in out
    assert_same_weights(baseline_1proc, final_state(runs))
    # its history too, from the checkpoint: before, results.csv (and plot.png) started empty on the new machine
    assert [int(r["step"]) for r in results(runs)] == [12, STEPS]
    assert json.loads((runs / "t" / "metrics.json").read_text())["final"]["step"] == STEPS
    # and its TensorBoard curves, every logged step of both machines (before: only the last machine's writer's file,
    # holding no step)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # type: ignore[import-untyped]

    events = EventAccumulator(str(runs / "t" / "tb"))
    events.Reload()
    assert sorted({e.step for e in events.Scalars("train/loss")}) == list(range(3, STEPS + 1, 3))


def test_a_run_resumed_with_fp16_amp_starts_its_grad_scaler_afresh(store, baseline_1proc_runs, tmp_path):
    # before: "The source state dict is empty, possibly because it was saved from a disabled instance of
    # GradScaler", a traceback, since the checkpoint's run trained without fp16
    shutil.copytree(baseline_1proc_runs, tmp_path / "runs")
    config = write_config(tmp_path / "run.yaml", store, train={"max_steps": STEPS + 3, "amp": "fp16"})
    out = train(config, torchrun=False)
    assert f"at step {STEPS}" in out and "amp float16" in out and f"done: step {STEPS + 3}" in out


def test_fresh_start_over_an_existing_run_is_refused(store, baseline_1proc_runs, tmp_path):
    # The existing run is the baseline's (training one only for this costs a launch); refused, it is left as it was.
    config = write_config(tmp_path / "run.yaml", store, runs_dir=str(baseline_1proc_runs), resume="never")
    code, out = finish(start(config, torchrun=False))
    assert code != 0
    assert f"error: resume=never, but run 't' already has a checkpoint at step {STEPS}" in out, out[-2000:]
    assert "Traceback" not in out
    assert final_state(baseline_1proc_runs)["step"] == STEPS


def damage_images(store: Path, count: int) -> None:
    """Overwrite the start of `count` train images inside their tar shards (the tar itself stays readable)."""
    members = [(tar, m) for tar in sorted(store.glob("train-*.tar"))
               for m in tarfile.open(tar).getmembers() if m.name.endswith(".jpg")]
    for tar, member in members[:: len(members) // count][:count]:
        with open(tar, "r+b") as f:
            f.seek(member.offset_data)
            f.write(bytes(32))


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_corrupt_samples_are_counted_or_stop_the_run(store, tmp_path, on_error):
    damaged = tmp_path / "store"
    shutil.copytree(store, damaged)
    damage_images(damaged, 2)
    config = write_config(tmp_path / "run.yaml", str(damaged), train={"max_steps": 12},
                          data={"on_error": on_error})
    code, out = finish(start(config, torchrun=False))
    if on_error == "skip":
        assert code == 0, out[-3000:]
        assert "corrupt train samples (data.on_error=skip), 2 in this run" in out
        assert json.loads((tmp_path / "runs" / "t" / "metrics.json").read_text())["skipped_samples"] == 2
    else:
        assert code != 0 and "Traceback" not in out
        assert re.search(r"error: corrupt data in shard train-\d+\.tar", out), out[-2000:]


def test_train_profile_writes_a_trace_and_logs_where_its_steps_went(store, tmp_path):
    config = write_config(tmp_path / "run.yaml", store, train={"max_steps": 4, "profile": [2, 2]})
    code, out = finish(start(config, torchrun=False))
    assert code == 0, out[-3000:]
    trace = tmp_path / "runs" / "t" / "profile" / "rank0-steps2-3.json"
    assert f"profiled steps 2-3: trace {trace}" in out
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert {"aten::convolution", "Optimizer.step#AdamW.step"} <= names, sorted(map(str, names))[:50]
    summary = re.search(r"profile: 2 steps, ([\d.]+) ms a step \(no GPU kernels\); the top CPU ops:\n((?:  .*\n)+)",
                        out)
    assert summary and float(summary[1]) > 0 and len(summary[2].splitlines()) == 10, out[-3000:]


def test_a_ranks_error_line_through_torchrun_is_the_last_line_with_its_exit_code(store, tmp_path):
    """A mistake only a rank finds (here: a batch larger than the split) ends `shardtrain train` with that rank's
    one line and exit code 2: no log line of torchrun's about the failed process, no summary after it."""
    config = write_config(tmp_path / "run.yaml", store, data={"batch_size": 100_000})
    code, out = finish(start(config))
    assert code == 2, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: ") and "fewer than one batch per rank" in last, out[-3000:]
    assert "failed (exitcode" not in out and "process(es) failed" not in out and "Traceback" not in out, out


def test_resume_from_unreachable_storage_is_one_line(store, tmp_path):
    config = write_config(tmp_path / "run.yaml", store, resume="s3://bucket/run/step_00000004.pt")
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
           "AWS_MAX_ATTEMPTS": "1"}
    code, out = finish(start(config, torchrun=False, env=env))
    assert code == 2 and "Traceback" not in out, out[-3000:]
    assert out.strip().splitlines()[-1].startswith(
        "error: bad value for resume: cannot read s3://bucket/run/step_00000004.pt.complete: EndpointConnectionError")


def rank_processes(launcher: int, rank: int) -> list[int]:
    """The rank's process, then its DataLoader workers (forks of it, with its RANK)."""
    found = []
    for pid in descendants(launcher):  # parents first
        with contextlib.suppress(OSError):  # gone already
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
    return found


def test_the_rank_that_failed_first_is_named_in_the_last_line_with_its_error(store, tmp_path):
    """The out-of-memory killer takes rank 1's DataLoader worker: rank 1 raises, and torchrun stops rank 0 with
    SIGTERM. Before, the last line blamed that ("training process(es) failed: killed by SIGTERM, exit code 1");
    now it names rank 1 and the error its error file holds (torch words it in one of a few ways, by where the
    worker's death finds the rank)."""
    config = write_config(tmp_path / "run.yaml", store, data={"workers": 1}, train={"max_steps": None, "epochs": 50})
    proc = start(config, "--nproc-per-node", "2")
    deadline = time.monotonic() + 180
    while "\nstep 3 epoch" not in output(proc):
        assert proc.poll() is None and time.monotonic() < deadline, output(proc)[-3000:]
        time.sleep(0.05)
    workers = rank_processes(proc.pid, 1)[1:]
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    code, out = finish(proc)
    last = out.strip().splitlines()[-1]
    assert code == 1 and re.match(r"error: rank 1 failed first: \w+Error: ", last), out[-3000:]


def failure(tmp_path: Path, local_rank: int, code: str, sig: signal.Signals | None = None) -> ProcessFailure:
    """How a real process ended, as torchrun's agent records a rank: its exit code (negative: the signal that
    killed it) and the error file `record` wrote, if it did."""
    error_file = tmp_path / f"error-{local_rank}.json"
    env = {**os.environ, "TORCHELASTIC_ERROR_FILE": str(error_file)}  # as torchrun sets it for each rank
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    if sig is not None:
        proc.send_signal(sig)
    proc.wait(timeout=120)
    return ProcessFailure(local_rank=local_rank, pid=proc.pid, exitcode=proc.returncode, error_file=str(error_file))


RAISES = """
from torch.distributed.elastic.multiprocessing.errors import record

@record
def main():
    raise {}

main()
"""


def test_the_last_line_says_how_the_first_failed_rank_ended(tmp_path):
    from training.torchrun import failure_line

    worker_killed = failure(tmp_path, 1, RAISES.format(
        'RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")'))  # torch's words
    stopped = failure(tmp_path, 0, "import time; time.sleep(60)", signal.SIGTERM)  # by torchrun, after rank 1
    assert failure_line(ChildFailedError("training", {1: worker_killed, 0: stopped})) == (
        "error: rank 1 failed first: RuntimeError: DataLoader worker (pid 4242) is killed by signal: Killed. "
        "(out of memory, or killed)")
    two_lines = failure(tmp_path, 2, RAISES.format('ValueError("no such key\\nwhere it was looked up")'))
    assert failure_line(ChildFailedError("training", {0: two_lines})) == "error: rank 0 failed: ValueError: no such key"
    killed = failure(tmp_path, 3, "import time; time.sleep(60)", signal.SIGKILL)
    assert failure_line(ChildFailedError("training", {0: killed})) == (
        "error: rank 0 failed: killed by SIGKILL (out of memory, or killed)")
    exited = failure(tmp_path, 4, "import os; os._exit(3)")
    assert failure_line(ChildFailedError("training", {0: exited})) == "error: rank 0 failed: exit code 3"


def test_sigterm_saves_exits_75_and_resumes_exactly(store, baseline_1proc, tmp_path):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "run.yaml", store)
    proc = start(config)
    wait_for(runs / "t" / "checkpoints" / "step_00000003.pt.complete", proc)
    proc.send_signal(signal.SIGTERM)  # to `shardtrain train` only: it forwards to torchrun, torchrun to workers
    code, out = finish(proc)
    assert code == 75, out[-3000:]
    saved = json.loads((runs / "t" / "preempted.json").read_text())["step"]
    assert (runs / "t" / "checkpoints" / f"step_{saved:08d}.pt.complete").exists()

    out = train(config, torchrun=False)
    assert f"at step {saved}" in out
    assert_same_weights(baseline_1proc, final_state(runs))
    assert [int(r["step"]) for r in results(runs)] == [12, STEPS]  # no row lost or repeated


def test_s3_outage_mid_run_uploads_catch_up(store, moto_server, s3_bucket, tmp_path):
    runs = tmp_path / "runs"
    bucket = s3_bucket.removeprefix("s3://")
    config = write_config(tmp_path / "run.yaml", store, checkpoint={"storage": s3_bucket, "every_steps": 2})
    proc = start(config, torchrun=False)
    deadline = time.monotonic() + 120
    # Its start line comes after the resume lookup (which needs storage) and before the first step:
    # from there on every upload meets the outage.
    while "process(es) on" not in Path(proc.log.name).read_text():
        assert proc.poll() is None and time.monotonic() < deadline, Path(proc.log.name).read_text()[-3000:]
        time.sleep(0.05)
    moto_server.stop()
    try:
        wait_for(runs / "t" / "metrics.json", proc)  # training went on and finished while S3 was down
    finally:
        moto_server.start(buckets=(bucket,))  # a restarted moto is empty: uploads must redo what is needed
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    # (Whether a failed attempt gets logged depends on s3fs's own retries outlasting the outage.)

    from training import latest_checkpoint, load_config

    shutil.rmtree(runs)
    latest = latest_checkpoint(load_config(config))
    assert (latest.path, latest.step, latest.epoch, latest.remote) == \
        (f"{s3_bucket}/t/checkpoints/step_{STEPS:08d}.pt", STEPS, 1, True)


# ---- two processes, two nodes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_2proc(store, tmp_path_factory) -> tuple[Path, str]:
    """A 2-process gloo DDP run through the CLI, with a NAS-style storage folder, gradient accumulation and
    data.workers: auto (the runs that must match it load in the training process)."""
    tmp = tmp_path_factory.mktemp("baseline2")
    config = write_config(tmp / "run.yaml", store, data={"workers": "auto"}, train=TWO_PROC,
                          checkpoint={"storage": str(tmp / "nas")})
    out = train(config, "--nproc-per-node", "2")
    return tmp, out


def test_ddp_two_processes_learns_and_records(baseline_2proc):
    tmp, out = baseline_2proc
    count, why = worker_count("auto", 2)  # each of torchrun's 2 processes takes its share of this host's CPUs
    assert f"data.workers: {count} ({why})" in out and "over 2 process(es)" in why
    rows = results(tmp / "runs")
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    run = tmp / "runs" / "t"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "plot.png").stat().st_size > 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metric"] == "val_top1" and metrics["step"] == 6 and metrics["epoch"] == 2
    assert metrics["best"] == pytest.approx(max(float(r["val_top1"]) for r in rows), abs=1e-5)
    nas = tmp / "nas" / "t" / "checkpoints"  # the NAS copy: file, then its marker with the right sha256
    marker = json.loads((nas / "step_00000006.pt.complete").read_text())
    import hashlib

    assert hashlib.sha256((nas / "step_00000006.pt").read_bytes()).hexdigest() == marker["sha256"]
    assert (nas / "best.pt.complete").exists() and (nas / "metrics.json").exists()


def test_ddp_two_processes_kill9_resume_exact(store, baseline_2proc, tmp_path):
    tmp, _ = baseline_2proc
    baseline = torch.load(tmp / "runs" / "t" / "checkpoints" / "last.pt", weights_only=True)
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "run.yaml", store, train=TWO_PROC, checkpoint={"every_steps": 1})
    kill_at_random_checkpoint(config, runs, [1, 2, 4], "--nproc-per-node", "2")
    train(config, "--nproc-per-node", "2")
    final = final_state(runs)
    assert final["step"] == 6
    for key in baseline["model"]:
        assert torch.equal(baseline["model"][key], final["model"][key]), key


def test_two_nodes_rendezvous_match_two_processes(store, baseline_2proc, tmp_path):
    """--nnodes 2 with one process each (c10d rendezvous on 127.0.0.1) trains exactly like 2 local processes."""
    tmp, _ = baseline_2proc
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(tmp_path / "run.yaml", store, train=TWO_PROC)
    # torchrun sets OMP_NUM_THREADS=1 only for several processes per node; the float sums must match that run
    nodes = [start(config, "--nnodes", "2", "--node-rank", str(r), "--rdzv-endpoint", f"127.0.0.1:{port}",
                   env={"OMP_NUM_THREADS": "1"}) for r in (0, 1)]
    for node in nodes:
        code, out = finish(node)
        assert code == 0, out[-3000:]
    baseline = torch.load(tmp / "runs" / "t" / "checkpoints" / "last.pt", weights_only=True)
    final = final_state(tmp_path / "runs")
    for key in baseline["model"]:
        assert torch.equal(baseline["model"][key], final["model"][key]), key


def test_a_run_killed_on_two_processes_goes_on_on_one_with_its_epochs_and_lr_schedule(store, tmp_path):
    """Killed mid-epoch on 2 processes (global batch 32: 3 steps an epoch, 6 in all), resumed on 1 (global batch 16:
    6 steps an epoch): the rest of epoch 2 (64 samples) in 4 steps, the cosine going on from 4 of 6 steps at 8 of 12
    and ending at min_lr with the run's 2 epochs. Before, the schedule was rebuilt over 12 steps from step 4 (its lr
    jumped from 7.5e-4 back up to 1.9e-3), the epoch took rank 1's samples again, and the run ended at step 9 of the
    12 it planned, its lr at 4.4e-4. Resumed on 1 with train.accum_steps doubled instead, it keeps the global batch
    32 and the 2-process run's steps, train.max_steps too (before, another accum_steps was refused). A run that
    train.max_steps ends is refused in one line where the global batch changes."""
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "run.yaml", store, optim={"lr": 3e-3, "warmup_epochs": 0},
                          train={**TWO_PROC, "log_every": 1}, checkpoint={"every_steps": 1, "keep": 10})
    proc = start(config, "--nproc-per-node", "2")
    wait_for(runs / "t" / "checkpoints" / "step_00000004.pt.complete", proc)
    kill_group(proc)
    for path in (runs / "t" / "checkpoints").glob("*.pt*"):  # as if the kill came right after step 4's checkpoint
        if not path.name.startswith("step_00000004"):
            path.unlink()

    # A run that train.max_steps ends counts its length and schedule in optimizer steps, whose batch would change.
    # It resumes a copy of the killed run, and another copy keeps the global batch with twice the accumulation
    # (through the CLI, whose checks before torchrun refused it before), side by side with the resume below (each
    # is one process).
    for copy in ("capped-runs", "kept-runs"):
        shutil.copytree(runs, tmp_path / copy)
    capped = write_config(tmp_path / "capped.yaml", store, runs_dir=str(tmp_path / "capped-runs"),
                          optim={"lr": 3e-3, "warmup_epochs": 0},
                          train={**TWO_PROC, "log_every": 1, "max_steps": 5}, checkpoint={"every_steps": 1, "keep": 10})
    kept = write_config(tmp_path / "kept.yaml", store, runs_dir=str(tmp_path / "kept-runs"),
                        optim={"lr": 3e-3, "warmup_epochs": 0},
                        train={**TWO_PROC, "log_every": 1, "accum_steps": 4, "max_steps": 5},
                        checkpoint={"every_steps": 1, "keep": 10})
    refused, resumed, kept_batch = start(capped, torchrun=False), start(config, torchrun=False), start(kept)
    code, out = finish(refused)
    assert code == 2 and out.strip().splitlines()[-1] == (
        "error: train.max_steps 5 ends this run, and counts optimizer steps of 32 samples on 2 process(es) but of 16 "
        "on 1: its length and lr schedule would not go on where they were; resume it on 2 process(es)"), out[-3000:]

    code, out = finish(resumed)
    assert code == 0, out[-3000:]
    assert ("resumed on 1 process(es) from 2: global batch 32 -> 16, steps an epoch 3 -> 6, lr 0.003; epoch 2 goes "
            "on with its 64 samples not yet trained; the lr schedule goes on from the same point of the data: its step "
            "4 of 6 on 2 is step 8 of 12 on 1 (67% done); random streams restart from the seed") in out, out[-3000:]
    lrs = {int(m[0]): float(m[1]) for m in re.findall(r"step (\d+) epoch 2 loss \S+ lr (\S+)", out)}
    # lr = 1.5e-3 * (1 + cos(pi * t)), t the fraction done: 9/12, 10/12, 11/12, 12/12 of this plan's steps
    assert lrs == {5: 4.39e-4, 6: 2.01e-4, 7: 5.11e-5, 8: 0.0}
    assert [(int(r["epoch"]), int(r["step"])) for r in results(runs)] == [(1, 3), (2, 8)]
    assert float(results(runs)[-1]["lr"]) == 0.0 and final_state(runs)["step"] == 8

    code, out = finish(kept_batch)
    assert code == 0, out[-3000:]
    assert ("resumed on 1 process(es) from 2 (train.accum_steps 2 -> 4): global batch 32 -> 32, steps an epoch 3 -> "
            "3, lr 0.003; epoch 2 goes on with its 64 samples not yet trained; the lr schedule goes on from the same "
            "point of the data: its step 4 of 5 on 2 is step 4 of 5 on 1 (80% done); random streams restart from the "
            "seed") in out, out[-3000:]
    lrs = {int(m[0]): float(m[1]) for m in re.findall(r"step (\d+) epoch 2 loss \S+ lr (\S+)", out)}
    assert lrs == {5: 0.0}  # the 2-process run's step 5 of its 5 (train.max_steps)
    kept_runs = tmp_path / "kept-runs"
    assert [(int(r["epoch"]), int(r["step"])) for r in results(kept_runs)] == [(1, 3), (1, 5)]
    assert final_state(kept_runs)["step"] == 5
