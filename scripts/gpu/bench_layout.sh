#!/usr/bin/env bash
# Scattered KV pages through NIXL with the page-major pool (issue: KV transfers at copy
# speed). 8B-shaped KV (32 layers, 8 KV heads, head dim 128, page 16, bf16): one (buffer,
# page) descriptor is 1 MiB, every layer of that page. Two processes on GPU 0, cudaMalloc'd
# pools, every byte verified; each run also times a same-device slice copy (the ceiling).
#   bash scripts/gpu/bench_layout.sh     # 512 MiB and a 2K-token prompt (256 MiB), with one
#                                        # UCX worker and with NIXL's UCX thread pool (8)
# Patterns: random (2 descriptors per page), contig (runs merge: 2 descriptors), rooms (the
# random pages as 64 concurrent writes), staged (gather into a contiguous region, one
# write, scatter on the target: three passes over HBM on one GPU).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
LDADD=$("$PY" -m toolkit.disagg.diagnose --ld-path 2>/dev/null | tail -1)
export LD_LIBRARY_PATH=${LDADD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# MiB ucx_threads split_batch patterns
VARIANTS=("512 0 0 [random,contig,rooms,staged]" "512 8 64 [random,contig,rooms]"
          "256 0 0 [random,contig,staged]" "256 8 64 [random,contig]")
for v in "${VARIANTS[@]}"; do
  set -- $v
  echo "== mib=$1 ucx_threads=$2 split_batch=$3 patterns=$4" | tee -a "$OUT/layout.txt"
  timeout -k 10 240 "$PY" -m toolkit.bench.transfer bench.alloc=torch bench.mib=$1 bench.repeats=3 \
    bench.ucx_threads=$2 bench.split_batch=$3 "bench.patterns=$4" bench.ucx_info=false \
    bench.json_out="$OUT/layout-M$1-T$2.json" 2>>"$OUT/layout.log" | tee -a "$OUT/layout.txt"
done
