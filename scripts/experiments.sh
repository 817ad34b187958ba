#!/usr/bin/env bash
# The experiments behind the numbers in BENCHMARKS.md / the issue notes:
#   seeds: DIN (3 seeds) and BaseModel on ML-100k, 2 epochs, 2 shards x 2 workers
#   mba:   DIN for 5 epochs with no regularization, plain L2 on touched rows, MBA
# Usage: scripts/experiments.sh seeds|mba|dien   (after scripts/demo.sh built and prepared)
set -euo pipefail
cd "$(dirname "$0")/.."
E=target/debug/ember
summary() { python3 - "$@" <<'PY'
import json, sys
for d in sys.argv[1:]:
    r = json.load(open(d + "/metrics.json"))
    rows = ["e%d loss %.4f AUC %.4f GAUC %.4f %.0f/s" % (e["epoch"], e["train_loss"], e["test"]["auc"], e["test"]["gauc"], e["samples_per_s"]) for e in r["epochs"]]
    print(d, "|", " | ".join(rows))
PY
}
case "${1:-seeds}" in
  seeds)
    for s in 1 2 3; do $E train --quiet --config configs/din_ml100k.toml --seed $s --out-dir runs/exp/din-seed$s; done
    $E train --quiet --config configs/base_ml100k.toml --seed 1 --out-dir runs/exp/base-seed1
    summary runs/exp/din-seed1 runs/exp/din-seed2 runs/exp/din-seed3 runs/exp/base-seed1 ;;
  mba)
    for v in none l2 mba; do
      cfg=runs/exp/din-$v.toml
      case $v in
        none) extra='mba_lambda = 0.0' ;;
        l2)   extra='plain_l2 = 0.01' ;;
        mba)  extra='mba_lambda = 0.01' ;;
      esac
      sed -e "s/^mba_lambda = .*/$extra/" configs/din_ml100k.toml > $cfg
      $E train --quiet --config $cfg --epochs 5 --out-dir runs/exp/mba-$v
    done
    summary runs/exp/mba-none runs/exp/mba-l2 runs/exp/mba-mba ;;
  dien)
    $E train --quiet --config configs/dien_ml100k.toml --epochs 1 --out-dir runs/exp/dien
    summary runs/exp/dien ;;
esac
