#!/usr/bin/env bash
# Installs (once, cached under $FLINT_CACHE/tools) and prints the path of the S3-compatible server the tests and the
# demo start on loopback: s3s-fs, a real S3 API server (HTTP, SigV4 auth, multipart, ListObjectsV2) that stores
# objects as files. Debian 12 packages no S3 server, so it is built from crates.io with the machine's cargo.
set -euo pipefail
version=0.14.1   # the newest release that builds with rustc 1.95
root=${FLINT_CACHE:-$HOME/.cache/flint}/tools/s3s-fs-$version
bin=$root/bin/s3s-fs
if [ ! -x "$bin" ]; then
  echo "s3: building s3s-fs $version into $root (once, ~3 minutes)" >&2
  cargo install -q s3s-fs@"$version" --locked --features binary --root "$root.tmp.$$" -j"${JOBS:-2}" >&2
  rm -rf "$root" && mv "$root.tmp.$$" "$root"
fi
echo "$bin"
