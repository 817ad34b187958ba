#!/usr/bin/env bash
# Ember's main job, from a fresh machine: fetch ML-100k, build, prepare the
# DIN-protocol samples and feature counts, then train DIN on a local cluster
# of 2 parameter-server shards and 2 workers (configs/din_ml100k.toml).
# Extra arguments go to `ember train` (e.g. --epochs 1, --seed 2, --resume).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-ml100k.sh data/ml-100k
cargo build --workspace --bins
if [ ! -f data/ml100k-din/meta.json ] || [ ! -f data/ml100k-din/train.txt ]; then
  target/debug/ember-data prepare --raw-dir data/ml-100k --out data/ml100k-din
fi
if [ ! -f data/ml100k-din/counts.bin ]; then
  target/debug/ember-data count --train data/ml100k-din/train.txt --out data/ml100k-din/counts.bin
fi
exec target/debug/ember train --config configs/din_ml100k.toml "$@"
