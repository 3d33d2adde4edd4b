"""The `shardtrain` console script: each package's commands, merged into one typer app.

Start-up imports only what the commands' signatures need (typer, rich, pydantic, fsspec): torch, timm,
albumentations and prefect are imported by the commands that use them, so `--help` and `inspect` are quick.
"""

import atexit
import gc
import os
import signal

# A scheduler's SIGTERM while the commands are still importing finds nothing started: exit with the preemption
# code (training.EXIT_PREEMPTED, "run me again"), not a signal death; a Ctrl-C exits quietly, without an import's
# traceback. At once (os._exit), as training.preempt.exit_now does and says why; nothing is printed yet. Once
# imported, the defaults return; `shardtrain train` installs its own until torchrun has the signal.
signal.signal(signal.SIGTERM, lambda *_: os._exit(75))
signal.signal(signal.SIGINT, lambda *_: os._exit(128 + signal.SIGINT))

from importlib.metadata import version  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from flows.demo import demo  # noqa: E402
from shards.cli import app as shards_app  # noqa: E402
from training.cli import app as training_app  # noqa: E402
from training.doctor import app as doctor_app  # noqa: E402

signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)
# The interpreter's last garbage collection walks every object torch and timm made: seconds on a busy
# host, after a command's work (and a second signal's "at once") is done. Objects frozen are left to the OS.
atexit.register(gc.freeze)

app = typer.Typer(
    help="Raw image folders to verified shards, and timm models trained on them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(shards_app)
app.add_typer(doctor_app)
app.add_typer(training_app)
app.command()(demo)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"shardtrain {version('shardtrain')}")
        raise typer.Exit()


@app.callback()
def main(
    _version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                           help="Show the version and exit.")] = False,
) -> None:
    """Options of shardtrain itself; the work is done by the commands."""
