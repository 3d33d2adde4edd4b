"""The checkpoint uploader against a NAS path that fails, then recovers (found by tests/faults/train_faults.py)."""

from __future__ import annotations

import threading

from training.storage import Uploader


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
