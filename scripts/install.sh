#!/usr/bin/env bash
# Create ./.venv from scratch and install prpo-lightning with its test/doc/benchmark extras.
# torch is installed first and pinned by constraints.txt in every later install, so no resolver step can
# replace it with a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m venv --clear .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
.venv/bin/python -m pip check
