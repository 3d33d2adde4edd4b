"""SIGTERM to `shardtrain train` outside the loop's steps: the exit code still says what happened.

torchrun answers a SIGTERM with 143 whatever its workers did; the launcher must turn that into 75
(preempted, resume me) when the workers were still starting, and 0 when the run had finished.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shards import ConvertOptions, convert
from training import EXIT_PREEMPTED

SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))


@pytest.fixture(scope="module")
def store(imagefolder_src, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("preempt-store") / "store"
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(dest), format="wds"), progress=False)
    return str(dest)


def write_config(tmp_path: Path, store: str, max_steps: int) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "t", "runs_dir": str(tmp_path / "runs"), "seed": 0,
        "data": {"path": store, "image_size": 32, "batch_size": 8, "workers": 0, "pin_memory": False,
                 "channels_last": False},
        "model": {"name": "test_resnet"},
        "train": {"epochs": 1, "max_steps": max_steps},
    }))
    return config


def start(tmp_path: Path, store: str) -> subprocess.Popen:
    config = write_config(tmp_path, store, max_steps=2)
    log = open(tmp_path / "log.txt", "w+")
    proc = subprocess.Popen([SHARDTRAIN, "train", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log = log
    return proc


def wait_until(cond, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, "the run ended first"
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


def finish(proc: subprocess.Popen) -> tuple[int, str]:
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
