#!/usr/bin/env bash
# GPU run through the device tool (see docs/benchmarks.md and scripts/gpu_setup.sh).
set -uo pipefail
source scripts/gpu_setup.sh || exit 1
echo "== run (bf16)"; python3 -m toolkit.run prompt="What is the capital of France?" engine=gpu
echo "== bench"; python3 -m toolkit.bench engine=gpu ${BENCH_ARGS:-} bench.json_out=${OUT:-/tmp}/bench.json 2>&1 \
  | grep -v "it/s\]" | tee ${OUT:-/tmp}/bench.txt
