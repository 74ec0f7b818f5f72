#!/usr/bin/env bash
# `make test` and its tiers (docs/testing.md):
#   scripts/test.sh unit   tier 0: fmt, clippy, unit tests (fake launcher, fake host network), host-mode agent,
#                          fuzz corpora replay. Needs nothing but Rust.
#   scripts/test.sh kvm    tier 1: the VMM on /dev/kvm driven by typed launch specs (boot, devices, snapshots).
#                          Needs /dev/kvm and the guest images (built once, cached).
#   scripts/test.sh full   tier 2: flintd end to end (root, S3 server, images, networks, jail, sessions across
#                          hosts, the crash harness).
#   scripts/test.sh [all]  every tier (what `make test` and .ci/run run): tier 0 first, then tiers 1 and 2 in two
#                          lanes side by side (`lanes` below).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
jobs=${JOBS:-2}
tier=${1:-all}
start=$(date +%s)
say() { echo "test: $* ($(( $(date +%s) - start )) s)" >&2; }

packages() {
  local need=()
  command -v ip >/dev/null || need+=(iproute2)
  command -v ping >/dev/null || need+=(iputils-ping)
  command -v nft >/dev/null || need+=(nftables)
  command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
  # E2B's SDKs (tests/tests/e2b.rs): a Python venv from PyPI, the JavaScript SDK from npm; openssl for its CA.
  python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
  command -v node >/dev/null || need+=(nodejs)
  command -v npm >/dev/null || need+=(npm)
  command -v openssl >/dev/null || need+=(openssl)
  # Many hosts (tests/tests/flintd.rs, docs/cluster.md): a real etcd, and curl to read its keys.
  command -v etcd >/dev/null || need+=(etcd-server)
  command -v curl >/dev/null || need+=(curl)
  if [ ${#need[@]} -gt 0 ]; then
    echo "test: installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
  fi
}

images() {
  [ -c /dev/kvm ] || { echo "test: /dev/kvm is missing: tiers kvm and full boot real guests" >&2; exit 1; }
  if [ -z "${FLINT_IMAGES:-}" ]; then FLINT_IMAGES=$(bash images/build.sh); fi
  # The Python image (Debian bookworm via mmdebstrap; cached like the default image).
  if [ -z "${FLINT_PYTHON_IMAGE:-}" ]; then FLINT_PYTHON_IMAGE=$(bash images/build.sh python); fi
  # The E2B image (Debian + bash, python3, sudo, curl, user `user`), for the E2B SDK tests.
  if [ -z "${FLINT_E2B_IMAGE:-}" ]; then FLINT_E2B_IMAGE=$(bash images/build.sh e2b); fi
  export FLINT_IMAGES FLINT_PYTHON_IMAGE FLINT_E2B_IMAGE
  say "guest images in $FLINT_IMAGES, $FLINT_PYTHON_IMAGE and $FLINT_E2B_IMAGE"
}

# Tests that start processes run one at a time: guests are CPU-bound on emulating hosts (their kernel code is
# emulated), so no test's guests starve another's. --no-fail-fast: every suite reports, the exit is still 1.
run_tests() {
  cargo build -j"$jobs" --workspace --bins
  cargo test -j"$jobs" -p flint-tests --no-fail-fast "$@" -- --test-threads=1
}

unit() {
  # Fail fast: formatting, lints (warnings are errors) and the unit tests come before any image is built.
  say "cargo fmt --check"
  cargo fmt --all -- --check
  say "cargo clippy (warnings are errors)"
  cargo clippy -j"$jobs" --workspace --all-targets -- -D warnings
  say "unit tests"
  cargo test -j"$jobs" --workspace --lib --bins
  say "host-mode agent tests"
  cargo test -j"$jobs" -p flint-agent --tests -- --test-threads=1
  say "tier 0 passed"
}

kvm() {
  packages # the boot test pings the guest from its network namespace
  images
  run_tests --test vmm_boot --test snapshot
  say "tier 1 passed"
}

# What tier 2 needs (and the lanes, which hold it): packages, images, the S3 server.
full_needs() {
  packages
  images
  FLINT_S3_SERVER=${FLINT_S3_SERVER:-$(bash scripts/s3-server.sh)}
  export FLINT_S3_SERVER
  say "S3-compatible server $FLINT_S3_SERVER"
}

full() {
  full_needs
  run_tests --test store_s3 --test fleet --test flintd --test e2b --test crash
  say "tier 2 passed"
}

# Tiers 1 and 2 in two lanes at once: the flintd suite in one; tier 1, the S3 store, the fleet, the E2B SDKs, the
# crash harness and the flintd suite's networks test in the other (together about as long). Most of the time a
# test has one guest running, and a guest keeps one core busy (its kernel is emulated here): through a cold boot
# the two cores are 49% idle.
# The lanes share no jail uids (the E2B and crash suites configure ranges of their own), ports, namespaces or
# data directories; the golden snapshot is made once under a lock. The test binaries run directly: `cargo test`
# holds the build directory's lock while its tests run. The second lane prints as it goes, the first when done.
lanes() {
  full_needs
  cargo build -j"$jobs" --workspace --bins
  local bins
  bins=$(cargo test -j"$jobs" -p flint-tests --no-run --message-format=json-render-diagnostics | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])')
  bin() { awk -v n="$1" '$1 == n { print $2 }' <<<"$bins"; }
  suite() { # name: runs one test binary as `cargo test` would (from the package's directory)
    local exe; exe=$(bin "$1")
    [ -n "$exe" ] || { echo "test: no test binary $1" >&2; return 1; }
    echo "     Running tests/$1.rs ($exe)"
    (cd tests && "$exe" --test-threads=1 "${@:2}")
  }
  # The networks test (its own jail uids and namespaces) goes in the second lane: the lanes take about as long.
  local net_test=networks_egress_policy_isolation_and_exposed_ports
  local log; log=$(mktemp /tmp/flint-lane-flintd.XXXXXX)
  say "lanes: [flintd] | [vmm_boot snapshot store_s3 fleet e2b crash, flintd's networks test]" \
    "(the first lane's output follows when done)"
  suite flintd --skip "$net_test" >"$log" 2>&1 &
  local lane_a=$!
  local failed=() a=0
  for t in vmm_boot snapshot store_s3 fleet e2b crash; do
    suite "$t" || failed+=("$t")
  done
  suite flintd --exact "$net_test" || failed+=("flintd $net_test")
  say "second lane done; waiting for the flintd suite"
  wait "$lane_a" || a=1
  echo "     (the flintd suite, run beside the lane above)"
  cat "$log"
  rm -f "$log"
  [ "$a" = 0 ] || failed+=(flintd)
  if [ ${#failed[@]} -gt 0 ]; then
    echo "error: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
    return 1
  fi
  say "tiers 1 and 2 passed"
}

case "$tier" in
  unit) unit ;;
  kvm) kvm ;;
  full) full ;;
  lanes) lanes ;;
  all)
    # Each tier in a process of its own: `set -e` does not hold inside a function called as `f || …`, so a
    # failure inside a tier must end that tier's process, whose status is then seen here.
    failed=0
    bash "$0" unit
    bash "$0" lanes || failed=1
    say "done ($([ $failed = 0 ] && echo passed || echo FAILED))"
    exit $failed
    ;;
  *) echo "usage: scripts/test.sh [unit|kvm|full|lanes|all]" >&2; exit 2 ;;
esac
