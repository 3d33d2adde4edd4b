"""`convert --dask` on a real Dask scheduler with two worker processes on 127.0.0.1 (tests/servers.py), to a
local folder and to S3 through the moto server: the store is byte for byte the single-host conversion's,
after an append, a worker killed mid-run and a client killed and rerun too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards import ConvertOptions, convert, open_fs, samples
from tests.servers import free_port

SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))


def contents(url: str) -> dict[str, bytes]:
    """Every file of the store at `url` by its path in the store; manifest.json without its two timestamps."""
    fs, root = open_fs(url)
    files = {path.removeprefix(root.rstrip("/") + "/"): fs.cat_file(path) for path in fs.find(root)}
    manifest = json.loads(files.pop("manifest.json"))
    del manifest["created"], manifest["updated"]
    return {**files, "manifest.json": json.dumps(manifest).encode()}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """Class folders without splits (val is held out by key hash), with a corrupt file and a duplicate."""
    root = samples.make_imagefolder(tmp_path_factory.mktemp("src"), per_class={"train": 5}, size=48, flat=True)
    photo = root / "chelsea" / "chelsea_0000.jpg"
    shutil.copy(photo, root / "coffee" / "copy.jpg")
    (root / "rocket" / "cut.jpg").write_bytes(photo.read_bytes()[:400])
    return root


@pytest.fixture(scope="module")
def big_src(tmp_path_factory) -> Path:
    # large enough that a conversion on the cluster takes seconds, so the kills land mid-run
    return samples.make_imagefolder(tmp_path_factory.mktemp("big"), per_class={"train": 40, "val": 4}, size=160)


@pytest.fixture(scope="module")
def big_reference(big_src, tmp_path_factory) -> dict[str, bytes]:
    dest = tmp_path_factory.mktemp("reference") / "store"
    convert(ConvertOptions(src=str(big_src), dest=str(dest), shard_size="8samples", workers=1), progress=False)
    return contents(str(dest))


def cli_convert(src: Path, dest: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [SHARDTRAIN, "convert", str(src), str(dest), "--shard-size", "8samples", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def wait_for_shards(proc: subprocess.Popen, dest: Path, finished: int) -> None:
    deadline = time.monotonic() + 120
    while len(list((dest / "_index").glob("*.json"))) < finished:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "conversion made no progress"
        time.sleep(0.005)


def test_store_is_the_single_host_one_locally_and_on_s3_append_included(src, dask_cluster, s3_bucket, tmp_path):
    # byte-sized shards: the client packs by the sizes the workers report after decoding
    opts = ConvertOptions(src=str(src), dest=str(tmp_path / "one" / "store"), shard_size="12KB", workers=1)
    convert(opts, progress=False)
    on_dask = {"dask": dask_cluster.address}
    for dest in (str(tmp_path / "dask" / "store"), f"{s3_bucket}/store"):
        summary = convert(opts.model_copy(update={**on_dask, "dest": dest}), progress=False)
        assert summary.rejected == 2 and len(summary.shards_written) > 3
        assert contents(dest) == contents(opts.dest)

    # a day of new images: the same --append on both
    more = shutil.copytree(src, tmp_path / "more")
    samples.make_imagefolder(more, per_class={"train": 2}, size=48, flat=True, start=5, seed=1)
    appended = opts.model_copy(update={"src": str(more), "append": True})
    convert(appended, progress=False)
    summary = convert(appended.model_copy(update={**on_dask, "dest": f"{s3_bucket}/store"}), progress=False)
    assert summary.version == 2 and summary.added == 12
    assert contents(f"{s3_bucket}/store") == contents(opts.dest)


def test_a_worker_killed_mid_conversion_is_replaced_and_the_store_is_unchanged(
        big_src, big_reference, dask_cluster, tmp_path):
    dest = tmp_path / "store"
    proc = cli_convert(big_src, dest, "--dask", dask_cluster.address)
    wait_for_shards(proc, dest, finished=1)
    # the worker holding the most decoded parts: they are lost with it and must be decoded again
    held = dask_cluster.keys_held()
    address = max(held, key=held.__getitem__)
    assert held[address] > 0
    victim = dask_cluster.worker_pids()[address]
    os.kill(victim, signal.SIGKILL)
    assert not (dest / "manifest.json").exists(), "the kill came too late to test anything"
    assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    assert victim not in dask_cluster.worker_pids().values()  # its nanny started a new worker
    assert contents(str(dest)) == big_reference


def test_a_killed_client_is_rerun_to_the_same_store_on_a_local_cluster(
        big_src, big_reference, dask_cluster, tmp_path, capsys):
    dest = tmp_path / "store"
    proc = cli_convert(big_src, dest, "--dask", dask_cluster.address)
    wait_for_shards(proc, dest, finished=3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (dest / "manifest.json").exists(), "the kill came too late to test anything"

    # rerun on another cluster: a LocalCluster of one process of this machine (--dask local:1)
    convert(ConvertOptions(src=str(big_src), dest=str(dest), shard_size="8samples", dask="local:1"))
    assert "resuming" in capsys.readouterr().err
    assert contents(str(dest)) == big_reference


def test_an_unreachable_scheduler_is_one_line(src, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"}
    proc = cli_convert(src, tmp_path / "store", "--dask", address, env=env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.splitlines()[-1].startswith(f"error: cannot reach the Dask scheduler at {address}: ")
    assert "Traceback" not in err
    assert not (tmp_path / "store" / "manifest.json").exists()

