#!/usr/bin/env bash
# Here, before each GPU call: put part K of the bundle sequence (the max parts, then extras, then
# vllm, each in part order) alone into .stage/, which that call carries to the GPU machine, where
# scripts/device-stage.sh collects it.
#
#   scripts/stage-part.sh list     the sequence, and the NAME=PARTS arguments for device-stage.sh
#   scripts/stage-part.sh K        1 <= K <= N: .stage/ holds part K only
#   scripts/stage-part.sh clear    empty .stage/
#
# BUNDLES (default /work/bundles) holds one folder per bundle (BUNDLES/NAME/NAME.partNN);
# BUNDLE_ORDER (default "max extras vllm") says which bundles, in which order.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLES=${BUNDLES:-/work/bundles}
read -r -a order <<<"${BUNDLE_ORDER:-max extras vllm}"
seq=() args=()
for b in "${order[@]}"; do
  parts=("$BUNDLES/$b/$b".part[0-9]*)
  [ -e "${parts[0]}" ] || { echo "stage-part: no parts in $BUNDLES/$b" >&2; exit 2; }
  seq+=("${parts[@]}")
  args+=("$b=${#parts[@]}")
done
n=${#seq[@]}
case "${1:-}" in
  list)
    for ((i = 0; i < n; i++)); do printf "%2d %s (%s bytes)\n" $((i + 1)) "${seq[$i]}" "$(stat -c %s "${seq[$i]}")"; done
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
    cp "${seq[$((k - 1))]}" .stage/
    echo "stage-part: $k/$n: .stage/$(basename "${seq[$((k - 1))]}"); on the GPU: bash scripts/device-stage.sh ${args[*]}"
    ;;
esac
