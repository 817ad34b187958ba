#!/usr/bin/env bash
# The DIN paper's full feature set vs the ids only on ML-100k (issue 15):
# Base and DIN, each with the ids-only schema (configs/din_ml100k_ids.toml:
# movie id, first genre and their histories) and the full schema
# (configs/din_ml100k_full.toml: + user profile, all genres multi-hot for the
# candidate and every history step, release year, weekday and hour), on the
# same prepared files (same training and test rows), 2 shards x 2 workers,
# EPOCHS epochs (default 2), SEEDS seeds (default 1 2 3).
#   scripts/features-ablation.sh                     # 4 variants x 3 seeds
#   RUNS="din_full:1 base_ids:2" scripts/features-ablation.sh
#   BIN=/tmp/ember-bin Q=runs/features scripts/features-ablation.sh
# A run whose metrics.json already holds its last epoch is not repeated.
# Prints each run and then mean +- sd per variant and epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${SEEDS:-1 2 3}"
EPOCHS="${EPOCHS:-2}"
VARIANTS="${VARIANTS:-base_ids base_full din_ids din_full}"
Q="${Q:-runs/features-ablation}"
BIN="${BIN:-}"
if [ -z "$BIN" ]; then
  cargo build --workspace --all-targets
  BIN=target/debug
fi
if [ ! -s data/ml100k-full/counts.bin ]; then
  scripts/fetch-ml100k.sh data/ml-100k
  "$BIN/ember-data" prepare --config configs/din_ml100k_full.toml
  "$BIN/ember-data" count --config configs/din_ml100k_full.toml --train data/ml100k-full/train.txt --out data/ml100k-full/counts.bin
fi
mkdir -p "$Q"
if [ -z "${RUNS:-}" ]; then
  RUNS=""
  for seed in $SEEDS; do for v in $VARIANTS; do RUNS="$RUNS $v:$seed"; done; done
fi
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for run in $RUNS; do
  name="${run%%:*}"; seed="${run##*:}"
  kind="${name%%_*}"; set_="${name#*_}"
  case "$kind" in base|din|dien) ;; *) echo "unknown model in $name" >&2; exit 2 ;; esac
  case "$set_" in ids|full) ;; *) echo "unknown feature set in $name" >&2; exit 2 ;; esac
  cfg="$Q/$name.toml"
  sed -e "0,/^name = .*/s//name = \"features-$name\"/" \
      -e "s/^kind = \"din\"/kind = \"$kind\"/" \
      -e "s/^epochs = .*/epochs = $EPOCHS/" \
      "configs/din_ml100k_$set_.toml" > "$cfg"
  grep -q "^kind = \"$kind\"" "$cfg" || { echo "could not set kind in $cfg" >&2; exit 2; }
  out="$Q/$name-s$seed"
  if ! python3 -c "import json,sys;r=json.load(open('$out/metrics.json'));sys.exit(0 if len(r['epochs'])>=$EPOCHS and r['epochs'][-1]['test'] else 1)" 2>/dev/null; then
    start=$(date +%s)
    "$BIN/ember" train --quiet --config "$cfg" --seed "$seed" --out-dir "$out" > "$out.log" 2>&1
    echo "$name seed $seed: $(( $(date +%s) - start )) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
  fi
  python3 -c "
import json
for e in json.load(open('$out/metrics.json'))['epochs']:
    t = e['test']; print(f\"  $name seed $seed epoch {e['epoch']}: AUC {t['auc']:.4f} GAUC {t['gauc']:.4f} logloss {t['logloss']:.4f}\")"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 scripts/ablation-table.py "$Q" $VARIANTS
