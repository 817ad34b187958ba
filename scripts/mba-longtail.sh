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
# epochs, best validation logloss), never on the test rows. Writes
# runs/mba-longtail/ and docs/mba_longtail.png.
#   scripts/mba-longtail.sh          # ~50 min on 2 idle cores
#   REGS="none dropout" scripts/mba-longtail.sh   # some of the runs (table and PNG of those)
# Needs a built tree (cargo build --workspace; or BIN=dir of binaries); the long-tail files come from
# scripts/longtail-data.sh (made once).
set -euo pipefail
cd "$(dirname "$0")/.."
E="${BIN:-target/debug}/ember"
d=data/longtail
R=runs/mba-longtail
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
}
run() { # NAME: train unless its metrics.json holds every epoch of its config
  local want; want=$(sed -n 's/^epochs = //p' $R/$1.toml)
  if ! python3 -c "import json,sys;r=json.load(open('$R/$1/metrics.json'));sys.exit(0 if len(r['epochs'])>=$want else 1)" 2>/dev/null; then
    echo "== $1 load $(cut -d' ' -f1-3 /proc/loadavg)"
    $E train --quiet --config $R/$1.toml --seed 1 --out-dir $R/$1 > $R/$1.log 2>&1
  fi
}
best() { # PREFIX: the lambda whose run has the lowest validation logloss at any epoch
  python3 - "$R" "$1" <<'PY'
import glob, json, sys
R, prefix = sys.argv[1], sys.argv[2]
best = None
for d in sorted(glob.glob(f"{R}/{prefix}-*")):
    if d.endswith(".toml") or d.endswith(".log"):
        continue
    ep = json.load(open(d + "/metrics.json"))["epochs"]
    ll = min(e["test"]["logloss"] for e in ep)
    lam = d.rsplit("-", 1)[1]
    print(f"  sweep {prefix} lambda {lam}: best validation logloss {ll:.4f}, AUC {max(e['test']['auc'] for e in ep):.4f}", file=sys.stderr)
    if best is None or ll < best[0]:
        best = (ll, lam)
print(best[1])
PY
}
REGS="${REGS:-none l2 mba mba_online mba-0.01 dropout}"
has() { case " $REGS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
l2=-; mba=-; drop=-
if has l2; then
  for lam in 0.001 0.01 0.1; do
    cfg sweep-l2-$lam $d/trainv.txt $d/valid.txt $d/counts_trainv.bin 3 l2=$lam; run sweep-l2-$lam
  done
  l2=$(best sweep-l2)
fi
if has mba || has mba_online; then
  for lam in 0.001 0.01 0.1; do
    cfg sweep-mba-$lam $d/trainv.txt $d/valid.txt $d/counts_trainv.bin 3 mba=$lam; run sweep-mba-$lam
  done
  mba=$(best sweep-mba)
fi
if has dropout; then
  for r in 0.1 0.3 0.5; do
    cfg sweep-drop-$r $d/trainv.txt $d/valid.txt $d/counts_trainv.bin 3 drop=$r; run sweep-drop-$r
  done
  drop=$(best sweep-drop)
fi
echo "chosen on the validation split: plain L2 $l2, MBA lambda $mba, id dropout $drop"
if has none; then cfg none $d/train.txt $d/test.txt $d/counts.bin 5 none; run none; fi
if has l2; then cfg l2 $d/train.txt $d/test.txt $d/counts.bin 5 l2=$l2; run l2; fi
if has mba; then cfg mba $d/train.txt $d/test.txt $d/counts.bin 5 mba=$mba; run mba; fi
if has mba_online; then cfg mba_online $d/train.txt $d/test.txt $d/counts.bin 5 mbaonline=$mba; run mba_online; fi
# Also MBA 0.01: the best MBA lambda at the sweep's last epoch rather than its
# best epoch (added after the first run of this script; BENCHMARKS.md says so).
if has mba-0.01; then cfg mba-0.01 $d/train.txt $d/test.txt $d/counts.bin 5 mba=0.01; run mba-0.01; fi
if has dropout; then cfg dropout $d/train.txt $d/test.txt $d/counts.bin 5 drop=$drop; run dropout; fi
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
labels=()
for n in $REGS; do
  case "$n" in
    none) labels+=("none=$R/none") ;;
    l2) labels+=("plain L2 $l2=$R/l2") ;;
    mba) labels+=("MBA $mba=$R/mba") ;;
    mba_online) labels+=("MBA $mba online=$R/mba_online") ;;
    mba-0.01) labels+=("MBA 0.01=$R/mba-0.01") ;;
    dropout) labels+=("id dropout $drop=$R/dropout") ;;
  esac
done
python3 - "${labels[@]}" <<'PY'
import json, sys
names = [a.rsplit("=", 1) for a in sys.argv[1:]]
runs = {d: json.load(open(f"{d}/metrics.json"))["epochs"] for _, d in names}
print("| epoch | " + " | ".join(label + " AUC / GAUC / logloss" for label, _ in names) + " |")
print("|---" * (len(names) + 1) + "|")
for i in range(5):
    cells = []
    for _, d in names:
        t = runs[d][i]["test"]
        cells.append(f"{t['auc']:.4f} / {t['gauc']:.4f} / {t['logloss']:.4f}")
    print(f"| {i + 1} | " + " | ".join(cells) + " |")
PY
$E plot-runs --title "DIN on the synthetic long tail" --out docs/mba_longtail.png "${labels[@]}"
echo "wrote docs/mba_longtail.png"
