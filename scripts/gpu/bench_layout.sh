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
#   bash scripts/gpu/bench_layout.sh [bench.repeats=5 ...]
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
LDADD=$("$PY" -m toolkit.disagg.diagnose --ld-path 2>/dev/null | tail -1)
export LD_LIBRARY_PATH=${LDADD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
for v in "32 16" "1 64" "1 128" "1 512" "1 1024"; do
  set -- $v
  echo "== layers=$1 page_size=$2" | tee -a "$OUT/layout.txt"
  "$PY" -m toolkit.bench.transfer bench.alloc=torch bench.layers=$1 bench.page_size=$2 bench.repeats=3 \
    bench.ucx_info=false bench.json_out="$OUT/layout-L$1-S$2.json" 2>>"$OUT/layout.log" | tee -a "$OUT/layout.txt"
done
