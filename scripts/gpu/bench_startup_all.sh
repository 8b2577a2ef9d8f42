#!/usr/bin/env bash
# The start-up measurements of docs/benchmarks.md ("Start-up"), on one GPU, in about 6 minutes:
# per-shape compile and cache-load seconds (four shapes, cold then warm cache), then a 1B-shaped
# unified server's time to ready (cold, warm) and the load at concurrency 128 after ready.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; export OUT=${OUT:-/tmp}; mkdir -p "$OUT"
ONE_B="model=tiny-random model.dtype=bfloat16 model.random.vocab_size=32768 model.random.hidden_size=2048 \
model.random.intermediate_size=8192 model.random.num_layers=16 model.random.num_heads=32 \
model.random.num_kv_heads=8 model.random.head_dim=64 model.random.max_position_embeddings=8192"
SMALL="engine=gpu engine.min_bucket=64 engine.chunk_size=64 engine.max_batch_size=64"
rm -rf "$OUT/small_cache"
for run in cold warm; do
  echo "######## compile, $run cache"
  "$PY" -m toolkit.bench.startup bench.mode=compile $ONE_B $SMALL engine.compile_cache_dir="$OUT/small_cache" \
    bench.json_out="$OUT/startup_compile_$run.json" 2> "$OUT/startup_compile_$run.err" | tail -7
done
LOAD="bench.load.num_requests=512 bench.load.concurrency=128" bash scripts/gpu/bench_startup.sh serve
