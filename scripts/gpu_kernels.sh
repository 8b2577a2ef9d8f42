#!/usr/bin/env bash
# Kernel tests (marked gpu) and the attention benchmark on the device machine.
# Device tool: carry .whlk (hydra/omegaconf/gguf for the config imports, pytest); env TESTS
# picks the test paths (default: the kernel grid and the engine-on-Pallas tests); run
#   bash scripts/gpu_kernels.sh [pytest args]
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whlk/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
O=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__, jax.devices())"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/kernels tests/engine/test_engine_pallas.py} "$@" 2>&1 \
    | tee $O/pytest_kernels.txt | tail -40
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 -m kernels.bench_attention ${BENCH_ARGS:-} 2>&1 | tee $O/bench_attention.txt
fi
if [ "${SKIP_E2E:-0}" != 1 ]; then
  python3 -m toolkit.bench_decode ${E2E_ARGS:-} 2>&1 | grep -v "it/s\]" | tee $O/bench_decode.txt
fi
