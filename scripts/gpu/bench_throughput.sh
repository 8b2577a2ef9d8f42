#!/usr/bin/env bash
# Engine throughput of the default model (SmolLM2-135M-Instruct, bfloat16) on the GPU engine config.
#   bash scripts/gpu/bench_throughput.sh ["bench.batch_sizes=[1,8,32,64]" ...]
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
"$PY" -m toolkit.bench.throughput engine=gpu bench.json_out="$OUT/throughput.json" "$@" | tee "$OUT/throughput.txt"
