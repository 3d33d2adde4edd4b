"""What the flows publish to the Prefect UI: run metrics, the run summary with its plot, promotion decisions."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.promote import NightlyDecision
from training import RunSummary


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def publish_run(name: str, run_dir: Path, summary: RunSummary) -> None:
    """A table of the final metrics, and a markdown summary with the loss plot embedded."""
    create_table_artifact(
        [{"name": key, "value": value} for key, value in summary.final.items()],
        key=artifact_key(name, "metrics"),
        description=f"Final metrics of run {name} ({run_dir})",
    )
    lines = [
        f"# Run `{name}`",
        "",
        f"Best {summary.metric}: **{fmt(summary.best)}** at step {summary.best_step}; "
        f"finished at epoch {summary.epoch}, step {summary.step}.",
        "",
        f"Run directory: `{run_dir}` (results.csv, TensorBoard events, checkpoints).",
    ]
    plot = run_dir / "plot.png"
    if plot.exists():
        # Embedded as a data URI so the summary shows the plot wherever the UI runs.
        lines += ["", f"![loss and accuracy](data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()})"]
    create_markdown_artifact("\n".join(lines), key=artifact_key(name, "summary"), description=f"Run {name}")


def fmt(value: float | None) -> str:
    return "none yet" if value is None else f"{value:.4f}"


def publish_decision(decision: NightlyDecision) -> None:
    """The nightly promotion decision with both metrics, so the history of promotions is browsable."""
    lines = [
        f"# Nightly decision: {'promoted' if decision.promoted else 'kept production'}",
        "",
        "| | value |",
        "| --- | --- |",
        f"| metric | {decision.metric} |",
        f"| candidate (run `{decision.run}`, step {decision.step}) | {fmt(decision.candidate)} |",
        f"| production before | {fmt(decision.production)} |",
        f"| promoted | {decision.promoted} |",
        f"| production model | `{decision.model}` |",
    ]
    create_markdown_artifact("\n".join(lines), key="nightly-decision", description="Promote or keep")


def publish_no_op(raw_dir: str, store: str) -> None:
    create_markdown_artifact(
        f"# Nightly: nothing new\n\nNo new images in `{raw_dir}` for `{store}`; no training tonight.",
        key="nightly-decision",
        description="No new images",
    )
