#!/usr/bin/env bash
# Compress the large text results under benchmarks/results before committing them: every file
# there (tracked, staged or new and not ignored) above 100 KiB whose name ends in .json, .jsonl,
# .log, .txt or .csv becomes FILE.xz (`xz -9e`, the plain file removed) and git's index follows
# (the plain file's removal and the .xz staged, as `git mv` would). PNGs, READMEs and report.md
# stay as they are. Every device call carries the tracked tree (64 MiB at most), and per-request
# serving rows and microbench rows shrink 8-20x.
#
#   bash scripts/compact-results.sh [-n] [PATH...]   (-n: list what it would compress; PATHs:
#                                                     folders or files, default benchmarks/results)
#
# kt reads what it wrote back either way: `python -m harness.bench summary|plot` and
# `kt microbench --compare` take FILE.json.xz, or FILE.json when only FILE.json.xz is there
# (harness.io.read_result_json). By hand: `xz -dc FILE.json.xz | jq ...`, `xzless FILE.log.xz`.
# A README that names a compressed file must name FILE.xz: the script lists what it renamed.
# MIN_BYTES overrides the 100 KiB threshold.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
dry=0
if [ "${1:-}" = "-n" ]; then dry=1; shift; fi
[ $# -gt 0 ] || set -- benchmarks/results
min=${MIN_BYTES:-102400}
command -v xz >/dev/null || { echo "compact-results: xz is not installed" >&2; exit 2; }

n=0 before=0 after=0
while IFS= read -r -d '' f; do
  case "$f" in *.json|*.jsonl|*.log|*.txt|*.csv) ;; *) continue ;; esac
  [ -f "$f" ] && [ ! -L "$f" ] || continue
  size=$(stat -c %s "$f")
  [ "$size" -gt "$min" ] || continue
  if [ -e "$f.xz" ]; then
    echo "compact-results: $f and $f.xz are both there; keep one and run again" >&2; exit 1
  fi
  if [ "$dry" = 1 ]; then echo "would compress $f ($size bytes)"; n=$((n + 1)); continue; fi
  xz -9e -T1 -- "$f"  # writes $f.xz, removes $f
  packed=$(stat -c %s "$f.xz")
  git rm --cached --quiet --ignore-unmatch -- "$f"
  git add -- "$f.xz"
  echo "$f -> $f.xz ($size -> $packed bytes)"
  n=$((n + 1)) before=$((before + size)) after=$((after + packed))
done < <(git ls-files -z --cached --others --exclude-standard -- "$@" | sort -zu)

if [ "$dry" = 1 ]; then echo "compact-results: $n file(s) to compress"; exit 0; fi
echo "compact-results: $n file(s), $before -> $after bytes"
[ "$n" = 0 ] || echo "compact-results: point the READMEs that name these files at the .xz names"
