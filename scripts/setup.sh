#!/usr/bin/env bash
# Create a virtual environment with distillad and its test tools, without CUDA wheels on a CPU machine.
# Usage: bash scripts/setup.sh [VENV_DIR]   (default .venv)
set -euo pipefail
venv="${1:-.venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$venv/bin/python" -m pip install --quiet torch            # CUDA build for GPU machines
    else
        "$venv/bin/python" -m pip install --quiet torch==2.13.0   # the local CPU build
    fi
fi
"$venv/bin/python" -m pip install --quiet -e ".[test]"
echo "distillad installed in $venv: activate it with '. $venv/bin/activate'"
