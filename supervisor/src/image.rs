//! Guest images as flintd sees them (docs/images.md): a directory with `vmlinux` and `initramfs.cpio`, and for a
//! disk-rooted image also `rootfs.ext4` (read-only, shared by every VM of the image) and `image.json`. A VM of a
//! disk-rooted image gets its own writable disk (`disk.img`, sparse, ext4; its size is the VM's storage quota),
//! which the agent lays over the read-only root with overlayfs.
//!
//! Snapshots never store an image's root: they name it (`name@sha256`), and a restore finds this host's image
//! with that digest (never a host path from the snapshot).
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why an image could not be loaded, or a disk, root filesystem or mount copy made.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image directory is not a usable image.
    #[error("image `{name}`: {why}")]
    Bad { name: String, why: String },
    #[error("no image `{name}` (known: {known})")]
    Unknown { name: String, known: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// A tool flintd runs (mkfs.ext4, du) failed.
    #[error("{what}: {stderr}")]
    Tool { what: String, stderr: String },
    /// A mount's source is not something flintd will copy (too large, a path that leaves it).
    #[error("{0}")]
    Source(String),
}

impl crate::error::Classify for ImageError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            ImageError::Bad { .. } | ImageError::Unknown { .. } | ImageError::Source(_) => crate::error::Kind::Invalid,
            ImageError::Io { .. } | ImageError::Tool { .. } => crate::error::Kind::Internal,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// Runs `cmd`; a failure is [`ImageError::Tool`] with its stderr.
fn run_tool(cmd: &mut std::process::Command, what: String) -> Result<(), ImageError> {
    let out = cmd.output().map_err(io(format!("{what} (is e2fsprogs installed?)")))?;
    if !out.status.success() {
        return Err(ImageError::Tool { what, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(())
}

/// Smallest and largest per-VM disk flintd makes.
pub const MIN_DISK_MIB: u64 = 16;

/// How an image's guest finds its root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Root {
    /// Everything in the initramfs (the default image).
    Initramfs,
    /// A read-only ext4 root under an overlay on the VM's own disk.
    Disk { rootfs: PathBuf, sha256: String, disk_mib: u64 },
}

#[derive(Clone, Debug)]
pub struct Image {
    pub name: String,
    pub dir: PathBuf,
    pub root: Root,
    /// Runner names (`python`) the image's agent keeps warm.
    pub runners: Vec<String>,
}

/// `image.json`, as images/image.py and the OCI import write it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct ImageJson {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub root: String,
    #[serde(default)]
    pub disk_mib: u64,
    #[serde(default)]
    pub rootfs_sha256: String,
    #[serde(default)]
    pub runners: Vec<String>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: Option<String>,
    /// Where it came from (an OCI layout's manifest digest, Debian package versions).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub source: serde_json::Value,
}

impl Image {
    /// The image in `dir`, or why it is not one.
    pub fn load(name: &str, dir: &Path) -> Result<Image, ImageError> {
        let bad = |why: String| ImageError::Bad { name: name.to_string(), why };
        for f in ["vmlinux", "initramfs.cpio"] {
            if !dir.join(f).is_file() {
                return Err(bad(format!("{} has no {f}", dir.display())));
            }
        }
        let json = dir.join("image.json");
        if !json.exists() {
            return Ok(Image { name: name.into(), dir: dir.into(), root: Root::Initramfs, runners: Vec::new() });
        }
        let j: ImageJson = std::fs::read(&json)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| bad(format!("{}: {e}", json.display())))?;
        let root = match j.root.as_str() {
            "initramfs" => Root::Initramfs,
            "disk" => {
                let rootfs = dir.join("rootfs.ext4");
                if !rootfs.is_file() {
                    return Err(bad(format!("a disk root but no {}", rootfs.display())));
                }
                if j.rootfs_sha256.len() != 64 || !j.rootfs_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad("image.json has no rootfs_sha256".into()));
                }
                Root::Disk { rootfs, sha256: j.rootfs_sha256.clone(), disk_mib: j.disk_mib.max(MIN_DISK_MIB) }
            }
            other => return Err(bad(format!("unknown root kind `{other}` (initramfs or disk)"))),
        };
        Ok(Image { name: name.into(), dir: dir.into(), root, runners: j.runners })
    }

    /// What a snapshot records for the image's root drive.
    pub fn root_ref(&self) -> Option<String> {
        match &self.root {
            Root::Disk { sha256, .. } => Some(format!("{}@{sha256}", self.name)),
            Root::Initramfs => None,
        }
    }
}

/// Splits `name@sha256`.
pub fn parse_ref(r: &str) -> Option<(&str, &str)> {
    let (name, sha) = r.split_once('@')?;
    (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit())).then_some((name, sha))
}

