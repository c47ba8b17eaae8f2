#!/usr/bin/env bash
# The test command of the README (and of CI): the main suite in ./.venv, then the vLLM suite in ./.venv-vllm.
#
# vLLM's CPU build pins its own torch/transformers, so its tests run in the second environment that
# scripts/install_vllm.sh builds; that environment is built here when it is missing, so this one command runs every
# test on a fresh machine after `bash scripts/install.sh`. The vLLM engine runs in-process
# (VLLM_ENABLE_V1_MULTIPROCESSING=0). Exit status: non-zero when either suite fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
[ -x .venv/bin/python ] || { echo "scripts/test.sh: no ./.venv: run 'bash scripts/install.sh' first"; exit 2; }
start=$(date +%s)
.venv/bin/python -m pytest -q tests
main_s=$(( $(date +%s) - start ))
if [ ! -x .venv-vllm/bin/python ]; then
  echo "[test] building ./.venv-vllm for the vLLM tests (bash scripts/install_vllm.sh)"
  bash scripts/install_vllm.sh
fi
vstart=$(date +%s)
VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 .venv-vllm/bin/python -m pytest -q \
  tests/test_engines_vllm.py tests/test_engines_vllm_module.py tests/test_engines_vllm_server.py tests/test_prm_served.py
echo "[test] main suite ${main_s}s, vLLM suite $(( $(date +%s) - vstart ))s"
