#!/usr/bin/env bash
# Create benchmarks/peers/.venv-autoround with Intel's auto-round, a peer of the quantize_calibrated
# benchmark (learned rounding, the method squeeze's --method autoround implements).
#
# auto-round 0.16.1 exactly. torch is installed first, pinned by the project's constraints file to
# the CPU wheel, and every later install carries the same constraints, so nothing can swap it for a
# CUDA build. squeeze is installed without dependencies so that the peer script can use squeeze's
# data and evaluation code.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
constraints="$repo/constraints.txt"
venv="$here/.venv-autoround"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -c "$constraints" torch
"$venv/bin/pip" install --quiet -c "$constraints" "auto-round==0.16.1"
# squeeze's own dependencies that auto-round does not already bring.
"$venv/bin/pip" install --quiet -c "$constraints" typer rich safetensors compressed-tensors gguf \
  psutil pyyaml pydantic
"$venv/bin/pip" install --quiet --no-deps -e "$repo"
"$venv/bin/pip" check || true
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "auto-round", "compressed-tensors", "squeeze"):
    print(f"{name} {md.version(name)}")
PY
