"""`shardtrain train CONFIG [key.sub=value ...]`: validate the config, then run it under torchrun."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from training.config import TrainError
from training.launch import launch
from training.preempt import EXIT_PREEMPTED, exit_now

app = typer.Typer()


@app.command(context_settings={"allow_extra_args": False})
def train(
    config: Annotated[Path, typer.Argument(help="run config YAML (see configs/)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. train.max_steps=20")] = None,
    nproc_per_node: Annotated[int, typer.Option(help="processes (GPUs) on this node")] = 1,
    nnodes: Annotated[int, typer.Option(help="number of nodes")] = 1,
    node_rank: Annotated[int, typer.Option(help="this node's rank (0..nnodes-1)")] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="HOST:PORT of the rendezvous (multi-node)")] = None,
) -> None:
    """Train a timm model on a shard store with DDP (wraps torchrun); exit code 75 = preempted, resume me."""
    try:
        with preempted_on_sigterm():
            code = launch(config, overrides or [], nproc_per_node=nproc_per_node, nnodes=nnodes,
                          node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, ignore_signals_after=True)
    except TrainError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


@contextlib.contextmanager
def preempted_on_sigterm() -> Iterator[None]:
    """Until `launch` forwards SIGTERM to torchrun, a SIGTERM finds no run started: exit EXIT_PREEMPTED ("run me
    again"), as during the CLI's imports (flows/cli.py), not a signal death.

    Once torchrun has ended, the exit code is decided, and stop signals are ignored until the process ends
    (`launch(ignore_signals_after=True)`; here too for a launch that raised): the interpreter's exit (torch
    imported) takes a moment, and a signal in it would turn a finished run's 0 into a signal death (SIGINT -2,
    SIGTERM -15), or in the launch's own return into 130 or 75."""
    signal.signal(signal.SIGTERM, lambda *_: exit_now(EXIT_PREEMPTED))
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


@app.command()
def predict(
    config: Annotated[Path, typer.Argument(
        help="a classify or detect config YAML, for the thresholds (the model and its input: the checkpoint's)")],
    checkpoint: Annotated[str, typer.Argument(help="checkpoint file or URL, e.g. runs/NAME/checkpoints/best.pt")],
    images: Annotated[list[Path], typer.Argument(help="image files or folders of images")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("predictions"),
    format: Annotated[str, typer.Option(help="json (out/predictions.json) or, detect, yolo (out/labels/*.txt)")
                      ] = "json",
    draw: Annotated[bool, typer.Option(help="detect: also write the images with their boxes to out/images/")] = False,
    conf: Annotated[float | None, typer.Option(
        help="detect: minimum score [default: detect.predict_score_thresh]")] = None,
    top: Annotated[int, typer.Option(help="classify: the most probable classes to list per image")] = 5,
) -> None:
    """A checkpoint on new images: a classifier's top classes, or a detector's boxes (thresholds from detect:)."""
    from training.config import load_config
    from training.predict import predict as run_predict

    try:
        records = run_predict(load_config(config), checkpoint, images, out, fmt=format, draw_boxes=draw, conf=conf,
                              top=top)
    except TrainError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    failed = sum("error" in r for r in records)
    boxes = sum(len(r.get("detections", ())) for r in records)
    found = f", {boxes} boxes" if any("detections" in r for r in records) else ""
    typer.echo(f"{len(records) - failed} images{found} -> {out}" + (f"; {failed} unreadable" if failed else ""))
    raise typer.Exit(1 if failed else 0)


@app.command()
def export(
    config: Annotated[Path, typer.Argument(
        help="a config YAML of the run's task (the model and its input: the checkpoint's)")],
    checkpoint: Annotated[str, typer.Argument(help="checkpoint file or URL, e.g. runs/NAME/checkpoints/best.pt")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("export"),
    format: Annotated[str | None, typer.Option(
        help="safetensors (classify, dino: timm's layout) or onnx (classify, detect); default: safetensors, "
             "onnx for detect")] = None,
) -> None:
    """A checkpoint as what a serving side loads: safetensors or ONNX, with config.json (class names, preprocessing)."""
    from training.config import load_config
    from training.export import export as run_export

    try:
        files = run_export(load_config(config), checkpoint, out, format)
    except TrainError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{', '.join(f.name for f in files)} -> {out}")
