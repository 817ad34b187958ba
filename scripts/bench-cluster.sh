#!/usr/bin/env bash
# The local cluster's training rate side by side (issue 13): DIN on ML-100k,
# 2 shards, 1 epoch, configs/din_ml100k.toml with the workers and the dense
# staleness changed, run alternately ROUNDS times in one session. Prints
# each run's samples/s, the workers' summed pull/compute/push/wait seconds
# and the test AUC / GAUC / logloss, then medians, with the load average.
#   scripts/bench-cluster.sh                       # w1 w2 w2_ds1, 3 rounds
#   VARIANTS="w2 w2_ds1 w2_ds2" ROUNDS=2 scripts/bench-cluster.sh
#   BIN=/tmp/ember-bin scripts/bench-cluster.sh    # binaries from elsewhere (no build)
# Variant names: w<workers>[_ds<dense_staleness>][_async][_t<worker_threads>],
# or mb<threads>: model-bench's DIN step, in process with no shards, on 64
# batches taken evenly over the same training file (the end-to-end
# comparison: how much of that rate the cluster keeps).
#   VARIANTS="mb1 w1 mb2 w2 w2_ds1" scripts/bench-cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-3}"
VARIANTS="${VARIANTS:-w1 w2 w2_ds1}"
Q="${Q:-runs/bench-cluster}"
BIN="${BIN:-}"
if [ -z "$BIN" ]; then
  cargo build --workspace --all-targets
  BIN=target/debug
fi
scripts/ml100k-din-data.sh "$BIN"
mkdir -p "$Q"
for v in $VARIANTS; do
  [[ $v =~ ^mb[0-9]+$ ]] && continue
  w=$(sed -E 's/^w([0-9]+).*/\1/' <<<"$v")
  ds=0; sync=sync; t=1
  [[ $v =~ _ds([0-9]+) ]] && ds=${BASH_REMATCH[1]}
  [[ $v =~ _async ]] && sync=async
  [[ $v =~ _t([0-9]+) ]] && t=${BASH_REMATCH[1]}
  extra=""; [ "$ds" != 0 ] && extra="\ndense_staleness = $ds"
  sed -e "s/^name = .*/name = \"bench-cluster-$v\"/" -e "s/^epochs = .*/epochs = 1/" \
      -e "s/^workers = .*/workers = $w/" -e "s/^worker_threads = .*/worker_threads = $t/" \
      -e "s/^sync = .*/sync = \"$sync\"/" -e "/^dense_staleness/d" -e "s/^staleness = .*/staleness = 1$extra/" \
      configs/din_ml100k.toml > "$Q/$v.toml"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
  for v in $VARIANTS; do
    out="$Q/$v-r$r"
    rm -rf "$out"
    if [[ $v =~ ^mb([0-9]+)$ ]]; then
      mkdir -p "$out"
      "$BIN/model-bench" --models din --data data/ml100k-din/train.txt --threads "${BASH_REMATCH[1]}" \
        --seconds 10 > "$out.log" 2>&1
      sps=$(awk '$1 == "din" { print $2 }' "$out.log")
      [ -n "$sps" ] || { echo "model-bench printed no DIN line: $out.log" >&2; exit 1; }
      echo "$sps" > "$out/samples_per_s"
      echo "round $r $(printf '%10s' "$v"): $(printf '%8.0f' "$sps") samples/s  (model-bench, in process; $(grep '^peak' "$out.log"))  load $(cut -d' ' -f1-3 /proc/loadavg)"
      continue
    fi
    "$BIN/ember" train --quiet --config "$Q/$v.toml" --out-dir "$out" > "$out.log" 2>&1
    python3 - "$out/metrics.json" "$v" "$r" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))["epochs"][0]
t, x = e["time"], e["test"]
print(f"round {sys.argv[3]} {sys.argv[2]:>10}: {e['samples_per_s']:8.0f} samples/s  "
      f"pull {t['pull_s']:5.1f} compute {t['compute_s']:5.1f} push {t['push_s']:5.1f} wait {t['wait_s']:5.1f} s  "
      f"AUC {x['auc']:.4f} GAUC {x['gauc']:.4f} logloss {x['logloss']:.4f}  load {sys.argv[4]}")
PY
  done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$Q" $VARIANTS <<'PY'
import glob, json, statistics as st, sys
q, vs = sys.argv[1], sys.argv[2:]
base = None
print("| variant | runs | samples/s (median) | vs first | wait s (median) | AUC (mean) |\n|---|---|---|---|---|---|")
for v in vs:
    if v.startswith("mb"):
        rates = [float(open(p).read()) for p in sorted(glob.glob(f"{q}/{v}-r*/samples_per_s"))]
        if rates:
            sps = st.median(rates)
            base = base or sps
            print(f"| {v} (model-bench) | {len(rates)} | {sps:,.0f} | {sps / base:.2f}x | - | - |")
        continue
    es = [json.load(open(p))["epochs"][0] for p in sorted(glob.glob(f"{q}/{v}-r*/metrics.json"))]
    if not es:
        continue
    sps = st.median(e["samples_per_s"] for e in es)
    base = base or sps
    print(f"| {v} | {len(es)} | {sps:,.0f} | {sps / base:.2f}x | {st.median(e['time']['wait_s'] for e in es):.1f} | {st.mean(e['test']['auc'] for e in es):.4f} |")
PY
