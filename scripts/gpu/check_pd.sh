#!/usr/bin/env bash
# P/D on GPUs: prefill and decode as two `python -m serve` processes, KV pools registered with
# NIXL as VRAM; greedy outputs of 16 concurrent requests must equal the unified engine's.
# GPU 0 -> GPU 0 (two processes, one GPU), and GPU 0 -> GPU 1 when there are two.
#   bash scripts/gpu/check_pd.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
# UCX's CUDA modules must find libcuda/libnvidia-ml (and libcudart): read once at process start
LDADD=$("$PY" -m toolkit.disagg.diagnose --ld-path 2>/dev/null | tail -1)
export LD_LIBRARY_PATH=${LDADD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
pairs="0:0"; (( $(nvidia-smi -L | grep -c '^GPU') >= 2 )) && pairs="0:0 0:1"
for pr in $pairs; do
  echo "== P/D check GPU ${pr%:*} -> GPU ${pr#*:}"
  timeout 300 "$PY" scripts/gpu/check_pd.py --src "${pr%:*}" --dst "${pr#*:}" 2>&1 | tee -a "$OUT/check_pd.txt" \
    | grep -E "RESULT|error"
done
