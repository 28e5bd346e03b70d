#!/usr/bin/env bash
# Correctness on the lent GPU after a kernel change, before timing it (issue: keep `kt verify`
# green on GPU after every speed change). Run from the repository root with MAX importable:
#
#   OUT=/path/to/results bash benchmarks/gpu_verify.sh [KERNEL...]   (default: `kt list`)
#
# 1. tests/mojo/gpu_launch.mojo --check: every GPU kernel launched for every dtype, then the
#    fused op's fast paths (RoPE pre-pass + MAX flash attention; the split-KV decode kernel)
#    against the simple fused kernel on random bf16 inputs.
# 2. `kt verify KERNEL --device gpu` with a small Hypothesis budget plus every golden case,
#    one JSON per kernel ($OUT/verify_<kernel>.json). The Triton twin JIT-compiles per shape
#    on a GPU, so the budget stays small (VERIFY_EXAMPLES); each cold MAX compile of a
#    (kernel, dtype) graph takes 50-75 s there. VERIFY_PARALLEL=1 runs the kernels side by side.
# Each step has a time limit; the summary line says which steps passed.
set -u
OUT=${OUT:?set OUT to the folder the results go to}
PY=${PYTHON:-python3}
# The mojo wheel's entry point sets the SDK paths (stdlib import path, driver) and execs the
# compiler; the bundle's bin/mojo wrapper script carries the packing machine's interpreter.
mojo() { $PY -c 'import sys; from mojo._entrypoints import exec_mojo; sys.argv[0] = "mojo"; exec_mojo()' "$@"; }
CHECK_S=${CHECK_S:-200}  # 0 skips step 1
VERIFY_S=${VERIFY_S:-240}
VERIFY_EXAMPLES=${VERIFY_EXAMPLES:-6}
VERIFY_FLAGS=${VERIFY_FLAGS:-}  # e.g. --no-triton, when the twin was verified already
VERIFY_PARALLEL=${VERIFY_PARALLEL:-0}  # 1: every kernel's verify at once, in its own process
kernels=("$@")
if [ ${#kernels[@]} -eq 0 ]; then
  mapfile -t kernels < <($PY -m harness list --names) || exit 1
fi
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_verify.log") 2>&1
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 COLUMNS=200
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
status=()

if [ "$CHECK_S" = 0 ]; then
  status+=("mojo-check:skipped")
else
  stamp "gpu_launch.mojo --check (limit ${CHECK_S} s)"
  export -f mojo; export PY
  timeout -k 10 "$CHECK_S" bash -c 'mojo run -I . tests/mojo/gpu_launch.mojo --check' 2>&1 \
    | grep -v Crashpad
  rc=${PIPESTATUS[0]}
  status+=("mojo-check:$([ "$rc" = 0 ] && echo PASS || echo "FAIL($rc)")")
fi
verify_one() {  # kernel
  timeout -s INT -k 20 "$VERIFY_S" $PY -m harness verify "$1" --device gpu \
    --examples "$VERIFY_EXAMPLES" $VERIFY_FLAGS --json "$OUT/verify_$1.json"
}
if [ "$VERIFY_PARALLEL" = 1 ]; then
  # Every kernel at once, each in its own process (its output to verify_<kernel>.log, printed
  # when it ends): the cold MAX compiles run side by side, the GPU is shared.
  stamp "kt verify ${kernels[*]} --device gpu --examples $VERIFY_EXAMPLES $VERIFY_FLAGS, in parallel (limit ${VERIFY_S} s)"
  pids=()
  for k in "${kernels[@]}"; do
    verify_one "$k" >"$OUT/verify_$k.log" 2>&1 & pids+=($!)
  done
  for i in "${!kernels[@]}"; do
    wait "${pids[$i]}"; rc=$?
    k=${kernels[$i]}
    stamp "kt verify $k: exit code $rc"; cat "$OUT/verify_$k.log"
    status+=("$k:$([ "$rc" = 0 ] && echo PASS || echo "FAIL($rc)")")
  done
else
  for k in "${kernels[@]}"; do
    stamp "kt verify $k --device gpu --examples $VERIFY_EXAMPLES $VERIFY_FLAGS (limit ${VERIFY_S} s)"
    verify_one "$k"; rc=$?
    status+=("$k:$([ "$rc" = 0 ] && echo PASS || echo "FAIL($rc)")")
  done
fi
stamp "summary: ${status[*]}"
