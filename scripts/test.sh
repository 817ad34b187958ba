#!/usr/bin/env bash
# Ember's test command (README, CI): fetches ML-100k (for the tests gated on
# real data), checks formatting, builds once (dev profile, optimised), runs
# clippy with warnings as errors, and runs every test of the workspace,
# including the multi-process cluster tests on loopback.
#
# Skips are visible: a test that lacks a prerequisite (Docker, ML-100k,
# kubernetes-validate) prints `SKIPPED: <test>: <reason>` and appends it to
# target/ember-skips.txt; the last line of this script is a skip summary.
# EMBER_REQUIRE=docker,data,k8s-validate (or all) turns a missing
# prerequisite into a failure. This script adds to it what it has verified on
# this machine: `data` when ML-100k was fetched, `docker` when `docker info`
# and Compose work (so a test cannot skip them by mistake).
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
require="${EMBER_REQUIRE:-}"
add_require() { require="${require:+$require,}$1"; }

if scripts/fetch-ml100k.sh data/ml-100k; then
  add_require data
else
  echo "warning: ML-100k could not be fetched; tests that need it will report that they skipped" >&2
fi
if docker info >/dev/null 2>&1 && { docker compose version || docker-compose version; } >/dev/null 2>&1; then
  add_require docker
fi
export EMBER_REQUIRE="$require"

skips=target/ember-skips.txt
mkdir -p target
: > "$skips"
summary() {
  local rc=$? n
  n=$(wc -l < "$skips" | tr -d ' ')
  if [ "$n" -gt 0 ]; then
    echo "---- skipped ----"
    cat "$skips"
  fi
  echo "test.sh: exit $rc after $(( $(date +%s) - start )) s; EMBER_REQUIRE=${EMBER_REQUIRE:-none}; $n skip(s)${n:+ (see $skips)}"
}
trap summary EXIT

# The multi-process tests run the workspace's binaries (ps-server, worker,
# ember, ember-data); `cargo test` alone only builds the binaries of packages
# that have integration tests, so build them all first. `--all-targets` (not
# `--bins`): the same targets and features as the `cargo test` below, which
# then compiles nothing again (`--bins` leaves out the dev-dependencies, so
# shared crates such as candle would be compiled twice with other features).
# Habits enforced: formatting and the workspace lints (Cargo.toml
# [workspace.lints]) with every clippy warning an error.
for tool in fmt clippy; do
  if ! cargo "$tool" --version >/dev/null 2>&1; then
    comp=$([ "$tool" = fmt ] && echo rustfmt || echo clippy)
    rustup component add "$comp" || { echo "test.sh: cargo $tool is missing (rustup component add $comp)" >&2; exit 1; }
  fi
done
cargo fmt --all -- --check
cargo build --workspace --all-targets
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets "$@"
