#!/usr/bin/env bash
# Install squeeze into .venv and run the main job: SmolLM2-135M, int8 per-channel weights,
# evaluated on Wikipedia text, report printed. Output: out/quickstart (replaced on each run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/squeeze quantize smollm2 --mode per-channel --bits 8 --out out/quickstart --overwrite "$@"
