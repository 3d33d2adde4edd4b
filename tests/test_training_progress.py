"""What a run prints and records as it goes: epochs counted alike in step and eval lines, images/s in
results.csv even when no log step came before the eval, figures printed rounded."""

from __future__ import annotations

import torch

from training import metrics
from training.dist import World
from training.profiling import covered
from training.progress import Reporter

LR = 0.0005075000000000002  # what a schedule hands over: printed raw before


def train_steps(reporter: Reporter, epoch: int, first: int, steps: int, log_every: int) -> None:
    reporter.start_epoch(epoch)
    for step in range(first + 1, first + steps + 1):
        reporter.add_loss(torch.tensor(2.0), 8)
        reporter.step(step, LR, torch.tensor(1.0), log_now=step % log_every == 0)


def test_step_and_eval_lines_agree_and_results_have_images_per_s(tmp_path, capsys):
    world = World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))
    reporter = Reporter(tmp_path, world, total_steps=14, step=0, log_every=7)
    try:
        train_steps(reporter, epoch=0, first=0, steps=7, log_every=7)
        reporter.eval_row(1, 7, {"val_top1": 100 / 3}, LR)
        # A second epoch shorter than log_every: no log step since the last eval.
        train_steps(reporter, epoch=1, first=7, steps=3, log_every=7)
        reporter.eval_row(2, 10, {"val_top1": 50.0}, LR)
    finally:
        reporter.close()
    lines = capsys.readouterr().out.splitlines()
    step_line = next(line for line in lines if line.startswith("step 7 "))
    assert step_line.startswith("step 7 epoch 1 ")  # the first epoch, as the eval after it says
    evals = [line for line in lines if line.startswith("eval ")]
    assert evals[0].startswith("eval epoch 1 step 7 train_loss 2 val_top1 33.3333 lr 0.0005075 images_per_s ")
    rows = metrics.read_results(tmp_path / "results.csv")
    assert [(r["epoch"], r["step"], r["lr"]) for r in rows] == [(1, 7, 0.0005075), (2, 10, 0.0005075)]
    assert all(r["images_per_s"] > 0 for r in rows), rows  # the second row had 0.0: no log step before it
    assert evals[1].endswith(f"images_per_s {rows[1]['images_per_s']:g}")


def test_a_row_after_no_training_has_no_images_per_s(tmp_path):
    """An eval with no step since the last row (a resumed run whose last epoch only lacked its eval)."""
    world = World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))
    reporter = Reporter(tmp_path, world, total_steps=1, step=1, log_every=10)
    try:
        reporter.eval_row(1, 1, {"val_top1": 50.0}, LR)
    finally:
        reporter.close()
    assert metrics.read_results(tmp_path / "results.csv")[0]["images_per_s"] is None


def test_fmt():
    assert [metrics.fmt(v) for v in (LR, 100 / 3, 2.0, 7, None)] == \
        ["0.0005075", "33.3333", "2", "7", "None"]


def test_the_plot_of_a_run_with_no_rows_yet_warns_nothing(tmp_path):
    """A run resumed after its last eval ends with no results rows; its plot is still written, silently."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.plot([], tmp_path / "plot.png")
        metrics.plot([{"step": 4, "train_loss": 1.5, "val_loss": 1.2, "val_top1": 40.0}], tmp_path / "plot2.png")
    assert (tmp_path / "plot.png").stat().st_size > 0 and (tmp_path / "plot2.png").stat().st_size > 0


def test_profiled_kernels_that_overlap_on_two_streams_count_once():
    # a step's stream busy 0-10 and 12-20; a decode stream's kernel at 8-13 covers part of the gap
    assert covered([(0, 10), (12, 20), (8, 13)]) == 20
    assert covered([(5, 6), (0, 10)]) == 10  # one inside another
    assert covered([(0, 1), (2, 3)]) == 2 and covered([]) == 0
