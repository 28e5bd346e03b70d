#!/usr/bin/env bash
# On the lent GPU machine (no network): gather the MAX/Mojo bundle parts that arrive one call
# at a time in .stage/, unpack them once all are there, and print the environment to source.
#   eval "$(bash scripts/device-stage.sh PARTS)"   (PARTS: how many parts the bundle has)
set -euo pipefail
parts=${1:?usage: device-stage.sh PARTS}
mkdir -p /tmp/stage
cp -n .stage/* /tmp/stage/ 2>/dev/null || true
have=$(ls /tmp/stage | wc -l)
echo "staged $have/$parts parts" >&2
if [ "$have" -ge "$parts" ] && [ ! -d /tmp/site-max ]; then
  cat /tmp/stage/max.part* | python3 -c "import sys,tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('/tmp')"
fi
echo "export PYTHONPATH=/tmp/site-max:$PWD PATH=/tmp/site-max/bin:\$PATH MODULAR_TELEMETRY_ENABLED=0"
