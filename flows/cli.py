"""The `shardtrain` console script: each package's commands, merged into one typer app."""

import typer

from flows.demo import demo
from shards.cli import app as shards_app
from training.doctor import app as doctor_app
from training.cli import app as training_app

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
