"""The nightly flow's lr schedule: each night a warm restart over its own epochs (`continue_from_latest` sets
optim.schedule_start_epoch), and a night killed mid-way goes on with its own schedule.

Real runs (`python -m training`, the rank alone) of timm's `test_resnet` at 32 px on the small ImageFolder store:
12 steps of 8 samples a night (one epoch), warm-up a quarter of it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from flows.nightly import continue_from_latest
from shards import ConvertOptions, convert
from tests.test_training_runs import final_state, finish, kill_group, output, start, train, wait_for, write_config

LR = 3e-3


@pytest.fixture(scope="module")
def store(imagefolder_src, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("schedule-store") / "store"
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(dest), format="wds"), progress=False)
    return str(dest)


@pytest.fixture
def config(store, tmp_path) -> Path:
    return write_config(tmp_path / "run.yaml", store, optim={"lr": LR, "warmup_epochs": 0.25, "min_lr": 0.0},
                        train={"epochs": 1, "max_steps": None, "log_every": 1},
                        checkpoint={"every_steps": 1, "keep": 30})


def night(config: Path, runs: Path, epochs: int = 1) -> list[str]:
    """The overrides the nightly flow trains a night of `epochs` with."""
    return continue_from_latest(str(config), [f"runs_dir={runs}"], epochs)


def logged_lrs(out: str) -> dict[int, float]:
    """The lr after each step: the one the next step trains with."""
    return {int(step): float(lr) for step, lr in re.findall(r"step (\d+) epoch \d+ loss \S+ lr (\S+)", out)}


def night_lr(k: int, steps: int = 12) -> float:
    """The lr after step k of a night of `steps`: a linear warm-up over 3 steps (a quarter epoch) from 0, then a
    cosine to 0."""
    return LR * k / 3 if k < 3 else LR / 2 * (1 + math.cos(math.pi * (k - 3) / (steps - 3)))


def kill_after(proc, runs: Path, step: int) -> None:  # noqa: ANN001 (a Popen)
    """Kill the run right after its checkpoint of `step` (any later one removed, as if the kill came first)."""
    checkpoints = runs / "t" / "checkpoints"
    wait_for(checkpoints / f"step_{step:08d}.pt.complete", proc)
    kill_group(proc)
    for path in checkpoints.glob("step_*.pt*"):
        if int(path.name[5:13]) > step:
            path.unlink()


def test_each_night_warms_up_again_and_a_killed_night_goes_on_with_its_own_schedule(config, tmp_path):
    """Night 2 (steps 13 to 24) begins with its own warm-up (1e-3, 2e-3) to the peak 3e-3 and ends at min_lr with
    its epoch; before, it went on from half of one cosine over both nights (lr 1.5e-3 and less). Killed after its
    step 18 and resumed as the flow's rerun does (continue_from_latest again), it goes on with that schedule."""
    runs = tmp_path / "runs"
    train(config, *night(config, runs), torchrun=False)  # night 1, from scratch
    proc = start(config, *night(config, runs), torchrun=False)
    kill_after(proc, runs, 18)
    # the run may have logged a step or two past 18 before the kill landed: those are the ones the rerun retrains
    before_kill = {step: lr for step, lr in logged_lrs(output(proc)).items() if 12 < step <= 18}
    assert before_kill == pytest.approx({12 + k: night_lr(k) for k in range(1, 7)}, rel=1e-2, abs=1e-8)

    out = train(config, *night(config, runs), torchrun=False)
    assert "at step 18 (epoch 1, batch 6)" in out, out[-3000:]
    assert logged_lrs(out) == pytest.approx({12 + k: night_lr(k) for k in range(7, 13)}, rel=1e-2, abs=1e-8)
    assert final_state(runs)["step"] == 24


def test_a_night_of_two_epochs_killed_in_its_second_is_finished_by_the_rerun_on_its_own_schedule(config, tmp_path):
    """Night 2 of two epochs (steps 25 to 48), killed after step 40, in its second epoch: the rerun goes on from step
    40 with night 2's lr and ends at step 48, with the night. Before, it took the checkpoint's 3 epochs done for the
    night's start: a new warm-up from step 40 and two more epochs, to step 60."""
    runs = tmp_path / "runs"
    train(config, *night(config, runs, 2), torchrun=False)  # night 1: steps 1 to 24
    proc = start(config, *night(config, runs, 2), torchrun=False)
    kill_after(proc, runs, 40)

    out = train(config, *night(config, runs, 2), torchrun=False)
    assert "at step 40 (epoch 3, batch 4)" in out, out[-3000:]
    assert logged_lrs(out) == pytest.approx({24 + k: night_lr(k, 24) for k in range(17, 25)}, rel=1e-2, abs=1e-8)
    assert final_state(runs)["step"] == 48


def test_a_schedule_that_begins_past_the_run_s_data_is_refused_in_one_line(config, tmp_path):
    code, out = finish(start(config, "train.epochs=2", "optim.schedule_start_epoch=1", "resume=never",
                             torchrun=False))
    assert code == 2 and out.strip().splitlines()[-1] == (
        "error: optim.schedule_start_epoch 1 is past the run's position (0 epochs done): set it to at most 0"), out
