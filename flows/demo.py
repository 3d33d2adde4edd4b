"""`shardtrain demo`: the nightly flow twice on the bundled photos, in Prefect's ephemeral mode.

Night one converts a fresh raw folder and trains from scratch; night two finds new images,
appends them, resumes from night one's checkpoint and decides whether to promote. Storage is
a local folder, as a NAS mount would be.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from rich.console import Console

import shards
import training
from shards import StoreError
from training import TrainError

if TYPE_CHECKING:
    from flows.nightly import NightlyResult

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# Written into --out so a rerun knows it may clear what an earlier demo left there.
STAMP = ".shardtrain-demo"

console = Console(soft_wrap=True)  # paths stay whole, so they can be copied


def use_ephemeral_prefect(home: Path) -> None:
    """Run flows without a server: Prefect starts a temporary one on a SQLite file in `home`.

    Set in the environment before prefect is imported, since it reads its settings then.
    """
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "true"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # The temporary server can take longer than the 20 s default to start on a busy small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    write_server_log_config(home)


def write_server_log_config(home: Path) -> None:
    """Prefect's default logging, except that the temporary server logs to `home/server.log`.

    On a busy machine the server's SQLite writes meet "database is locked"; it retries them, logging each
    with a traceback that would land in the middle of the demo's output. Prefect reads `logging.yml`
    from PREFECT_HOME in both processes, the demo's and the server's.
    """
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH

    config = yaml.safe_load(DEFAULT_LOGGING_SETTINGS_PATH.read_text())
    log = str(home / "server.log").replace("$", "$$")  # Prefect substitutes ${SETTING}s in this file
    config["handlers"]["server_file"] = {
        "class": "logging.FileHandler", "filename": log, "formatter": "standard", "delay": True,
    }
    for name in ("prefect.server", "uvicorn", "fastapi"):
        config["loggers"][name].update(handlers=["server_file"], propagate=False)
    home.mkdir(parents=True, exist_ok=True)
    (home / "logging.yml").write_text(yaml.safe_dump(config, sort_keys=False))


class DemoError(Exception):
    """A problem with the demo's own arguments; one line."""


def prepare_out(out: Path) -> None:
    """Start from an empty `out`; refuse to clear a non-empty folder that no demo made."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file; pick a folder")
    if out.exists() and any(out.iterdir()):
        if not (out / STAMP).exists():
            raise DemoError(f"--out {out} is not empty and was not made by `shardtrain demo`; pick another folder")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in its path, no permission
        raise DemoError(f"--out {out}: cannot make the folder: {e.strerror}") from None
    (out / STAMP).touch()


def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes (cleared first).")] = Path(
        "demo-output"
    ),
    images: Annotated[int, typer.Option(min=2, help="New images per class each night (a fifth held out as val).")] = 20,
    size: Annotated[int, typer.Option(min=32, help="Side of the generated images in pixels.")] = 64,
) -> None:
    """Two nights of the nightly flow on the bundled photos: convert, train, resume, promote."""
    try:
        run_demo(out.resolve(), images, size)
    except (DemoError, StoreError, TrainError) as e:
        Console(stderr=True).print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def run_demo(out: Path, images: int, size: int) -> None:
    prepare_out(out)
    use_ephemeral_prefect(out / "prefect")
    from flows.nightly import nightly_retrain  # after use_ephemeral_prefect: prefect reads settings on import
    from shards import samples  # imports cv2 and numpy, which `shardtrain --help` does without

    raw, store, storage, runs = out / "raw", out / "store", out / "storage", out / "runs"
    overrides = (f"runs_dir={runs}", f"data.image_size={size}")

    def night(number: int, start: int) -> NightlyResult:
        # Class folders with no train/val split, as most users' data comes: convert holds out a fifth as val.
        samples.make_imagefolder(raw, {"train": images}, size=size, seed=number, start=start, flat=True)
        console.rule(f"[bold]Night {number}[/]: {images} new images per class in {raw}")
        return nightly_retrain(
            raw_dir=str(raw), store=str(store), config=str(DEMO_CONFIG), storage=str(storage),
            epochs=1, overrides=overrides, val_fraction=0.2,
        )

    first = night(1, start=0)
    console.rule("[bold]The store after night 1[/]: shardtrain inspect, shardtrain verify")
    console.print_json(json.dumps(shards.inspect_store(str(store))))
    problems = shards.verify(str(store))
    if problems:
        raise StoreError(f"verify found {len(problems)} problems: {problems[0]}")
    console.print("verify: [green]ok[/] (every shard's size, sha256 and sample count match the manifest)")
    second = night(2, start=images)

    console.rule("[bold]Done[/]")
    for label, night_result in (("night 1", first), ("night 2", second)):
        decision = night_result.decision
        assert decision is not None  # each demo night adds images, so each trains and decides
        production = "none" if decision.production is None else f"{decision.production:.4f}"
        console.print(f"{label}: {decision.metric} {decision.candidate:.4f} vs production {production}"
                      f" -> {'promoted' if decision.promoted else 'kept production'}")
    cfg = training.load_config(DEMO_CONFIG, [*overrides, f"data.path={store}"])
    console.print(f"run directory:    {training.run_dir(cfg)}  (results.csv, plot.png, checkpoints/)")
    console.print(f"TensorBoard:      tensorboard --logdir {runs}")
    console.print(f"shard store:      {store}  (shardtrain inspect {store})")
    console.print(f"storage (NAS):    {storage}")
    console.print(f"production model: {second.decision.model if second.decision else '-'}")
    console.print(f"flow runs:        PREFECT_HOME={out / 'prefect'} prefect server start, then http://127.0.0.1:4200")
    console.print(f"server log:       {out / 'prefect' / 'server.log'}  (the temporary server's errors, if any)")
