"""A nightly run that died after its append (a host crash) leaves samples no model was trained on:
the next run, finding nothing new to append, still trains on them (bench/faults_prefect.py kills it for real)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import shards
from servers import ephemeral_prefect_env
from shards import samples

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = {"train": 2, "val": 1}

NIGHTLY = """
import sys
from flows.nightly import nightly_retrain
overrides = ("data.image_size=32", "data.batch_size=8", "data.workers=0", f"runs_dir={sys.argv[4]}")
print("RESULT", nightly_retrain(raw_dir=sys.argv[1], store=sys.argv[2], config="configs/demo.yaml",
                                storage=sys.argv[3], overrides=overrides).model_dump())
"""


def nightly(tmp_path: Path) -> dict:
    """One nightly-retrain run in Prefect's ephemeral mode; returns the flow's result."""
    env = ephemeral_prefect_env(tmp_path / "prefect")
    args = [str(tmp_path / name) for name in ("raw", "store", "storage", "runs")]
    out = subprocess.run([sys.executable, "-c", NIGHTLY, *args], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    [line] = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    return ast.literal_eval(line.removeprefix("RESULT "))


@pytest.mark.slow
def test_appended_but_untrained_samples_are_trained_next_night(tmp_path):
    samples.make_imagefolder(tmp_path / "raw", per_class=PER_CLASS, size=32)
    assert nightly(tmp_path)["trained"] is True

    # What a run killed after its append leaves: new samples in the store, no training on them.
    samples.make_imagefolder(tmp_path / "raw", per_class=PER_CLASS, size=32, seed=1, start=100)
    appended = shards.convert(shards.ConvertOptions(src=str(tmp_path / "raw"), dest=str(tmp_path / "store"),
                                                    append=True, workers=1), progress=False)
    assert appended.added > 0

    rerun = nightly(tmp_path)
    assert rerun["trained"] is True and rerun["added"] == 0
    # Trained on that store version now: the night after is a no-op again.
    assert nightly(tmp_path)["trained"] is False
