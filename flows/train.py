"""The `train` flow: torchrun via training.launch, its output in the flow's log, the run's metrics published."""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import PositiveInt

import training
from flows.artifacts import publish_run


@flow(name="train", validate_parameters=True)
def train(config: str, overrides: tuple[str, ...] = (), nproc_per_node: PositiveInt = 1) -> training.RunSummary:
    """Train the run described by the YAML `config` (plus dotted `overrides`); returns its metrics.json."""
    cfg = training.load_config(config, overrides)  # the run dir; a bad key fails here, in one line
    code = training.launch(config, overrides, nproc_per_node=nproc_per_node, stream=get_run_logger().info)
    if code != 0:
        raise training.TrainError(f"torchrun exited with code {code} (its output is in this flow's log)")
    run_dir = training.run_dir(cfg)
    summary = training.RunSummary.read(run_dir / training.SUMMARY_FILE)
    publish_run(cfg.name, run_dir, summary)
    return summary
