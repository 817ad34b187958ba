#!/usr/bin/env bash
# The synthetic long-tail files shared by `DATA=longtail scripts/compact-quality.sh`
# and scripts/mba-longtail.sh (made once): ember-data synth with Zipf item ids
# over a 10^9 id space and 20k users with interests, 220k rows: the first
# 200k are data/longtail/train.txt, the last 20k test.txt, and counts.bin
# the counting pass over train.txt. Needs a built tree (or BIN=dir of binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
d=data/longtail
if [ ! -s $d/counts.bin ]; then
  mkdir -p $d
  "${BIN:-target/debug}/ember-data" synth --ids 1000000000 --users 20000 --rows 220000 --out $d/all.txt
  head -n 200000 $d/all.txt > $d/train.txt
  tail -n 20000 $d/all.txt > $d/test.txt
  "${BIN:-target/debug}/ember-data" count --train $d/train.txt --out $d/counts.bin
fi
