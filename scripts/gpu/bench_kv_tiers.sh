#!/usr/bin/env bash
# The KV tiers below the device prefix cache (toolkit/cache/tiers.py) on one GPU, with
# scripts/bench_kv_tiers.py --gpu:
#  1. movement: 1 GiB of Llama-8B-shaped pages (32 layers, 8 KV heads, head dim 128, page
#     16, bf16: 2 MiB a page with K and V) device -> host, host -> device, host -> file and
#     file -> host, scattered and contiguous, against a same-run device copy, np.copyto and
#     plain pwrite / preadv; once with reads from the page cache and no fsync, once with
#     fsync after writes and cold reads (the file's pages evicted before each read);
#  2. workload: a unified random-8b server per setting (cache none; radix; radix + 32 GiB
#     host; + 24 GiB file storage; radix + 8 GiB host + storage) under 32 interleaved
#     conversations whose working set (~23 GiB of KV) is ~5.6x the 2048-page device pool.
#   bash scripts/gpu/bench_kv_tiers.sh                 # both parts (the workload: ~10-20 min, estimated)
#   PART=movement bash scripts/gpu/bench_kv_tiers.sh   # or PART=workload; extra args go to the script
#   KV_DIR=/mnt/nvme/kv bash scripts/gpu/bench_kv_tiers.sh   # the disk the file tier is measured on
# Needs ~30 GiB free under KV_DIR (default $OUT/kv_tiers_files) and ~40 GiB of host memory.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp}; mkdir -p "$OUT"
LDADD=$("$PY" -m toolkit.disagg.diagnose --ld-path 2>/dev/null | tail -1)
export LD_LIBRARY_PATH=${LDADD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
PART=${PART:-all}; DIR=${KV_DIR:-$OUT/kv_tiers_files}; mkdir -p "$DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/kv_tiers.txt"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>/dev/null | tee -a "$OUT/kv_tiers.txt"
df -hT "$DIR" | tee -a "$OUT/kv_tiers.txt"
rc=0
if [[ $PART == all || $PART == movement ]]; then
  for flags in "" "--fsync --cold-reads"; do
    echo "== movement $flags" | tee -a "$OUT/kv_tiers.txt"
    # shellcheck disable=SC2086
    timeout -k 10 600 "$PY" scripts/bench_kv_tiers.py --gpu --part movement --dir "$DIR" $flags \
      --json-out "$OUT/kv_tiers_movement${flags:+_cold}.json" "$@" 2>>"$OUT/kv_tiers.log" \
      | tee -a "$OUT/kv_tiers.txt" || rc=1
  done
fi
if [[ $PART == all || $PART == workload ]]; then
  echo "== workload" | tee -a "$OUT/kv_tiers.txt"
  timeout -k 30 3600 "$PY" scripts/bench_kv_tiers.py --gpu --part workload --dir "$DIR" \
    --log-dir "$OUT" --json-out "$OUT/kv_tiers_workload.json" "$@" 2>>"$OUT/kv_tiers.log" \
    | tee -a "$OUT/kv_tiers.txt" || rc=1
fi
exit $rc
