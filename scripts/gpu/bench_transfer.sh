#!/usr/bin/env bash
# KV page WRITEs through NIXL between two processes, 512 MiB of Llama-8B-shaped pages, pools
# from JAX (XLA's VMM memory) and from torch (cudaMalloc): GPU 0 -> 0, and 0 -> 1 with two GPUs.
#   bash scripts/gpu/bench_transfer.sh [bench.repeats=5 ...]
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
LDADD=$("$PY" -m toolkit.disagg.diagnose --ld-path 2>/dev/null | tail -1)
export LD_LIBRARY_PATH=${LDADD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
dsts=0; (( $(nvidia-smi -L | grep -c '^GPU') >= 2 )) && dsts=0,1
"$PY" -m toolkit.bench.transfer -m bench.alloc=torch,jax bench.dst_device=$dsts \
  bench.json_out="$OUT/transfer.json" hydra.sweep.dir="$OUT/transfer_sweep" "$@" 2>"$OUT/transfer.log" \
  | tee "$OUT/transfer.txt"
