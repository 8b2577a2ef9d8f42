#!/usr/bin/env bash
# Where a worker's start-up time goes, and how long it takes, on this GPU.
#   bash scripts/gpu/bench_startup.sh compile     # per step shape: trace / lower / XLA seconds, variants
#   bash scripts/gpu/bench_startup.sh serve       # `python -m serve`: time to ready cold and warm, then load
# MODEL_ARGS picks the model (default: a ~1B-shaped random bf16 Llama); SERVE_EXTRA adds
# server overrides (e.g. role=prefill transfer=nixl); LOAD adds load-generator overrides.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
ONE_B="model=tiny-random model.dtype=bfloat16 model.random.vocab_size=32768 model.random.hidden_size=2048 \
model.random.intermediate_size=8192 model.random.num_layers=16 model.random.num_heads=32 \
model.random.num_kv_heads=8 model.random.head_dim=64 model.random.max_position_embeddings=8192"
read -r -a MODEL <<< "${MODEL_ARGS:-$ONE_B}"
read -r -a EXTRA <<< "${SERVE_EXTRA:-}"
read -r -a LOADS <<< "${LOAD:-}"
case "${1:-compile}" in
compile)
  # four shapes (decode B=64, prefill T=64; greedy and sampling) per variant, nothing cached
  SMALL="engine=gpu engine.min_bucket=64 engine.chunk_size=64 engine.max_batch_size=64 engine.compile_threads=1 engine.compile_cache_dir="
  for v in default autotune0 scan reference; do
    case $v in
      default) env=(); args=() ;;
      autotune0) env=(XLA_FLAGS=--xla_gpu_autotune_level=0); args=() ;;
      scan) env=(); args=(engine.layer_loop=scan) ;;
      reference) env=(); args=(engine.attention_backend=reference) ;;
    esac
    echo "######## compile variant: $v"
    env "${env[@]}" "$PY" -m toolkit.bench.startup bench.mode=compile "${MODEL[@]}" $SMALL "${args[@]}" \
      bench.json_out="$OUT/startup_compile_$v.json" 2> "$OUT/startup_compile_$v.err" | tail -7
  done ;;
serve)
  args="'engine=gpu'"; for a in "${MODEL[@]}" "${EXTRA[@]}"; do args="$args,'$a'"; done
  "$PY" -m toolkit.bench.startup bench.mode=serve "bench.server_args=[$args]" \
    bench.cache_dir="$OUT/xla_cache" bench.json_out="$OUT/startup_serve.json" "${LOADS[@]}" \
    2> "$OUT/startup_serve.err" | tail -8 ;;
esac
