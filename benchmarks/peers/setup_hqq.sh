#!/usr/bin/env bash
# Create benchmarks/peers/.venv-hqq with the hqq package, the peer of the quantize_hqq benchmark.
#
# hqq 0.2.8 exactly (the last 0.2.x release). Its setup.py compiles CUDA kernels after installing
# unless DISABLE_CUDA=1; the peer only uses hqq's quantizer on the CPU, so they are skipped. torch
# is installed first, pinned by the project's constraints file to the CPU wheel, and every later
# install carries the same constraints, so nothing can swap it for a CUDA build. squeeze is
# installed without dependencies so that the peer script can use squeeze's data and evaluation code.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
constraints="$repo/constraints.txt"
venv="$here/.venv-hqq"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -c "$constraints" torch
DISABLE_CUDA=1 "$venv/bin/pip" install --quiet -c "$constraints" "hqq==0.2.8"
# squeeze's own dependencies that hqq does not already bring.
"$venv/bin/pip" install --quiet -c "$constraints" typer rich safetensors compressed-tensors gguf \
  psutil pyyaml pydantic
"$venv/bin/pip" install --quiet --no-deps -e "$repo"
"$venv/bin/pip" check || true
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "hqq", "compressed-tensors", "squeeze"):
    print(f"{name} {md.version(name)}")
PY
