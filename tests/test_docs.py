"""The docs keep up with the code: the generated config reference, the README's contract, relative links."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from training import config_reference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == config_reference.render(), \
        "docs/config.md is behind the config models: run python -m training.config_reference > docs/config.md"


def test_config_reference_lists_every_key_of_every_section():
    text = config_reference.render()
    for key in ["name", "data.path", "data.augment.max_aspect", "optim.lr_base_batch", "train.ema_decay",
                "checkpoint.preempt_timeout", "eval.knn_temperature", "detect.head", "dino.koleo_weight"]:
        assert f"| `{key}` |" in text
    assert "| `optim.lr` | float, > 0 | `0.001` |" in text
    assert "| `data.decode` | auto \\| cpu \\| gpu \\| hw \\| dali | `auto` |" in text
    assert "Only in `task: dino` runs" in text and "Only in `task: detect` runs" in text


def test_a_key_without_a_description_is_refused():
    class Section(BaseModel):
        documented: int = Field(1, description="described")
        undocumented: int = 2

    with pytest.raises(ValueError, match="config key x.undocumented has no description"):
        config_reference.section("x.", "", Section)


def test_readme_is_an_entry_point_under_150_lines():
    assert len(README.read_text().splitlines()) < 150


def test_quickstart_block_holds_exactly_the_two_commands():
    text = README.read_text()
    section = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    blocks = FENCE.findall(section)
    assert len(blocks) == 1
    commands = [line.strip() for line in blocks[0].splitlines()[1:-1] if line.strip()]
    assert commands == ["./run demo", "./run test"]


def heading_ids(path: Path) -> set[str]:
    """The ids GitHub gives a Markdown file's headings (lower case, punctuation dropped, spaces to dashes)."""
    ids: set[str] = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if line.startswith("#"):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            ids.add(slug if slug not in ids else next(f"{slug}-{n}" for n in range(1, 99) if f"{slug}-{n}" not in ids))
    return ids


def relative_links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_files_and_headings_that_exist(doc):
    broken = []
    for target in relative_links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in heading_ids(dest)):
            broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"


def adding_a_task_blocks() -> tuple[str, str]:
    """docs/training.md's two code blocks of `## Adding a task`: the task's module, then the registry entries."""
    text = (ROOT / "docs" / "training.md").read_text()
    section = text.split("\n## Adding a task\n", 1)[1].split("\n## ", 1)[0]
    module, entries = [block.split("\n", 1)[1].rsplit("```", 1)[0] for block in FENCE.findall(section)]
    return module, entries


def test_the_smallest_task_in_the_docs_trains_only_its_head(imagefolder_src, tmp_path, monkeypatch):
    """The docs' linear probe, registered exactly as they say, runs in the real loop: its classifier learns,
    its backbone (BatchNorm statistics included) stays as it was."""
    import torch
    import yaml

    import pipelines.tasks
    import training.tasks
    from shards import ConvertOptions, convert
    from training import load_config, run

    source, entries = adding_a_task_blocks()
    module = types.ModuleType("training.tasks.probe")
    exec(compile(source, "docs/training.md", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    training_entry, pipelines_entry = entries.split("\n\n")
    assert training_entry.startswith("# training/tasks/__init__.py")
    assert pipelines_entry.startswith("# pipelines/tasks.py")
    info = eval("{" + training_entry + "}", {"TaskInfo": training.tasks.TaskInfo})
    data = {**pipelines.tasks.TASKS}
    exec(pipelines_entry, {"TASKS": data})
    monkeypatch.setitem(training.tasks.TASKS, "probe", info["probe"])
    monkeypatch.setitem(pipelines.tasks.TASKS, "probe", data["probe"])

    store = tmp_path / "store"
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(store)), progress=False)
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump({
        "name": "probe", "runs_dir": str(tmp_path / "runs"), "task": "probe",
        "data": {"path": str(store), "image_size": 32, "batch_size": 4, "workers": 0, "pin_memory": False},
        "model": {"name": "test_resnet"}, "optim": {"lr": 0.05}, "train": {"epochs": 1, "max_steps": 3},
        "checkpoint": {"every_steps": 1, "keep": 3}}))
    summary = run(load_config(config))

    assert summary is not None and summary.metric == "val_top1" and summary.step == 3
    ckpts = tmp_path / "runs" / "probe" / "checkpoints"
    first, last = (torch.load(ckpts / f"step_{s:08d}.pt", weights_only=True)["model"] for s in (1, 3))
    assert first.keys() == last.keys()
    changed = {key for key in first if not torch.equal(first[key], last[key])}
    assert changed == {"fc.weight", "fc.bias"}
