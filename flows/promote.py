"""The production model in storage: `<storage>/models/production/{model.pt, metrics.json}` and its exports
(`model.safetensors`, `model.onnx`, `config.json`: see training/export.py).

The marker `model.pt.complete` is removed before and written after the files, so a
reader that finds the marker finds a complete, matching set (never half a promotion).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from fsspec.core import url_to_fs
from pydantic import BaseModel

from training import RunSummary

MARKER = "model.pt.complete"


class NightlyDecision(BaseModel):
    """Whether a night's run replaced the production model, on what evidence (the `nightly-decision` artifact)."""

    promoted: bool
    metric: str  # eval.metric, higher is better
    candidate: float | None  # the run's best value of it
    production: float | None  # production's before the decision; None when nothing was promoted yet
    run: str
    step: int | None  # the run's step of its best checkpoint
    model: str  # URL of the production model after the decision


def production_url(storage: str) -> str:
    return storage.rstrip("/") + "/models/production"


def read_production(storage: str) -> RunSummary | None:
    """The promoted model's metrics.json, or None when nothing was promoted yet."""
    fs, root = url_to_fs(production_url(storage))
    if not fs.exists(f"{root}/{MARKER}"):
        return None
    return RunSummary.model_validate_json(fs.cat_file(f"{root}/metrics.json"))


def beats(candidate: RunSummary, production: RunSummary | None) -> bool:
    """Whether the candidate's best eval metric (higher is better) beats production's."""
    if candidate.best is None:
        return False
    return production is None or production.best is None or candidate.best > production.best


def promote(storage: str, model: Path, metrics: RunSummary, exports: Sequence[Path] = ()) -> str:
    """Copy `model`, its `exports` and its metrics to production, marker last; returns the model's URL."""
    fs, root = url_to_fs(production_url(storage))
    fs.makedirs(root, exist_ok=True)
    if fs.exists(f"{root}/{MARKER}"):
        fs.rm(f"{root}/{MARKER}")
    fs.put_file(str(model), f"{root}/model.pt")
    for path in exports:
        fs.put_file(str(path), f"{root}/{path.name}")
    fs.pipe_file(f"{root}/metrics.json", metrics.model_dump_json(indent=2).encode())
    marker = {"sha256": hashlib.sha256(model.read_bytes()).hexdigest(), "metric": metrics.metric, "best": metrics.best}
    fs.pipe_file(f"{root}/{MARKER}", json.dumps(marker).encode())
    return production_url(storage) + "/model.pt"