/// The kernel command line that makes the agent enter a disk root: the image's root is `vda`, the VM's disk `vdb`.
pub const DISK_ROOT_CMDLINE: &str = "flint.root=vda flint.overlay=vdb";

/// Makes a VM's writable disk: a sparse file of `mib` MiB with an empty ext4 (no reserved blocks, lazily
/// initialised inode tables and journal, so the file holds only metadata until the guest writes). The guest can
/// never make the file larger: the block device has this size, and a full filesystem is ENOSPC in the guest.
pub fn make_disk(path: &Path, mib: u64) -> Result<(), ImageError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(format!("create {}", path.display())))?;
    f.set_len(mib << 20).map_err(io(format!("size {}", path.display())))?;
    drop(f);
    let made = run_tool(
        std::process::Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-m",
                "0",
                "-L",
                "flintdisk",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
            ])
            .arg(path),
        format!("mkfs.ext4 {}", path.display()),
    );
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Bytes under `tree` (`du -sb`).
fn du(tree: &Path) -> Result<u64, ImageError> {
    let out = std::process::Command::new("du").arg("-sb").arg(tree).output().map_err(io("run du"))?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Makes a read-only root filesystem image of `tree` (ext4, no journal, no reserved blocks) at `out`, sized to fit.
pub fn make_rootfs(tree: &Path, out: &Path) -> Result<(), ImageError> {
    let mib = du(tree)? * 13 / 10 / (1 << 20) + 32;
    run_tool(
        std::process::Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-L",
                "flintroot",
                "-m",
                "0",
                "-i",
                "8192",
                "-O",
                "^has_journal",
                "-E",
                "root_owner=0:0",
                "-d",
            ])
            .arg(tree)
            .arg(out)
            .arg(format!("{mib}M")),
        format!("mkfs.ext4 -d {}", tree.display()),
    )
}

/// The sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).map_err(io(format!("open {}", path.display())))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io(format!("read {}", path.display())))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// What [`copy_tree`] copied.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CopyReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Sockets, FIFOs and devices left out.
    pub skipped: u64,
}

/// Copies directory `source` into the new directory `dst` with a walker that cannot leave `source`: every entry
/// is opened beneath it without following a symlink (a symlink is copied as a symlink, its target text unread),
/// so swapping a directory for a link mid-copy fails the copy instead of copying what the link names. Regular
/// files, directories and symlinks are copied; anything else is left out. At most `max_bytes` of file content.
pub fn copy_tree(source: &Path, dst: &Path, max_bytes: u64) -> Result<CopyReport, ImageError> {
    use crate::beneath::Beneath;
    let src = Beneath::open(source).map_err(io(format!("open {}", source.display())))?;
    std::fs::create_dir(dst).map_err(io(format!("create {}", dst.display())))?;
    let out = Beneath::open(dst).map_err(io(format!("open {}", dst.display())))?;
    let mut report = CopyReport::default();
    let mut todo = vec![PathBuf::new()];
    while let Some(dir) = todo.pop() {
        let names =
            src.list(&dir).map_err(|e| ImageError::Source(format!("{}/{}: {e}", source.display(), dir.display())))?;
        for name in names {
            let rel = dir.join(&name);
            let fail = |e: std::io::Error| ImageError::Source(format!("{}/{}: {e}", source.display(), rel.display()));
            let t = src.symlink_metadata(&rel).map_err(fail)?.file_type();
            if t.is_dir() {
                out.create_dir(&rel, 0o755, false).map_err(fail)?;
                report.dirs += 1;
                todo.push(rel);
            } else if t.is_file() {
                let from = src.open_regular(&rel).map_err(fail)?;
                let mut to = out.create_file(&rel, 0o644).map_err(fail)?;
                let n = std::io::copy(&mut (&from).take(max_bytes - report.bytes + 1), &mut to).map_err(fail)?;
                report.bytes += n;
                if report.bytes > max_bytes {
                    return Err(ImageError::Source(format!(
                        "{} holds more than {} MiB",
                        source.display(),
                        max_bytes >> 20
                    )));
                }
                report.files += 1;
            } else if t.is_symlink() {
                let target = src.read_link(&rel).map_err(fail)?;
                out.symlink(&target, &rel).map_err(fail)?;
                report.symlinks += 1;
            } else {
                report.skipped += 1;
            }
        }
    }
    Ok(report)
}

