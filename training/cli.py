"""`shardtrain train CONFIG [key.sub=value ...]`: validate the config, then run it under torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from training.config import TrainError
from training.launch import launch

app = typer.Typer()


@app.command(context_settings={"allow_extra_args": False})
def train(
    config: Annotated[Path, typer.Argument(help="run config YAML (see configs/)")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="dotted overrides, e.g. train.max_steps=20")] = None,
    nproc_per_node: Annotated[int, typer.Option(help="processes (GPUs) on this node")] = 1,
    nnodes: Annotated[int, typer.Option(help="number of nodes")] = 1,
    node_rank: Annotated[int, typer.Option(help="this node's rank (0..nnodes-1)")] = 0,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(help="HOST:PORT of the rendezvous (multi-node)")] = None,
) -> None:
    """Train a timm model on a shard store with DDP (wraps torchrun); exit code 75 = preempted, resume me."""
    try:
        code = launch(config, overrides or [], nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                      rdzv_endpoint=rdzv_endpoint)
    except TrainError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)
