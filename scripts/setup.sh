#!/usr/bin/env bash
# Installs kt into .venv from pyproject.toml (pip; the CPU build of torch 2.13.0), then, with
# --serving, the serving engines into .venvs/ (scripts/setup-serving.sh). Idempotent.
#   bash scripts/setup.sh [--serving]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.kt-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and alone: 2.13.0 resolves to the CPU build on kt machines, and with it
  # installed nothing later pulls a CUDA one.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e .
  touch "$stamp"
fi
if [ "${1:-}" = "--serving" ]; then
  bash scripts/setup-serving.sh
fi
