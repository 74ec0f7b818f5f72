//! The VMM confining itself (flintd's jailed launcher; docs/security.md). flintd starts `flint-vmm` as pid 1 of new
//! pid, mount, IPC, UTS and network namespaces, already in its cgroups, with stdio and the host files it needs as
//! inherited fds. Here, single-threaded and before anything a guest, a snapshot or a caller controls is read, the
//! process:
//! 1. makes its mounts private and its VM directory `/` (pivot_root; the host's tree is detached, not hidden);
//! 2. gets a private `/dev` (tmpfs) holding only the device nodes the spec lists, owned by its uid, and a `/proc`
//!    of its own pid namespace (it sees only itself);
//! 3. sets its rlimits, closes every other fd, drops to its uid/gid with no supplementary groups (so no
//!    capabilities), and sets no_new_privs and non-dumpable (no ptrace by its own uid, no core dumps of guest
//!    memory).
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use flint_vmm_api::spec::JailSpec;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("a jailed VMM must be pid 1 of its own pid namespace (started by flintd's launcher), not pid {0}")]
    NotPidOne(i32),
    #[error("jail: {what}")]
    Sys {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("jail: {0}")]
    Invalid(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

fn check(rc: libc::c_int, what: impl Into<String>) -> Result<(), JailError> {
    if rc < 0 {
        return Err(JailError::Sys { what: what.into(), source: std::io::Error::last_os_error() });
    }
    Ok(())
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Invalid(format!("{} has a NUL byte", p.display())))
}

fn mount(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let c = |s: Option<&str>| s.map(|s| CString::new(s).expect("no NUL in a literal"));
    let (src_c, fs_c, data_c) = (c(src), c(fstype), c(data));
    let target_c = cstr(target)?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null where mount(2) allows it.
    let rc =
        unsafe { libc::mount(ptr(&src_c), target_c.as_ptr(), ptr(&fs_c), flags, ptr(&data_c) as *const libc::c_void) };
    check(rc, format!("mount {} on {}", src.unwrap_or("-"), target.display()))
}

/// Confines this process as `j` says. Must run before any other thread exists.
pub fn enter(j: &JailSpec) -> Result<(), JailError> {
    // SAFETY: getpid(2) has no preconditions.
    let pid = unsafe { libc::getpid() };
    if pid != 1 {
        return Err(JailError::NotPidOne(pid));
    }
    if j.uid == 0 || j.gid == 0 {
        return Err(JailError::Invalid("the jail's uid and gid must not be root".into()));
    }
    let root = j.root.canonicalize().map_err(sys(format!("the jail root {}", j.root.display())))?;
    // Nothing mounted here propagates back to the host, and the VM directory becomes a mount point to pivot to.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(Some(root.to_str().unwrap_or_default()), &root, None, libc::MS_BIND | libc::MS_REC, None)?;

    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).map_err(sys("create /dev"))?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=64k,nr_inodes=32"),
    )?;
    for d in &j.devices {
        if d.name.contains("..") || d.name.starts_with('/') {
            return Err(JailError::Invalid(format!("device name `{}`", d.name)));
        }
        let node = dev.join(&d.name);
        if let Some(parent) = node.parent() {
            std::fs::create_dir_all(parent).map_err(sys(format!("create {}", parent.display())))?;
        }
        let c = cstr(&node)?;
        // SAFETY: mknod(2) on a NUL-terminated path in the jail's private tmpfs.
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(d.major, d.minor)) };
        check(rc, format!("mknod /dev/{}", d.name))?;
        // SAFETY: chown(2) of the node just made.
        check(unsafe { libc::chown(c.as_ptr(), j.uid, j.gid) }, format!("chown /dev/{}", d.name))?;
    }

    let old = root.join(".old-root");
    std::fs::create_dir_all(&old).map_err(sys("create the old-root mount point"))?;
    let (root_c, old_c) = (cstr(&root)?, cstr(&old)?);
    // SAFETY: pivot_root(2) with two NUL-terminated paths: `old` is under `root`, `root` is a mount point.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, root_c.as_ptr(), old_c.as_ptr()) } as i32, "pivot_root")?;
    std::env::set_current_dir("/").map_err(sys("chdir /"))?;
    // SAFETY: umount2(2) of the old root, now at /.old-root; MNT_DETACH takes the whole host tree away at once.
    check(unsafe { libc::umount2(c"/.old-root".as_ptr(), libc::MNT_DETACH) }, "detach the host's root")?;
    std::fs::remove_dir("/.old-root").map_err(sys("remove /.old-root"))?;
    std::fs::create_dir_all("/proc").map_err(sys("create /proc"))?;
    mount(Some("proc"), Path::new("/proc"), Some("proc"), libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, None)?;
    // SAFETY: sethostname(2) in this process's own UTS namespace, with a buffer and its length.
    unsafe { libc::sethostname(c"flint-vmm".as_ptr(), 9) };

    for (res, value, name) in [
        (libc::RLIMIT_NOFILE, j.rlimits.nofile, "nofile"),
        (libc::RLIMIT_NPROC, j.rlimits.nproc, "nproc"),
        (libc::RLIMIT_FSIZE, j.rlimits.fsize, "fsize"),
    ] {
        let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: setrlimit(2) reads the struct above.
        check(unsafe { libc::setrlimit(res, &lim) }, format!("setrlimit {name}"))?;
    }
    close_other_fds(&j.keep_fds)?;

    // SAFETY: plain system calls that change this (single-threaded) process's credentials; results are checked.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        check(libc::setresgid(j.gid, j.gid, j.gid), "setresgid")?;
        check(libc::setresuid(j.uid, j.uid, j.uid), "setresuid")?;
        if libc::getuid() != j.uid || libc::geteuid() != j.uid || libc::getegid() != j.gid {
            return Err(JailError::Invalid("credentials did not change".into()));
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")?;
        // The page map a diff snapshot reads (crate::snapshot::memory::SourcePages): the credential change left
        // the process non-dumpable, which hands /proc/self to root; for the moment of the open it is dumpable
        // again, so the file opens with the VM's own credentials (page frame numbers stay hidden). Nothing else
        // runs as this uid. Without it diffs hold every dirtied page, as before.
        check(libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable for the page map")?;
        crate::snapshot::memory::preopen_pagemap();
        check(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0), "non-dumpable")?;
    }
    Ok(())
}

/// Closes every fd above stderr except `keep`.
fn close_other_fds(keep: &[i32]) -> Result<(), JailError> {
    let mut keep: Vec<u32> = keep.iter().filter(|fd| **fd > 2).map(|fd| *fd as u32).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 3u32;
    for k in keep.iter().copied().chain(std::iter::once(u32::MAX)) {
        if k > from {
            // SAFETY: close_range(2) closes fds in [from, k - 1]; none of them is used by this process any more
            // (std opened nothing yet that it keeps, and the fds to keep are outside the range).
            let rc = unsafe { libc::syscall(libc::SYS_close_range, from, k - 1, 0) };
            check(rc as i32, "close inherited fds")?;
        }
        from = k.saturating_add(1);
    }
    Ok(())
}
