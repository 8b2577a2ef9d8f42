#!/usr/bin/env bash
# KV page transfer bandwidth over NIXL/UCX on the GPU machine, under several UCX environments.
#
#   carry .whl/ (nixl_cu13-1.5.1-cp312-...whl + hydra-core/omegaconf/antlr4/gguf wheels); run:
#   bash scripts/gpu_pd_transfer.sh           (env: MIB=512 REPEATS=3 BUDGET_S=360 RUN_TIMEOUT=90)
#
# Prints environment facts, which UCX modules load (and the missing library when one does not),
# then runs `python -m toolkit.disagg.bench_transfer` per variant: GPU 0 -> GPU 0 (two processes
# sharing one GPU) and, with 2+ GPUs visible, 0 -> 1. Full logs and JSON in $OUT; per run it shows
# UCX's module failures, the protocol UCX chose for "ucp_put* from cuda memory to cuda"
# (zero-copy cuda_ipc/cuda = fast path; software emulation / tcp = the 0.3-0.5 GB/s path) and the
# table. No new variant starts after BUDGET_S seconds, so the whole run stays near 8 minutes.
#
# Why these variants (findings on the nixl-cu13 1.5.1 wheel, UCX 1.23.0 bundled):
#  * UCX finds its modules itself (dladdr of libucs -> nixl_cu13.libs/ucx/, no UCX_MODULE_DIR
#    needed). libuct_cuda.so (cuda_copy + cuda_ipc) NEEDs libcuda.so.1 and libnvidia-ml.so.1 only
#    (driver libs, not libcudart); libucm_cuda.so (memory hooks) NEEDs libcudart.so.13 too. There
#    is no gdr_copy module at all (the wheel's UCX is built --without-gdrcopy). If a dlopen fails,
#    UCX_MODULE_LOG_LEVEL=info prints "dlopen(...libuct_cuda...) failed: <lib>: cannot open".
#    `libpath` prepends the dirs of those libs (found by bench_transfer --ld-path).
#  * NIXL refuses VRAM registration when UCX has no CUDA memory type, so a VRAM transfer that ran
#    at all had cuda_copy. The likelier cause of 0.3-0.5 GB/s: JAX >= 0.11 allocates every device
#    buffer through XLA's VMM allocator (cuMemCreate, POSIX-fd shareable), which is not "legacy
#    CUDA IPC capable"; this UCX's cuda_ipc exports such memory only as a FABRIC handle (the POSIX-fd
#    export landed in UCX master in July 2026, openucx/ucx#11183), so the rkey says NO_IPC and UCX
#    falls back to software-emulated RMA over tcp with cuda_copy staging (openucx/ucx#11548,
#    ai-dynamo/nixl#1754 report the same 0.3 GB/s). Each run prints the pool pointer's
#    legacy_cuda_ipc_capable / allowed_handle_types to confirm. `torch` and `cupy` allocate the
#    pools with cudaMalloc (legacy IPC capable) to show the cuda_ipc speed on this machine;
#    `ppln` tries UCX's pipelined host staging for the emulated path.
#  * cuda_ipc never connects two agents of ONE process ("same process" is unreachable), so PDPair
#    (prefill + decode in one process) can never use it; the benchmark uses two processes.
#  * JAX arrays give raw pointers with unsafe_buffer_pointer() (a device pointer on GPU). JAX
#    preallocates 75% of GPU memory per process: XLA_PYTHON_CLIENT_PREALLOCATE=false (set below;
#    or XLA_PYTHON_CLIENT_MEM_FRACTION=.35) lets two processes share one GPU.
set -uo pipefail
OUT=${OUT:-/tmp/pd_transfer}
mkdir -p "$OUT"
T0=$(date +%s)
MIB=${MIB:-512}
REPEATS=${REPEATS:-3}
BUDGET_S=${BUDGET_S:-360}
RUN_TIMEOUT=${RUN_TIMEOUT:-90}

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false NIXL_LOG_LEVEL=WARN
BENCH="python3 -m toolkit.disagg.bench_transfer"

