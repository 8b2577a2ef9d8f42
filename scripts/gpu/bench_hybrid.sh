#!/usr/bin/env bash
# Hybrid models on one GPU (docs/benchmarks.md, "Hybrid models (Bamba-9B shape)"):
#  1. tiny random Bamba and Mamba2, float32: greedy tokens on the GPU against the CPU's
#     (scripts/gpu/check_hybrid_tokens.py; stored CPU tokens and this host's CPU), in the
#     background while step 2 loads and compiles (no GPU memory preallocated for it);
#  2. the Bamba-9B-shaped engine (random bf16 weights made on the device): a 4K-token prefill
#     against the matmul ceiling, then decode at B=64, 1, 16 with 1K contexts against the
#     memory roofline (weights + attention K/V + Mamba2 state read and written).
#   bash scripts/gpu/bench_hybrid.sh ["bench.batch_sizes=[64]"] ...   (extra options: step 2)
#   STEPS=bench bash scripts/gpu/bench_hybrid.sh                       (one of them: tokens | bench)
# Outputs under $OUT (default /tmp): hybrid_tokens.txt, decode_bamba.{txt,err,json}; each
# decode row also goes to decode_bamba.err as soon as it is measured ("row: {...}").
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
STEPS=" ${STEPS:-tokens bench} "
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
pid=
if [[ "$STEPS" == *" tokens "* ]]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "${TOKENS_TIMEOUT:-240}" \
    "$PY" scripts/gpu/check_hybrid_tokens.py --live-cpu > "$OUT/hybrid_tokens.txt" 2> "$OUT/hybrid_tokens.err" &
  pid=$!
fi
if [[ "$STEPS" == *" bench "* ]]; then
  t0=$(date +%s)
  timeout -k 10 "${BENCH_TIMEOUT:-480}" "$PY" -m toolkit.bench.decode bench.model=bamba-9b "bench.backends=[auto]" \
    "bench.modes=[overlap]" "bench.batch_sizes=[64,1,16]" bench.prefill_len=4096 \
    bench.json_out="$OUT/decode_bamba.json" "$@" > "$OUT/decode_bamba.txt" 2> "$OUT/decode_bamba.err"
  echo "bench rc=$? $(( $(date +%s) - t0 ))s"
  grep -E "^(row|prefill|trace: kernel kinds|trace: top)" "$OUT/decode_bamba.err" | cut -c1-1500
  grep -v "it/s\]" "$OUT/decode_bamba.err" | grep -iE "error|Traceback" -A3 | tail -30
  cat "$OUT/decode_bamba.txt"
fi
if [[ -n "$pid" ]]; then
  wait "$pid"; echo "tokens rc=$?"; tail -20 "$OUT/hybrid_tokens.err" | grep -v "it/s\]"; cat "$OUT/hybrid_tokens.txt"
fi
