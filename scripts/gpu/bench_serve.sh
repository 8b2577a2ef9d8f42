#!/usr/bin/env bash
# The load generator against a unified server of the default model on this GPU (engine=gpu).
#   bash scripts/gpu/bench_serve.sh [bench.concurrency=32 bench.num_requests=256 ...]
#   SERVER_ARGS="model=hf model.path=DIR" bash scripts/gpu/bench_serve.sh     # another model
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
PORT=${PORT:-8000}
read -r -a SERVER <<< "${SERVER_ARGS:-}"
"$PY" -m serve engine=gpu "${SERVER[@]}" server.port="$PORT" > "$OUT/serve_server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 300); do
  "$PY" -c "import httpx; httpx.get('http://127.0.0.1:$PORT/health', timeout=1).raise_for_status()" 2>/dev/null \
    && break
  kill -0 $server 2>/dev/null || { echo "server exited:"; tail -20 "$OUT/serve_server.log"; exit 1; }
  sleep 1
done
# twice: the first run compiles the server's shapes
"$PY" -m toolkit.bench.serve bench.url="http://127.0.0.1:$PORT" "$@" > /dev/null
"$PY" -m toolkit.bench.serve bench.url="http://127.0.0.1:$PORT" bench.json_out="$OUT/serve.json" "$@" \
  | tee "$OUT/serve.txt"
