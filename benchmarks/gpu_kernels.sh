#!/usr/bin/env bash
# The kernel half of a GPU session, meant to run in the background beside
# benchmarks/serving/gpu_serve.sh on the same machine: `gpu_verify.sh` (every kernel's verify at
# once), then `gpu_run.sh` (the microbench of every kernel), under one hard deadline, then a
# marker file that gpu_serve.sh's MEASURE_AFTER waits for, so that no serving load point is
# measured while a kernel is timed (the engines start up meanwhile).
#
#   KT_GIT_SHA=<sha> STAGE_ARGS="max=3" setsid nohup bash benchmarks/gpu_kernels.sh \
#       >/tmp/kt-kernels.out 2>&1 </dev/null &
#   cat /tmp/kt-kernels/status.txt                 # progress, one line per phase
#   cp /tmp/kt-kernels.tar.xz "$OUT"/              # once /tmp/kt-kernels/DONE exists
#
# Variables (defaults): RESULTS (/tmp/kt-kernels), KERNELS_LIMIT_S (720: verify and microbench
# together; at the limit the running step gets SIGINT, and saves what it measured, then
# SIGKILL), VERIFY_KERNELS (every kernel of `kt list`; "none" skips verify), BENCH_KERNELS (the
# same, for the microbench), VERIFY_S (200), VERIFY_EXAMPLES (4), VERIFY_FLAGS, gpu_run.sh's
# WARM_S and LIMIT_<kernel>, and MOJO_RUNS: Mojo programs run first, one after another
# (`mojo run -I .`; ';' between programs, each with its arguments, e.g.
# "tests/mojo/gpu_launch.mojo --check;tests/mojo/gpu_bench.mojo"), each one's output in
# $RESULTS/mojo/<program>.log. With STAGE_ARGS it first waits (STAGE_WAIT_S, 600) for
# scripts/device-stage.sh to have unpacked the MAX bundle, and the flashinfer bundle when
# STAGE_ARGS names it (then on PYTHONPATH after MAX); else MAX must be importable.
# The end: $RESULTS/DONE, holding the summary line, and $RESULTS.tar.xz (verify/ and
# microbench/: JSON, PNG, logs; machine.txt; status.txt). A SIGTERM to the script's process
# group stops the work the same way and still writes both.
set -uo pipefail
main() {
  SRC=$(cd "$(dirname "$0")/.." && pwd)
  RESULTS=${RESULTS:-/tmp/kt-kernels}
  PY=${PYTHON:-python3}
  LIMIT=${KERNELS_LIMIT_S:-720}
  mkdir -p "$RESULTS"
  rm -f "$RESULTS/DONE" "$RESULTS.tar.xz"
  STATUS="$RESULTS/status.txt"
  t0=$(date +%s)
  deadline=$(( t0 + LIMIT ))
  stamp() {
    local line="[$(( $(date +%s) - t0 )) s] $*"
    echo "$line" >>"$STATUS"
    echo "$line"
  }
  export PYTHONUNBUFFERED=1

  # A private copy of the repository: a later device call re-syncs the working tree.
  RUN="$RESULTS/repo"
  rm -rf "$RUN" && mkdir -p "$RUN/tests"
  for item in harness pykernels kernels benchmarks scripts pyproject.toml; do
    [ -e "$SRC/$item" ] && cp -a "$SRC/$item" "$RUN/"
  done
  cp -a "$SRC/tests/mojo" "$RUN/tests/"
  cd "$RUN" || exit 1

  work=""
  stopped=""
  finish() {  # stop the work, pack, write the marker; runs once
    trap - EXIT INT TERM HUP
    if [ -n "$work" ] && kill -0 "$work" 2>/dev/null; then
      stamp "stopping the running step (SIGINT: it saves what it measured)"
      kill -INT -- -"$work" 2>/dev/null
      for _ in $(seq 30); do kill -0 "$work" 2>/dev/null || break; sleep 1; done
      kill -KILL -- -"$work" 2>/dev/null
      stopped="; stopped at the limit"
    fi
    local v m
    v=$(grep -o 'summary: .*' "$RESULTS/verify/gpu_verify.log" 2>/dev/null | tail -n 1 | cut -c10-)
    m=$(cd "$RESULTS/microbench" 2>/dev/null && ls -- *.json 2>/dev/null | tr '\n' ' ')
    summary="verify: ${v:-none}; microbench: ${m:-none}$stopped"
    cd / && rm -rf "$RUN"
    tar -C "$(dirname "$RESULTS")" -cJf "$RESULTS.tar.xz.tmp" "$(basename "$RESULTS")" \
      && mv "$RESULTS.tar.xz.tmp" "$RESULTS.tar.xz"
    echo "$summary" >"$RESULTS/DONE"
    stamp "done: $summary"
  }
  trap 'finish; exit 143' TERM
  trap 'finish; exit 130' INT
  trap 'finish; exit 129' HUP
  trap 'finish' EXIT

  stamp "gpu_kernels.sh: results=$RESULTS limit=${LIMIT} s"
  {
    echo "kt_git_sha: ${KT_GIT_SHA:-unknown}"
    echo "date_utc: $(date -u +%Y%m%d-%H%M%S)"
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    nproc
  } >"$RESULTS/machine.txt" 2>&1

  if [ -n "${STAGE_ARGS:-}" ]; then
    while :; do
      # shellcheck disable=SC2086
      eval "$(STAGE_COPY=0 bash scripts/device-stage.sh $STAGE_ARGS 2>>"$RESULTS/stage.log")"
      want_fi=""
      [[ " $STAGE_ARGS " == *" flashinfer="* ]] && want_fi=1
      if [[ " $KT_STAGE_READY " == *" max "* ]] &&
         { [ -z "$want_fi" ] || [[ " $KT_STAGE_READY " == *" flashinfer "* ]]; }; then
        break
      fi
      if [ "$(date +%s)" -ge $(( t0 + ${STAGE_WAIT_S:-600} )) ]; then
        if [[ " $KT_STAGE_READY " == *" max "* ]]; then
          stamp "the flashinfer bundle was not staged: its rows will be n/a"; break
        fi
        stamp "the MAX bundle was not staged"; exit 2
      fi
      sleep 3
    done
    # MAX's toolchain only: the serving extras pin a transformers the microbench does not need.
    # FlashInfer after it, when staged.
    export PYTHONPATH="$RUN:${KT_MAX_PYTHONPATH%%:*}${KT_FLASHINFER_PYTHONPATH:+:$KT_FLASHINFER_PYTHONPATH}"
  else
    export PYTHONPATH="$RUN${PYTHONPATH:+:$PYTHONPATH}"
  fi
  stamp "MAX importable from $PYTHONPATH"

  # Each step runs in its own process group, so that the deadline can stop all of it.
  step() {  # name command...
    local name=$1; shift
    stamp "$name"
    setsid "$@" &
    work=$!
    while kill -0 "$work" 2>/dev/null; do
      if [ "$(date +%s)" -ge "$deadline" ]; then finish; exit 0; fi
      sleep 2
    done
    wait "$work"; local rc=$?
    work=""
    stamp "$name: exit code $rc"
    return $rc
  }
  if [ -n "${MOJO_RUNS:-}" ]; then
    mkdir -p "$RESULTS/mojo"
    IFS=';' read -r -a programs <<<"$MOJO_RUNS"
    for prog in "${programs[@]}"; do
      read -r -a words <<<"$prog"
      [ ${#words[@]} -gt 0 ] || continue
      # The mojo wheel's entry point (as gpu_verify.sh runs it); the output also goes to the log.
      # shellcheck disable=SC2016
      LOG="$RESULTS/mojo/$(basename "${words[0]}" .mojo).log" step "mojo run ${words[*]}" \
        bash -c '"$0" -c "import sys; from mojo._entrypoints import exec_mojo; sys.argv[0] = \"mojo\"; exec_mojo()" run -I . "$@" 2>&1 | grep -v Crashpad | tee "$LOG"; exit ${PIPESTATUS[0]}' \
        "$PY" "${words[@]}" || true
    done
  fi
  verify_list=${VERIFY_KERNELS:-}
  bench_list=${BENCH_KERNELS:-}
  if [ "$verify_list" != none ]; then
    # shellcheck disable=SC2086
    OUT="$RESULTS/verify" VERIFY_PARALLEL=1 VERIFY_S=${VERIFY_S:-200} VERIFY_EXAMPLES=${VERIFY_EXAMPLES:-4} \
      step "gpu_verify.sh ${verify_list:-(every kernel)}" bash benchmarks/gpu_verify.sh $verify_list
  fi
  if [ "$bench_list" != none ]; then
    # shellcheck disable=SC2086
    OUT="$RESULTS/microbench" step "gpu_run.sh ${bench_list:-(every kernel)}" bash benchmarks/gpu_run.sh $bench_list
  fi
}
main "$@"
exit $?
