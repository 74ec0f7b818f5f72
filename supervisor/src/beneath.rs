//! File operations confined beneath a directory that someone else shapes: an imported image's tree (its layers
//! choose every name and symlink), or a VM's directory (its jailed VMM's uid owns it and may replace any entry
//! with a symlink or a FIFO while flintd works in it).
//!
//! Every path is resolved from the directory's fd with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)`: a symlink anywhere in the path, or a `..` that would climb out, is an error (`ELOOP`,
//! `EXDEV`) instead of a write to wherever the link points. The last component is created or changed with the
//! `*at` calls relative to its parent's fd, never followed. Files flintd reads from such a directory must be
//! regular files (a FIFO would block it forever, a device would read something else).
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

/// A directory whose descendants are reached only through paths that stay beneath it and hold no symlink.
#[derive(Debug)]
pub struct Beneath {
    fd: OwnedFd,
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// `openat2(dirfd, path, how)` with resolution confined beneath `dirfd` and no symlinks.
fn openat2(dirfd: RawFd, path: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: `open_how` is plain data (three u64s) for which all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 { u64::from(mode) } else { 0 };
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2(2) reads the NUL-terminated path and the `open_how` of the size passed, both alive for the
    // call; the returned fd is checked and then owned.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Splits a relative path into its parent (possibly empty) and its last normal component; absolute paths and
/// `..` are refused.
fn split(rel: &Path) -> io::Result<(&Path, &std::ffi::OsStr)> {
    let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: {why}", rel.display()));
    for c in rel.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            _ => return Err(invalid("must be relative, without `..`")),
        }
    }
    let name = rel.file_name().ok_or_else(|| invalid("names no file"))?;
    Ok((rel.parent().unwrap_or(Path::new("")), name))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Beneath {
    /// Opens `dir` itself (it must be a directory; flintd made it, so it is trusted to be where it is).
    pub fn open(dir: &Path) -> io::Result<Beneath> {
        let c = cstr(dir)?;
        // SAFETY: open(2) on a NUL-terminated path alive for the call; the fd is checked and then owned.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::new(
                io::Error::last_os_error().kind(),
                format!("open {}: {}", dir.display(), io::Error::last_os_error()),
            ));
        }
        // SAFETY: a fresh fd nobody else owns.
        Ok(Beneath { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// The directory `rel` below this one (empty: this one).
    pub fn dir(&self, rel: &Path) -> io::Result<Beneath> {
        if rel.as_os_str().is_empty() {
            return Ok(Beneath { fd: self.fd.try_clone()? });
        }
        Ok(Beneath { fd: openat2(self.fd.as_raw_fd(), rel, libc::O_PATH | libc::O_DIRECTORY, 0)? })
    }

    /// The parent directory of `rel` and the name of its last component.
    fn parent(&self, rel: &Path) -> io::Result<(Beneath, CString)> {
        let (parent, name) = split(rel)?;
        Ok((self.dir(parent)?, cstr(Path::new(name))?))
    }

    /// Creates directory `rel` (its parent must exist); an existing directory is fine when `exist_ok`.
    pub fn create_dir(&self, rel: &Path, mode: u32, exist_ok: bool) -> io::Result<()> {
        let (p, name) = self.parent(rel)?;
        // SAFETY: mkdirat(2) with a directory fd we own and a NUL-terminated name alive for the call.
        match check(unsafe { libc::mkdirat(p.fd.as_raw_fd(), name.as_ptr(), mode) }) {
            Err(e) if exist_ok && e.kind() == io::ErrorKind::AlreadyExists => {
                // Only a real directory will do: `dir` refuses a symlink in its place.
                self.dir(rel).map(drop)
            }
            r => r,
        }
    }

    /// Creates directory `rel` and every missing parent, each checked on the way down.
    pub fn create_dir_all(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let mut at = std::path::PathBuf::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => at.push(n),
                Component::CurDir => continue,
                _ => {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not relative", rel.display())))
                }
            }
            self.create_dir(&at, mode, true)?;
        }
        Ok(())
    }

    /// Creates the new file `rel` for writing (never an existing one, never through a symlink).
    pub fn create_file(&self, rel: &Path, mode: u32) -> io::Result<File> {
        split(rel)?;
        let fd = openat2(self.fd.as_raw_fd(), rel, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, mode)?;
        Ok(File::from(fd))
    }

    /// Writes the new file `rel` with `bytes`.
    pub fn write_new(&self, rel: &Path, mode: u32, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let mut f = self.create_file(rel, mode)?;
        f.write_all(bytes)
    }

    /// Opens `rel` for reading; it must be a regular file (never a FIFO, device or socket someone put there).
    pub fn open_regular(&self, rel: &Path) -> io::Result<File> {
        split(rel)?;
        // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just after.
        let f = File::from(openat2(self.fd.as_raw_fd(), rel, libc::O_RDONLY | libc::O_NONBLOCK, 0)?);
        if !f.metadata()?.file_type().is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a regular file", rel.display())));
        }
        // Back to blocking reads (a regular file ignores O_NONBLOCK, but the fd may be handed on).
        // SAFETY: fcntl(2) on an fd we own, with plain integer arguments.
        unsafe {
            let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
        Ok(f)
    }

    /// Opens the existing regular file `rel` for reading and writing (never through a link, never a FIFO).
    pub fn open_regular_rw(&self, rel: &Path) -> io::Result<File> {
        split(rel)?;
        let f = File::from(openat2(self.fd.as_raw_fd(), rel, libc::O_RDWR | libc::O_NONBLOCK, 0)?);
        if !f.metadata()?.file_type().is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a regular file", rel.display())));
        }
        Ok(f)
    }

    /// The entries of directory `rel` (names only, as they are now).
    pub fn list(&self, rel: &Path) -> io::Result<Vec<std::ffi::OsString>> {
        let fd = if rel.as_os_str().is_empty() {
            openat2(self.fd.as_raw_fd(), Path::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)?
        } else {
            openat2(self.fd.as_raw_fd(), rel, libc::O_RDONLY | libc::O_DIRECTORY, 0)?
        };
        // The directory is read through its own fd (its /proc/self/fd entry names that very directory).
        let entries = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        let mut out = Vec::new();
        for e in entries {
            out.push(e?.file_name());
        }
        Ok(out)
    }

    /// The target of symlink `rel` (as text; never resolved).
    pub fn read_link(&self, rel: &Path) -> io::Result<std::path::PathBuf> {
        let fd = openat2(self.fd.as_raw_fd(), rel, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: readlinkat(2) with AT_EMPTY_PATH semantics (an empty path names the O_PATH fd itself, a symlink)
        // writes at most `buf.len()` bytes into our buffer.
        let n = unsafe { libc::readlinkat(fd.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(std::path::PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(buf)))
    }

    /// Reads the regular file `rel` whole, if it is at most `max` bytes.
    pub fn read_regular(&self, rel: &Path, max: u64) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let f = self.open_regular(rel)?;
        let mut out = Vec::new();
        f.take(max + 1).read_to_end(&mut out)?;
        if out.len() as u64 > max {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is over {max} bytes", rel.display())));
        }
        Ok(out)
    }

    /// Makes symlink `rel` pointing at `target` (the target is only text: it is never resolved here).
    pub fn symlink(&self, target: &Path, rel: &Path) -> io::Result<()> {
        let (p, name) = self.parent(rel)?;
        let t = cstr(target)?;
        // SAFETY: symlinkat(2) with NUL-terminated strings alive for the call and a directory fd we own.
        check(unsafe { libc::symlinkat(t.as_ptr(), p.fd.as_raw_fd(), name.as_ptr()) })
    }

    /// Makes `rel` a hard link to the existing `existing` (both beneath this directory; neither followed).
    pub fn hard_link(&self, existing: &Path, rel: &Path) -> io::Result<()> {
        let (from_dir, from_name) = self.parent(existing)?;
        let (to_dir, to_name) = self.parent(rel)?;
        // SAFETY: linkat(2) without AT_SYMLINK_FOLLOW, with directory fds we own and NUL-terminated names.
        check(unsafe {
            libc::linkat(from_dir.fd.as_raw_fd(), from_name.as_ptr(), to_dir.fd.as_raw_fd(), to_name.as_ptr(), 0)
        })
    }

    /// Makes FIFO `rel`.
    pub fn mkfifo(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let (p, name) = self.parent(rel)?;
        // SAFETY: mknodat(2) of a FIFO (no device number) with a directory fd we own and a NUL-terminated name.
        check(unsafe { libc::mknodat(p.fd.as_raw_fd(), name.as_ptr(), libc::S_IFIFO | mode, 0) })
    }

    /// Changes the owner of `rel` itself (a symlink's own owner, never its target's).
    pub fn lchown(&self, rel: &Path, uid: u32, gid: u32) -> io::Result<()> {
        if rel.as_os_str().is_empty() {
            // SAFETY: fchownat(2) with AT_EMPTY_PATH on our own directory fd and an empty NUL-terminated path.
            return check(unsafe { libc::fchownat(self.fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) });
        }
        let (p, name) = self.parent(rel)?;
        // SAFETY: fchownat(2) with AT_SYMLINK_NOFOLLOW, a directory fd we own and a NUL-terminated name.
        check(unsafe { libc::fchownat(p.fd.as_raw_fd(), name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
    }

    /// Changes the mode of `rel`, which must not be a symlink (a symlink has no mode of its own).
    pub fn chmod(&self, rel: &Path, mode: u32) -> io::Result<()> {
        // An O_PATH fd of the very inode (resolved without symlinks; a symlink as the last component is opened as
        // itself with O_NOFOLLOW and refused), changed through its /proc/self/fd entry: fchmod(2) does not take
        // O_PATH fds, and fchmodat(2) would follow a symlink swapped in after the check.
        let fd = if rel.as_os_str().is_empty() {
            self.fd.try_clone()?
        } else {
            openat2(self.fd.as_raw_fd(), rel, libc::O_PATH | libc::O_NOFOLLOW, 0)?
        };
        let f = File::from(fd);
        if f.metadata()?.file_type().is_symlink() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is a symlink", rel.display())));
        }
        let proc = cstr(Path::new(&format!("/proc/self/fd/{}", f.as_raw_fd())))?;
        // SAFETY: chmod(2) on a NUL-terminated path alive for the call; the magic link names the inode we hold.
        check(unsafe { libc::chmod(proc.as_ptr(), mode) })
    }

    /// The metadata of `rel` itself (not followed).
    pub fn symlink_metadata(&self, rel: &Path) -> io::Result<std::fs::Metadata> {
        let f = File::from(openat2(self.fd.as_raw_fd(), rel, libc::O_PATH | libc::O_NOFOLLOW, 0)?);
        f.metadata()
    }

    /// Removes the file (or symlink) `rel`, if there is one.
    pub fn remove_file(&self, rel: &Path) -> io::Result<()> {
        let (p, name) = self.parent(rel)?;
        // SAFETY: unlinkat(2) with a directory fd we own and a NUL-terminated name; a symlink is removed itself.
        match check(unsafe { libc::unlinkat(p.fd.as_raw_fd(), name.as_ptr(), 0) }) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("flint-beneath-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Nothing reaches outside through a symlink, wherever in the path it sits; `..` is refused; the host
    /// directory a symlink names keeps its mode and gains no file.
    #[test]
    fn symlinks_and_dotdot_never_lead_outside() {
        let root = tmp("root");
        let outside = tmp("outside");
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("tmp")).unwrap();
        std::os::unix::fs::symlink(outside.join("x.sh"), root.join("image.json")).unwrap();
        let b = Beneath::open(&root).unwrap();
        let loops = |e: io::Error| e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::EXDEV);
        assert!(loops(b.create_dir(Path::new("tmp/d"), 0o755, false).unwrap_err()));
        assert!(b.create_dir(Path::new("tmp"), 0o755, true).is_err(), "a symlink is no directory");
        assert!(loops(b.chmod(Path::new("tmp/."), 0o1777).unwrap_err()));
        assert!(b.chmod(Path::new("tmp"), 0o1777).is_err());
        assert!(b.create_file(Path::new("image.json"), 0o644).is_err());
        assert!(loops(b.create_file(Path::new("tmp/f"), 0o644).unwrap_err()));
        assert!(b.open_regular(Path::new("image.json")).is_err());
        assert!(b.create_file(Path::new("../escape"), 0o644).is_err());
        assert!(b.create_dir_all(Path::new("a/../../b"), 0o755).is_err());
        // The symlinked host directory is as it was.
        assert_eq!(std::fs::metadata(&outside).unwrap().permissions().mode() & 0o7777, 0o755);
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // What stays inside works.
        b.create_dir_all(Path::new("etc/flint/hooks"), 0o755).unwrap();
        b.write_new(Path::new("etc/flint/image.json"), 0o644, b"{}").unwrap();
        b.chmod(Path::new("etc"), 0o711).unwrap();
        assert_eq!(std::fs::metadata(root.join("etc")).unwrap().permissions().mode() & 0o7777, 0o711);
        assert_eq!(b.read_regular(Path::new("etc/flint/image.json"), 10).unwrap(), b"{}");
        assert!(b.read_regular(Path::new("etc/flint/image.json"), 1).is_err(), "over the limit");
        b.symlink(Path::new("/etc/passwd"), Path::new("etc/link")).unwrap();
        assert_eq!(std::fs::read_link(root.join("etc/link")).unwrap(), Path::new("/etc/passwd"));
        b.remove_file(Path::new("etc/link")).unwrap();
        // A FIFO is refused, not waited on.
        b.mkfifo(Path::new("fifo"), 0o600).unwrap();
        assert!(b.open_regular(Path::new("fifo")).unwrap_err().to_string().contains("not a regular file"));
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }
}
