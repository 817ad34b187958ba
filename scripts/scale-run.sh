#!/usr/bin/env bash
# The scale run of BENCHMARKS.md: DIN on a long-tail synthetic workload with
# PREFILL (default 10^8) distinct item ids stored across the shards of
# configs/scale_1e8.toml (f16 rows + row-wise Adagrad), trained end to end.
#
#   scripts/scale-run.sh                       # 10^8 ids
#   CONFIG=configs/scale_3e8.toml PREFILL=300000000 scripts/scale-run.sh   # 3x10^8 ids (needs ~20 GB free)
#   ROWS=1100000 scripts/scale-run.sh          # training + test rows to generate
#
# Prints: per-shard peak RSS and bytes per row (RSS / rows), rows pulled and
# pushed per second (from each shard's /metrics), samples/s of the job,
# checkpoint write time (step-0 base after the prefill, then deltas every
# CKPT_EVERY steps) and restore time of the last chain (a --resume of the
# finished job, fresh shard processes), from the shard logs, and test AUC / GAUC
# next to the item-popularity baseline on the same held-out rows. Not a test:
# it needs minutes and most of the machine's memory.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFILL="${PREFILL:-100000000}"
ROWS="${ROWS:-1100000}"
TEST_ROWS="${TEST_ROWS:-100000}"
# Cluster checkpoints every CKPT_EVERY steps (after the step-0 base: deltas).
CKPT_EVERY="${CKPT_EVERY:-500}"
CONFIG="${CONFIG:-configs/scale_1e8.toml}"
RUN="runs/scale-$PREFILL"

cargo build --workspace --all-targets
BIN=target/debug

if [ ! -s data/scale/train.txt ] || [ "$(wc -l < data/scale/all.txt 2>/dev/null || echo 0)" != "$ROWS" ]; then
  mkdir -p data/scale
  "$BIN/ember-data" synth --ids 1000000000 --users 1000000 --rows "$ROWS" --cats 1000 --out data/scale/all.txt
  head -n $((ROWS - TEST_ROWS)) data/scale/all.txt > data/scale/train.txt
  tail -n "$TEST_ROWS" data/scale/all.txt > data/scale/test.txt
fi

JOB="$RUN.toml"
mkdir -p runs
sed -e "s/^prefill_ids = .*/prefill_ids = $PREFILL/" -e "s/^name = .*/name = \"scale-$PREFILL\"/" \
    -e "s/^keep_checkpoints = .*/keep_checkpoints = 2\ncheckpoint_every_steps = $CKPT_EVERY/" "$CONFIG" > "$JOB"
echo "train.out_dir: $RUN"
rm -rf "$RUN"

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
START=$(date +%s)
"$BIN/ember" train --quiet --config "$JOB" --out-dir "$RUN" > "$RUN.out" 2> "$RUN.err" &
EMBER=$!

# Sample each shard's RSS (peak) and its /metrics while the job runs.
declare -A PEAK
while kill -0 "$EMBER" 2>/dev/null; do
  if [ -s "$RUN/cluster.json" ]; then
    i=0
    for pid in $(python3 -c "import json;print(' '.join(str(p) for p in json.load(open('$RUN/cluster.json'))['pids']))" 2>/dev/null); do
      rss=$(awk '/VmRSS/{print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
      if [ "${rss:-0}" -gt "${PEAK[$i]:-0}" ]; then PEAK[$i]=$rss; fi
      i=$((i + 1))
    done
    i=0
    for m in $(python3 -c "import json;print(' '.join(json.load(open('$RUN/cluster.json'))['metrics']))" 2>/dev/null); do
      curl -sf --max-time 2 "http://$m/metrics" > "$RUN.metrics-$i.tmp" 2>/dev/null && mv "$RUN.metrics-$i.tmp" "$RUN.metrics-$i" || true
      i=$((i + 1))
    done
  fi
  sleep 2
done
set +e
wait "$EMBER"; RC=$?
set -e
END=$(date +%s)
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "ember train exit $RC after $((END - START)) s"
tail -n 5 "$RUN.out" || true
[ "$RC" = 0 ] || { tail -n 30 "$RUN.err"; exit "$RC"; }

for i in "${!PEAK[@]}"; do
  f="$RUN.metrics-$i"
  rows=$(awk '/^ember_ps_resident_rows\{/{s+=$2} END{print s+0}' "$f" 2>/dev/null)
  bytes=$(awk '/^ember_ps_resident_bytes\{/{s+=$2} END{print s+0}' "$f" 2>/dev/null)
  pulled=$(awk '/^ember_ps_rows_pulled_total\{/{s+=$2} END{print s+0}' "$f" 2>/dev/null)
  pushed=$(awk '/^ember_ps_rows_pushed_total\{/{s+=$2} END{print s+0}' "$f" 2>/dev/null)
  python3 - "$i" "${PEAK[$i]}" "$rows" "$bytes" "$pulled" "$pushed" "$((END - START))" <<'PY'
import sys
i, peak_kb, rows, bytes_, pulled, pushed, secs = sys.argv[1:]
peak = int(peak_kb) * 1024; rows = float(rows); secs = float(secs)
print(f"shard {i}: peak RSS {peak/2**30:.2f} GiB, {rows:.0f} rows, "
      f"{peak/max(rows,1):.1f} B/row (RSS), {float(bytes_)/max(rows,1):.1f} B/row (accounted), "
      f"pulled {float(pulled)/1e6:.1f} M rows, pushed {float(pushed)/1e6:.1f} M rows "
      f"(avg {float(pulled)/secs/1e3:.0f} K/{float(pushed)/secs/1e3:.0f} K rows/s over the run)")
PY
done
grep -h "checkpoint written\|checkpoint restored\|prefill done" "$RUN"/logs/*.log "$RUN.err" 2>/dev/null | tail -n 20 || true
cp -r "$RUN/logs" "$RUN.train-logs"

# Restore time: resume the finished job (fresh shard processes restore the
# last cluster checkpoint, base + deltas; nothing is left to train).
echo "restoring the last cluster checkpoint (load average $(cut -d' ' -f1-3 /proc/loadavg)) ..."
"$BIN/ember" train --quiet --config "$JOB" --out-dir "$RUN" --resume > "$RUN.resume.out" 2> "$RUN.resume.err" || {
  echo "resume failed:"; tail -n 20 "$RUN.resume.err"; }
grep -h "checkpoint restored" "$RUN"/logs/shard-*.log 2>/dev/null || true
python3 - "$RUN/metrics.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for e in r["epochs"]:
    t = e.get("test") or {}
    print(f"epoch {e.get('epoch')}: {e.get('samples_per_s', e.get('train', {}).get('samples_per_s', 'n/a'))} samples/s, "
          f"test AUC {t.get('auc', float('nan')):.4f} GAUC {t.get('gauc', float('nan')):.4f}")
PY
"$BIN/ember-data" popularity --train data/scale/train.txt --test data/scale/test.txt
