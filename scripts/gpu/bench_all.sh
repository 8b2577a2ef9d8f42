#!/usr/bin/env bash
# Every GPU benchmark once, each with its plain command (docs/benchmarks.md), on one GPU, in
# about 9 minutes on an H200: modest sizes where a default run is long. Outputs (tables, JSON,
# logs) under $OUT (default /tmp); a summary of exit codes and times at the end.
#   bash scripts/gpu/bench_all.sh                  (after bash scripts/gpu_setup.sh)
#   MODEL_ARGS="model=tiny-random" bash scripts/gpu/bench_all.sh   # throughput and serve on another model
#   STEPS="attention decode" bash scripts/gpu/bench_all.sh          # some of them
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
read -r -a MODEL <<< "${MODEL_ARGS:-}"  # model overrides for the two benchmarks that load one
export OUT=${OUT:-/tmp}; mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"; : > "$SUMMARY"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

STEPS=" ${STEPS:-diagnose attention decode throughput transfer serve} "
step() {  # step NAME TIMEOUT_S command...: run it, log its output, record rc and seconds
  local name=$1 limit=$2; shift 2
  [[ "$STEPS" == *" $name "* ]] || return 0
  local t0=$(date +%s)
  echo "######## $name: $*"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  local rc=$?
  tail -25 "$OUT/$name.out"
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
}

step diagnose 60 "$PY" -m toolkit.disagg.diagnose --with-jax
step attention 150 "$PY" -m toolkit.bench.attention bench.json_out="$OUT/attention.json"
# (the 8B-shaped model's compilations take most of it: ~45 s each on an H200, JAX 0.11.2)
step decode 360 "$PY" -m toolkit.bench.decode "bench.backends=[auto]" "bench.modes=[overlap]" "bench.batch_sizes=[1,64]" bench.json_out="$OUT/decode.json"
step throughput 90 "$PY" -m toolkit.bench.throughput engine=gpu "${MODEL[@]}" bench.repeats=2 bench.json_out="$OUT/throughput.json"
LDADD=$("$PY" -m toolkit.disagg.diagnose --ld-path 2>/dev/null | tail -1)
step transfer 120 env LD_LIBRARY_PATH="${LDADD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "$PY" -m toolkit.bench.transfer -m bench.alloc=torch,jax bench.repeats=3 bench.json_out="$OUT/transfer.json" \
  hydra.sweep.dir="$OUT/transfer_sweep"
step serve 120 env SERVER_ARGS="${MODEL_ARGS:-}" bash scripts/gpu/bench_serve.sh bench.num_requests=64 bench.concurrency=16
echo "== summary"; cat "$SUMMARY"
