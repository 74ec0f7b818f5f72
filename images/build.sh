#!/usr/bin/env bash
# Builds guest images into a cache outside the clone, keyed by a hash of their inputs, and prints
# where they are. A no-op when cached. Every image is described by `images/<name>/image.toml`
# (docs/images.md).
#
#   build.sh            the `default` image; prints its directory (FLINT_IMAGES)
#   build.sh NAME       image NAME; prints its directory
#   build.sh --all      every image (`make images`); prints NAME=DIR lines
#
#   ${FLINT_CACHE:-~/.cache/flint}/kernel/<kernel inputs hash>/{vmlinux,config,System.map}
#   ${FLINT_CACHE:-~/.cache/flint}/images/<all inputs hash>/{vmlinux,initramfs.cpio,boot.cpio,rootfs.ext4,inputs}
#   ${FLINT_CACHE:-~/.cache/flint}/images/<name>-<inputs hash>/{vmlinux,initramfs.cpio,rootfs.ext4,image.json,inputs}
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${FLINT_CACHE:-$HOME/.cache/flint}
cd "$repo"
want=${1:-default}
if [ "$want" = --all ]; then
  for t in images/*/image.toml; do
    n=$(basename "$(dirname "$t")")
    echo "$n=$(bash "$0" "$n")"
  done
  exit 0
fi
[ -f "images/$want/image.toml" ] || { echo "images: no image \`$want\` (no images/$want/image.toml)" >&2; exit 1; }

need_pkgs=(linux-source-6.1 busybox-static e2fsprogs cpio flex bison bc libelf-dev libssl-dev xz-utils file make gcc)
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

# Inputs: everything that changes the bytes of the images.
kernel_inputs() {
  sha256sum images/kernel/build.sh images/kernel/microvm.fragment images/kernel/patches/*.patch
  echo "linux-source-6.1 $(pkg_version linux-source-6.1)"
}
rootfs_inputs() {
  find guest-agent -type f \( -name '*.rs' -o -name Cargo.toml \) | LC_ALL=C sort | xargs sha256sum
  sha256sum Cargo.toml Cargo.lock images/rootfs/build.sh images/default/image.toml
  echo "busybox-static $(pkg_version busybox-static)"
  echo "e2fsprogs $(pkg_version e2fsprogs)"
  rustc --version
}

missing=()
for p in "${need_pkgs[@]}"; do
  [ -n "$(pkg_version "$p")" ] && dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "images: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${missing[@]}" >&2
fi

khash=$(kernel_inputs | sha256sum | cut -c1-16)
ihash=$( { echo "kernel $khash"; rootfs_inputs; } | sha256sum | cut -c1-16)
dir="$cache/images/$ihash"
if [ "$want" != default ]; then
  # Another image: the default image's kernel and agent, plus its own userland (images/image.py).
  base=$(bash "$0" default)
  exec python3 images/image.py "$want" "$base" "$cache/images"
fi
if [ -f "$dir/.complete" ]; then
  echo "$dir"
  exit 0
fi

mkdir -p "$cache/kernel" "$cache/images"
kdir="$cache/kernel/$khash"
if [ ! -f "$kdir/.complete" ]; then
  rm -rf "$kdir.tmp"
  images/kernel/build.sh "$kdir.tmp" >&2
  touch "$kdir.tmp/.complete"
  rm -rf "$kdir"
  mv "$kdir.tmp" "$kdir"
fi

echo "images: building the static flint-agent" >&2
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q -j"$(nproc)" --profile agent -p flint-agent --target x86_64-unknown-linux-gnu >&2
agent_bin="$repo/target/x86_64-unknown-linux-gnu/agent/flint-agent"

tmp="$dir.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
images/rootfs/build.sh "$tmp" "$agent_bin" >&2
cp "$kdir/vmlinux" "$kdir/config" "$kdir/System.map" "$tmp/"
cp "$agent_bin" "$tmp/flint-agent"
{ echo "kernel $khash"; kernel_inputs; rootfs_inputs; } > "$tmp/inputs"
touch "$tmp/.complete"
rm -rf "$dir"
mv "$tmp" "$dir"
echo "$dir"
