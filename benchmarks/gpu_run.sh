#!/usr/bin/env bash
# `kt microbench` on the lent GPU for every kernel `kt list` shows (or those named) and every
# GPU shape family, in at most 8.5 minutes for the shipped three. Run from the repository
# root with MAX/Mojo importable (e.g. on PYTHONPATH):
#
#   OUT=/path/to/results bash benchmarks/gpu_run.sh [KERNEL...]
#
# Writes <kernel>.json and <kernel>.png per kernel to $OUT, and gpu_run.log (everything
# printed, which ends with a summary: per case every provider's p50, each speed target as
# kt_graph's ratio [95% interval] met / missed / within noise, the rows whose two timings
# disagree and the rows kept out of ratios, with why). What runs comes from `python -m harness.bench plan`,
# which reads each kernel's benchmarks/<kernel>.toml (`warm`, `warm_split`, `time_limit_s`).
#
# Phase 1 compiles every provider that compiles (the kt op through a MAX graph and through
# the torch bridge, the Triton twin, and the file's `warm` providers: stock MAX graphs,
# torch.compile) in parallel processes, each running its provider once per shape untimed,
# to fill the on-disk caches (~/.cache/modular, Triton's and Inductor's). Phase 2 then times
# one kernel at a time on an otherwise idle machine, loading those caches. Every step has a
# time limit (seconds: WARM_S, and per kernel its file's `time_limit_s`, overridable as
# LIMIT_<kernel>=S; SHAPES_<kernel>=F,F limits a kernel to those shape families in both
# phases); a timed run that hits its limit gets SIGINT and saves what it measured
# (the JSON is also rewritten after every shape, so even a killed run leaves its rows). Each
# phase-2 row line starts with the seconds since its process started and ends with where its
# time went.
#
# FlashInfer (the `flashinfer` provider), when staged: KT_FLASHINFER_PYTHONPATH (as
# scripts/device-stage.sh prints it) goes on PYTHONPATH after MAX; its kernels are JIT-compiled
# by nvcc (CUDA_HOME, default /usr/local/cuda) in phase 1 and cached under
# FLASHINFER_WORKSPACE_BASE (default /tmp/kt-flashinfer), where phase 2 finds them. Unstaged,
# its rows say "n/a: flashinfer is not importable".
#
# Budget for the shipped kernels: ~8 s of imports and ~8 s of planning, the limits
# (150 + 150 + 85 + 85 s), ~5 s of summary: at most ~490 s, inside 520 s (a 540 s device
# slot less ~20 s of unpacking). Measured H100 runs are in benchmarks/results/README.md.
# Phase 1 on a machine with cold caches is the risk: on the H200 (2026-12-04c) all four
# kernels' jobs at once (8 stock-MAX attention graphs among them) did not finish in WARM_S=220,
# and the kernels whose compile was cut off spent their whole phase-2 limit compiling; one
# kernel at a time took 109 s (fused_rope_attention) and 75 s (rope).
set -u
OUT=${OUT:?set OUT to the folder the results go to}
PY=${PYTHON:-python3}
WARM_S=${WARM_S:-150}
DEVICE=${DEVICE:-gpu}  # DEVICE=cpu rehearses the script's flow on a CPU (cpu families)
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
exec > >(tee -a "$LOG") 2>&1
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 COLUMNS=220
if [ -n "${KT_FLASHINFER_PYTHONPATH:-}" ] && [[ ":${PYTHONPATH:-}:" != *":$KT_FLASHINFER_PYTHONPATH:"* ]]; then
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$KT_FLASHINFER_PYTHONPATH"
fi
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/kt-flashinfer}
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

stamp "kt microbench: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
$PY -c "import torch, max, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" || exit 1
$PY -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>/dev/null || echo "flashinfer: not importable (its rows are n/a)"

plan=$($PY -m harness.bench plan --device "$DEVICE" "$@") || exit 1

# --- phase 1: compile everything at once ---------------------------------------------
shapes() {  # kernel: the --shapes argument its SHAPES_<kernel> names, if set
  local var="SHAPES_$1"
  [ -n "${!var:-}" ] && printf '%s\n' --shapes "${!var}"
}
warm() {  # kernel provider [--where name=value ...]
  local sh; mapfile -t sh < <(shapes "$1")
  timeout -k 10 "$WARM_S" $PY -m harness.bench warm "$1" --device "$DEVICE" --providers "$2" "${sh[@]}" "${@:3}" \
    2>&1 | grep -E "^warm |Error|error" | tail -n 4 | sed "s/^/  [$*] /"
}
stamp "phase 1: compiling all providers in parallel (limit ${WARM_S} s)"
pids=()
while read -r -u 3 what args; do  # the plan on fd 3: the jobs keep their stdin
  [ "$what" = warm ] || continue
  # shellcheck disable=SC2086  # args: kernel provider [--where name=value ...]
  warm $args & pids+=($!)
done 3<<< "$plan"
wait "${pids[@]}"  # not a bare `wait`: it would also wait for the `tee` above
stamp "phase 1 done"

# --- phase 2: time one kernel at a time ----------------------------------------------
bench() {  # kernel limit_s
  local sh; mapfile -t sh < <(shapes "$1")
  stamp "phase 2: $1 (limit $2 s)${sh[1]:+, families ${sh[1]}}"
  timeout -s INT -k 30 "$2" $PY -m harness microbench "$1" --device "$DEVICE" "${sh[@]}" \
    --save "$OUT/$1.json" --plot "$OUT/$1.png"
  local rc=$?
  stamp "$1: exit code $rc"
  if [ -f "$OUT/$1.json" ] && [ ! -f "$OUT/$1.png" ]; then
    $PY -m harness.bench plot "$OUT/$1.json" "$OUT/$1.png" || true
  fi
}
files=()
while read -r -u 3 what kernel limit; do
  [ "$what" = time ] || continue
  override="LIMIT_$kernel"
  bench "$kernel" "${!override:-$limit}"
  [ -f "$OUT/$kernel.json" ] && files+=("$OUT/$kernel.json")
done 3<<< "$plan"

stamp "summary"
[ ${#files[@]} -gt 0 ] && $PY -m harness.bench summary "${files[@]}"
stamp "done"
