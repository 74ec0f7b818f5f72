#!/usr/bin/env bash
# `make fuzz`: runs every cargo-fuzz target under fuzz/ for FUZZ_SECONDS (default 60) each and prints execs/s.
# Needs the nightly toolchain; installs cargo-fuzz once (from crates.io). New inputs land in fuzz/corpus/<target>
# (replayed by `cargo test` on stable: commit the ones worth keeping, minimized with `cargo +nightly fuzz cmin`);
# a crash stops that target and leaves its input in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
rustup toolchain list | grep -q '^nightly' || { echo "fuzz: needs the nightly toolchain (rustup toolchain install nightly)" >&2; exit 1; }
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (once)" >&2
  cargo +nightly install -q cargo-fuzz --locked
fi
export CARGO_BUILD_JOBS=${JOBS:-2}
cargo +nightly fuzz build -s none >&2
printf '%-14s %10s %12s %10s %s\n' target seconds executions execs/s result
status=0
for t in $(cargo +nightly fuzz list); do
  log=$(mktemp)
  if cargo +nightly fuzz run -s none "$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" -print_final_stats=1 \
      -rss_limit_mb=2048 -timeout=10 >"$log" 2>&1; then
    result=ok
  else
    result="CRASH (see fuzz/artifacts/$t)"
    status=1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  printf '%-14s %10s %12s %10s %s\n' "$t" "$seconds" "$runs" "$((runs / seconds))" "$result"
  [ "$result" = ok ] || tail -30 "$log" >&2
  rm -f "$log"
done
exit $status
