#!/usr/bin/env bash
# Reader throughput against training speed, side by side in one run (issue 15:
# the reader must stay >= 10x the DIN training speed with the wide samples).
# Alternates, ROUNDS times (default 2): `ember-data bench-reader` (one thread,
# batches of 128 as the workers read them, DIEN negatives skipped as DIN does)
# and a short `ember train` of the same job (2 shards x 2 workers,
# STEPS steps per worker, default 200), and prints both rates, their ratio
# and the load average. CONFIG defaults to configs/din_ml100k_full.toml
# (prepare its data first: ember-data prepare --config CONFIG).
#   scripts/bench-reader-vs-train.sh
#   CONFIG=configs/din_ml100k_ids.toml BIN=/tmp/ember-bin scripts/bench-reader-vs-train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${CONFIG:-configs/din_ml100k_full.toml}"
ROUNDS="${ROUNDS:-2}"
STEPS="${STEPS:-200}"
BIN="${BIN:-}"
if [ -z "$BIN" ]; then
  cargo build --workspace --all-targets
  BIN=target/debug
fi
train=$(python3 -c "import tomllib,sys;print(tomllib.load(open(sys.argv[1],'rb'))['data']['train'])" "$CONFIG")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
sed -e "s/^epochs = .*/epochs = 1\nmax_steps_per_epoch = $STEPS\nmax_eval_samples = 100/" "$CONFIG" > "$out/job.toml"
for r in $(seq 1 "$ROUNDS"); do
  l0=$(cut -d' ' -f1 /proc/loadavg)
  reader=$("$BIN/ember-data" --quiet bench-reader --file "$train" --config "$CONFIG" --batch 128 | sed -E 's/.*= ([0-9]+) samples\/s.*/\1/')
  "$BIN/ember" train --quiet --config "$out/job.toml" --out-dir "$out/run" > "$out/train.log" 2>&1
  trainrate=$(python3 -c "import json;print(round(json.load(open('$out/run/metrics.json'))['epochs'][0]['samples_per_s']))")
  echo "round $r: reader $reader samples/s (1 thread), training $trainrate samples/s (2 shards x 2 workers), ratio $(python3 -c "print(round($reader/$trainrate,1))")x, load $l0 -> $(cut -d' ' -f1 /proc/loadavg)"
done
