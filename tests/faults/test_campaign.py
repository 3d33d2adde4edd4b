"""The fault campaign: kill, corrupt and cut off shardtrain on purpose, and count what survived.

    .venv/bin/python -m pytest tests/faults -m faults -s                    # every part, 20 kills each (hours)
    .venv/bin/python -m pytest tests/faults -m faults -s -k data --kills 5
    .venv/bin/python -m pytest tests/faults -m faults -s -k preemptions --kills 5   # the delivery modes alone
    ... -k preemptions --kills 5 --fault-budget-s 3600    # no trial started after an hour: a cut-short campaign

Each part (`train_faults`, `data_faults`, `prefect_faults`) exposes `run(work, kills, seed) -> dict` of flat
figures (the preemption trials alone: `train_faults.run_preemptions`) and prints one line per trial (`-s`
shows them as they come). Each test appends its figures as one JSON line to bench/results/faults.jsonl,
whether or not they pass, then fails on any trial that went wrong. docs/RELIABILITY.md reads the figures.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.common import machine, record
from tests.faults import data_faults, prefect_faults, train_faults

# Parts take from minutes to hours: past the suite's per-test timeout.
pytestmark = [pytest.mark.faults, pytest.mark.timeout(6 * 3600)]


def campaign(part: str, run: Callable[..., dict], work: Path, config: pytest.Config) -> dict:
    """Run one part and record its figures (bench/results/faults.jsonl)."""
    kills, seed = config.getoption("kills"), config.getoption("fault_seed")
    started = time.monotonic()
    figures = run(work / part, kills=kills, seed=seed)
    record("faults", {"bench": "faults", "parts": [part], "kills": kills, "seed": seed, **figures,
                      "wall_s": round(time.monotonic() - started), **machine()})
    return figures


def assert_preemptions(figures: dict) -> None:
    for mode in train_faults.MODES:
        key = "preempt_" + mode.replace("-", "_")
        assert figures[f"{key}_signals"] > 0, mode
        assert figures[f"{key}_ok"] == figures[f"{key}_signals"], mode
        assert figures[f"{key}_identical"] == figures[f"{key}_signals"], mode


def test_preemptions(tmp_path, pytestconfig):
    budget_s = pytestconfig.getoption("fault_budget_s")
    figures = campaign("preempt", functools.partial(train_faults.run_preemptions, budget_s=budget_s), tmp_path,
                       pytestconfig)
    assert_preemptions(figures)
    assert all(figures[f"preempt_{m.replace('-', '_')}_signals"] == pytestconfig.getoption("kills")
               for m in train_faults.MODES)


def test_train(tmp_path, pytestconfig):
    figures = campaign("train", train_faults.run, tmp_path, pytestconfig)
    assert figures["train_kills_identical"] == figures["train_kills"]
    assert_preemptions(figures)
    assert figures["storage_outage_runs_ok"] == figures["storage_outage_runs"]
    assert figures["partial_checkpoints_loaded"] == 0
    assert figures["partial_resumes_identical"] == figures["partial_trials"]
    assert figures["nas_readonly_ok"] in (True, None)  # None: this machine cannot bind-mount


def test_data(tmp_path, pytestconfig):
    figures = campaign("data", data_faults.run, tmp_path, pytestconfig)
    assert figures["convert_kills_ok"] == figures["convert_kills"]
    assert figures["append_kills_ok"] == figures["append_kills"]
    assert figures["bad_inputs_wrong"] == figures["bad_inputs_crashed"] == 0
    assert figures["corruptions_caught"] == figures["corruptions"]
    assert figures["index_corruptions_caught"] == figures["index_corruptions"]
    assert figures["corruptions_crashed_verify"] == figures["corrupt_train_lmdb_cut_crashed"] == 0


def test_prefect(tmp_path, pytestconfig):
    figures = campaign("prefect", prefect_faults.run, tmp_path, pytestconfig)
    assert figures["prefect_recovered"] == figures["prefect_worker_kills"]
    assert figures["prefect_dead_runs_crashed"] == figures["prefect_worker_kills"]
