#!/usr/bin/env bash
# On the lent GPU machine (no network): gather the parts of offline bundles (shared/offline-site.sh
# writes NAME.part00, NAME.part01, ...; each an xz tar stream slice of a folder site-NAME) that
# arrive one call at a time in .stage/, unpack each bundle into /tmp/site-NAME once all of its
# parts are there, and print the environment to source.
#
#   eval "$(bash scripts/device-stage.sh max=3 extras=1 vllm=5 flashinfer=2)"   (NAME=PARTS each)
#
# Every call copies what .stage/ holds into $STAGE (default /tmp/stage), so successive calls
# accumulate parts of several bundles in any order. A bundle is unpacked once (into a temporary
# folder, renamed when complete, so a call killed mid-way leaves nothing half-made), after which
# its parts are deleted. Prints on stderr what is staged and missing; on stdout:
#   KT_MAX_PYTHONPATH=/tmp/site-max:/tmp/site-extras   MAX's environment (the toolchain, then
#                                                      max[serve]'s GPU extras), once both are in
#   KT_VLLM_PYTHONPATH=/tmp/site-vllm                  vLLM 0.26's packages, over the machine's
#                                                      torch, triton and transformers
#   KT_FLASHINFER_PYTHONPATH=/tmp/site-flashinfer      FlashInfer (kt microbench's `flashinfer`
#                                                      provider), over the machine's torch
#   KT_STAGE_READY="max vllm flashinfer"               the environments that are complete
# kt passes KT_<ENGINE>_PYTHONPATH to that engine's server only; kt itself runs on the machine's
# python3 with the repository on PYTHONPATH. Exit status 0 even when parts are still missing.
# Calls are serialized by a lock ($STAGE/.lock), so a background waiter may call it too.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: device-stage.sh NAME=PARTS [NAME=PARTS ...]" >&2; exit 2; }
STAGE=${STAGE:-/tmp/stage}
SITES=${SITES:-/tmp}
PY=${PYTHON:-python3}
mkdir -p "$STAGE" "$SITES"
# One stager at a time: a foreground call and gpu_serve.sh's background wait may both run this.
if command -v flock >/dev/null; then
  exec 9>"$STAGE/.lock"
  flock 9
fi

# 1. Take this call's parts (a part already staged with the same size is left alone). STAGE_COPY=0
#    only unpacks and reports: a background waiter must not read .stage/ while a call re-syncs it.
if [ "${STAGE_COPY:-1}" != 0 ] && [ -d .stage ]; then
  for f in .stage/*.part[0-9]*; do
    [ -e "$f" ] || continue
    name=$(basename "$f")
    if [ ! -f "$STAGE/$name" ] || [ "$(stat -c %s "$f")" != "$(stat -c %s "$STAGE/$name")" ]; then
      cp "$f" "$STAGE/.$name.tmp" && mv "$STAGE/.$name.tmp" "$STAGE/$name"
    fi
  done
fi

# 2. Unpack each bundle whose parts are all there.
for spec in "$@"; do
  name=${spec%%=*}; parts=${spec#*=}
  case "$parts" in ''|*[!0-9]*) echo "device-stage: $spec: PARTS must be a number" >&2; exit 2 ;; esac
  site="$SITES/site-$name"
  if [ -f "$STAGE/$name.done" ] && [ -d "$site" ]; then
    echo "device-stage: $name: unpacked ($site)" >&2
    continue
  fi
  have=() missing=()
  for ((i = 0; i < parts; i++)); do
    p=$(printf "%s/%s.part%02d" "$STAGE" "$name" "$i")
    if [ -f "$p" ]; then have+=("$p"); else missing+=("$(basename "$p")"); fi
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "device-stage: $name: ${#have[@]}/$parts parts (missing ${missing[*]})" >&2
    continue
  fi
  tmp="$STAGE/.unpack-$name"
  rm -rf "$tmp" && mkdir -p "$tmp"
  t0=$(date +%s)
  if ! cat "${have[@]}" | "$PY" -c "
import lzma, sys, tarfile
kw = {'filter': 'tar'} if hasattr(tarfile, 'tar_filter') else {}  # keeps links and modes, quietly
xz = lzma.open(sys.stdin.buffer)
tarfile.open(fileobj=xz, mode='r|').extractall(sys.argv[1], **kw)
while xz.read(1 << 20):  # to the end of the stream: a truncated last part raises here
    pass" "$tmp"; then
    rm -rf "$tmp"
    echo "device-stage: $name: unpacking failed (a corrupt or truncated part?)" >&2
    exit 1
  fi
  if [ ! -d "$tmp/site-$name" ]; then
    echo "device-stage: $name: the archive holds no folder site-$name" >&2
    rm -rf "$tmp"
    exit 1
  fi
  rm -rf "$site"
  mv "$tmp/site-$name" "$site"
  rm -rf "$tmp" "${have[@]}"
  touch "$STAGE/$name.done"
  echo "device-stage: $name: unpacked into $site in $(( $(date +%s) - t0 )) s" >&2
done

# 3. The environment of each engine whose bundles are all unpacked.
done_() { [ -f "$STAGE/$1.done" ] && [ -d "$SITES/site-$1" ]; }
wanted() { for spec in "$@"; do [ "${spec%%=*}" = "$WANT" ] && return 0; done; return 1; }
ready=()
WANT=max
if wanted "$@" && done_ max; then
  pp="$SITES/site-max"
  WANT=extras
  if wanted "$@"; then
    if done_ extras; then pp="$pp:$SITES/site-extras"; else pp=""; fi
  fi
  if [ -n "$pp" ]; then echo "export KT_MAX_PYTHONPATH=$pp"; ready+=(max); fi
fi
WANT=vllm
if wanted "$@" && done_ vllm; then
  echo "export KT_VLLM_PYTHONPATH=$SITES/site-vllm"
  ready+=(vllm)
fi
WANT=flashinfer
if wanted "$@" && done_ flashinfer; then
  echo "export KT_FLASHINFER_PYTHONPATH=$SITES/site-flashinfer"
  ready+=(flashinfer)
fi
echo "export KT_STAGE_READY=\"${ready[*]}\""
echo "device-stage: ready: ${ready[*]:-none}" >&2
