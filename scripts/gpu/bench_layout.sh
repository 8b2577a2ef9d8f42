#!/usr/bin/env bash
# Which pool layout moves scattered pages at copy speed (issue: KV transfers at copy speed)?
# The same 512 MiB of 8B-shaped KV (32 layers, 8 KV heads, head dim 128, bf16), random and
# contiguous pages, through NIXL between two processes on GPU 0, with the piece one
# descriptor moves growing:
#   layer-major  [L, P, S, KV, Dh]   one (buffer, layer, page): 32 KiB per descriptor (today)
#   page-major   [P, L, S, KV, Dh]   one (buffer, page), every layer: 1 MiB (bench.layers=1,
#                                    bench.page_size=16*32: the same bytes, laid out as one row)
#   page-major, K and V together     2 MiB (page_size=16*32*2)
# plus 128 and 256 KiB pieces for the curve. Each run also times a same-device slice copy
# (the ceiling) and a page gather (what a staging path would add on each side).
#   bash scripts/gpu/bench_layout.sh           # the descriptor sizes, one UCX worker
#   bash scripts/gpu/bench_layout.sh threads   # NIXL's UCX thread pool (a write's descriptors
#                                              # split across worker threads) on both layouts
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
LDADD=$("$PY" -m toolkit.disagg.diagnose --ld-path 2>/dev/null | tail -1)
export LD_LIBRARY_PATH=${LDADD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# layers page_size ucx_threads split_batch
if [[ "${1:-}" == threads ]]; then
  VARIANTS=("32 16 8 1024" "32 16 16 1024" "1 512 8 64" "1 512 16 64" "1 1024 16 32"); NAME=threads
else
  VARIANTS=("32 16 0 0" "1 64 0 0" "1 128 0 0" "1 512 0 0" "1 1024 0 0"); NAME=layout
fi
for v in "${VARIANTS[@]}"; do
  set -- $v
  echo "== layers=$1 page_size=$2 ucx_threads=$3 split_batch=$4" | tee -a "$OUT/$NAME.txt"
  "$PY" -m toolkit.bench.transfer bench.alloc=torch bench.layers=$1 bench.page_size=$2 bench.repeats=3 \
    bench.ucx_threads=$3 bench.split_batch=$4 bench.ucx_info=false \
    bench.json_out="$OUT/$NAME-L$1-S$2-T$3.json" 2>>"$OUT/$NAME.log" | tee -a "$OUT/$NAME.txt"
done
