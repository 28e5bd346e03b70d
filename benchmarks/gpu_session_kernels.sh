#!/usr/bin/env bash
# The kernel half of a GPU session that runs beside benchmarks/serving/gpu_serve.sh, in three
# steps, each one benchmarks/gpu_kernels.sh run over one private copy of the repository (a later
# device call re-syncs the working tree; the copy does not change under the run):
#
#   1. verify (VERIFY_KERNELS; default the paged ops and rms_norm, the kernels MAX Serve runs),
#      whose first step, tests/mojo/gpu_launch.mojo --check, also compares the candidate kernel
#      of kernels/paged_rope_attention.mojo with the one in use (FLAG below; its line in the
#      check's output is CHECK_LINE);
#   2. when that check passed: FLAG turned on in the copy and `kt verify paged_rope_attention
#      --device gpu` again, so the op takes the candidate only once it has passed through MAX
#      as well;
#   3. once the file AFTER exists (the serving run's DONE: no kernel is timed while engines
#      serve), the microbench of BENCH_KERNELS and paged_rope_attention, with FLAG on when step 2
#      passed.
#
#   KT_GIT_SHA=<sha> STAGE_ARGS="max=4 flashinfer=1" AFTER=/tmp/kt-serve/DONE \
#     setsid nohup bash benchmarks/gpu_session_kernels.sh >/tmp/kt-session.out 2>&1 </dev/null &
#
# Variables (defaults): RESULTS (/tmp/kt-session), VERIFY_KERNELS ("paged_rope_store
# paged_rope_attention rms_norm"; none: no steps 1 and 2, the kernels as shipped), FLAG
# (PIPELINED_DECODE: the split-KV decode's key loads one step ahead), CHECK_LINE ("paged decode
# check: all PASS"), BENCH_KERNELS ("rope rms_norm fused_rope_attention"), AFTER (none: no
# wait), AFTER_WAIT_S (1200), STAGE_ARGS (as gpu_kernels.sh takes it; step 3 waits for the
# flashinfer bundle when it names one), VERIFY_LIMIT_S (540), BENCH_LIMIT_S (720).
# Progress: $RESULTS/status.txt. The end: $RESULTS/DONE and $RESULTS/k1.tar.xz, k2.tar.xz,
# k3.tar.xz (each step's verify/ or microbench/ folder, logs, machine.txt).
set -uo pipefail
main() {
  SRC=$(cd "$(dirname "$0")/.." && pwd)
  RESULTS=${RESULTS:-/tmp/kt-session}
  VERIFY_KERNELS=${VERIFY_KERNELS:-paged_rope_store paged_rope_attention rms_norm}
  BENCH_KERNELS=${BENCH_KERNELS:-rope rms_norm fused_rope_attention}
  mkdir -p "$RESULTS"
  rm -f "$RESULTS/DONE"
  STATUS="$RESULTS/status.txt"
  t0=$(date +%s)
  stamp() { local line="[$(( $(date +%s) - t0 )) s] $*"; echo "$line" >>"$STATUS"; echo "$line"; }
  trap 'stamp "stopped by a signal"; echo stopped >"$RESULTS/DONE"; exit 143' TERM INT HUP

  COPY="$RESULTS/src"
  rm -rf "$COPY" && mkdir -p "$COPY"
  for item in harness pykernels kernels benchmarks scripts tests pyproject.toml; do
    [ -e "$SRC/$item" ] && cp -a "$SRC/$item" "$COPY/"
  done

  kernels() {  # step name, then VAR=value settings for gpu_kernels.sh
    local name=$1; shift
    stamp "$name: gpu_kernels.sh $*"
    (cd "$COPY" && env RESULTS="$RESULTS/$name" "$@" bash benchmarks/gpu_kernels.sh \
      >"$RESULTS/$name.out" 2>&1)
    stamp "$name: $(cat "$RESULTS/$name/DONE" 2>/dev/null || echo 'no summary')"
  }

  FLAG=${FLAG:-PIPELINED_DECODE}
  CHECK_LINE=${CHECK_LINE:-paged decode check: all PASS}
  OP="$COPY/kernels/paged_rope_attention.mojo"
  on=""
  [[ " $BENCH_KERNELS " == *" paged_rope_attention "* ]] || BENCH_KERNELS="$BENCH_KERNELS paged_rope_attention"
  if [ "$VERIFY_KERNELS" = none ]; then
    stamp "no verify steps (VERIFY_KERNELS=none): the kernels as shipped"
  else
    kernels k1 STAGE_ARGS="${STAGE_ARGS%% *}" VERIFY_KERNELS="$VERIFY_KERNELS" BENCH_KERNELS=none \
      KERNELS_LIMIT_S="${VERIFY_LIMIT_S:-540}" CHECK_S=300
    if grep -q "^comptime $FLAG = True\$" "$OP"; then
      on=1
      stamp "$FLAG is on as shipped: no step 2"
    elif grep -qF "$CHECK_LINE" "$RESULTS/k1/verify/gpu_verify.log" 2>/dev/null; then
      sed -i "s/^comptime $FLAG = False\$/comptime $FLAG = True/" "$OP"
      if grep -q "^comptime $FLAG = True\$" "$OP"; then
        # CHECK_S=0: gpu_launch --check ran in step 1; this step is the op through MAX.
        kernels k2 STAGE_ARGS="${STAGE_ARGS%% *}" VERIFY_KERNELS=paged_rope_attention \
          BENCH_KERNELS=none KERNELS_LIMIT_S="${VERIFY_LIMIT_S:-540}" CHECK_S=0
        if grep -q "paged_rope_attention:PASS" "$RESULTS/k2/verify/gpu_verify.log" 2>/dev/null; then
          on=1
          stamp "$FLAG passed kt verify on the GPU: the microbench times it"
        else
          sed -i "s/^comptime $FLAG = True\$/comptime $FLAG = False/" "$OP"
          stamp "$FLAG failed kt verify on the GPU: it stays off"
        fi
      fi
    else
      stamp "no '$CHECK_LINE' in step 1: $FLAG stays off"
    fi
  fi

  if [ -n "${AFTER:-}" ]; then
    stamp "waiting for $AFTER"
    local until=$(( $(date +%s) + ${AFTER_WAIT_S:-1200} ))
    while [ ! -e "$AFTER" ] && [ "$(date +%s)" -lt "$until" ]; do sleep 2; done
    stamp "$([ -e "$AFTER" ] && echo "$AFTER is there" || echo "gave up waiting for $AFTER")"
  fi
  kernels k3 STAGE_ARGS="${STAGE_ARGS:-}" VERIFY_KERNELS=none BENCH_KERNELS="$BENCH_KERNELS" \
    KERNELS_LIMIT_S="${BENCH_LIMIT_S:-720}"
  echo "$FLAG=${on:-0}" >"$RESULTS/DONE"
  stamp "done ($FLAG $([ -n "$on" ] && echo on || echo off))"
}
main "$@"
exit $?
