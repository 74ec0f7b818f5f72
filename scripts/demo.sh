#!/usr/bin/env bash
# `make demo`: start flintd (temporary socket and data dir, embedded defaults) with a loopback S3 server, create a
# template from the default image, restore clones, exec in each, print timings, stop everything.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
: "${FLINT_IMAGES:?run through make demo}"
FLINT_S3_SERVER=${FLINT_S3_SERVER:-$(bash "$repo/scripts/s3-server.sh")}
export FLINT_S3_SERVER
exec "$repo/target/release/flint-demo"
