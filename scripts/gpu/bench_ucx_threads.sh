#!/usr/bin/env bash
# Scattered-page WRITEs with NIXL's UCX thread pool (a write's descriptors split across
# worker threads), on today's layer-major pool (32 KiB descriptors) and a page-major one
# (1 and 2 MiB descriptors, as in bench_layout.sh). One GPU, two processes, 512 MiB.
#   bash scripts/gpu/bench_ucx_threads.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
LDADD=$("$PY" -m toolkit.disagg.diagnose --ld-path 2>/dev/null | tail -1)
export LD_LIBRARY_PATH=${LDADD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
for v in "32 16 8 1024" "32 16 16 1024" "1 512 8 64" "1 512 16 64" "1 1024 16 32"; do
  set -- $v
  echo "== layers=$1 page_size=$2 ucx_threads=$3 split_batch=$4" | tee -a "$OUT/threads.txt"
  "$PY" -m toolkit.bench.transfer bench.alloc=torch bench.layers=$1 bench.page_size=$2 bench.repeats=3 \
    bench.ucx_threads=$3 bench.split_batch=$4 bench.ucx_info=false \
    bench.json_out="$OUT/threads-L$1-S$2-T$3.json" 2>>"$OUT/threads.log" | grep "^|" | tee -a "$OUT/threads.txt"
done
