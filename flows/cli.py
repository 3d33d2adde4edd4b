"""The `shardtrain` console script: each package's commands, merged into one typer app."""

import signal
import sys

# Importing the commands takes seconds (torch, prefect, albumentations). A scheduler's SIGTERM in that window
# finds nothing started: exit with the preemption code (training.EXIT_PREEMPTED, "run me again"), not a
# signal death. Once imported, the default returns; `shardtrain train` installs its own forwarding.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))

import typer  # noqa: E402

from flows.demo import demo  # noqa: E402
from shards.cli import app as shards_app  # noqa: E402
from training.cli import app as training_app  # noqa: E402
from training.doctor import app as doctor_app  # noqa: E402

signal.signal(signal.SIGTERM, signal.SIG_DFL)

app = typer.Typer(
    help="Raw image folders to verified shards, and timm models trained on them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(shards_app)
app.add_typer(doctor_app)
app.add_typer(training_app)
app.command()(demo)
