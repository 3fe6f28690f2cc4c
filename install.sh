#!/usr/bin/env bash
# Create .venv beside this script and install the harness into it (editable, with test tools).
# Safe to run again: an existing .venv is reused and brought up to date.
# --mmseg also installs the optional mmsegmentation backend of the ADE20k task
# (scripts/install_mmseg.sh: builds mmcv once per machine, ~10-25 min on 2 cores, then cached).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
# torch and torchvision are pinned together in pyproject.toml: the pair that imports cleanly
# with timm on CPU-only machines and on CUDA clusters alike.
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/bench list >/dev/null
if [[ "${1:-}" == "--mmseg" ]]; then
  scripts/install_mmseg.sh .venv
fi
echo "installed: $(.venv/bin/python -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)')"
