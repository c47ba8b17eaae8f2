#!/usr/bin/env bash
# Create ./.venv from scratch and install prpo-lightning with its test/doc/benchmark extras, at the exact versions
# of constraints.txt (the tested set; regenerate it with scripts/lock.sh). Every install step applies the
# constraints, so no resolver step can pick a newer release than the one the tests and README numbers were
# measured with, nor replace torch with a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m venv --clear .venv
.venv/bin/python -m pip install -q -c constraints.txt --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
.venv/bin/python -m pip check
