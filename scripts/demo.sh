#!/usr/bin/env bash
# `make demo`: boot a sandbox from the cached guest images, exec in it, print timings.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
: "${FLINT_IMAGES:?run through make demo}"
exec "$repo/target/release/flint-demo"
