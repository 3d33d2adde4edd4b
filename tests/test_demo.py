"""`shardtrain demo`: two nights of the nightly flow in Prefect's ephemeral mode, on a small setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shards
import training
from shards import samples

SHARDTRAIN = Path(sys.executable).with_name("shardtrain")
REPO = Path(__file__).resolve().parents[1]


def run_demo(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    return subprocess.run(
        [str(SHARDTRAIN), "demo", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_demo_two_nights(tmp_path):
    out = tmp_path / "demo"
    result = run_demo("--out", str(out), "--images", "5", "--size", "32")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output

    # The store: night 1's images, then night 2's appended as a new version; verified.
    per_night = len(samples.class_names()) * 5
    manifest = shards.read_manifest(str(out / "store"))
    assert (manifest.version, manifest.totals.samples) == (2, 2 * per_night)
    assert shards.verify(str(out / "store"), deep=True) == []
    assert '"format": "wds"' in output and "verify: ok" in output

    # Training: night 2 resumed night 1's run and trained one more epoch.
    cfg = training.load_config(REPO / "configs/demo.yaml", [f"runs_dir={out / 'runs'}"])
    metrics = json.loads((training.run_dir(cfg) / "metrics.json").read_text())
    assert metrics["epoch"] == 2
    assert "resumed from" in output
    # Night 1's one epoch is all warmup: said plainly, not as timm's "Cosine annealing ... no effect" warning.
    assert "optim.warmup_epochs 1 covers all" in output and "Cosine annealing" not in output
    in_storage = training.latest_checkpoint(
        training.load_config(
            REPO / "configs/demo.yaml", [f"runs_dir={tmp_path / 'none'}", f"checkpoint.storage={out / 'storage'}"]
        )
    )
    assert in_storage.remote and in_storage.step == metrics["step"]

    # Production: a complete model whose metrics are the best promoted so far.
    production = out / "storage" / "models" / "production"
    assert (production / "model.pt.complete").exists()
    promoted = json.loads((production / "metrics.json").read_text())
    model = torch.load(production / "model.pt", map_location="cpu", weights_only=True)
    assert set(model) >= {"model", "step", "epoch", "config"}
    assert promoted["best"] == metrics["best"]
    assert f"production model: {production / 'model.pt'}" in output
    assert f"tensorboard --logdir {out / 'runs'}" in output


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = run_demo("--out", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("error: --out") and "Traceback" not in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    for out, what in ((tmp_path / "precious.txt", " is a file; pick a folder"),
                      (tmp_path / "precious.txt" / "sub", ": cannot make the folder: Not a directory")):
        result = run_demo("--out", str(out))
        assert (result.returncode, result.stderr) == (1, f"error: --out {out}{what}\n")


def test_the_temporary_servers_log_goes_to_its_file_and_the_demos_own_to_the_console(tmp_path):
    # The server retries SQLite "database is locked" writes, logging a traceback each time; on a busy
    # machine one landed in the middle of the demo's output. Log as the server's process would.
    home = tmp_path / "prefect"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    write = f"from pathlib import Path; import flows.demo as d; d.use_ephemeral_prefect(Path({str(home)!r}))"
    subprocess.run([sys.executable, "-c", write], env=env, cwd=REPO, check=True)
    log = (
        "import logging, prefect\n"
        "from prefect.logging.configuration import setup_logging\n"
        "setup_logging()\n"
        "try:\n    raise RuntimeError('database is locked')\n"
        "except RuntimeError:\n"
        "    logging.getLogger('prefect.server.services.task_run_recorder').exception('Error flushing 3 events')\n"
        "logging.getLogger('prefect').warning('flow says hello')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", log], env={**env, "PREFECT_HOME": str(home)}, cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "flow says hello" in result.stderr
    assert "Traceback" not in result.stderr and "Error flushing" not in result.stderr
    server_log = (home / "server.log").read_text()
    assert "Error flushing 3 events" in server_log and "RuntimeError: database is locked" in server_log
