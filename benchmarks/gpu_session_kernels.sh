#!/usr/bin/env bash
# The kernel half of a GPU session that runs beside benchmarks/serving/gpu_serve.sh, in three
# steps, each one benchmarks/gpu_kernels.sh run over one private copy of the repository (a later
# device call re-syncs the working tree; the copy does not change under the run):
#
#   1. check, time: tests/mojo/gpu_launch.mojo --check, then tests/mojo/gpu_bench.mojo with
#      the candidates that passed. A candidate kernel (CANDIDATES: its flag, a
#      `comptime NAME = False` line in exactly one kernels/*.mojo, and its label) is turned on in
#      the copy when the check printed the line "<label> check: all PASS" and the bench a line
#      starting "<label> faster: yes". Then $RESULTS/kernels_ready names the flags turned
#      on: gpu_serve.sh's START_AFTER, so that max+kt serves the kernels picked here
#      (SERVE_KERNELS=$RESULTS/src/kernels);
#   2. verify: `kt verify` of VERIFY_KERNELS on the GPU with the flags picked, then
#      $RESULTS/verified (gpu_serve.sh's START_AFTER or MEASURE_AFTER). A flag of step 1 is
#      turned off again in the copy when an op that reaches its file (imports it, directly or
#      not) did not pass, or when the step gave no summary (the microbench then times those ops
#      as shipped; a serving run that started with them says so: kernels_ready is rewritten);
#   3. once the file AFTER exists (the serving run's DONE), the microbench of BENCH_KERNELS.
#
#   KT_GIT_SHA=<sha> STAGE_ARGS="max=4 flashinfer=1" AFTER=/tmp/kt-serve/DONE \
#     setsid nohup bash benchmarks/gpu_session_kernels.sh >/tmp/kt-session.out 2>&1 </dev/null &
#
# Variables (defaults): RESULTS (/tmp/kt-session), CANDIDATES ("EXACT_LENGTHS=exact lengths";
# none: no step 1 programs; TILED_DECODE and MAX_PREFILL were picked this way on 2026-12-03,
# DENSE_TILED_DECODE and ROPE_TWIN on 2026-12-04, RMS_NORM_LEAN and DENSE_WAVE_DECODE later that
# day; a flag on as shipped is left alone),
# VERIFY_KERNELS ("paged_rope_attention rms_norm", the ops the candidates are in;
# none: no step 2), VERIFY_S (360: its time limit),
# VERIFY_FLAGS ("--no-triton --dtype bfloat16 --dtype float16"),
# BENCH_KERNELS ("paged_rope_attention"), AFTER (none: no wait), AFTER_WAIT_S (1200),
# STAGE_ARGS (as gpu_kernels.sh takes it; step 3 waits for the flashinfer bundle when it names
# one), PICK_LIMIT_S (420), VERIFY_LIMIT_S (420), BENCH_LIMIT_S (720), CHECK_FROM (the check
# folder of an earlier run of the same code: step 1's check is not run again).
# Progress: $RESULTS/status.txt. The end: $RESULTS/DONE (the flags on) and $RESULTS/check.tar.xz,
# time.tar.xz, verify.tar.xz, bench.tar.xz (each step's mojo/, verify/ or microbench/ folder, logs,
# machine.txt).
set -uo pipefail
main() {
  SRC=$(cd "$(dirname "$0")/.." && pwd)
  RESULTS=${RESULTS:-/tmp/kt-session}
  CANDIDATES=${CANDIDATES-EXACT_LENGTHS=exact lengths}
  VERIFY_KERNELS=${VERIFY_KERNELS:-paged_rope_attention rms_norm}
  BENCH_KERNELS=${BENCH_KERNELS:-paged_rope_attention}
  mkdir -p "$RESULTS"
  rm -f "$RESULTS/DONE" "$RESULTS/kernels_ready" "$RESULTS/verified"
  STATUS="$RESULTS/status.txt"
  t0=$(date +%s)
  stamp() { local line="[$(( $(date +%s) - t0 )) s] $*"; echo "$line" >>"$STATUS"; echo "$line"; }
  on=()
  # Whatever happens, the serving run waiting on these files is not left waiting.
  release() { [ -e "$RESULTS/kernels_ready" ] || echo "${on[*]:-none}" >"$RESULTS/kernels_ready"
              [ -e "$RESULTS/verified" ] || echo "not verified" >"$RESULTS/verified"; }
  trap 'stamp "stopped by a signal"; release; echo stopped >"$RESULTS/DONE"; exit 143' TERM INT HUP
  trap 'release' EXIT

  COPY="$RESULTS/src"
  rm -rf "$COPY" && mkdir -p "$COPY"
  for item in harness pykernels kernels benchmarks scripts tests pyproject.toml; do
    [ -e "$SRC/$item" ] && cp -a "$SRC/$item" "$COPY/"
  done
  STAGE_ARGS=${STAGE_ARGS:-}
  stage_max=${STAGE_ARGS%% *}  # the MAX bundle's NAME=PARTS: steps 1 and 2 need no other
  flag_file() {  # NAME: the copy's one kernels/*.mojo that defines the flag; fails when no
                 # file or several do
    local files
    mapfile -t files < <(grep -lE "^comptime $1 = (True|False)\$" "$COPY"/kernels/*.mojo)
    [ ${#files[@]} -eq 1 ] && echo "${files[0]}"
  }
  flag() {  # NAME True|False: set the flag in its file
    local file
    file=$(flag_file "$1") || return 1
    sed -i "s/^comptime $1 = \(True\|False\)\$/comptime $1 = $2/" "$file"
    grep -q "^comptime $1 = $2\$" "$file"
  }

  reaches() {  # OP FILE: whether kernels/OP.mojo is FILE or imports it, directly or not
    local want seen=" " todo=("$1") f dep
    want=$(basename "$2" .mojo)
    while [ ${#todo[@]} -gt 0 ]; do
      f=${todo[0]}; todo=("${todo[@]:1}")
      [ "$f" = "$want" ] && return 0
      [[ "$seen" == *" $f "* ]] && continue
      seen="$seen$f "
      for dep in $(sed -nE 's/^from (kernels)?\.([a-z_0-9]+) import.*/\2/p' "$COPY/kernels/$f.mojo" 2>/dev/null); do
        todo+=("$dep")
      done
    done
    return 1
  }

  kernels() {  # step name, then VAR=value settings for gpu_kernels.sh
    local name=$1; shift
    stamp "$name: gpu_kernels.sh $*"
    (cd "$COPY" && env RESULTS="$RESULTS/$name" "$@" bash benchmarks/gpu_kernels.sh \
      >"$RESULTS/$name.out" 2>&1)
    stamp "$name: $(cat "$RESULTS/$name/DONE" 2>/dev/null || echo 'no summary')"
  }

  if [ "$CANDIDATES" != none ]; then
    # NAME=label pairs; a label is the words up to the next NAME=.
    local pairs passed=()
    pairs=$(sed -E 's/ ([A-Z][A-Z0-9_]*=)/\n\1/g' <<<"$CANDIDATES")
    if [ -n "${CHECK_FROM:-}" ]; then  # an earlier check step's folder (same code): not run again
      rm -rf "$RESULTS/check" && cp -a "$CHECK_FROM" "$RESULTS/check"
      stamp "check: the results of $CHECK_FROM"
    else
      kernels check STAGE_ARGS="$stage_max" VERIFY_KERNELS=none BENCH_KERNELS=none \
        KERNELS_LIMIT_S="${PICK_LIMIT_S:-420}" MOJO_RUNS="tests/mojo/gpu_launch.mojo --check"
    fi
    while IFS='=' read -r name label; do
      [ -n "$name" ] || continue
      if grep -qsx "comptime $name = True" "$COPY"/kernels/*.mojo; then
        stamp "$name is on as shipped: left alone"
      # Whole lines: "tiled decode" must not pass on "dense tiled decode"'s line.
      elif grep -qxF "$label check: all PASS" "$RESULTS/check/mojo/gpu_launch.log" 2>/dev/null; then
        passed+=("$name")
      else
        stamp "$name stays off: no '$label check: all PASS'"
      fi
    done <<<"$pairs"
    # Only the candidates that passed are timed (one that faults must not take the bench down).
    kernels time STAGE_ARGS="$stage_max" VERIFY_KERNELS=none BENCH_KERNELS=none \
      KERNELS_LIMIT_S="${PICK_LIMIT_S:-420}" MOJO_RUNS="tests/mojo/gpu_bench.mojo ${passed[*]}"
    while IFS='=' read -r name label; do
      [[ " ${passed[*]} " == *" $name "* ]] || continue
      if ! grep -q "^$label faster: yes" "$RESULTS/time/mojo/gpu_bench.log" 2>/dev/null; then
        stamp "$name stays off: checked, but not '$label faster: yes'"
      elif flag "$name" True; then
        on+=("$name")
        stamp "$name on: checked and faster"
      else
        stamp "$name: not exactly one kernels/*.mojo with a 'comptime $name = ...' line"
      fi
    done <<<"$pairs"
  fi
  echo "${on[*]:-none}" >"$RESULTS/kernels_ready"

  if [ "$VERIFY_KERNELS" != none ]; then
    kernels verify STAGE_ARGS="$stage_max" VERIFY_KERNELS="$VERIFY_KERNELS" BENCH_KERNELS=none \
      KERNELS_LIMIT_S="${VERIFY_LIMIT_S:-420}" CHECK_S=0 VERIFY_EXAMPLES="${VERIFY_EXAMPLES:-3}" VERIFY_S="${VERIFY_S:-360}" \
      VERIFY_FLAGS="${VERIFY_FLAGS:---no-triton --dtype bfloat16 --dtype float16}"
    # A flag stays on when every verified op that reaches its file (the op's own file, or one it
    # imports, directly or through another kernels/ file) passed; with no summary line (the
    # step stopped) every flag goes off.
    local summary name kept=() dropped=()
    summary=$(grep -o 'summary: .*' "$RESULTS/verify/verify/gpu_verify.log" 2>/dev/null | tail -n 1)
    for name in "${on[@]}"; do
      local bad=""
      if [ -z "$summary" ]; then
        bad="no verify summary"
      else
        for op in $VERIFY_KERNELS; do
          if reaches "$op" "$(flag_file "$name")" && [[ " ${summary#summary: } " != *" $op:PASS "* ]]; then
            bad="$bad $op"
          fi
        done
      fi
      if [ -n "$bad" ]; then flag "$name" False; dropped+=("$name (${bad# })"); else kept+=("$name"); fi
    done
    if [ ${#dropped[@]} -gt 0 ]; then
      stamp "off again after kt verify on the GPU: ${dropped[*]} (the microbench times those ops as shipped)"
      echo "${kept[*]:-none} (off after kt verify: ${dropped[*]}; the engines started with them)" >"$RESULTS/kernels_ready"
    fi
    on=("${kept[@]}")
  fi
  echo "${on[*]:-none}" >"$RESULTS/verified"

  if [ -n "${AFTER:-}" ]; then
    stamp "waiting for $AFTER"
    local until=$(( $(date +%s) + ${AFTER_WAIT_S:-1200} ))
    while [ ! -e "$AFTER" ] && [ "$(date +%s)" -lt "$until" ]; do sleep 2; done
    stamp "$([ -e "$AFTER" ] && echo "$AFTER is there" || echo "gave up waiting for $AFTER")"
  fi
  if [ "$BENCH_KERNELS" != none ]; then
    kernels bench STAGE_ARGS="${STAGE_ARGS:-}" VERIFY_KERNELS=none BENCH_KERNELS="$BENCH_KERNELS" \
      KERNELS_LIMIT_S="${BENCH_LIMIT_S:-720}"
  fi
  echo "on: ${on[*]:-none}" >"$RESULTS/DONE"
  stamp "done (on: ${on[*]:-none})"
}
main "$@"
exit $?
