#!/usr/bin/env bash
# Install squeeze with its test extra into .venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,gptq,bnb
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}"
.venv/bin/python -m pytest -q --durations=25 "$@"  # the 25 slowest tests, for keeping CI short
