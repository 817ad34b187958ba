#!/usr/bin/env bash
# Ember's models side by side with DeepCTR-Torch (issue 13), alternating in
# one run on the same machine state:
#   for each round, thread count and model: the peer (../shared/peer/
#   run_deepctr.py, one epoch over the first N rows of its ML-100k files),
#   then Ember's model-bench on batches of the same shape (batch 128,
#   embeddings 18 + 18, history cap 100); samples/s of each, with the load
#   average before the pair. Prints medians per model and thread count, the
#   ratio Ember / peer, and Ember's 2-thread over 1-thread speed-up.
#   scripts/bench-peer.sh                  # 3 rounds, 1 and 2 threads, base din dien
#   ROUNDS=5 THREADS="1" MODELS="din" scripts/bench-peer.sh
#   BASE_BIN=/tmp/old/model-bench scripts/bench-peer.sh   # also an earlier build, same rounds
# First run only: a venv outside the repository ($VENV, default
# ~/.cache/ember-peer-venv) with torch 2.15.0 + deepctr-torch 0.3.0 from
# PyPI (~5.6 GB; not part of CI), and the peer's ML-100k files in
# data/peer-ml100k. Run it on an idle machine: figures from a loaded moment
# are not comparable with an idle one, which is why the two sides alternate.
set -euo pipefail
cd "$(dirname "$0")/.."
PEER="${PEER:-../shared/peer}"
VENV="${VENV:-$HOME/.cache/ember-peer-venv}"
ROUNDS="${ROUNDS:-3}"
THREADS="${THREADS:-1 2}"
MODELS="${MODELS:-base din dien}"
SECONDS_PER_RUN="${SECONDS_PER_RUN:-5}"
[ -f "$PEER/run_deepctr.py" ] || { echo "bench-peer: no $PEER/run_deepctr.py (set PEER=dir)" >&2; exit 2; }
if ! "$VENV/bin/python" -c "import deepctr_torch, torch" 2>/dev/null; then
  echo "bench-peer: setting up $VENV (torch 2.15.0, deepctr-torch 0.3.0; first run only)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.15.0 deepctr-torch==0.3.0 requests
fi
[ -x target/debug/model-bench ] || cargo build --workspace --all-targets
scripts/fetch-ml100k.sh data/ml-100k
P=data/peer-ml100k
if [ ! -s $P/train.tsv ]; then
  "$VENV/bin/python" "$PEER/build_ml100k.py" --inter data/ml-100k/ml-100k.inter \
    --item data/ml-100k/ml-100k.item --out $P
fi
# Peer rows per measurement: enough for a few seconds of training each.
peer_rows() { case $1 in base) echo 64000 ;; din) echo 12800 ;; dien) echo 3200 ;; esac; }
out=runs/bench-peer; mkdir -p $out
res=$out/results.txt; : > $res
echo "bench-peer: $ROUNDS rounds, threads [$THREADS], models [$MODELS]; $(nproc) cores"
for round in $(seq "$ROUNDS"); do
  for th in $THREADS; do
    for m in $MODELS; do
      load=$(cut -d' ' -f1-3 /proc/loadavg)
      peer=$(OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=$th "$VENV/bin/python" "$PEER/run_deepctr.py" \
               --data $P --model $m --epochs 1 --threads "$th" --max-train-rows "$(peer_rows $m)" 2>/dev/null \
             | sed -n 's/^FINAL //p' | python3 -c 'import json,sys; print(json.load(sys.stdin)["samples_per_s"])')
      ember=$(RAYON_NUM_THREADS=$th target/debug/model-bench --models "$m" --threads "$th" \
                --seconds "$SECONDS_PER_RUN" 2>/dev/null | awk -v m="$m" '$1 == m {print $2}')
      [ -n "$peer" ] && [ -n "$ember" ] || { echo "bench-peer: no figure for $m ($th threads)" >&2; exit 1; }
      base=-
      if [ -n "${BASE_BIN:-}" ]; then
        base=$(RAYON_NUM_THREADS=$th "$BASE_BIN" --models "$m" --threads "$th" \
                 --seconds "$SECONDS_PER_RUN" 2>/dev/null | awk -v m="$m" '$1 == m {print $2}')
      fi
      echo "round $round threads $th $m: peer $peer, ember $ember, ember before $base samples/s (load $load)"
      echo "$round $th $m $peer $ember $load $base" >> $res
    done
  done
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$res" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault((r[2], int(r[1])), []).append((float(r[3]), float(r[4]), float(r[5])))
print("| model | threads | DeepCTR-Torch samples/s (median) | Ember samples/s (median) | Ember / peer | load (1-min) |")
print("|---|---|---|---|---|---|")
med = {}
for (m, th), v in sorted(by.items()):
    p, e = st.median(x[0] for x in v), st.median(x[1] for x in v)
    med[(m, th)] = e
    loads = [x[2] for x in v]
    print(f"| {m} | {th} | {p:,.0f} | {e:,.0f} | {e / p:.2f}x | {min(loads):.2f}-{max(loads):.2f} |")
base = {}
for r in rows:
    # round threads model peer ember load(3 fields) base
    if len(r) > 8 and r[8] != "-":
        base.setdefault((r[2], int(r[1])), []).append((float(r[4]), float(r[8])))
for (m, th), v in sorted(base.items()):
    e, b = st.median(x[0] for x in v), st.median(x[1] for x in v)
    print(f"Ember {m}, {th} thread(s): this build {e:,.0f} / BASE_BIN {b:,.0f} = {e / b:.2f}x (medians)")
for m in sorted({k[0] for k in med}):
    if (m, 1) in med and (m, 2) in med:
        print(f"Ember {m}: 2 threads / 1 thread = {med[(m, 2)] / med[(m, 1)]:.2f}x")
PY
