#!/usr/bin/env bash
# Quality of compact rows on ML-100k DIN: f32 + Adam (configs/din_ml100k.toml)
# against f16 + row-wise Adagrad (configs/din_ml100k_compact.toml) and f16 +
# Adam (precision alone), SEEDS seeds each (default 1 2 3), same test rows,
# alternating the variants. Prints mean +- sd of AUC, GAUC and test logloss.
#   scripts/compact-quality.sh            # ~15 min on 2 idle cores
#   VARIANTS="f32_adam f16_rowwise_adagrad" SEEDS="1 2 3" scripts/compact-quality.sh
#   VARIANTS="f16_rowwise_adagrad_lr0.1" ...   # another row-wise Adagrad lr
#   VARIANTS="f16_rowwise_adagrad_catadam_lr0.0001" ... # that, with Adam for the cat table
#   VARIANTS="compact" ...                     # configs/din_ml100k_compact.toml as shipped
#       (f16_rowwise_* start from it with the cat-table override removed)
#   VARIANTS="f16_rowwise_adam f32_adam_dice" ... # row-wise Adam; DIN with Dice
#   VARIANTS="f16_rowwise_adam_f16m" ...       # row-wise Adam, f16 first moment too
#   DATA=longtail scripts/compact-quality.sh   # the same variants on the synthetic
#       long tail (ember-data synth: Zipf ids over a 10^9 id space, most ids seen
#       once or twice), results under runs/quality-longtail
#   DATA=longtail-valid ...                  # tuning split: first 180k training rows
#       against the last 20k (runs/quality-longtail-valid); the test rows untouched
# A run whose metrics.json already holds its last epoch is not repeated.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${SEEDS:-1 2 3}"
VARIANTS="${VARIANTS:-f32_adam f16_rowwise_adagrad f16_adam}"
cargo build --workspace --all-targets
if [ ! -s data/ml100k-din/counts.bin ]; then
  scripts/fetch-ml100k.sh data/ml-100k
  target/debug/ember-data prepare --raw-dir data/ml-100k --out data/ml100k-din
  target/debug/ember-data count --train data/ml100k-din/train.txt --out data/ml100k-din/counts.bin
fi
DATA="${DATA:-ml100k}"
Q=runs/quality
if [ "$DATA" = longtail ] || [ "$DATA" = longtail-valid ]; then
  Q=runs/quality-$DATA
  d=data/longtail
  scripts/longtail-data.sh
  if [ ! -s $d/counts_trainv.bin ]; then
    head -n 180000 $d/train.txt > $d/trainv.txt
    tail -n 20000 $d/train.txt > $d/valid.txt
    target/debug/ember-data count --train $d/trainv.txt --out $d/counts_trainv.bin
  fi
  target/debug/ember-data popularity --train $d/train.txt --test $d/test.txt
elif [ "$DATA" != ml100k ]; then
  echo "unknown DATA $DATA (ml100k, longtail or longtail-valid)" >&2; exit 2
