#!/usr/bin/env python3
"""Builds a disk-rooted guest image from its description, images/<name>/image.toml (docs/images.md).

    image.py NAME BASE_DIR CACHE_IMAGES_DIR

BASE_DIR is the built `default` image (its kernel, and `boot.cpio`: the agent as /init). The result,
printed on stdout, is CACHE_IMAGES_DIR/<name>-<hash of the inputs>/:

    vmlinux          the kernel (the default image's)
    initramfs.cpio   the agent as /init: it mounts rootfs.ext4 read-only under the VM's writable overlay
    rootfs.ext4      the userland, read-only, shared by every VM of the image
    image.json       what flintd reads: root kind, default disk size, digest of rootfs.ext4, runners, packages
    inputs           what the hash covers

A cached build answers at once. Debian userlands come from mmdebstrap (Debian's packages, versions pinned
in the description; FLINT_DEBIAN_MIRROR overrides the mirror).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def die(msg):
    print(f"image: {msg}", file=sys.stderr)
    sys.exit(1)


def log(msg):
    print(f"image: {msg}", file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(name):
    desc_path = os.path.join(REPO, "images", name, "image.toml")
    try:
        with open(desc_path, "rb") as f:
            desc = tomllib.load(f)
    except FileNotFoundError:
        die(f"no image `{name}` ({desc_path} is missing)")
    except tomllib.TOMLDecodeError as e:
        die(f"{desc_path}: {e}")
    if desc.get("root") != "disk":
        die(f"{desc_path}: root = {desc.get('root')!r}; image.py builds disk-rooted images (root = \"disk\")")
    base = desc.get("base", {})
    if base.get("kind") != "debian":
        die(f"{desc_path}: base.kind = {base.get('kind')!r}; supported: \"debian\"")
    for key in ("suite", "mirror"):
        if not isinstance(base.get(key), str):
            die(f"{desc_path}: base.{key} must be a string")
    disk_mib = desc.get("disk_mib", 256)
    if not isinstance(disk_mib, int) or not 16 <= disk_mib <= 1 << 20:
        die(f"{desc_path}: disk_mib must be a whole number of MiB, at least 16")
    for guest, local in desc.get("files", {}).items():
        if not guest.startswith("/") or ".." in guest.split("/"):
            die(f"{desc_path}: files: `{guest}` must be an absolute guest path without `..`")
        if not os.path.isfile(os.path.join(REPO, "images", name, local)):
            die(f"{desc_path}: files: `{local}` is not a file next to the description")
    for u in desc.get("users", []):
        if not isinstance(u.get("name"), str) or not u["name"].isidentifier() or not isinstance(u.get("uid"), int) \
                or not 1000 <= u["uid"] < 60000 or not str(u.get("home", "")).startswith("/"):
            die(f"{desc_path}: users: each needs a plain name, a uid within 1000..60000 and an absolute home")
    for rname, r in desc.get("runners", {}).items():
        argv = r.get("argv")
        if not rname.isidentifier() or not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            die(f"{desc_path}: runners.{rname}: needs a non-empty argv of strings (and a plain name)")
    return desc_path, desc


def inputs(name, desc_path, desc, base_dir):
    lines = [f"base {os.path.basename(os.path.normpath(base_dir))}"]
    lines.append(f"{sha256_file(desc_path)}  images/{name}/image.toml")
    lines.append(f"{sha256_file(os.path.abspath(__file__))}  images/image.py")
    for local in sorted(desc.get("files", {}).values()):
        lines.append(f"{sha256_file(os.path.join(REPO, 'images', name, local))}  images/{name}/{local}")
    for tool in ("mmdebstrap", "e2fsprogs"):
        v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", tool], capture_output=True, text=True).stdout
        lines.append(f"{tool} {v}")
    mirror = os.environ.get("FLINT_DEBIAN_MIRROR")
    if mirror:
        lines.append(f"mirror {mirror}")
    return "\n".join(lines) + "\n"


def ensure_packages():
    missing = [p for p in ("mmdebstrap", "e2fsprogs", "cpio")
               if "install ok installed" not in subprocess.run(
                   ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True).stdout]
    if missing:
        log(f"installing Debian packages: {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=sys.stderr)


def userland(desc, stage):
    base = desc["base"]
    mirror = os.environ.get("FLINT_DEBIAN_MIRROR", base["mirror"])
    cmd = ["mmdebstrap", "--mode=root", f"--variant={base.get('variant', 'essential')}", "--quiet"]
    packages = base.get("packages", [])
    if packages:
        cmd.append("--include=" + ",".join(packages))
    for pattern in base.get("exclude", []):
        cmd.append(f"--dpkgopt=path-exclude={pattern}")
    cmd += [base["suite"], stage, f"deb {mirror} {base['suite']} main"]
    log(f"mmdebstrap {base['suite']} from {mirror} with {len(packages)} pinned package(s)")
    r = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        hint = ""
        if "has no installation candidate" in r.stderr or "not found" in r.stderr or "Version '" in r.stderr:
            hint = " (a pinned version is gone from the mirror: update the pin in image.toml)"
        die(f"mmdebstrap failed{hint}")


def finish_tree(name, desc, stage):
    etc = os.path.join(stage, "etc", "flint")
    for d in ("hooks/after-restore.d", "hooks/before-checkpoint.d"):
        os.makedirs(os.path.join(etc, d), exist_ok=True)
    for guest, local in desc.get("files", {}).items():
        dst = os.path.join(stage, guest.lstrip("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(REPO, "images", name, local), dst)
        os.chmod(dst, 0o644)
    # What the agent reads at boot (docs/images.md): env for every process, working dir, runners.
    guest_cfg = {
        "name": name,
        "env": desc.get("env", {}),
        "workdir": desc.get("workdir"),
        "runners": {k: {"argv": v["argv"], "env": v.get("env", {})} for k, v in desc.get("runners", {}).items()},
    }
    with open(os.path.join(etc, "image.json"), "w") as f:
        json.dump(guest_cfg, f, indent=1, sort_keys=True)
    # The unprivileged user execs may ask for, as in the default image.
    passwd = os.path.join(stage, "etc", "passwd")
    if "\nsandbox:" not in "\n" + open(passwd).read():
        with open(passwd, "a") as f:
            f.write("sandbox:x:1000:1000:sandbox:/tmp:/bin/sh\n")
        with open(os.path.join(stage, "etc", "group"), "a") as f:
            f.write("sandbox:x:1000:\n")
    # Accounts the image asks for ([[users]]): in passwd, group and shadow (no password), a home they own, and
    # passwordless sudo when asked.
    for u in desc.get("users", []):
        name, uid, home = u["name"], u["uid"], u["home"]
        shell = u.get("shell", "/bin/sh")
        if f"\n{name}:" not in "\n" + open(passwd).read():
            with open(passwd, "a") as f:
                f.write(f"{name}:x:{uid}:{uid}:{name}:{home}:{shell}\n")
            with open(os.path.join(stage, "etc", "group"), "a") as f:
                f.write(f"{name}:x:{uid}:\n")
            shadow = os.path.join(stage, "etc", "shadow")
            if os.path.exists(shadow):
                with open(shadow, "a") as f:
                    f.write(f"{name}:*:19000:0:99999:7:::\n")
        h = os.path.join(stage, home.lstrip("/"))
        os.makedirs(h, exist_ok=True)
        os.chmod(h, 0o755)
        os.chown(h, uid, uid)
        if u.get("sudo"):
            d = os.path.join(stage, "etc", "sudoers.d")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, name), "w") as f:
                f.write(f"{name} ALL=(ALL) NOPASSWD:ALL\n")
            os.chmod(os.path.join(d, name), 0o440)
    with open(os.path.join(stage, "etc", "hostname"), "w") as f:
        f.write("flint\n")
    for d in ("var/cache/apt", "var/lib/apt/lists", "var/log"):
        p = os.path.join(stage, d)
        if os.path.isdir(p):
            for e in os.listdir(p):
                q = os.path.join(p, e)
                if os.path.isdir(q) and not os.path.islink(q):
                    shutil.rmtree(q)
                else:
                    os.unlink(q)
    packages = subprocess.run(["chroot", stage, "dpkg-query", "-W", "-f=${Package} ${Version}\n"],
                              check=True, capture_output=True, text=True).stdout
    return dict(line.split(" ", 1) for line in packages.splitlines() if " " in line)


def main():
    if len(sys.argv) != 4:
        die("usage: image.py NAME BASE_DIR CACHE_IMAGES_DIR")
    name, base_dir, out_root = sys.argv[1:]
    if os.geteuid() != 0:
        die("must run as root (mmdebstrap --mode=root, device nodes, ownership)")
    desc_path, desc = load(name)
    for f in ("vmlinux", "boot.cpio"):
        if not os.path.isfile(os.path.join(base_dir, f)):
            die(f"{base_dir}/{f} is missing: build the default image first (images/build.sh)")
    # The tools first: their versions are inputs (a fresh machine's first build hashed an empty mmdebstrap
    # version, so the next call missed the cache and built the image again).
    ensure_packages()
    text = inputs(name, desc_path, desc, base_dir)
    out = os.path.join(out_root, f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}")
    if os.path.isfile(os.path.join(out, ".complete")):
        print(out)
        return
    tmp = f"{out}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    stage = tempfile.mkdtemp(prefix=f"flint-image-{name}.", dir=out_root)
    try:
        userland(desc, stage)
        packages = finish_tree(name, desc, stage)
        subprocess.run(["find", stage, "-exec", "touch", "-h", "-d", "@0", "{}", "+"], check=True)
        used = int(subprocess.run(["du", "-sb", stage], check=True, capture_output=True, text=True).stdout.split()[0])
        size_mib = used * 13 // 10 // (1 << 20) + 32
        rootfs = os.path.join(tmp, "rootfs.ext4")
        env = dict(os.environ, E2FSPROGS_FAKE_TIME="0")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "flintroot", "-m", "0", "-i", "8192", "-O", "^has_journal",
                        "-U", "6c696e74-0000-4000-8000-000000000003",
                        "-E", "root_owner=0:0,hash_seed=6c696e74-0000-4000-8000-000000000004",
                        "-d", stage, rootfs, f"{size_mib}M"], check=True, env=env, stdout=sys.stderr)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    shutil.copyfile(os.path.join(base_dir, "vmlinux"), os.path.join(tmp, "vmlinux"))
    shutil.copyfile(os.path.join(base_dir, "boot.cpio"), os.path.join(tmp, "initramfs.cpio"))
    manifest = {
        "name": name,
        "description": desc.get("description", ""),
        "root": "disk",
        "disk_mib": desc.get("disk_mib", 256),
        "rootfs_sha256": sha256_file(rootfs),
        "runners": sorted(desc.get("runners", {})),
        "env": desc.get("env", {}),
        "workdir": desc.get("workdir"),
        "packages": packages,
    }
    with open(os.path.join(tmp, "image.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    with open(os.path.join(tmp, "inputs"), "w") as f:
        f.write(text)
    open(os.path.join(tmp, ".complete"), "w").close()
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    log(f"{name}: {size_mib} MiB read-only root, {len(packages)} packages -> {out}")
    print(out)


if __name__ == "__main__":
    main()
