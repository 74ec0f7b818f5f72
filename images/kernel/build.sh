#!/usr/bin/env bash
# Builds the Flint guest kernel (ELF vmlinux + .config) into OUT_DIR.
# Usage: images/kernel/build.sh OUT_DIR
# Source: Debian's linux-source-6.1 package + tinyconfig + microvm.fragment + patches/*.patch.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_DIR}
tarball=$(ls /usr/src/linux-source-6.1.tar.xz)
work=$(mktemp -d "${TMPDIR:-/tmp}/flint-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "kernel: unpacking $tarball" >&2
tar -C "$work" -xf "$tarball"
src="$work/linux-source-6.1"
for p in "$here"/patches/*.patch; do
  echo "kernel: applying $(basename "$p")" >&2
  patch -s -d "$src" -p1 --no-backup-if-mismatch < "$p"
done
make -s -C "$src" ARCH=x86_64 tinyconfig >/dev/null
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/microvm.fragment" >/dev/null
make -s -C "$src" ARCH=x86_64 olddefconfig >/dev/null
# Every option the fragment asks for must have survived olddefconfig (a typo or a missing
# dependency would otherwise silently drop it).
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) grep -qxF "$line" "$src/.config" || { echo "kernel: $line did not survive olddefconfig" >&2; missing=1; } ;;
    "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}; grep -q "^$opt=" "$src/.config" && { echo "kernel: $opt should be off" >&2; missing=1; } ;;
  esac
done < "$here/microvm.fragment"
[ "$missing" = 0 ] || exit 1
echo "kernel: building vmlinux with -j$(nproc) (about 4 minutes on 2 cores)" >&2
make -s -C "$src" ARCH=x86_64 -j"$(nproc)" KBUILD_BUILD_TIMESTAMP="Thu Jan  1 00:00:00 UTC 2026" KBUILD_BUILD_USER=flint KBUILD_BUILD_HOST=flint vmlinux >&2
mkdir -p "$out"
cp "$src/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
cp "$src/.config" "$out/config"
cp "$src/System.map" "$out/System.map"
echo "kernel: $(stat -c %s "$out/vmlinux") bytes -> $out/vmlinux" >&2
