#!/usr/bin/env bash
# The GPU tests (marked gpu; CPU runs skip them): the kernel grids and the engine on the Pallas
# kernels by default; any pytest arguments replace the paths, e.g. -k mgpu.
#   bash scripts/gpu/tests.sh [pytest args]          (after bash scripts/gpu_setup.sh)
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
[ $# -eq 0 ] && set -- tests/kernels tests/engine/test_engine_pallas.py
"$PY" -m pytest -q -p no:cacheprovider "$@" 2>&1 \
  | tee "$OUT/gpu_tests.txt" | tail -40
