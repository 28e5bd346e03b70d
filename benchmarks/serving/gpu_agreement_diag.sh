#!/usr/bin/env bash
# Which setting makes MAX Serve's greedy text on the GPU agree with the fp32 reference: one
# probe-only `benchmarks/serving/gpu_serve.sh` run per line of DIAG_RUNS, one after the other,
# each into $ROOT/<name>; then every run's agreement verdicts in $ROOT/status.txt and everything
# in $ROOT.tar.xz.
#
#   DIAG_RUNS='legacy_kv|max|--engine-env max=MODULAR_USE_LEGACY_KV_CACHE=1
#   syncs|max+kt,max+kt:rms_norm|--engine-env max+kt=KT_CHECK=sync --engine-env max+kt:rms_norm=KT_CHECK=sync' \
#   ROOT=/tmp/kt-diag STAGE_ARGS="max=4" setsid nohup bash benchmarks/serving/gpu_agreement_diag.sh &
#
# A line is NAME|ENGINES|SERVE_ARGS[|VARS]: SERVE_ARGS are kt serve-bench arguments (e.g.
# --engine-env ENGINE=VAR=VALUE, --engine-arg ENGINE=ARG), VARS gpu_serve.sh variables for that
# run only (e.g. KV_SHARE=0.05). Each run serves MAX's default mode (device graph capture, overlap
# scheduler) unless its arguments say otherwise, sends the reference's 4 greedy probe prompts
# and one small load point (2 prompts of 512 + 32 tokens), and compares each engine's text with
# the fp32 reference (and max+kt variants with max when max is in the run). An engine served with
# KT_CHECK=hidden also gets `python -m harness.serving.layers` (LOG.layers.txt beside its log):
# the first layer step where each probe prompt's prefill departs from the reference. The engines of one
# run start together (STARTUP, default concurrent). Every other variable goes to gpu_serve.sh
# (STAGE_ARGS, START_AFTER, SERVE_KERNELS, KT_GIT_SHA, ...); RUN_LIMIT_S (600) is each run's
# SERVE_LIMIT_S. WAIT_MODEL=1: first wait (up to 600 s) for another job to have made the model
# (MODEL_DIR's kt_model.json, written last), so that two jobs started together do not both make
# it. The end: $ROOT/DONE.
set -uo pipefail
main() {
  SRC=$(cd "$(dirname "$0")/../.." && pwd)
  ROOT=${ROOT:-/tmp/kt-diag}
  [ -n "${DIAG_RUNS:-}" ] || { echo "DIAG_RUNS is empty: give NAME|ENGINES|SERVE_ARGS lines" >&2; return 2; }
  mkdir -p "$ROOT"
  rm -f "$ROOT/DONE" "$ROOT.tar.xz"
  STATUS="$ROOT/status.txt"
  t0=$(date +%s)
  stamp() { local line="[$(( $(date +%s) - t0 )) s] $*"; echo "$line" >>"$STATUS"; echo "$line"; }
  finish() {
    trap - EXIT INT TERM HUP
    tar -C "$(dirname "$ROOT")" -cJf "$ROOT.tar.xz.tmp" --exclude='*.tar.xz*' --exclude=repo "$(basename "$ROOT")" \
      && mv "$ROOT.tar.xz.tmp" "$ROOT.tar.xz"
    echo "${1:-done}" >"$ROOT/DONE"
    stamp "done (${1:-done})"
  }
  trap 'finish stopped; exit 143' TERM INT HUP
  trap 'finish' EXIT
  if [ "${WAIT_MODEL:-0}" = 1 ]; then
    local model=${MODEL_DIR:-/tmp/kt-model-${MODEL_PRESET:-llama-3.2-1b}}/kt_model.json until=$(( $(date +%s) + 600 ))
    while [ ! -f "$model" ] && [ "$(date +%s)" -lt "$until" ]; do sleep 2; done
    stamp "$([ -f "$model" ] && echo "model: $model is there" || echo "model: gave up waiting for $model")"
  fi
  local name engines args vars
  while IFS='|' read -r name engines args vars; do
    name=$(echo "$name" | tr -d ' ')
    [ -n "$name" ] || continue
    stamp "$name: engines $engines; $args${vars:+; $vars}"
    # shellcheck disable=SC2086
    env ${vars:-} RESULTS="$ROOT/$name" ENGINES="$engines" SERVE_ARGS="$args" STARTUP="${STARTUP:-concurrent}" \
      CONCURRENCY=1 RATES= DATASETS=random NUM_PROMPTS=2 PER_LOAD=0 DURATION=4 IN_LEN="${IN_LEN:-512}" OUT_LEN="${OUT_LEN:-32}" \
      SERVE_LIMIT_S="${RUN_LIMIT_S:-600}" bash "${GPU_SERVE:-$SRC/benchmarks/serving/gpu_serve.sh}" >"$ROOT/$name.out" 2>&1
    grep -hE "vs reference|vs max" "$ROOT/$name/serve/serve-bench.log" 2>/dev/null | sed "s/^/  $name: /" >>"$STATUS"
    # KT_CHECK=hidden runs: where each probe prompt's prefill departs from the reference.
    local log
    for log in "$ROOT/$name"/serve/logs/*.log; do
      grep -q "^kt hidden" "$log" 2>/dev/null || continue
      (cd "$SRC" && "${PYTHON:-python3}" -m harness.serving.layers "$log" "$ROOT/$name/serve/reference/probe.json") \
        >"${log%.log}.layers.txt" 2>&1
      grep "^prompt" "${log%.log}.layers.txt" | sed "s/^/  $name $(basename "$log" .log): /" >>"$STATUS"
    done
    stamp "$name: done ($(cat "$ROOT/$name/DONE" 2>/dev/null || echo 'no DONE'))"
  done <<<"$DIAG_RUNS"
}
main "$@"
exit $?
