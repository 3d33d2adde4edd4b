"""The `shardtrain` console script itself: a quick start (no torch, timm, prefect or albumentations for
--help and inspect), -h beside --help, --version, and no type shown on flags."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from flows.cli import app
from shards import ConvertOptions, convert, samples

HEAVY = {"torch", "timm", "torchvision", "albumentations", "prefect", "numpy", "matplotlib", "webdataset"}
# Runs the root app in a fresh interpreter, then names the heavy packages it imported.
PROBE = f"""
import sys
from flows.cli import app
try:
    app(sys.argv[1:], prog_name="shardtrain")
except SystemExit as e:
    code = e.code
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({sorted(HEAVY)!r}))
print("exit", code, "heavy", heavy, file=sys.stderr)
"""
COMMANDS = ["convert", "inspect", "verify", "train", "predict", "doctor", "demo"]


def shardtrain(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cli")
    src = samples.make_imagefolder(root / "src", per_class={"train": 2}, size=32, classes=["chelsea"])
    convert(ConvertOptions(src=str(src), dest=str(root / "store"), workers=1), progress=False)
    return str(root / "store")


@pytest.mark.parametrize("args", [["--help"], ["inspect", "STORE"]], ids=["help", "inspect"])
def test_help_and_inspect_import_nothing_heavy(store, args):
    args = [store if a == "STORE" else a for a in args]
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)
    assert result.stderr.strip().splitlines()[-1] == "exit 0 heavy []", result.stderr


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_dash_h_is_help_and_flags_show_no_type(command):
    result = shardtrain(*([command] if command else []), "-h")
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and "-h" in result.output
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output


def test_flags_are_listed_without_a_value():
    assert re.search(r"--append +add new inputs to an existing store", shardtrain("convert", "--help").output)


def test_version():
    result = shardtrain("--version")
    assert result.exit_code == 0 and result.output == f"shardtrain {version('shardtrain')}\n"
