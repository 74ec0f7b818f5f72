#!/usr/bin/env bash
# Builds the Flint guest root filesystem from busybox-static and a static flint-agent:
#   OUT_DIR/initramfs.cpio  uncompressed newc initramfs; /init is flint-agent (PID 1)
#   OUT_DIR/rootfs.ext4     the same tree as an ext4 image (boot with root=/dev/vda; /sbin/init)
#   OUT_DIR/boot.cpio       only the agent as /init: the initramfs of disk-rooted images (docs/images.md),
#                           which mounts their read-only root and the VM's writable overlay, then enters it
# Usage: images/rootfs/build.sh OUT_DIR AGENT_BINARY
set -euo pipefail
out=${1:?usage: build.sh OUT_DIR AGENT_BINARY}
agent=${2:?usage: build.sh OUT_DIR AGENT_BINARY}
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "rootfs: $busybox missing (Debian package busybox-static)" >&2; exit 1; }
file -L "$busybox" 2>/dev/null | grep -q 'statically linked' || { echo "rootfs: $busybox is not static (install busybox-static)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "rootfs: must run as root (device nodes, ownership)" >&2; exit 1; }

stage=$(mktemp -d "${TMPDIR:-/tmp}/flint-rootfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
cd "$stage"
mkdir -p bin sbin etc dev proc sys tmp run root var/tmp usr etc/flint/hooks/after-restore.d etc/flint/hooks/before-checkpoint.d
ln -s ../bin usr/bin
ln -s ../sbin usr/sbin
cp "$busybox" bin/busybox
for applet in $(bin/busybox --list); do
  [ -e "bin/$applet" ] || ln -s busybox "bin/$applet"
done
install -m 0755 "$agent" sbin/flint-agent
ln -s sbin/flint-agent init
ln -s flint-agent sbin/init
mknod -m 600 dev/console c 5 1
mknod -m 666 dev/null c 1 3
chmod 1777 tmp var/tmp
chmod 700 root
cat > etc/passwd <<'P'
root:x:0:0:root:/root:/bin/sh
sandbox:x:1000:1000:sandbox:/tmp:/bin/sh
nobody:x:65534:65534:nobody:/:/bin/false
P
cat > etc/group <<'G'
root:x:0:
sandbox:x:1000:
nogroup:x:65534:
G
echo flint > etc/hostname
printf 'nameserver 127.0.0.1\n' > etc/resolv.conf
# Fixed timestamps: the same inputs give the same bytes.
find . -exec touch -h -d @0 {} +

mkdir -p "$out"
find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 --reproducible > "$out/initramfs.cpio.tmp"
mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
rm -f "$out/rootfs.ext4.tmp"
boot=$(mktemp -d "${TMPDIR:-/tmp}/flint-boot.XXXXXX")
( cd "$boot"
  mkdir -p dev proc sys mnt
  install -m 0755 "$agent" init
  mknod -m 600 dev/console c 5 1
  mknod -m 666 dev/null c 1 3
  find . -exec touch -h -d @0 {} +
  find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 --reproducible > "$out/boot.cpio" )
rm -rf "$boot"
E2FSPROGS_FAKE_TIME=0 mkfs.ext4 -q -F -L flintroot -U 6c696e74-0000-4000-8000-000000000001 -E root_owner=0:0,hash_seed=6c696e74-0000-4000-8000-000000000002 \
  -d "$stage" "$out/rootfs.ext4.tmp" 64M >&2
mv "$out/rootfs.ext4.tmp" "$out/rootfs.ext4"
echo "rootfs: $(stat -c %s "$out/initramfs.cpio") byte initramfs, 64 MiB ext4 -> $out" >&2
