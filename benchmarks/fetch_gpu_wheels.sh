#!/usr/bin/env bash
# Re-create the wheel folder that travels to the GPU machine (default .whl/ in the repo root) from
# benchmarks/gpu_wheels.txt: `download` lines come from PyPI as CPython 3.12 x86-64 manylinux wheels, `build` lines
# (DeepSpeed: an sdist only) are built here with DS_BUILD_OPS=0, which needs torch and setuptools in $PYTHON's
# environment (default: the project's .venv). Fails when a listed file is missing afterwards, when the folder holds
# a wheel that is not listed (two versions of a package stop the install there), or when it exceeds 64 MiB.
#   bash benchmarks/fetch_gpu_wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p "$DEST"
listed=()
while read -r requirement how file _; do
  case "$requirement" in ''|'#'*) continue ;; esac
  listed+=("$file")
  if [ -e "$DEST/$file" ]; then echo "have   $file"; continue; fi
  case "$how" in
    download)
      "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$DEST" "$requirement" ;;
    build)
      DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$requirement" ;;
    *) echo "gpu_wheels.txt: unknown method '$how' for $requirement (use download or build)"; exit 1 ;;
  esac
  [ -e "$DEST/$file" ] || { echo "fetching $requirement did not give $DEST/$file: update gpu_wheels.txt"; exit 1; }
  echo "got    $file"
done < benchmarks/gpu_wheels.txt
for whl in "$DEST"/*.whl; do
  name=$(basename "$whl")
  printf '%s\n' "${listed[@]}" | grep -qxF "$name" \
    || { echo "$whl is not in benchmarks/gpu_wheels.txt: remove it (one version per package)"; exit 1; }
done
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(( bytes / 1048576 )) MiB in $DEST"
[ "$bytes" -le $(( 64 * 1048576 )) ] || { echo "over the 64 MiB the device tool carries"; exit 1; }
