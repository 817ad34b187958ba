#!/usr/bin/env bash
# Ember's test command (README, CI): fetches ML-100k (for the tests gated on
# real data), then builds once (dev profile, optimised) and runs every test of
# the workspace, including the multi-process cluster tests on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! scripts/fetch-ml100k.sh data/ml-100k; then
  echo "warning: ML-100k could not be fetched; tests that need it will report that they skipped" >&2
fi

# The multi-process tests run the workspace's binaries (ps-server, worker,
# ember, ember-data); `cargo test` alone only builds the binaries of packages
# that have integration tests, so build them all first (same profile: the
# libraries are compiled once and shared).
cargo build --workspace --bins
cargo test --workspace --all-targets "$@"
