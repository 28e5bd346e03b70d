#!/usr/bin/env bash
# `kt serve-bench` on a GPU machine with no network: MAX Serve stock, max+kt and vLLM on a random
# Llama 3 model made here, with the fair settings and the sweep of benchmarks/serving/README.md,
# the max+kt vs max agreement check, everything under $RESULTS, packed into $RESULTS.tar.xz.
#
#   bash benchmarks/serving/gpu_serve.sh                      (foreground)
#   setsid nohup bash benchmarks/serving/gpu_serve.sh >/tmp/kt-serve.out 2>&1 </dev/null &
#                                                             (background: poll $RESULTS/status.txt)
#
# Environments: KT_MAX_PYTHONPATH and KT_VLLM_PYTHONPATH, as scripts/device-stage.sh prints them.
# With STAGE_ARGS (e.g. "max=3 extras=1 vllm=5") the script makes the model first, then waits up
# to STAGE_WAIT_S for the device calls' device-stage.sh to have unpacked every bundle, so it can
# start before the last bundle part has arrived. Every engine runs under this machine's python3.
#
# Variables (defaults): RESULTS (/tmp/kt-serve), MODEL_PRESET (llama-3.2-1b; llama-3.1-8b),
# MODEL_DIR (/tmp/kt-model-$MODEL_PRESET), SEED (0), ENGINES (max,max+kt,vllm), STARTUP
# (concurrent; serial), KV_SHARE (0.28: three engines fit together), MAX_NUM_SEQS (128),
# MAX_MODEL_LEN (2048), CONCURRENCY (1,8,32,64,128), RATES (4,16,64), NUM_PROMPTS (16),
# PER_LOAD (4), DURATION (10 s per load point), IN_LEN (1024), OUT_LEN (128), DATASETS
# (random,sonnet), TP (1), COST_PER_HOUR (3.5: $/h of one H200, for cost per 1M tokens),
# SERVE_LIMIT_S (1080: kt gets SIGINT then, and saves what finished), KT_GIT_SHA (recorded),
# MEASURE_AFTER (a file: engines start at once, load points wait for it; another GPU job's end),
# SERVE_KERNELS (the kernels package max+kt serves; default the repository's kernels/), START_AFTER
# (a file the engines wait for, e.g. the kernel job's choice of SERVE_KERNELS), SERVE_ARGS
# (more kt serve-bench arguments). ENGINES may name max+kt variants, e.g. max,max+kt,max+kt:attention
# (kt's per-op ablation, each checked against max); RATES= (empty) runs no open-loop sweep.
# DEVICE=cpu rehearses the whole flow on a CPU: tiny model, .venvs engines, a small sweep.
#
# Progress: $RESULTS/status.txt (one line per phase), $RESULTS/serve/serve-bench.log (kt's
# output, a line per load point). The end: $RESULTS/DONE holding kt's exit code, and the
# archive. Stop it with: kill -TERM -- -$(cat $RESULTS/pgid) (kt stops every server and saves
# what finished); SIGKILL of kt also takes its servers down (harness/serving/process.py).
set -uo pipefail
# The whole script is one function, read before it runs: a device call that re-syncs the working
# tree mid-run cannot change what bash executes.
main() {
  SRC=$(cd "$(dirname "$0")/../.." && pwd)
  DEVICE=${DEVICE:-gpu}
  RESULTS=${RESULTS:-/tmp/kt-serve}
  PY=${PYTHON:-python3}
  if [ "$DEVICE" = cpu ]; then
    : "${MODEL_PRESET:=tiny}" "${KV_SHARE:=}" "${MAX_NUM_SEQS:=4}" "${CONCURRENCY:=1,2}" "${RATES:=4}"
    : "${NUM_PROMPTS:=2}" "${PER_LOAD:=1}" "${DURATION:=60}" "${IN_LEN:=64}" "${OUT_LEN:=8}" "${COST_PER_HOUR:=}"
  fi
  MODEL_PRESET=${MODEL_PRESET:-llama-3.2-1b}
  MODEL_DIR=${MODEL_DIR:-/tmp/kt-model-$MODEL_PRESET}
  SEED=${SEED:-0}
  ENGINES=${ENGINES:-max,max+kt,vllm}
  STARTUP=${STARTUP:-concurrent}
  KV_SHARE=${KV_SHARE-0.28}
  MAX_NUM_SEQS=${MAX_NUM_SEQS:-128}
  MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048}
  CONCURRENCY=${CONCURRENCY:-1,8,32,64,128}
  RATES=${RATES-4,16,64}
  NUM_PROMPTS=${NUM_PROMPTS:-16}
  PER_LOAD=${PER_LOAD:-4}
  DURATION=${DURATION:-10}
  IN_LEN=${IN_LEN:-1024}
  OUT_LEN=${OUT_LEN:-128}
  DATASETS=${DATASETS:-random,sonnet}
  TP=${TP:-1}
  COST_PER_HOUR=${COST_PER_HOUR-3.5}
  SERVE_LIMIT_S=${SERVE_LIMIT_S:-1080}
  STAGE_WAIT_S=${STAGE_WAIT_S:-900}

  mkdir -p "$RESULTS/serve"
  rm -f "$RESULTS/DONE" "$RESULTS.tar.xz"
  STATUS="$RESULTS/status.txt"
  # The script's output also goes to its log. The tee ignores the signals sent to this process
  # group (kill -TERM -- -PGID), so that the clean-up after them is still written; a write to a
  # closed stdout is an error, not the end of the clean-up.
  trap '' PIPE
  exec > >(trap '' INT TERM HUP; exec tee -a "$RESULTS/gpu_serve.log") 2>&1
  echo $$ >"$RESULTS/pid"
  ps -o pgid= $$ | tr -d ' ' >"$RESULTS/pgid"
  t0=$(date +%s)
  stamp() {
    local line="[$(( $(date +%s) - t0 )) s] $*"
    echo "$line" >>"$STATUS"
    echo "$line" 2>/dev/null
  }
  export PYTHONUNBUFFERED=1 COLUMNS=200 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

  # kt runs from a private copy of the repository: a later device call re-syncs the working tree,
  # and nothing of this run may change under it.
  RUN="$RESULTS/repo"
  rm -rf "$RUN" && mkdir -p "$RUN"
  for item in harness pykernels kernels benchmarks scripts pyproject.toml; do
    [ -e "$SRC/$item" ] && cp -a "$SRC/$item" "$RUN/"
  done
  export PYTHONPATH="$RUN"
  cd "$RUN" || exit 1

  kt_pid=""
  rc=""
  finish() {  # pack what there is, write the final marker; runs once
    trap - EXIT INT TERM HUP
    if [ -n "$kt_pid" ] && kill -0 "$kt_pid" 2>/dev/null; then
      stamp "stopping kt (SIGINT: it stops its servers and saves what finished)"
      kill -INT "$kt_pid" 2>/dev/null
      for _ in $(seq 60); do kill -0 "$kt_pid" 2>/dev/null || break; sleep 1; done
      kill -KILL "$kt_pid" 2>/dev/null
      rc=${rc:-130}
    fi
    cd / && rm -rf "$RUN"
    stamp "packing $RESULTS.tar.xz"
    tar -C "$(dirname "$RESULTS")" -cJf "$RESULTS.tar.xz.tmp" --exclude="$(basename "$RESULTS")/repo" "$(basename "$RESULTS")" \
      && mv "$RESULTS.tar.xz.tmp" "$RESULTS.tar.xz"
    # A device call returns files of at most 16 MiB: a larger archive is also cut into parts
    # ($RESULTS.tar.xz.partNN; cat them back together).
    rm -f "$RESULTS.tar.xz.part"*
    if [ -f "$RESULTS.tar.xz" ] && [ "$(stat -c %s "$RESULTS.tar.xz")" -gt $((15 * 1024 * 1024)) ]; then
      split -b 15M -d "$RESULTS.tar.xz" "$RESULTS.tar.xz.part"
    fi
    ls -l "$RESULTS.tar.xz"* >>"$STATUS" 2>&1
    if [ -n "${ARCHIVE_TO:-}" ]; then
      if ls "$RESULTS.tar.xz.part"* >/dev/null 2>&1; then cp "$RESULTS.tar.xz.part"* "$ARCHIVE_TO/"; else cp "$RESULTS.tar.xz" "$ARCHIVE_TO/"; fi
    fi
    echo "${rc:-1}" >"$RESULTS/DONE"
    stamp "done: kt serve-bench exit code ${rc:-none}"
  }
  trap 'rc=${rc:-143}; finish; exit 143' TERM
  trap 'rc=${rc:-130}; finish; exit 130' INT
  trap 'rc=${rc:-129}; finish; exit 129' HUP
  trap 'finish' EXIT

  stamp "gpu_serve.sh: DEVICE=$DEVICE preset=$MODEL_PRESET engines=$ENGINES startup=$STARTUP tp=$TP results=$RESULTS"
  {
    echo "kt_git_sha: ${KT_GIT_SHA:-unknown}"
    echo "date_utc: $(date -u +%Y%m%d-%H%M%S)"
    echo "python: $($PY -c 'import sys; print(sys.version.split()[0], sys.executable)')"
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" 2>&1
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used --format=csv 2>&1 || true
    nproc; free -g 2>/dev/null | head -2; df -h /tmp | tail -1
  } >"$RESULTS/machine.txt" 2>&1
  cat "$RESULTS/machine.txt"

  # --- the model (does not need the engines: made while the last bundle parts arrive) --------
  if [ -f "$MODEL_DIR/kt_model.json" ] && grep -q "\"seed\": $SEED," "$MODEL_DIR/kt_model.json"; then
    stamp "model: $MODEL_DIR exists (seed $SEED)"
  else
    stamp "model: kt make-model $MODEL_PRESET $MODEL_DIR --seed $SEED"
    if ! $PY -m harness make-model "$MODEL_PRESET" "$MODEL_DIR" --seed "$SEED"; then
      stamp "make-model failed"; rc=2; exit 2
    fi
    stamp "model ready: $(du -sh "$MODEL_DIR" | cut -f1)"
  fi
  cp "$MODEL_DIR/kt_model.json" "$MODEL_DIR/config.json" "$RESULTS/" 2>/dev/null

  # --- the engines' environments ------------------------------------------------------------
  engine_args=()
  if [ "$DEVICE" = cpu ]; then
    dtype=float32
    for e in max vllm; do  # the venvs of scripts/setup-serving.sh (kt runs from a copy without them)
      [ -x "$SRC/.venvs/$e/bin/python" ] && engine_args+=(--python "$e=$SRC/.venvs/$e/bin/python")
    done
  else
    dtype=bfloat16
    # The environments the engines need: MAX's for max and every max+kt variant, vLLM's for vllm.
    wanted=""
    case ",$ENGINES," in *,max,*|*,max+kt,*|*,max+kt:*) wanted="max" ;; esac
    case ",$ENGINES," in *,vllm,*) wanted="$wanted vllm" ;; esac
    if [ -n "${STAGE_ARGS:-}" ]; then
      deadline=$(( $(date +%s) + STAGE_WAIT_S ))
      while :; do
        # shellcheck disable=SC2086
        eval "$(cd "$SRC" && STAGE_COPY=0 bash scripts/device-stage.sh $STAGE_ARGS 2>>"$RESULTS/stage.log")"
        need=0
        for env in $wanted; do [[ " $KT_STAGE_READY " == *" $env "* ]] || need=1; done
        [ $need = 0 ] && break
        if [ "$(date +%s)" -ge "$deadline" ]; then
          stamp "environments not complete after ${STAGE_WAIT_S} s (ready: ${KT_STAGE_READY:-none})"; rc=2; exit 2
        fi
        sleep 5
      done
      stamp "environments staged: $KT_STAGE_READY"
    fi
    export KT_MAX_PYTHONPATH KT_VLLM_PYTHONPATH
    engine_args=(--python "max=$(command -v "$PY")" --python "vllm=$(command -v "$PY")")
    for env in $wanted; do
      v=KT_${env^^}_PYTHONPATH
      [ -n "${!v:-}" ] || { stamp "$v is not set: source scripts/device-stage.sh's output first"; rc=2; exit 2; }
    done
  fi

  # --- the kernels max+kt serves ------------------------------------------------------------
  # START_AFTER: a file; the engines start once it exists (at most START_AFTER_WAIT_S, 600 s,
  # later), e.g. gpu_session_kernels.sh's kernels_ready, written once it has picked the kernels
  # in SERVE_KERNELS. SERVE_KERNELS: the Mojo package max+kt serves (default the repository's
  # kernels/), copied after that wait.
  if [ -n "${START_AFTER:-}" ]; then
    stamp "waiting for $START_AFTER"
    deadline=$(( $(date +%s) + ${START_AFTER_WAIT_S:-600} ))
    while [ ! -e "$START_AFTER" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 2; done
    stamp "$([ -e "$START_AFTER" ] && echo "$START_AFTER: $(head -c 200 "$START_AFTER")" || echo "gave up waiting for $START_AFTER")"
  fi
  if [ -n "${SERVE_KERNELS:-}" ]; then
    mkdir -p "$RUN/serve_kernels" && cp -a "$SERVE_KERNELS" "$RUN/serve_kernels/kernels" || { rc=2; exit 2; }
    grep -H "^comptime [A-Z_]* = \(True\|False\)$" "$RUN/serve_kernels/kernels/"*.mojo >>"$RESULTS/serve_kernels_flags.txt" 2>/dev/null
  fi

  # --- the benchmark -----------------------------------------------------------------------
  args=(--model "$MODEL_DIR" --engines "$ENGINES" --device "$DEVICE" "${engine_args[@]}"
        --dtype "$dtype" --max-num-seqs "$MAX_NUM_SEQS" --max-model-len "$MAX_MODEL_LEN" --no-prefix-caching
        --tensor-parallel "$TP" --startup "$STARTUP" --dataset "$DATASETS" --input-len "$IN_LEN" --output-len "$OUT_LEN"
        --num-prompts "$NUM_PROMPTS"
        --prompts-per-load "$PER_LOAD" --duration "$DURATION" --num-warmups 2 --seed "$SEED"
        --startup-timeout 1200 --request-timeout 300 --out "$RESULTS/serve")
  [ -n "$CONCURRENCY" ] && args+=(--max-concurrency "$CONCURRENCY")
  [ -n "$RATES" ] && args+=(--request-rate "$RATES")
  [ -n "$KV_SHARE" ] && args+=(--kv-cache-memory "$KV_SHARE")
  # SERVE_ARGS: more serve-bench arguments, word-split (e.g. "--engine-arg max+kt=--no-device-graph-capture").
  # shellcheck disable=SC2206
  [ -n "${SERVE_ARGS:-}" ] && args+=($SERVE_ARGS)
  [ -n "$COST_PER_HOUR" ] && args+=(--cost-per-hour "$COST_PER_HOUR")
  [ -n "${MEASURE_AFTER:-}" ] && args+=(--measure-after "$MEASURE_AFTER")
  [ -n "${SERVE_KERNELS:-}" ] && args+=(--custom-kernel-path "$RUN/serve_kernels/kernels")
  stamp "kt serve-bench ${args[*]} (limit ${SERVE_LIMIT_S} s)"
  # kt writes to a file, not a pipe: nothing that a signal can kill stands between kt and its log.
  timeout -s INT -k 90 "$SERVE_LIMIT_S" $PY -m harness serve-bench "${args[@]}" >"$RESULTS/serve/serve-bench.log" 2>&1 &
  kt_pid=$!
  # Relay kt's per-point lines into the status file while it runs.
  while kill -0 "$kt_pid" 2>/dev/null; do
    sleep 10
    ln=$(grep -E "ready after|first request answered| ok, .* failed|failed|Error" "$RESULTS/serve/serve-bench.log" 2>/dev/null | tail -n 1)
    [ -n "$ln" ] && [ "$ln" != "${last:-}" ] && stamp "kt: $ln" && last=$ln
  done
  wait "$kt_pid"
  rc=$?
  kt_pid=""
  stamp "kt serve-bench exit code $rc"
  grep -E "vs max|vs reference|^reference:|fp32 reference" "$RESULTS/serve/serve-bench.log" | tail -n 12 >>"$STATUS"
  return "$rc"
}
main "$@"
exit $?
