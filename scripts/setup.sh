#!/usr/bin/env bash
# Create .venv (if missing) and install squeeze into it, with torch pinned to the CPU wheel.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# constraints.txt pins torch to the CPU build; an unpinned torch pulls a multi-GB CUDA build.
# The llamacpp extra compiles llama.cpp (about 8 minutes on 2 cores): without its multimodal library,
# which squeeze never calls, and on every core.
if [[ ",$extras," == *",llamacpp,"* ]]; then
  export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e "$spec"
