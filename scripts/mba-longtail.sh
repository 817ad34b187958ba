#!/usr/bin/env bash
# MBA where it matters (issue 16): DIN on the synthetic long tail
# (ember-data synth: Zipf item ids over a 10^9 id space, 2.45 M distinct
# items in 200k training rows, most seen once or twice; the label depends on
# the user's interests), 5 epochs, test metrics after every epoch, with
#   none      no regularization
#   l2        plain L2 on every touched row, once per step
#   mba       DIN's mini-batch-aware L2, lambda / n_j, exact n_j (counting pass)
#   mba_online  the same with n_j counted online by the shards
#   dropout   id dropout: each goods-id occurrence of a training sample
#             replaced by the zero row with probability r (`sparse.id_dropout`;
#             the paper's "Dropout" baseline)
# lambda of l2 and mba, and r, are chosen by a sweep on a validation split
# (the last 20k rows of the training file, trained on the first 180k, 3
# epochs, seed 1), never on the test rows. PICK=best (default) takes the
# lowest validation logloss at any epoch, PICK=last the lowest at the
# sweep's last epoch (what a regularizer against late overfitting must win).
# The final runs are repeated for every seed of SEEDS (default 1); the table
# gives mean ± sd over seeds and the PNG the per-epoch means.
# OPT=sgd trains the sparse tables with plain SGD at SPARSE_LR (default 1.0,
# the DIN paper's starting rate; dense stays Adam) into runs/mba-longtail-sgd/
# and docs/mba_longtail_sgd.png; the default (Adam) writes runs/mba-longtail/
# and docs/mba_longtail.png. L2_GRID, MBA_GRID, DROP_GRID set the sweeps.
#   scripts/mba-longtail.sh          # ~50 min on 2 idle cores
#   REGS="none dropout" scripts/mba-longtail.sh   # some of the runs (table and PNG of those)
#   OPT=sgd PICK=last SEEDS="1 2 3" REGS="none l2 mba dropout" scripts/mba-longtail.sh
# Needs a built tree (cargo build --workspace; or BIN=dir of binaries); the long-tail files come from
# scripts/longtail-data.sh (made once).
set -euo pipefail
cd "$(dirname "$0")/.."
E="${BIN:-target/debug}/ember"
d=data/longtail
OPT="${OPT:-adam}"
case "$OPT" in
  adam) R=runs/mba-longtail; PNG=docs/mba_longtail.png; sparse_opt='' ;;
  sgd) R=runs/mba-longtail-sgd; PNG=docs/mba_longtail_sgd.png
       sparse_opt="optimizer = { kind = \"sgd\", lr = ${SPARSE_LR:-1.0} }" ;;
  *) echo "OPT must be adam or sgd, not $OPT" >&2; exit 2 ;;
esac
PICK="${PICK:-best}"
case "$PICK" in best|last) ;; *) echo "PICK must be best or last, not $PICK" >&2; exit 2 ;; esac
SEEDS="${SEEDS:-1}"
mkdir -p $R docs
scripts/longtail-data.sh
if [ ! -s $d/counts_trainv.bin ]; then
  head -n 180000 $d/train.txt > $d/trainv.txt
  tail -n 20000 $d/train.txt > $d/valid.txt
  "${BIN:-target/debug}/ember-data" count --train $d/trainv.txt --out $d/counts_trainv.bin
