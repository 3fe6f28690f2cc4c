#!/usr/bin/env bash
# Install the optional mmsegmentation backend (tasks.ade20k.backend=mmseg) into a venv.
# mmseg 1.2.2 needs full mmcv 2.1.0 (with ops), which has no wheel for torch 2.14 on PyPI and
# whose sdist only builds after its C++ standard is raised to C++20 (torch's headers need it).
# The built wheel is cached under ~/.cache/iwm-bench/wheels so the ~10-minute build happens
# once per machine. Usage: scripts/install_mmseg.sh [path/to/venv]   (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY="$VENV/bin/python"
[[ -x "$PY" ]] || { echo "install_mmseg: no python at $PY (run ./install.sh first)" >&2; exit 2; }
PY="$(cd "$(dirname "$PY")" && pwd)/python"  # absolute: the build runs in another folder
MMCV_VERSION=2.1.0
TORCH_TAG=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
CUDA_OPS=${FORCE_CUDA:-0}
CACHE=${IWM_BENCH_WHEELS:-$HOME/.cache/iwm-bench/wheels}/mmcv-$MMCV_VERSION-torch$TORCH_TAG-cuda$CUDA_OPS
mkdir -p "$CACHE"
WHEEL=$(ls "$CACHE"/mmcv-*.whl 2>/dev/null | head -n1 || true)
if [[ -z "$WHEEL" ]]; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  # Build tools go to a private folder on PYTHONPATH: mmcv's setup.py imports pkg_resources
  # (gone from setuptools >= 70), and the venv's own setuptools is left untouched.
  "$PY" -m pip install --quiet --target "$WORK/buildtools" "setuptools<70" wheel ninja
  # pip prepares the sdist's metadata even when only downloading: same build tools needed.
  PYTHONPATH="$WORK/buildtools" "$PY" -m pip download --quiet --no-deps --no-build-isolation \
    --no-binary :all: "mmcv==$MMCV_VERSION" -d "$WORK"
  tar -xzf "$WORK"/mmcv-$MMCV_VERSION.tar.gz -C "$WORK"
  sed -i 's/c++14/c++20/g; s/c++17/c++20/g' "$WORK/mmcv-$MMCV_VERSION/setup.py"
  echo "install_mmseg: building mmcv $MMCV_VERSION (about 10 minutes on 2 cores) ..."
  (cd "$WORK/mmcv-$MMCV_VERSION" && \
    PATH="$WORK/buildtools/bin:$PATH" PYTHONPATH="$WORK/buildtools" \
    MMCV_WITH_OPS=1 FORCE_CUDA=$CUDA_OPS MAX_JOBS=${MAX_JOBS:-2} \
    "$PY" -m pip wheel --quiet --no-build-isolation --no-deps . -w "$WORK/dist")
  cp "$WORK"/dist/mmcv-*.whl "$CACHE/"
  WHEEL=$(ls "$CACHE"/mmcv-*.whl | head -n1)
fi
# Same pins as the `mmseg` extra in pyproject.toml.
"$PY" -m pip install --quiet "$WHEEL" "mmsegmentation==1.2.2" "mmengine>=0.10.4,<0.11" ftfy regex
"$PY" -c 'import mmcv.ops, mmseg, mmengine; print("installed: mmcv", mmcv.__version__, "mmseg", mmseg.__version__)'
