#!/usr/bin/env bash
# Create benchmarks/peers/.venv with llm-compressor, the peer the RTN and calibrated benchmarks compare
# against, then benchmarks/peers/.venv-gptqmodel with GPTQModel (setup_gptqmodel.sh; skip it with
# SKIP_GPTQMODEL=1).
#
# llm-compressor caps transformers below the version squeeze's own venv uses, so it lives in a venv
# of its own. torch is pinned by the project's constraints file (the CPU wheel); squeeze is
# installed without dependencies so that the peer script can use squeeze's evaluation and data code.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
constraints="$repo/constraints.txt"
venv="$here/.venv"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# torch first, pinned by the constraints file to the CPU build, so nothing pulls a CUDA build.
"$venv/bin/pip" install --quiet -c "$constraints" torch
"$venv/bin/pip" install --quiet -c "$constraints" "llmcompressor==0.14.*" "transformers<=5.17"
# squeeze's own dependencies that llm-compressor does not already bring.
"$venv/bin/pip" install --quiet -c "$constraints" typer rich safetensors compressed-tensors gguf accelerate \
  psutil pyyaml pydantic loguru
"$venv/bin/pip" install --quiet --no-deps -e "$repo"
"$venv/bin/pip" check || true
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "squeeze"):
    print(f"{name} {md.version(name)}")
PY

if [[ "${SKIP_GPTQMODEL:-0}" != 1 ]]; then
  "$here/setup_gptqmodel.sh"
fi