fi
# cfg NAME TRAIN TEST COUNTS EPOCHS REG: the DIN job on the long-tail files.
cfg() {
  local reg
  case "$6" in
    none) reg='mba_lambda = 0.0' ;;
    l2=*) reg="mba_lambda = 0.0\nplain_l2 = ${6#l2=}" ;;
    mba=*) reg="mba_lambda = ${6#mba=}" ;;
    mbaonline=*) reg="mba_lambda = ${6#mbaonline=}" ;;
    drop=*) reg="mba_lambda = 0.0\nid_dropout = ${6#drop=}" ;;
  esac
  local count=exact
  [ "${6%%=*}" = mbaonline ] && count=online
  sed -e "s/^name = .*/name = \"din-longtail-$1\"/" \
      -e "s#^train = .*#train = \"$2\"#" -e "s#^test = .*#test = \"$3\"#" \
      -e "s#^counts = .*#counts = \"$4\"#" -e 's/^max_len = .*/max_len = 50/' \
      -e "s/^mba_lambda = .*/$reg/" -e "s/^count_mode = .*/count_mode = \"$count\"/" \
      -e "s/^epochs = .*/epochs = $5/" configs/din_ml100k.toml > $R/$1.toml
  grep -q "^train = \"$2\"" $R/$1.toml || { echo "could not write $R/$1.toml" >&2; exit 2; }
  if [ -n "$sparse_opt" ]; then
    sed -i "/^\[sparse\]/,/^\[dense\]/ s/^optimizer = .*/$sparse_opt/" $R/$1.toml
    grep -q "^$sparse_opt" $R/$1.toml || { echo "could not set the sparse optimizer in $R/$1.toml" >&2; exit 2; }
  fi
}
dir_of() { # NAME SEED: the run directory (seed 1 keeps the plain name)
  if [ "$2" = 1 ]; then echo "$R/$1"; else echo "$R/$1-seed$2"; fi
}
run() { # NAME [SEED]: train unless it ran with this config (<run>.toml.used) and its metrics.json holds every epoch
  local want seed="${2:-1}" out; want=$(sed -n 's/^epochs = //p' $R/$1.toml)
  out=$(dir_of "$1" "$seed")
  if ! cmp -s "$R/$1.toml" "$out.toml.used" ||
     ! python3 -c "import json,sys;r=json.load(open('$out/metrics.json'));sys.exit(0 if len(r['epochs'])>=$want else 1)" 2>/dev/null; then
    echo "== $1 seed $seed load $(cut -d' ' -f1-3 /proc/loadavg)"
    rm -rf "$out"
    $E train --quiet --config $R/$1.toml --seed "$seed" --out-dir "$out" > "$out.log" 2>&1
    cp "$R/$1.toml" "$out.toml.used"
  fi
}
final() { # NAME REG: the 5-epoch run on the test rows, for every seed
  cfg "$1" $d/train.txt $d/test.txt $d/counts.bin 5 "$2"
  for s in $SEEDS; do run "$1" "$s"; done
}
best() { # PREFIX: the lambda whose run has the lowest validation logloss (PICK: at any epoch, or the last)
  python3 - "$R" "$1" "$PICK" <<'PY'
import glob, json, os, sys
R, prefix, pick = sys.argv[1], sys.argv[2], sys.argv[3]
best = None
for d in sorted(glob.glob(f"{R}/{prefix}-*")):
    if not os.path.isdir(d):
        continue
    ep = json.load(open(d + "/metrics.json"))["epochs"]
    ll = min(e["test"]["logloss"] for e in ep) if pick == "best" else ep[-1]["test"]["logloss"]
    lam = d.rsplit("-", 1)[1]
    print(f"  sweep {prefix} lambda {lam}: validation logloss ({pick}) {ll:.4f}, per epoch " + ", ".join(f"{e['test']['logloss']:.4f}" for e in ep) + f"; AUC at the last epoch {ep[-1]['test']['auc']:.4f}", file=sys.stderr)
    if best is None or ll < best[0]:
        best = (ll, lam)
print(best[1])
PY
}
REGS="${REGS:-none l2 mba mba_online mba-0.01 dropout}"
has() { case " $REGS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
l2=-; mba=-; drop=-
if has l2; then
  for lam in ${L2_GRID:-0.001 0.01 0.1}; do
    cfg sweep-l2-$lam $d/trainv.txt $d/valid.txt $d/counts_trainv.bin 3 l2=$lam; run sweep-l2-$lam
  done
  l2=$(best sweep-l2)
fi
if has mba || has mba_online; then
  for lam in ${MBA_GRID:-0.001 0.01 0.1}; do
    cfg sweep-mba-$lam $d/trainv.txt $d/valid.txt $d/counts_trainv.bin 3 mba=$lam; run sweep-mba-$lam
  done
  mba=$(best sweep-mba)
fi
if has dropout; then
  for r in ${DROP_GRID:-0.1 0.3 0.5}; do
    cfg sweep-drop-$r $d/trainv.txt $d/valid.txt $d/counts_trainv.bin 3 drop=$r; run sweep-drop-$r
  done
  drop=$(best sweep-drop)
fi
echo "chosen on the validation split: plain L2 $l2, MBA lambda $mba, id dropout $drop"
if has none; then final none none; fi
if has l2; then final l2 l2=$l2; fi
if has mba; then final mba mba=$mba; fi
if has mba_online; then final mba_online mbaonline=$mba; fi
# Also MBA 0.01: the best MBA lambda at the sweep's last epoch rather than its
# best epoch (added after the first run of this script; BENCHMARKS.md says so).
if has mba-0.01; then final mba-0.01 mba=0.01; fi
if has dropout; then final dropout drop=$drop; fi
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
labels=()
for n in $REGS; do
  dirs=""
  for sd in $SEEDS; do dirs="${dirs:+$dirs,}$(dir_of "$n" "$sd")"; done
  case "$n" in
    none) labels+=("none=$dirs") ;;
    l2) labels+=("plain L2 $l2=$dirs") ;;
    mba) labels+=("MBA $mba=$dirs") ;;
    mba_online) labels+=("MBA $mba online=$dirs") ;;
    mba-0.01) labels+=("MBA 0.01=$dirs") ;;
    dropout) labels+=("id dropout $drop=$dirs") ;;
  esac
done
echo "sparse optimizer: $OPT${sparse_opt:+ ($sparse_opt)}; seeds: $SEEDS; cells: mean ± sd over seeds of AUC / GAUC / logloss"
python3 - "${labels[@]}" <<'PY'
import json, statistics, sys
names = [a.rsplit("=", 1) for a in sys.argv[1:]]
runs = {d: [json.load(open(f"{x}/metrics.json"))["epochs"] for x in d.split(",")] for _, d in names}
def cell(vals):
    m = statistics.mean(vals)
    return f"{m:.4f}" + (f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else "")
print("| epoch | " + " | ".join(label for label, _ in names) + " |")
print("|---" * (len(names) + 1) + "|")
for i in range(5):
    cells = []
    for _, d in names:
        ts = [r[i]["test"] for r in runs[d]]
        cells.append(" / ".join(cell([t[k] for t in ts]) for k in ("auc", "gauc", "logloss")))
    print(f"| {i + 1} | " + " | ".join(cells) + " |")
PY
title="DIN on the synthetic long tail"
[ "$OPT" = sgd ] && title="$title, sparse SGD"
$E plot-runs --title "$title" --out $PNG "${labels[@]}"
echo "wrote $PNG"
