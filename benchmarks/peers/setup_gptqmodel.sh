#!/usr/bin/env bash
# Create benchmarks/peers/.venv-gptqmodel with GPTQModel, the second peer of the calibrated benchmark.
#
# GPTQModel wants a newer transformers and its own numpy pin, so it cannot share llm-compressor's
# venv. 7.6.0 exactly: 7.7 requires a CUDA build of torch. torch is installed first, pinned by the
# project's constraints file to the CPU wheel, and every later install carries the same constraints,
# so nothing can swap it for a CUDA build. GPTQModel ships as an sdist whose build needs only
# setuptools (its kernels are compiled at run time, not at install). squeeze is installed without
# dependencies so that the peer script can use squeeze's data and evaluation code.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
constraints="$repo/constraints.txt"
venv="$here/.venv-gptqmodel"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -c "$constraints" torch
"$venv/bin/pip" install --quiet -c "$constraints" "gptqmodel==7.6.0"
# squeeze's own dependencies that GPTQModel does not already bring.
"$venv/bin/pip" install --quiet -c "$constraints" typer rich safetensors compressed-tensors gguf accelerate \
  psutil pyyaml pydantic loguru
"$venv/bin/pip" install --quiet --no-deps -e "$repo"
"$venv/bin/pip" check || true
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "gptqmodel", "compressed-tensors", "squeeze"):
    print(f"{name} {md.version(name)}")
PY