{
  echo "== GPUs"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,pci.bus_id --format=csv
  nvidia-smi topo -m 2>/dev/null | head -12
  echo "== kernel $(uname -r); ptrace_scope $(cat /proc/sys/kernel/yama/ptrace_scope 2>/dev/null || echo n/a)" \
       "(cma needs ptrace access to the peer)"
  echo "== LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  echo "== ldconfig: $(ldconfig -p 2>/dev/null | grep -E 'libcuda\.so\.1|libnvidia-ml\.so\.1|libcudart\.so' | tr -s ' \t' ' ' | tr '\n' ';')"
  ls -d /usr/local/nvidia/lib64 /usr/local/cuda*/compat 2>/dev/null
  python3 -c "import jax, jaxlib; print('== jax', jax.__version__, jax.devices())" 2>&1 | tail -1
  python3 -c "import torch; print('== torch', torch.__version__, torch.version.cuda, torch.cuda.device_count())" 2>&1 | tail -1
  python3 -c "import cupy; print('== cupy', cupy.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"

LDADD=$($BENCH --ld-path 2>/dev/null | tail -1)
LIBPATH="LD_LIBRARY_PATH=${LDADD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== suggested LD_LIBRARY_PATH additions: ${LDADD:-(none)}"
echo "== UCX modules and resources, environment as given"
timeout 120 $BENCH --ucx-info 2>&1 | tee "$OUT/ucx_info_plain.txt"
echo "== UCX modules and resources with $LIBPATH, after JAX initialised the GPUs"
env "$LIBPATH" timeout 120 $BENCH --ucx-info --with-jax 2>&1 | tee "$OUT/ucx_info_libpath.txt"

NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# run NAME SRC DST "VAR=value ..." "bench args"
run() {
  local name=$1 src=$2 dst=$3 envs=$4 extra=$5
  local used=$(( $(date +%s) - T0 ))
  if (( used > BUDGET_S )); then echo "-- skipped $name $src->$dst (${used}s used)"; return; fi
  local log="$OUT/xfer_${name}_${src}${dst}.log"
  echo
  echo "######## $name: GPU $src -> GPU $dst   env: ${envs:-(none)}   args: ${extra:-(none)}"
  # shellcheck disable=SC2086
  env UCX_LOG_LEVEL=info UCX_MODULE_LOG_LEVEL=info UCX_PROTO_INFO=y $envs \
    timeout -k 5 "$RUN_TIMEOUT" $BENCH --mib "$MIB" --repeats "$REPEATS" --src-device "$src" --dst-device "$dst" \
      --env-variant "$name" --startup-timeout 60 --xfer-timeout 20 --json-out "$OUT/xfer_${name}_${src}${dst}.json" \
      $extra > "$log" 2>&1
  echo "rc=$? ($(( $(date +%s) - T0 ))s elapsed)  log: $log"
  # UCX lines: strip "[time] [host:pid:tid]" so repeats collapse
  sed -E 's/^\[[0-9.]+\] \[[^]]*\] +//' "$log" \
    | grep -E "dlopen\(.*failed|UCX  (WARN|ERROR)|intra-node cfg|UCX_\* env|^\[(src|dst)\] (cuda|pool|ucp resource)|^!!|Error|error:" \
    | grep -v '^|' | sort | uniq -c | head -40
  echo "-- UCX protocol for puts from GPU memory (initiator):"
  grep -A7 -E "remote memory write by ucp_put\* from cuda" "$log" | sed -E 's/^\[[0-9.]+\] \[[^]]*\] +//' | head -20
  sed -n '/^== results/,$p' "$log"
  sed -n '/^== results/,$p' "$log" | grep -vE '^(== results|variant|---)' | sed "s/^/$name $src->$dst | /" >> "$SUMMARY"
}

# One GPU, two processes. Most informative first: the budget may cut the tail.
run base    0 0 ""                                                         ""
run torch   0 0 "$LIBPATH"                                                 "--alloc torch"
run libpath 0 0 "$LIBPATH"                                                 ""
run ppln    0 0 "$LIBPATH UCX_TLS=cuda_ipc,cuda_copy,cma,tcp UCX_RMA_PPLN_ENABLE=y" ""
run tls     0 0 "$LIBPATH UCX_TLS=cuda_ipc,cuda_copy,cma,tcp"              ""
if (( NGPU >= 2 )); then
  run base  0 1 ""                                                         ""
  run torch 0 1 "$LIBPATH"                                                 "--alloc torch"
  run ppln  0 1 "$LIBPATH UCX_TLS=cuda_ipc,cuda_copy,cma,tcp UCX_RMA_PPLN_ENABLE=y" ""
fi
run cupy    0 0 "$LIBPATH"                                                 "--alloc cupy"

echo
echo "== summary (variant pair | row, bytes, ms, GB/s, ratio, post ms, notif ms, descs/runs, verify), $(( $(date +%s) - T0 ))s total"
cat "$SUMMARY"
