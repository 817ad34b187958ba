#!/usr/bin/env bash
# Makes a test PKI for a TLS Ember cluster: a CA, a server certificate for the
# given host names / IPs, a client certificate (for mTLS) and a random bearer
# token. Keys and the token are written with mode 0600.
#
#   scripts/make-test-certs.sh [OUT_DIR] [HOST...]
#   scripts/make-test-certs.sh certs ps-0 ps-1 trainer localhost 127.0.0.1
#
# Default OUT_DIR: certs/ (gitignored); default hosts: localhost 127.0.0.1.
# For Kubernetes use the StatefulSet's DNS names, e.g.
#   '*.ps.ember.svc.cluster.local' trainer.ember.svc.cluster.local
# Uses `ember certs` (pure Rust, rcgen); nothing else to install.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-certs}"
shift || true
hosts=("$@")
if [ ${#hosts[@]} -eq 0 ]; then hosts=(localhost 127.0.0.1); fi
bin="${EMBER_BIN_DIR:-target/debug}/ember"
if [ ! -x "$bin" ]; then
  cargo build -q -p ember-cluster --bin ember
  bin=target/debug/ember
fi
args=()
for h in "${hosts[@]}"; do args+=(--host "$h"); done
"$bin" certs --out "$out" "${args[@]}"
