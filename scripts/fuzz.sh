#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS_PER_TARGET seconds each
# (default 60) and prints one summary line per target. Exits nonzero if any
# target crashed (the reproducer is left in fuzz/artifacts/<target>/).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Needs the nightly toolchain (`rustup toolchain install nightly`); installs
# cargo-fuzz from crates.io if it is missing. Builds in fuzz/target (never
# touches the main target/ directory). The committed seeds in
# fuzz/corpus/<target>/ are read only; new inputs go to
# fuzz/target/work-corpus/<target>/ (kept between runs). Extra libFuzzer
# flags: EMBER_FUZZ_FLAGS (for example "-jobs=2 -workers=2").
# See docs/fuzzing.md.
set -euo pipefail

secs="${1:-60}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: the nightly toolchain is missing: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

targets=(checkpoint_decode sample_line counts_file)
# Separate target dir: fuzz builds use other flags (sanitizer, coverage).
export CARGO_TARGET_DIR="$root/fuzz/target"
cargo +nightly fuzz build

logs="$root/fuzz/target/logs"
mkdir -p "$logs"
failed=0
summary=()
for t in "${targets[@]}"; do
    work="$root/fuzz/target/work-corpus/$t"
    mkdir -p "$work" "$root/fuzz/corpus/$t"
    log="$logs/$t.log"
    echo "fuzz.sh: $t for ${secs}s (log: $log)" >&2
    rc=0
    # shellcheck disable=SC2086
    cargo +nightly fuzz run "$t" "$work" "$root/fuzz/corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 ${EMBER_FUZZ_FLAGS:-} \
        >"$log" 2>&1 || rc=$?
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)"
    rate="$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)"
    took="$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -n 1 | grep -o 'in [0-9]*' | grep -o '[0-9]*' || true)"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*' || true)"
    units="$(find "$work" -type f | wc -l)"
    if [ "$rc" -eq 0 ]; then
        status="ok"
    else
        status="CRASH (exit $rc)"
        failed=1
        artifact="$(grep -o 'Test unit written to [^ ]*' "$log" | tail -n 1 | sed 's/Test unit written to //' || true)"
        [ -n "$artifact" ] && status="$status artifact $artifact"
        grep -m 5 -E 'panicked at|ERROR: libFuzzer|out-of-memory|AddressSanitizer' "$log" >&2 || true
    fi
    summary+=("$(printf '%-18s %s: %s execs in %s s (%s exec/s), coverage %s, corpus %s' \
        "$t" "$status" "${runs:-?}" "${took:-?}" "${rate:-?}" "${cov:-?}" "$units")")
done
printf '%s\n' "${summary[@]}"
exit "$failed"
