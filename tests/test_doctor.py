"""`shardtrain doctor`: the report's keys and values on this machine, storage probes, exit codes."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipelines.cpus import auto_workers
from training import doctor

runner = CliRunner()


def run_doctor(*args: str) -> tuple[int, dict]:
    result = runner.invoke(doctor.app, ["--json", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, json.loads(result.stdout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, **sections: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "doctor-test", **sections}))
    return path


def test_report_describes_this_machine():
    code, report = run_doctor()
    assert report["python"] == {"version": platform.python_version(), "executable": sys.executable, "ok": True}
    assert report["torch"]["ok"] and report["torch"]["version"] == torch.__version__
    assert report["torch"]["cuda"] == torch.version.cuda
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()
    assert len(report["gpus"]) == torch.cuda.device_count()
    stat = os.statvfs("/dev/shm")
    assert report["shm"]["total_gb"] == round(stat.f_blocks * stat.f_frsize / 1e9, 2) > 0
    assert 0 < report["cpu"]["count"] <= len(os.sched_getaffinity(0))
    assert report["storage"] is None and report["problems"] == []
    assert code == 0 and report["ok"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA GPU")
def test_cpu_host_warns_and_fails_only_when_gpu_required():
    code, report = run_doctor()
    assert code == 0 and report["h2d_bandwidth_gbs"] is None
    assert any("no CUDA GPU" in w for w in report["warnings"])
    assert report["hw_jpeg_decoder"] == {"usable": False, "detail": "no CUDA GPU (the device is cpu)"}
    assert report["dali"] == {"usable": False, "detail": "no CUDA GPU (the device is cpu)"}
    code, report = run_doctor("--require-gpu")
    assert code == 1 and report["ok"] is False
    assert any("no CUDA GPU" in p for p in report["problems"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_host_reports_devices_and_bandwidth():
    code, report = run_doctor("--require-gpu")
    assert code == 0, report["problems"]
    assert [g["name"] for g in report["gpus"]] == [
        torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
    ]
    major, minor = torch.cuda.get_device_capability(0)
    assert report["gpus"][0]["capability"] == f"{major}.{minor}"
    assert report["gpus"][0]["bf16"] == torch.cuda.is_bf16_supported(including_emulation=False)
    assert report["gpus"][0]["memory_gb"] > 1
    assert report["h2d_bandwidth_gbs"] > 0.1
    assert report["torch"]["cudnn"] and report["torch"]["nccl"]
    from pipelines import hw

    why = hw.unavailable(torch.device("cuda", 0))
    assert report["hw_jpeg_decoder"]["usable"] == (why is None)
    assert report["hw_jpeg_decoder"]["detail"] == (why or hw.describe(torch.device("cuda", 0)))


def test_text_report_is_readable():
    result = runner.invoke(doctor.app, [])
    assert result.exit_code == 0
    for label in ("python", "torch", "shm", "cpus", "prefect"):
        assert label in result.stdout
    assert result.stdout.rstrip().endswith("ok")


def test_s3_storage_writable_and_probe_removed(s3_bucket, tmp_path):
    storage = f"{s3_bucket}/runs/ckpt"
    code, report = run_doctor("--config", str(write_config(tmp_path, checkpoint={"storage": storage})))
    assert code == 0, report["problems"]
    assert report["storage"] == {"url": storage, "writable": True, "error": None}
    import s3fs

    assert s3fs.S3FileSystem(skip_instance_cache=True).find(s3_bucket) == []


def test_s3_storage_missing_bucket_fails(moto_server, tmp_path):
    storage = "s3://no-such-bucket-doctor/ckpt"
    code, report = run_doctor("--config", str(write_config(tmp_path, checkpoint={"storage": storage})))
    assert code == 1 and report["storage"]["writable"] is False
    assert report["storage"]["error"]
    assert any(storage in p and "not writable" in p for p in report["problems"])


def test_s3_storage_down_fails(moto_server, tmp_path):
    storage = "s3://doctor-outage/ckpt"
    moto_server.stop()
    try:
        code, report = run_doctor("--config", str(write_config(tmp_path, checkpoint={"storage": storage})))
    finally:
        moto_server.start()
    assert code == 1 and report["storage"]["writable"] is False


def test_local_storage_created_and_writable(tmp_path):
    storage = tmp_path / "nas" / "checkpoints"
    code, report = run_doctor("--config", str(write_config(tmp_path, checkpoint={"storage": str(storage)})))
    assert code == 0 and report["storage"]["writable"] is True
    assert storage.is_dir() and list(storage.iterdir()) == []


def read_only_dir(kind: str, tmp_path: Path) -> Path:
    if kind == "/proc":
        return Path("/proc/shardtrain-doctor")  # no user, root included, can create files there
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits (the /proc case covers root)")
    path = tmp_path / "readonly"
    path.mkdir()
    path.chmod(0o555)
    return path


@pytest.mark.parametrize("kind", ["chmod 555", "/proc"])
def test_read_only_local_storage_fails(kind, tmp_path):
    storage = read_only_dir(kind, tmp_path)
    code, report = run_doctor("--config", str(write_config(tmp_path, checkpoint={"storage": str(storage)})))
    assert code == 1 and report["storage"]["writable"] is False
    assert report["storage"]["error"].split(":")[0] in {"PermissionError", "FileNotFoundError", "OSError"}


def test_workers_beyond_cpus_warn(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    code, report = run_doctor("--config", str(write_config(tmp_path, data={"workers": cpus * 4})))
    assert code == 0
    assert report["cpu"]["workers"] == cpus * 4 and report["cpu"]["workers_total"] >= cpus * 4
    assert any("data.workers" in w for w in report["warnings"])


def test_workers_within_cpus_do_not_warn(tmp_path):
    code, report = run_doctor("--config", str(write_config(tmp_path, data={"workers": 1})))
    assert code == 0 and report["cpu"]["warning"] is None


def test_auto_workers_are_counted_as_each_process_gets_them(tmp_path):
    code, report = run_doctor("--config", str(write_config(tmp_path, data={"workers": "auto"})))
    cpu = report["cpu"]
    assert code == 0 and cpu["setting"] == "auto" and cpu["warning"] is None
    assert cpu["workers"] == auto_workers(cpu["count"], cpu["processes"]) >= 1
    assert cpu["workers_total"] == cpu["workers"] * cpu["processes"]
    table = runner.invoke(doctor.app, ["--config", str(tmp_path / "run.yaml")]).stdout
    assert f"for {cpu['workers_total']} DataLoader workers (data.workers auto)" in table


def test_small_shm_warns():
    total = os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize
    assert doctor.shm_info("/dev/shm", min_bytes=total)["warning"] is None
    assert "bus error" in doctor.shm_info("/dev/shm", min_bytes=total + 1)["warning"]
    assert "missing" in doctor.shm_info("/no/such/shm")["warning"]


def test_prefect_api_unreachable_warns():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://127.0.0.1:{closed_port()}/api"
    with temporary_settings({PREFECT_API_URL: url}):
        code, report = run_doctor()
    assert code == 0
    assert report["prefect"]["api_url"] == url and report["prefect"]["healthy"] is False
    assert any(url in w for w in report["warnings"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read config"),
        ("data: [unclosed", "not valid YAML"),
        ("- a list", "not a YAML mapping"),
        ("data: {workers: many}", "data.workers"),
        ("checkpoint: {storage: [a, b]}", "checkpoint.storage"),
    ],
)
def test_bad_config_is_one_line_error(content, message, tmp_path):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    result = runner.invoke(doctor.app, ["--config", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_console_script_has_doctor():
    shardtrain = Path(sys.executable).with_name("shardtrain")
    result = subprocess.run([str(shardtrain), "doctor", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["torch"]["version"] == torch.__version__
