#!/usr/bin/env bash
# Llama-3-8B-shaped engine decode against the memory roofline (random bf16 weights, no download).
#   bash scripts/gpu/bench_decode.sh ["bench.backends=[auto]"] ["bench.batch_sizes=[1,16,64]"] ...
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
"$PY" -m toolkit.bench.decode bench.json_out="$OUT/decode.json" "$@" | tee "$OUT/decode.txt"
