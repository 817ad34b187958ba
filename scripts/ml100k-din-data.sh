#!/usr/bin/env bash
# The DIN-protocol ML-100k files the benchmark and ablation scripts train on
# (data/ml100k-din: samples and feature counts), made once with the
# ember-data binary in BIN (default target/debug).
#   scripts/ml100k-din-data.sh [BIN]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/debug}"
if [ ! -s data/ml100k-din/counts.bin ]; then
  scripts/fetch-ml100k.sh data/ml-100k
  "$BIN/ember-data" prepare --raw-dir data/ml-100k --out data/ml100k-din
  "$BIN/ember-data" count --train data/ml100k-din/train.txt --out data/ml100k-din/counts.bin
fi
