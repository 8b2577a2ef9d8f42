#!/usr/bin/env bash
# The transfer benchmark under several UCX environments, with UCX's own reports per run: which
# modules fail to load and why, and the protocol it picked for puts from GPU memory (zero-copy
# cuda_ipc/cuda = the fast path; software emulation over tcp = the ~0.5 GB/s path). What the
# variants showed is in docs/benchmarks.md ("Bandwidth: why it was 0.5 GB/s").
#   bash scripts/gpu/transfer_ucx_variants.sh        (env: MIB=512 REPEATS=3 BUDGET_S=360 RUN_TIMEOUT=90)
# No new variant starts after BUDGET_S seconds.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}; OUT=${OUT:-/tmp/ucx_variants}; mkdir -p "$OUT"
T0=$(date +%s); MIB=${MIB:-512}; REPEATS=${REPEATS:-3}; BUDGET_S=${BUDGET_S:-360}; RUN_TIMEOUT=${RUN_TIMEOUT:-90}
export XLA_PYTHON_CLIENT_PREALLOCATE=false NIXL_LOG_LEVEL=WARN
{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,pci.bus_id --format=csv
  nvidia-smi topo -m 2>/dev/null | head -12
  echo "kernel $(uname -r); ptrace_scope $(cat /proc/sys/kernel/yama/ptrace_scope 2>/dev/null || echo n/a) (cma needs it)"
} 2>&1 | tee "$OUT/env.txt"
LDADD=$("$PY" -m toolkit.disagg.diagnose --ld-path 2>/dev/null | tail -1)
LIBPATH="LD_LIBRARY_PATH=${LDADD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
timeout 120 "$PY" -m toolkit.disagg.diagnose 2>&1 | tee "$OUT/ucx_plain.txt"
env "$LIBPATH" timeout 120 "$PY" -m toolkit.disagg.diagnose --with-jax 2>&1 | tee "$OUT/ucx_libpath.txt"

run() {  # run NAME SRC DST "VAR=value ..." [overrides...]
  local name=$1 src=$2 dst=$3 envs=$4; shift 4
  if (( $(date +%s) - T0 > BUDGET_S )); then echo "-- skipped $name $src->$dst"; return; fi
  local log="$OUT/xfer_${name}_${src}${dst}.log"
  echo "######## $name: GPU $src -> GPU $dst   env: ${envs:-(none)}   $*"
  # shellcheck disable=SC2086
  env UCX_LOG_LEVEL=info UCX_MODULE_LOG_LEVEL=info UCX_PROTO_INFO=y $envs timeout -k 5 "$RUN_TIMEOUT" \
    "$PY" -m toolkit.bench.transfer bench.mib="$MIB" bench.repeats="$REPEATS" bench.src_device="$src" \
    bench.dst_device="$dst" bench.env_variant="$name" bench.startup_timeout_s=60 bench.xfer_timeout_s=20 \
    bench.json_out="$OUT/xfer_${name}_${src}${dst}.json" "$@" > "$log" 2>&1
  echo "rc=$?  log: $log"
  sed -E 's/^\[[0-9.]+\] \[[^]]*\] +//' "$log" | grep -E "dlopen\(.*failed|UCX  (WARN|ERROR)|^\[(src|dst)\] (cuda|pool)|^!!" \
    | sort | uniq -c | head -20
  grep -A7 -E "remote memory write by ucp_put\* from cuda" "$log" | sed -E 's/^\[[0-9.]+\] \[[^]]*\] +//' | head -12
  grep "^|" "$log"
}
run base    0 0 ""
run torch   0 0 "$LIBPATH" bench.alloc=torch
run libpath 0 0 "$LIBPATH"
run ppln    0 0 "$LIBPATH UCX_TLS=cuda_ipc,cuda_copy,cma,tcp UCX_RMA_PPLN_ENABLE=y"
run tls     0 0 "$LIBPATH UCX_TLS=cuda_ipc,cuda_copy,cma,tcp"
if (( $(nvidia-smi -L | grep -c '^GPU') >= 2 )); then
  run base  0 1 ""
  run torch 0 1 "$LIBPATH" bench.alloc=torch
fi
run cupy    0 0 "$LIBPATH" bench.alloc=cupy
