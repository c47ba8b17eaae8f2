#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): every GPU path of the framework once, in about 6 minutes.
#
#   bash benchmarks/gpu_check.sh             # GPU run: installs .whl/*.whl into /tmp/site first (no registry needed)
#   bash benchmarks/gpu_check.sh --dry-run   # CPU, tiny shapes, the current environment (no install)
#
# The wheels come from benchmarks/fetch_gpu_wheels.sh (listed in benchmarks/gpu_wheels.txt); they never replace the
# image's torch, transformers or lightning. The repo is not pip-installed: PYTHONPATH holds the wheels and the repo.
# Results: gpu_check.json, gpu_check.md and gpu_check.log in $OUT when it is set, else in runs/gpu_check/.
# Exit status: 0 when no section failed, 1 when one did, 2 without CUDA (GPU run), 3 when the install failed,
# 124/137 when the hard time limit stopped it (the JSON written so far stays).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-runs/gpu_check}"
SITE="${GPU_CHECK_SITE:-/tmp/site}"
mkdir -p "$OUT_DIR"
dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done
hard_limit=510  # seconds for the python part of the GPU run (its own deadline is 480 s, stack dump at 495 s)
[ "$dry" = 1 ] && hard_limit=1200

{
  t0=$(date +%s)
  if [ "$dry" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    for whl in .whl/*.whl; do
      case "$(basename "$whl")" in
        torch-*|transformers-*|lightning-*|pytorch_lightning-*)
          echo "[gpu_check] refusing $whl: the check tests the image's own torch/transformers/lightning"; exit 3 ;;
      esac
    done
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || { echo "[gpu_check] installing .whl/*.whl into $SITE failed"; exit 3; }
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu_check] installed $(ls .whl/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - t0 ))s"
  else
    [ "$dry" = 0 ] && echo "[gpu_check] no .whl/*.whl here: using the installed packages"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  timeout -k 10 "$hard_limit" "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" "$@"
} 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