fi
mkdir -p runs/quality $Q
# The compact config without its per-table override (every table row-wise
# Adagrad): the f16_rowwise_* variants below start from it.
C=runs/quality/din_ml100k_compact_onetable.toml
sed '/^\[sparse.tables.cat\]/,/^$/d' configs/din_ml100k_compact.toml > $C
grep -q 'sparse.tables' $C && { echo "could not strip the override from $C" >&2; exit 2; }
sed -e 's/^name = .*/name = "din-ml100k-f16-adam"/' -e 's/^\[sparse\]$/[sparse]\nprecision = "f16"/' \
  configs/din_ml100k.toml > runs/quality/din_ml100k_f16_adam.toml
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for seed in $SEEDS; do
  for name in $VARIANTS; do
    case "$name" in
      f32_adam) cfg=configs/din_ml100k.toml ;;
      f16_rowwise_adagrad) cfg=$C ;;
      compact) cfg=configs/din_ml100k_compact.toml ;;   # as shipped: cat table on Adam
      f16_rowwise_adagrad_lr*)
        # The compact config with another row-wise Adagrad learning rate.
        lr="${name#f16_rowwise_adagrad_lr}"
        cfg="runs/quality/din_ml100k_compact_lr$lr.toml"
        sed -e "s/^name = .*/name = \"din-ml100k-compact-lr$lr\"/" \
            -e "s/kind = \"rowwise_adagrad\", lr = [0-9.e-]*/kind = \"rowwise_adagrad\", lr = $lr/" \
            "$C" > "$cfg"
        grep -q "lr = $lr," "$cfg" || { echo "could not set lr $lr in $cfg" >&2; exit 2; } ;;
      f16_rowwise_adagrad_catadam_lr*)
        # The compact config with another row-wise Adagrad learning rate for
        # the item table and Adam (f32, lr 0.001) for the small cat table.
        lr="${name#f16_rowwise_adagrad_catadam_lr}"
        cfg="runs/quality/din_ml100k_compact_catadam_lr$lr.toml"
        sed -e "s/^name = .*/name = \"din-ml100k-compact-catadam-lr$lr\"/" \
            -e "s/kind = \"rowwise_adagrad\", lr = [0-9.e-]*/kind = \"rowwise_adagrad\", lr = $lr/" \
            "$C" > "$cfg"
        printf '\n[sparse.tables.cat]\noptimizer = { kind = "adam", lr = 0.001 }\nprecision = "f32"\n' >> "$cfg"
        grep -q "lr = $lr," "$cfg" || { echo "could not set lr $lr in $cfg" >&2; exit 2; } ;;
      f16_adam) cfg=runs/quality/din_ml100k_f16_adam.toml ;;
      f16_rowwise_adam|f16_rowwise_adam_f16m)
        # f16 weights, row-wise Adam (first moment per value, second per row);
        # _f16m stores that first moment in f16 too (100 B/row).
        cfg=runs/quality/din_ml100k_$name.toml
        moment=
        [ "$name" = f16_rowwise_adam_f16m ] && moment='\nmoment_precision = "f16"'
        sed -e "s/^name = .*/name = \"din-ml100k-${name//_/-}\"/" \
            -e 's/^optimizer = { kind = "rowwise_adagrad".*/optimizer = { kind = "rowwise_adam", lr = 0.001 }/' \
            -e "s/^precision = \"f16\".*/precision = \"f16\"$moment/" \
            "$C" > "$cfg"
        grep -q 'kind = "rowwise_adam"' "$cfg" || { echo "could not set rowwise_adam in $cfg" >&2; exit 2; }
        [ -z "$moment" ] || grep -q '^moment_precision = "f16"' "$cfg" \
          || { echo "could not set moment_precision in $cfg" >&2; exit 2; } ;;
      f32_adam_dice)
        # The f32 + Adam job with Dice instead of PReLU (issue 16's Dice vs PReLU).
        cfg=runs/quality/din_ml100k_dice.toml
        sed -e 's/^name = .*/name = "din-ml100k-dice"/' -e 's/^activation = "prelu".*/activation = "dice"/' \
          configs/din_ml100k.toml > "$cfg"
        grep -q '^activation = "dice"' "$cfg" || { echo "could not set dice in $cfg" >&2; exit 2; } ;;
      *) echo "unknown variant $name" >&2; exit 2 ;;
    esac
    if [ "$DATA" = longtail ]; then
      # The same job on the long-tail files (max_len 50: synthetic histories are 5..50).
      lcfg="$Q/$(basename "$cfg")"
      sed -e 's#data/ml100k-din/#data/longtail/#' -e 's/^max_len = .*/max_len = 50/' "$cfg" > "$lcfg"
      grep -q 'data/longtail/train.txt' "$lcfg" || { echo "could not point $lcfg at data/longtail" >&2; exit 2; }
      cfg="$lcfg"
    elif [ "$DATA" = longtail-valid ]; then
      # Tuning: trained on the first 180k training rows, tested on the last 20k.
      lcfg="$Q/$(basename "$cfg")"
      sed -e 's#data/ml100k-din/train.txt#data/longtail/trainv.txt#' \
          -e 's#data/ml100k-din/test.txt#data/longtail/valid.txt#' \
          -e 's#data/ml100k-din/counts.bin#data/longtail/counts_trainv.bin#' \
          -e 's/^max_len = .*/max_len = 50/' "$cfg" > "$lcfg"
      grep -q 'data/longtail/valid.txt' "$lcfg" || { echo "could not point $lcfg at data/longtail" >&2; exit 2; }
      cfg="$lcfg"
    fi
    out="$Q/$name-s$seed"
    if ! python3 -c "import json,sys;r=json.load(open('$out/metrics.json'));sys.exit(0 if len(r['epochs'])>=2 and r['epochs'][-1]['test'] else 1)" 2>/dev/null; then
      target/debug/ember train --quiet --config "$cfg" --seed "$seed" --out-dir "$out" > "$out.log" 2>&1
    fi
    echo "$name seed $seed: $(python3 -c "import json;e=json.load(open('$out/metrics.json'))['epochs'][-1]['test'];print(f\"AUC {e['auc']:.4f} GAUC {e['gauc']:.4f} logloss {e['logloss']:.4f}\")")"
  done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
Q="$Q" VARIANTS="$VARIANTS" python3 - $SEEDS <<'PY'
import json, os, statistics as st, sys
seeds = sys.argv[1:]
print("| variant | AUC | GAUC | test logloss |\n|---|---|---|---|")
for name in os.environ.get("VARIANTS", "f32_adam f16_rowwise_adagrad f16_adam").split():
    rows = [json.load(open(f"{os.environ['Q']}/{name}-s{s}/metrics.json"))["epochs"][-1]["test"] for s in seeds]
    cell = lambda k: f"{st.mean(r[k] for r in rows):.4f} ± {st.stdev(r[k] for r in rows) if len(rows) > 1 else 0:.4f}"
    print(f"| {name} | {cell('auc')} | {cell('gauc')} | {cell('logloss')} |")
PY
