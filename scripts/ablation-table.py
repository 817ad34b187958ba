#!/usr/bin/env python3
"""Mean +- sd over seeds of the per-epoch test metrics of ablation runs.

Usage: scripts/ablation-table.py DIR VARIANT...   (runs in DIR/VARIANT-s<seed>/metrics.json)
Prints a markdown table: variant, epoch, seeds, AUC, GAUC, test logloss.
Used by scripts/dien-ablation.sh and scripts/features-ablation.sh.
"""
import glob
import json
import statistics as st
import sys

q, variants = sys.argv[1], sys.argv[2:]
print("| variant | epoch | seeds | AUC | GAUC | test logloss |\n|---|---|---|---|---|---|")
for name in variants:
    by_epoch = {}
    for p in sorted(glob.glob(f"{q}/{name}-s*/metrics.json")):
        for e in json.load(open(p))["epochs"]:
            if e.get("test"):
                by_epoch.setdefault(e["epoch"], []).append(e["test"])
    for ep, rows in sorted(by_epoch.items()):
        sd = lambda k: st.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0
        cell = lambda k: f"{st.mean(r[k] for r in rows):.4f} ± {sd(k):.4f}"
        print(f"| {name} | {ep} | {len(rows)} | {cell('auc')} | {cell('gauc')} | {cell('logloss')} |")
