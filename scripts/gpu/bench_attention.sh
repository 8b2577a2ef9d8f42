#!/usr/bin/env bash
# Attention and KV-movement kernels against the same-run copy/matmul ceilings and baselines.
#   bash scripts/gpu/bench_attention.sh [bench.sweep=true] ["bench.only=[prefill]"]
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
"$PY" -m toolkit.bench.attention bench.json_out="$OUT/attention.json" "$@" | tee "$OUT/attention.txt"