/// Writes a copy of directory `source` into a VM's mount slot (`slot`, opened beneath the VM's directory) as an
/// ext4 filesystem the size of the slot. The copy and the filesystem are made in `scratch` (flintd's own, private
/// directory), then the slot is emptied and the filesystem written into it through its fd: nothing is written
/// through a path the VMM's uid or the source's owner could redirect. The guest must not have the slot mounted.
pub fn fill_slot(slot: &std::fs::File, source: &Path, scratch: &Path) -> Result<CopyReport, ImageError> {
    let size = slot.metadata().map_err(io("the mount slot"))?.len();
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).map_err(io(format!("create {}", scratch.display())))?;
    let result = (|| {
        let tree = scratch.join("tree");
        let report = copy_tree(source, &tree, size / 10 * 8).map_err(|e| match e {
            ImageError::Source(m) if m.contains("holds more than") => ImageError::Source(format!(
                "{m}: more than the mount slot ({} MiB, vm.mount_slot_mib) can carry",
                size >> 20
            )),
            e => e,
        })?;
        let img = scratch.join("slot.ext4");
        std::fs::File::create(&img).and_then(|f| f.set_len(size)).map_err(io(format!("create {}", img.display())))?;
        run_tool(
            std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0", "-L", "flintmount", "-E", "lazy_itable_init=1,lazy_journal_init=1", "-d"])
                .arg(&tree)
                .arg(&img),
            format!("copy {} into the mount slot", source.display()),
        )?;
        empty_slot(slot)?;
        let from = std::fs::File::open(&img).map_err(io(format!("open {}", img.display())))?;
        crate::drives::write_over(&from, slot).map_err(io("write the mount slot"))?;
        Ok(report)
    })();
    let _ = std::fs::remove_dir_all(scratch);
    result
}

/// Returns a mount slot to zeros (holes: it costs nothing on the host or in snapshots).
pub fn empty_slot(f: &std::fs::File) -> Result<(), ImageError> {
    use std::os::fd::AsRawFd;
    let len = f.metadata().map_err(io("the mount slot"))?.len();
    // SAFETY: fallocate on an fd we own; PUNCH_HOLE|KEEP_SIZE frees the range and keeps the size.
    let r = unsafe {
        libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, len as libc::off_t)
    };
    if r != 0 {
        return Err(ImageError::Io { what: "empty the mount slot".into(), source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Bytes a file holds on the host (its allocated blocks, not its size).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_load_or_say_why_not() {
        let dir = std::env::temp_dir().join(format!("flint-image-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(Image::load("x", &dir).unwrap_err().to_string().contains("no vmlinux"));
        std::fs::write(dir.join("vmlinux"), b"k").unwrap();
        std::fs::write(dir.join("initramfs.cpio"), b"i").unwrap();
        assert_eq!(Image::load("x", &dir).unwrap().root, Root::Initramfs);
        let sha = "ab".repeat(32);
        std::fs::write(
            dir.join("image.json"),
            format!(r#"{{"name":"x","root":"disk","disk_mib":64,"rootfs_sha256":"{sha}"}}"#),
        )
        .unwrap();
        assert!(Image::load("x", &dir).unwrap_err().to_string().contains("no "), "no rootfs.ext4");
        std::fs::write(dir.join("rootfs.ext4"), b"r").unwrap();
        let img = Image::load("x", &dir).unwrap();
        assert_eq!(img.root_ref().unwrap(), format!("x@{sha}"));
        assert_eq!(parse_ref(&img.root_ref().unwrap()), Some(("x", sha.as_str())));
        assert_eq!(parse_ref("x@123"), None);
        std::fs::write(dir.join("image.json"), r#"{"name":"x","root":"floppy"}"#).unwrap();
        assert!(Image::load("x", &dir).unwrap_err().to_string().contains("unknown root kind `floppy`"));
        // make_disk runs mkfs.ext4: checked end to end (tests/tests/flintd.rs), not here, where the in-process
        // agent of other tests reaps every child.
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The mount copy never follows a link out of its source (a link is copied as a link, a FIFO is left out,
    /// not waited on) and stops at its byte budget.
    #[test]
    fn copy_tree_stays_inside_its_source() {
        let base = std::env::temp_dir().join(format!("flint-copy-tree-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let src = base.join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/a.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink("/etc", src.join("etc-link")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", src.join("sub/host-file")).unwrap();
        let fifo = std::ffi::CString::new(src.join("fifo").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path alive for the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let dst = base.join("dst");
        let r = copy_tree(&src, &dst, 1 << 20).unwrap();
        assert_eq!((r.files, r.dirs, r.symlinks, r.bytes, r.skipped), (1, 1, 2, 5, 1), "{r:?}");
        assert_eq!(std::fs::read(dst.join("sub/a.txt")).unwrap(), b"hello");
        assert!(std::fs::symlink_metadata(dst.join("etc-link")).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_link(dst.join("sub/host-file")).unwrap(), Path::new("/etc/hostname"));
        assert!(!dst.join("fifo").exists());
        let e = copy_tree(&src, &base.join("dst2"), 3).unwrap_err().to_string();
        assert!(e.contains("holds more than"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
