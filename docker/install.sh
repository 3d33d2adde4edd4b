#!/usr/bin/env bash
# The image's install steps, one per Dockerfile step; tests/test_container.py runs the same
# steps into a temporary virtual environment. PYTHON picks the interpreter (default: python).
#
#   docker/install.sh venv DIR        a venv that sees the base image's torch (--system-site-packages)
#   docker/install.sh wheels DIR      wheels of the pinned dependencies (docker/requirements.lock)
#   docker/install.sh deps DIR        install them from DIR alone, leaving the base's torch as it is
#   docker/install.sh app-wheel DIR   build shardtrain's own wheel from the source in the cwd
#   docker/install.sh app DIR         install that wheel, then start `shardtrain` once
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
pip=("$py" -m pip --disable-pip-version-check --no-input)

# The torch build the base already has, as a constraint: if anything in the lock asked for
# another torch, pip stops instead of downloading a different build over it.
keep_base() {
  "$py" - <<'PY' >"$1"
from importlib.metadata import PackageNotFoundError, version
for name in ("torch", "torchvision"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
PY
}

case "${1:-} ${2:-}" in
  venv\ ?*)
    # A venv rather than the base's own environment: our pins never replace the packages
    # the base image's tools (conda) depend on, and the base's torch stays visible.
    "$py" -m venv --system-site-packages "$2" ;;
  wheels\ ?*)
    "${pip[@]}" wheel --no-deps --wheel-dir "$2" --requirement "$here/requirements.lock" ;;
  deps\ ?*)
    base=$(mktemp)
    keep_base "$base"
    "${pip[@]}" install --no-cache-dir --no-index --find-links "$2" \
      --requirement "$here/requirements.lock" --constraint "$base"
    rm -f "$base" ;;
  app-wheel\ ?*)
    # No build isolation: setuptools is in the lock, so this step needs no index either.
    "${pip[@]}" wheel --no-deps --no-build-isolation --wheel-dir "$2" . ;;
  app\ ?*)
    "${pip[@]}" install --no-cache-dir --no-index --no-deps "$2"/shardtrain-*.whl
    "$(dirname "$py")/shardtrain" --help >/dev/null ;;
  *)
    echo "usage: docker/install.sh venv|wheels|deps|app-wheel|app DIR" >&2; exit 2 ;;
esac
