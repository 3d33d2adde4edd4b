"""Two nightly runs never overlap in Prefect's ephemeral mode either (no server: each process
starts a temporary one on the same SQLite file, which holds the global concurrency limit)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import shards
from shards import samples
from tests.servers import ephemeral_prefect_env

REPO = Path(__file__).resolve().parents[1]

# Each script freezes gc at exit, as the shardtrain CLI does: the interpreter's last collection walks everything
# Prefect made (a second or more); the test waits for both processes to end.
HOLD = """
import atexit, gc, sys, time
from pathlib import Path
atexit.register(gc.freeze)
from prefect.concurrency.sync import concurrency
from flows.nightly import NIGHTLY_LIMIT, ensure_nightly_limit
ensure_nightly_limit()
with concurrency(NIGHTLY_LIMIT, occupy=1, strict=True):
    print("held", flush=True)
    while not Path(sys.argv[1]).exists():
        time.sleep(0.2)
"""

NIGHTLY = """
import atexit, gc, sys, time
from pathlib import Path
atexit.register(gc.freeze)
from flows.nightly import nightly_retrain
while not Path(sys.argv[4]).exists():  # imported while the holder starts; the flow runs once the slot is held
    time.sleep(0.1)
result = nightly_retrain(raw_dir=sys.argv[1], store=sys.argv[2], config="configs/demo.yaml", storage=sys.argv[3])
print(result.model_dump())
"""


def python(code: str, *args: str, env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    """Start `python -c code args`; its output lines collect in the returned list as they come."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    lines: list[str] = []
    stdout = proc.stdout
    assert stdout is not None  # stdout=PIPE
    threading.Thread(target=lambda: lines.extend(stdout), daemon=True).start()
    return proc, lines


def wait_for_line(proc: subprocess.Popen, lines: list[str], text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert proc.poll() is None or any(text in line for line in lines), f"exited early:\n{''.join(lines)}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout}s:\n{''.join(lines)}"
        time.sleep(0.2)


@pytest.mark.slow
def test_nightly_waits_for_the_slot_in_ephemeral_mode(tmp_path):
    raw, store, release = tmp_path / "raw", tmp_path / "store", tmp_path / "release"
    samples.make_imagefolder(raw, per_class={"train": 2, "val": 1}, size=32)
    shards.convert(shards.ConvertOptions(src=str(raw), dest=str(store), workers=1), progress=False)
    # What a night that trained on this store leaves (flows/nightly.py): tonight has nothing new to train on.
    marker = tmp_path / "storage" / "nightly" / "trained.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"store": str(store), "version": 1}))
    env = ephemeral_prefect_env(tmp_path / "prefect")

    go = tmp_path / "go"
    holder, held = python(HOLD, str(release), env=env)
    # Started together (each takes seconds to import): the nightly's flow starts once the holder holds the slot.
    nightly, lines = python(NIGHTLY, str(raw), str(store), str(tmp_path / "storage"), str(go), env=env)
    try:
        wait_for_line(holder, held, "held")
        go.touch()
        wait_for_line(nightly, lines, "acquiring the 'nightly-retrain' concurrency slot")
        time.sleep(5)
        before_release = list(lines)
    finally:
        go.touch()
        release.touch()
    assert nightly.wait(timeout=300) == 0, "".join(lines)
    assert holder.wait(timeout=60) == 0, "".join(held)
    time.sleep(0.5)  # the reader thread takes the last lines
    # Nothing ran while the slot was held; then it found nothing new in raw/ and finished.
    assert not any("convert_task" in line for line in before_release), "".join(before_release)
    output = "".join(lines)
    assert "nothing to train tonight" in output
    assert "{'trained': False, 'added': 0, 'decision': None}" in output
