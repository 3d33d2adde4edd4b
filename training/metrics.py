"""What a run records: results.csv (one row per eval), TensorBoard scalars, plot.png, metrics.json."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

RESULTS_FIELDS = ("epoch", "step", "train_loss", "val_loss", "val_top1", "val_top5",
                  "ema_val_top1", "ema_val_top5", "val_map50", "val_map", "ema_val_map50", "ema_val_map",
                  "val_knn_top1", "lr", "images_per_s")


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
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULTS_FIELDS)
        writer.writeheader()
        writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in RESULTS_FIELDS} for row in rows)
    os.replace(tmp, path)


def append_result(path: Path, row: dict) -> None:
    write_results(path, [*read_results(path), row])


def keep_results_until(path: Path, step: int) -> None:
    """Drop rows a killed run wrote after the checkpoint it is resumed from."""
    rows = read_results(path)
    write_results(path, [r for r in rows if r["step"] <= step])


def write_metrics(path: Path, metric: str, best: float | None, best_step: int | None,
                  final: dict, epoch: int, step: int, skipped_samples: int) -> None:
    data = {"metric": metric, "best": best, "best_step": best_step, "final": final, "epoch": epoch, "step": step,
            "skipped_samples": skipped_samples}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def plot(rows: list[dict], path: Path) -> None:
    """Loss and accuracy against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        ax_loss.plot(steps, [r[key] for r in rows], marker="o", label=key)
    for key in ("val_top1", "val_top5", "ema_val_top1", "val_map50", "val_map", "val_knn_top1"):
        if any(r.get(key) is not None for r in rows):
            ax_acc.plot(steps, [r.get(key) for r in rows], marker="o", label=key)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy (%) or mAP", title="validation")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
