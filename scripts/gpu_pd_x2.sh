#!/usr/bin/env bash
# P/D on GPUs through the device tool (one call): correctness on one GPU and across two, and
# KV transfer bandwidth against a device copy. Carry .whl (nixl-cu13, hydra, ...) and .whl2
# (fastapi, uvicorn, pyzmq, ...). Results: docs/benchmarks.md.
set -uo pipefail
OUT=${OUT:-/tmp/pd_x2}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl2/*.whl 2>&1 | grep -v WARN
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NIXL_LOG_LEVEL=WARN
NGPU=$(nvidia-smi -L | grep -c '^GPU')
nvidia-smi --query-gpu=index,name,memory.total --format=csv; nvidia-smi topo -m 2>/dev/null | head -5
BENCH="python3 -m toolkit.disagg.bench_transfer"
LDADD=$($BENCH --ld-path 2>/dev/null | tail -1)
export LD_LIBRARY_PATH=${LDADD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
pairs="0:0"; (( NGPU >= 2 )) && pairs="0:0 0:1"
for pr in $pairs; do
  s=${pr%:*}; d=${pr#*:}
  echo "######## P/D check GPU $s -> GPU $d (engine.kv_alloc=auto: cudaMalloc pools)"
  timeout 240 python3 scripts/gpu_pd_check.py --src $s --dst $d 2>&1 | grep -E "RESULT|error" | tee -a "$OUT/pd_check.txt"
done
for pr in $pairs; do
  s=${pr%:*}; d=${pr#*:}
  for alloc in torch jax; do
    echo "######## transfer bench GPU $s -> GPU $d, pools from $alloc"
    extra=""; [ $alloc = torch ] && extra="--alloc torch"
    timeout 120 $BENCH --mib 512 --repeats 5 --src-device $s --dst-device $d --env-variant $alloc $extra \
      --json-out "$OUT/xfer_${alloc}_${s}${d}.json" > "$OUT/xfer_${alloc}_${s}${d}.log" 2>&1
    sed -n '/^== results/,$p' "$OUT/xfer_${alloc}_${s}${d}.log" | tee -a "$OUT/xfer_tables.txt"
  done
done
