#!/usr/bin/env bash
# Here, before each GPU call: put the bundle parts of call K into .stage/, which that call carries
# to the GPU machine, where scripts/device-stage.sh collects them.
#
#   scripts/stage-part.sh list     the calls and their parts, and device-stage.sh's arguments
#   scripts/stage-part.sh K        1 <= K <= N: .stage/ holds the parts of call K only
#   scripts/stage-part.sh clear    empty .stage/
#
# Parts (the max bundle's, then extras', then vllm's, in part order) go to calls first-fit: each
# into the first call with room for it under STAGE_BUDGET bytes, so small parts share a call. A
# call carries at most 64 MiB together with the repository's travelling files (tracked and
# untracked-not-ignored), so the default budget is 64 MiB less their size less 1 MiB. A bundle
# whose parts are larger than the budget is re-cut (its parts are slices of one stream) into
# BUNDLES/.cut-BUDGET/NAME/, and device-stage.sh gets the new part count.
# BUNDLES (default /work/bundles) holds one folder per bundle (BUNDLES/NAME/NAME.partNN);
# BUNDLE_ORDER (default "max extras vllm") says which bundles, in which order: add flashinfer
# for kt microbench's `flashinfer` provider ("max flashinfer" for a kernels-only session).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLES=${BUNDLES:-/work/bundles}
if [ -z "${STAGE_BUDGET:-}" ]; then
  travel=$( { git ls-files -z --cached --others --exclude-standard 2>/dev/null || true; } \
           | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
  STAGE_BUDGET=$(( (63 << 20) - travel ))
  [ "$STAGE_BUDGET" -gt $((4 << 20)) ] || { echo "stage-part: the repository's $travel travelling bytes leave no room for bundle parts" >&2; exit 2; }
fi
BUDGET=$STAGE_BUDGET
read -r -a order <<<"${BUNDLE_ORDER:-max extras vllm}"
parts=() args=()
for b in "${order[@]}"; do
  found=("$BUNDLES/$b/$b".part[0-9]*)
  [ -e "${found[0]}" ] || { echo "stage-part: no parts in $BUNDLES/$b" >&2; exit 2; }
  big=0
  for p in "${found[@]}"; do [ "$(stat -c %s "$p")" -le "$BUDGET" ] || big=1; done
  if [ $big = 1 ]; then  # re-cut the stream into parts that fit, once per budget and bundle build
    cut="$BUNDLES/.cut-$BUDGET/$b"
    if [ ! -e "$cut/.done" ] || [ -n "$(find "${found[@]}" -newer "$cut/.done")" ]; then
      rm -rf "$cut" && mkdir -p "$cut"
      cat "${found[@]}" | split -b "$BUDGET" -d -a 2 - "$cut/$b.part" && touch "$cut/.done"
    fi
    found=("$cut/$b".part[0-9]*)
  fi
  parts+=("${found[@]}")
  args+=("$b=${#found[@]}")
done
calls=() used=()  # calls[i]: its parts, space-separated; used[i]: their bytes
for p in "${parts[@]}"; do
  size=$(stat -c %s "$p")
  [ "$size" -le "$BUDGET" ] || { echo "stage-part: $p is larger than STAGE_BUDGET ($BUDGET bytes)" >&2; exit 2; }
  placed=0
  for i in "${!calls[@]}"; do
    if [ $((used[i] + size)) -le "$BUDGET" ]; then
      calls[i]="${calls[i]} $p"; used[i]=$((used[i] + size)); placed=1; break
    fi
  done
  [ $placed = 1 ] || { calls+=("$p"); used+=("$size"); }
done
n=${#calls[@]}
case "${1:-}" in
  list)
    for i in "${!calls[@]}"; do
      echo "call $((i + 1)): $(for p in ${calls[i]}; do printf '%s ' "$(basename "$p")"; done)($((used[i] / 1048576)) MiB)"
    done
    echo "budget: $BUDGET bytes per call"
    echo "device-stage.sh arguments: ${args[*]}"
    ;;
  clear)
    rm -rf .stage
    ;;
  ''|*[!0-9]*)
    echo "usage: stage-part.sh list | K (1..$n) | clear" >&2; exit 2
    ;;
  *)
    k=$1
    [ "$k" -ge 1 ] && [ "$k" -le "$n" ] || { echo "stage-part: K must be in 1..$n" >&2; exit 2; }
    rm -rf .stage && mkdir .stage
    # shellcheck disable=SC2086
    cp ${calls[$((k - 1))]} .stage/
    echo "stage-part: call $k/$n: .stage/ holds $(ls .stage | tr '\n' ' ')($((used[k - 1] / 1048576)) MiB); on the GPU: bash scripts/device-stage.sh ${args[*]}"
    ;;
esac
