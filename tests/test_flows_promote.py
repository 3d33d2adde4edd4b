"""The production model in storage (local folder and moto S3): promote, read back, never half."""

from __future__ import annotations

import hashlib
import json

import fsspec
import pytest

from flows.promote import beats, promote, read_production
from training import RunSummary


def metrics(best: float) -> RunSummary:
    return RunSummary(metric="val_top1", best=best, best_step=12, final={}, epoch=2, step=12, skipped_samples=0)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "storage")
    return request.getfixturevalue("s3_bucket") + "/shardtrain"


def test_promote_then_read_back(storage, tmp_path):
    model = tmp_path / "best.pt"
    model.write_bytes(b"weights-1")
    assert read_production(storage) is None

    url = promote(storage, model, metrics(40.0))
    assert url == storage + "/models/production/model.pt"
    assert read_production(storage) == metrics(40.0)

    model.write_bytes(b"weights-2")
    promote(storage, model, metrics(55.5))
    fs, root = fsspec.core.url_to_fs(storage + "/models/production", skip_instance_cache=True)
    assert fs.cat_file(f"{root}/model.pt") == b"weights-2"
    marker = json.loads(fs.cat_file(f"{root}/model.pt.complete"))
    assert marker == {"sha256": hashlib.sha256(b"weights-2").hexdigest(), "metric": "val_top1", "best": 55.5}
    assert read_production(storage).best == 55.5


def test_without_its_marker_there_is_no_production_model(storage, tmp_path):
    """A promotion cut off after the files but before the marker is not visible to readers."""
    model = tmp_path / "best.pt"
    model.write_bytes(b"weights")
    promote(storage, model, metrics(40.0))
    fs, root = fsspec.core.url_to_fs(storage + "/models/production", skip_instance_cache=True)
    fs.rm(f"{root}/model.pt.complete")
    assert read_production(storage) is None


def test_only_a_better_metric_beats_production():
    assert beats(metrics(10.0), None)
    assert beats(metrics(50.1), metrics(50.0))
    assert not beats(metrics(50.0), metrics(50.0))
    assert not beats(metrics(49.0), metrics(50.0))
