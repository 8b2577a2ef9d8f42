#!/usr/bin/env bash
# Greedy tokens of the default model on this GPU (float32 and bfloat16) against the CPU reference.
#   bash scripts/gpu/check_tokens.sh [--engine default]
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
"$PY" scripts/gpu/check_tokens.py "$@" 2>&1 | tee "$OUT/check_tokens.txt"
