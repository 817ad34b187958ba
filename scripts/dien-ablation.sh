#!/usr/bin/env bash
# DIEN's ablations on ML-100k (issue 16; DIEN paper Table 2): the interest
# extractor GRU followed by attention pooling (evolve = "attpool"), AIGRU,
# AGRU or AUGRU, each with and without the auxiliary loss, as
# configs/dien_ml100k.toml (2 shards x 2 workers, Adam 1e-3, batch 128) for
# EPOCHS epochs (default 2; test metrics after every epoch, so a 4-epoch run
# also gives the 2-epoch figures), SEEDS seeds, same test rows.
#   scripts/dien-ablation.sh                        # 8 variants x 3 seeds, ~5 min a run idle
#   RUNS="attpool_aux:1 augru_noaux:2" scripts/dien-ablation.sh   # listed variant:seed runs only
#   EPOCHS=4 Q=runs/dien-ablation-4ep scripts/dien-ablation.sh
#   BIN=/tmp/ember-bin scripts/dien-ablation.sh      # binaries from elsewhere (no build)
#   RUNS="augru_aux_tf1:1" scripts/dien-ablation.sh  # suffix _tf1: both GRUs with
#                                                    # gru_init = "tf1" (the reference's TF1 GRUCell init)
# A run whose metrics.json already holds its last epoch is not repeated.
# Prints each run and then mean +- sd per variant and epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${SEEDS:-1 2 3}"
EPOCHS="${EPOCHS:-2}"
VARIANTS="${VARIANTS:-attpool_aux attpool_noaux aigru_aux aigru_noaux agru_aux agru_noaux augru_aux augru_noaux}"
Q="${Q:-runs/dien-ablation}"
BIN="${BIN:-}"
if [ -z "$BIN" ]; then
  cargo build --workspace --all-targets
  BIN=target/debug
fi
scripts/ml100k-din-data.sh "$BIN"
mkdir -p "$Q"
if [ -z "${RUNS:-}" ]; then
  RUNS=""
  for seed in $SEEDS; do for v in $VARIANTS; do RUNS="$RUNS $v:$seed"; done; done
fi
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for run in $RUNS; do
  name="${run%%:*}"; seed="${run##*:}"
  evolve="${name%%_*}"; aux="${name#*_}"; init=uniform
  case "$aux" in *_tf1) aux="${aux%_tf1}"; init=tf1 ;; esac
  case "$evolve" in attpool|aigru|agru|augru) ;; *) echo "unknown evolve in $name" >&2; exit 2 ;; esac
  case "$aux" in aux) a=true ;; noaux) a=false ;; *) echo "unknown aux in $name" >&2; exit 2 ;; esac
  cfg="$Q/dien_$name.toml"
  sed -e "s/^name = .*/name = \"dien-$name\"/" \
      -e "s/^evolve = .*/evolve = \"$evolve\"/" \
      -e "s/^aux_loss = .*/aux_loss = $a\ngru_init = \"$init\"/" \
      -e "s/^epochs = .*/epochs = $EPOCHS/" \
      configs/dien_ml100k.toml > "$cfg"
  grep -q "^evolve = \"$evolve\"" "$cfg" && grep -q "^aux_loss = $a" "$cfg" \
    && grep -q "^gru_init = \"$init\"" "$cfg" \
    || { echo "could not set evolve/aux_loss in $cfg" >&2; exit 2; }
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
