#!/usr/bin/env bash
# The 8B shape's start-up and serving (docs/benchmarks.md, "Start-up"), on one GPU:
#   bash scripts/gpu/bench_startup_8b.sh unified   # server cold, warm, then the load at concurrency 64
#                                                  # and 128; then the engine's decode step at those batches
#   bash scripts/gpu/bench_startup_8b.sh roles     # prefill and decode workers (transfer=nixl), cold and warm
# The model is conf/model/random-8b.yaml: Llama-3-8B-shaped random bf16 weights made on the GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
serve() {  # $1: label, $2: server overrides (comma-separated, quoted), rest: bench overrides
  local label=$1 args=$2; shift 2
  "$PY" -m toolkit.bench.startup bench.mode=serve "bench.server_args=['engine=gpu','model=random-8b',$args]" \
    bench.cache_dir="$OUT/xla_$label" bench.json_out="$OUT/startup_8b_$label.json" "$@" \
    2> "$OUT/startup_8b_$label.err" | tail -9
}
case "${1:-unified}" in
unified)
  # 64-word prompts (~420 byte-level tokens with the chat template), 256 tokens out, two waves
  # of requests per concurrency: most of the run is decode at the full batch
  # (logprobs: the random model's tokens are mostly ids with no text; with them every token
  # is streamed, so TTFT and TPOT are measured per token)
  serve unified "'role=unified'" bench.load.num_requests=256 bench.load.output_len=256 bench.load.logprobs=true \
    "bench.load_concurrency=[64,128]"
  # the engine alone at the same batch sizes and a context near the load's mean (~550)
  "$PY" -m toolkit.bench.decode "bench.backends=[auto]" "bench.modes=[overlap]" "bench.batch_sizes=[64,128]" \
    bench.ctx=512 bench.trace_steps=0 bench.json_out="$OUT/decode_8b.json" 2> "$OUT/decode_8b.err" | tail -6 ;;
roles)
  serve prefill "'role=prefill','transfer=nixl'"
  serve decode "'role=decode','transfer=nixl'" ;;
esac
