#!/usr/bin/env bash
# What GRU4Rec's mid-epoch checkpoints cost: `ember train` of
# configs/gru4rec_ml100k_cluster.toml (2 ps-server shards, 2 workers, TLS)
# for EPOCHS epochs (default 1) with `cluster.checkpoint_every_steps` set to
# each value of EVERY (default "0 100"; 0 = only at epoch ends), the
# variants alternating in every round (ROUNDS, default 3) so that all of
# them see the same machine state. Prints each run's wall time, the
# mid-epoch checkpoints it wrote and the load average, then the median wall
# time per variant and the cost per mid-epoch checkpoint against EVERY's
# first value (the difference of the medians over the checkpoints written).
#   scripts/bench-seq-ckpt.sh
#   EVERY="0 50 200" ROUNDS=5 scripts/bench-seq-ckpt.sh
# Needs a built tree (or BIN=dir of binaries); the ML-100k files come from
# scripts/ml100k-din-data.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-target/debug}"
ROUNDS="${ROUNDS:-3}"
EVERY="${EVERY:-0 100}"
EPOCHS="${EPOCHS:-1}"
scripts/ml100k-din-data.sh "$BIN"
R=runs/bench-seq-ckpt
mkdir -p $R
: > $R/results.tsv
for e in $EVERY; do
  sed -e "s/^name = .*/name = \"bench-seq-ckpt-$e\"/" \
      -e "s/^sync = .*/&\ncheckpoint_every_steps = $e/" \
      configs/gru4rec_ml100k_cluster.toml > $R/every-$e.toml
  grep -q "^checkpoint_every_steps = $e" $R/every-$e.toml ||
    { echo "could not set checkpoint_every_steps in $R/every-$e.toml" >&2; exit 2; }
done
for r in $(seq "$ROUNDS"); do
  for e in $EVERY; do
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    t0=$(date +%s.%N)
    "$BIN/ember" train --quiet --config $R/every-$e.toml --epochs "$EPOCHS" \
      --out-dir $R/run-$e > $R/run-$e.log 2>&1
    t1=$(date +%s.%N)
    n=$(grep -c "mid-epoch checkpoint" $R/run-$e.log || true)
    wall=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
    echo "round $r  every $e: wall $wall s, $n mid-epoch checkpoints, load $load"
    printf '%s\t%s\t%s\t%s\n' "$e" "$wall" "$n" "$load" >> $R/results.tsv
  done
done
python3 - $R/results.tsv <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
order = list(dict.fromkeys(r[0] for r in rows))
wall = {e: statistics.median(float(r[1]) for r in rows if r[0] == e) for e in order}
ckpts = {e: statistics.median(int(r[2]) for r in rows if r[0] == e) for e in order}
base = order[0]
print("| checkpoint_every_steps | median wall (s) | mid-epoch checkpoints | cost per checkpoint |")
print("|---|---|---|---|")
for e in order:
    extra = ckpts[e] - ckpts[base]
    cost = f"{(wall[e] - wall[base]) / extra * 1000:.0f} ms" if extra > 0 else "-"
    print(f"| {e} | {wall[e]:.2f} | {ckpts[e]:.0f} | {cost} |")
loads = [r[3].split()[0] for r in rows]
print(f"load average (1 min) over the runs: {min(loads)}-{max(loads)}")
PY
