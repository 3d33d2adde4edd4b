"""The checkpoint uploader against a NAS path that fails, then recovers (found by tests/faults/train_faults.py); storage
that cannot be reached at all."""

from __future__ import annotations

import threading

import pytest

from training.config import TrainError
from training.storage import Uploader, filesystem


def test_a_failed_upload_superseded_while_storage_is_down_is_dropped(tmp_path):
    """Storage down; step 2's upload fails; step 4 is saved meanwhile; storage returns: only step 4 goes up
    (a late copy of step 2 would cost a transfer and crowd a newer checkpoint out of storage's keep)."""
    nas = tmp_path / "nas"
    nas.write_text("not a folder")  # every write below it fails, as on an unmounted share
    local = tmp_path / "ckpt"
    local.mkdir()
    for step in (2, 4):
        (local / f"step_{step:08d}.pt").write_bytes(bytes([step]) * 1000)
    failed = threading.Event()
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if "failed" in line:
            failed.set()

    uploader = Uploader(str(nas), "t", log=log)
    uploader.submit(local / "step_00000002.pt", "checkpoints/step_00000002.pt", {"step": 2, "epoch": 0}, keep=2)
    assert failed.wait(30), lines
    uploader.submit(local / "step_00000004.pt", "checkpoints/step_00000004.pt", {"step": 4, "epoch": 0}, keep=2)
    nas.unlink()  # storage is back
    nas.mkdir(exist_ok=True)  # step 4's retry may have made it already
    assert uploader.wait(60), lines
    uploader.close()
    remote = nas / "t" / "checkpoints"
    assert sorted(p.name for p in remote.iterdir()) == ["step_00000004.pt", "step_00000004.pt.complete"], lines
    assert any("step_00000002.pt dropped" in line for line in lines), lines


def test_storage_that_connects_as_it_is_opened_and_fails_is_one_line():
    """fsspec's FTP filesystem connects when it is made: before, the refusal (or an unknown host) was a traceback
    from every rank."""
    with pytest.raises(TrainError) as err:
        filesystem("ftp://127.0.0.1:9/checkpoints")
    assert str(err.value) == ("checkpoint.storage: cannot reach ftp://127.0.0.1:9/checkpoints: ConnectionRefusedError: "
                              "[Errno 111] Connection refused")
