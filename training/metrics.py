"""What a run records: results.csv (one row per eval), TensorBoard scalars, plot.png, metrics.json."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from pydantic import BaseModel

SUMMARY_FILE = "metrics.json"


class RunSummary(BaseModel):
    """metrics.json: how a run ended. Written by the run's finish; read by the flows and the promotion."""

    metric: str  # eval.metric: the one best.pt and the nightly promotion go by (higher is better)
    best: float | None  # its best value over the run's evals
    best_step: int | None
    final: dict[str, float | int | None]  # the last results.csv row
    epoch: int  # epochs trained and evaluated
    step: int  # optimizer steps
    skipped_samples: int  # corrupt train samples skipped (data.on_error=skip), all ranks

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> RunSummary:
        return cls.model_validate_json(path.read_text())


def fmt(value: object) -> str:
    """A figure for a log line: floats to 6 significant digits (0.0005075, not 0.0005075000000000002)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def parse(value: str) -> float | int | None:
    if value == "":
        return None
    number = float(value)
    return int(number) if number.is_integer() and "." not in value and "e" not in value else number


def write_results(path: Path, rows: list[dict]) -> None:
    """The rows as CSV; the columns are the rows' keys (a run's task decides its metrics), in order of appearance."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in fields} for row in rows)
    os.replace(tmp, path)


def append_result(path: Path, row: dict) -> None:
    write_results(path, [*read_results(path), row])


def restore_results(path: Path, stored: list[dict] | None, step: int) -> None:
    """results.csv as it was at the checkpoint a run resumes from, whose last eval was at `step`: the checkpoint's
    own rows (`stored`: a run dir on a new machine has none), or for a checkpoint from before it held them the
    local rows; either way without the rows a killed run wrote after that checkpoint."""
    rows = read_results(path) if stored is None else stored
    write_results(path, [r for r in rows if r["step"] <= step])


def restore_events(folder: Path, stored: dict[str, bytes] | None) -> None:
    """Write back the checkpoint's TensorBoard event files that `folder` lacks (a run dir on a new machine; None:
    a checkpoint from before it held them). The new writer's purge_step hides their events past the checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (stored or {}).items():
        if not (folder / name).exists():
            (folder / name).write_bytes(data)


def plot(rows: list[dict], path: Path) -> None:
    """Loss and accuracy against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key in columns:
        if key.endswith("loss") or key.startswith(("val_", "ema_val_")):
            ax = ax_loss if key.endswith("loss") else ax_acc
            ax.plot(steps, [r.get(key) for r in rows], marker="o", label=key)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy (%) or mAP", title="validation")
    for ax in (ax_loss, ax_acc):
        if ax.lines:  # a run resumed after its last eval has no rows yet
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
