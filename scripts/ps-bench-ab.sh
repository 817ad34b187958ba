#!/usr/bin/env bash
# Side-by-side ps-server benchmark of two builds on the same machine state:
# runs BEFORE and AFTER alternately (2 rounds) on f16 + row-wise Adagrad and
# f32 + Adagrad tables of 10^7 rows (dim 32), then the dim-18 compact row
# once each, printing the load average before every run.
#   git worktree add /tmp/before <commit> && (cd /tmp/before && CARGO_TARGET_DIR=/tmp/before-target cargo build -p ember-ps --bin ps-server)
#   scripts/ps-bench-ab.sh /tmp/before-target/debug/ps-server target/debug/ps-server
set -euo pipefail
B="${1:?usage: ps-bench-ab.sh BEFORE_BIN AFTER_BIN [ROWS]}"
A="${2:?usage: ps-bench-ab.sh BEFORE_BIN AFTER_BIN [ROWS]}"
ROWS="${3:-10000000}"
for round in 1 2; do
  for v in "f16 rowwise_adagrad" "f32 adagrad"; do
    set -- $v
    for side in before after; do
      bin=$B; [ "$side" = after ] && bin=$A
      echo "== round $round $side precision=$1 optimizer=$2 load $(cut -d' ' -f1-3 /proc/loadavg)"
      "$bin" bench --rows "$ROWS" --dim 32 --precision "$1" --optimizer "$2" 2>&1 | grep -E "^\| \("
    done
  done
done
for side in before after; do
  bin=$B; [ "$side" = after ] && bin=$A
  echo "== dim 18 f16 rowwise_adagrad $side load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$bin" bench --rows "$ROWS" --dim 18 --precision f16 --optimizer rowwise_adagrad --seconds 1 2>&1 | grep -E "^\| \((1|2|3)\)"
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
