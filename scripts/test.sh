#!/usr/bin/env bash
# `make test`: the whole suite. Builds/finds the guest images (cached outside the clone),
# builds the binaries, then runs unit tests, host-mode agent tests and the end-to-end tests
# that boot real guests on /dev/kvm.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
jobs=${JOBS:-2}

[ -c /dev/kvm ] || { echo "test: /dev/kvm is missing: the end-to-end tests boot real guests" >&2; exit 1; }
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v nft >/dev/null || need+=(nftables)
if [ ${#need[@]} -gt 0 ]; then
  echo "test: installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi

start=$(date +%s)
# Fail fast: formatting, lints (warnings are errors) and the unit tests come first, before any guest image is
# built or any guest boots.
echo "test: cargo fmt --check" >&2
cargo fmt --all -- --check
echo "test: cargo clippy (warnings are errors)" >&2
cargo clippy -j"$jobs" --workspace --all-targets -- -D warnings
echo "test: unit tests" >&2
cargo test -j"$jobs" --workspace --lib --bins
echo "test: fmt, clippy and unit tests passed ($(( $(date +%s) - start )) s)" >&2

FLINT_IMAGES=$(bash images/build.sh)
# The Python image (Debian bookworm via mmdebstrap; cached like the default image).
FLINT_PYTHON_IMAGE=$(bash images/build.sh python)
export FLINT_IMAGES FLINT_PYTHON_IMAGE
echo "test: guest images in $FLINT_IMAGES and $FLINT_PYTHON_IMAGE ($(( $(date +%s) - start )) s)" >&2

FLINT_S3_SERVER=$(bash scripts/s3-server.sh)
export FLINT_S3_SERVER
echo "test: S3-compatible server $FLINT_S3_SERVER" >&2

cargo build -j"$jobs" --workspace --bins
# The suites that start processes: host-mode agent, S3 store, flintd, and guests on /dev/kvm. Guests are CPU-bound
# on emulating hosts (their kernel code is emulated): one test at a time, so no test's guests starve another's.
# --no-fail-fast: every suite reports, exit is still 1.
cargo test -j"$jobs" --workspace --tests --no-fail-fast -- --test-threads=1 --skip 'tests::'

echo "test: done in $(( $(date +%s) - start )) s" >&2
