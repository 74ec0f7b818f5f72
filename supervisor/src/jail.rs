//! The jail flintd starts every VMM in (docs/security.md): a uid and gid of its own (never root), new pid, mount,
//! IPC, UTS and network namespaces, its own cgroup, its VM directory as `/`, only the fds it needs. flintd
//! rewrites the launch spec so every path is relative to the VM directory and host files outside it (kernel,
//! initramfs, drives the caller named) are inherited fds; clones the process straight into its namespaces (so the
//! VMM is flintd's direct child and pid 1 of its own pid namespace), moves it into its cgroup before it runs, and
//! execs `flint-vmm`, which pivots into its directory and drops its privileges before reading anything else
//! (`flint_vmm::jail`).
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flint_vmm_api::spec::{
    JailDevice, JailRlimits, JailSpec, Launch, LaunchSpec, MemorySource, StandbySpec, STANDBY_CONTROL_FD,
};

use crate::cgroup::{CgroupError, VmCgroup};

/// Why a VMM could not be jailed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The launch spec names something the jail cannot give the VMM.
    #[error("{0}")]
    Spec(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Another flintd of this host holds an overlapping uid range.
    #[error("{0}")]
    UidsTaken(String),
}

impl crate::error::Classify for JailError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            JailError::Spec(_) => crate::error::Kind::Invalid,
            JailError::UidsTaken(_) => crate::error::Kind::Conflict,
            JailError::Io { .. } | JailError::Cgroup(_) => crate::error::Kind::Internal,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Io { what, source }
}

fn last_os(what: &str) -> JailError {
    JailError::Io { what: what.into(), source: std::io::Error::last_os_error() }
}

/// Who a jailed VMM is and what it may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Confinement {
    pub uid: u32,
    pub gid: u32,
    /// Guest memory, MiB (the cgroup allows this plus the VMM allowance; 0: unknown).
    pub mem_mib: u64,
    /// CPU limit, a fraction of one core (the cgroup's `cpu.max`); none: no limit.
    pub cpu: Option<f64>,
}

/// The first fd a jailed VMM inherits host files on.
const FIRST_PASSED_FD: RawFd = 3;

/// The path a jailed VMM sees for `p`: relative to its directory, which becomes `/`.
fn inside(dir: &Path, p: &Path) -> Option<PathBuf> {
    p.strip_prefix(dir).ok().map(|rel| Path::new("/").join(rel))
}

/// A character device of the host, as a node for the jail's /dev.
fn host_device(path: &str, name: &str) -> Option<JailDevice> {
    let m = std::fs::metadata(path).ok()?;
    let rdev = m.rdev();
    Some(JailDevice { name: name.into(), major: libc::major(rdev), minor: libc::minor(rdev) })
}

/// The spec rewritten for the jail, with the host files it inherits (in fd order from 3).
pub fn jail_spec(
    dir: &Path,
    spec: &LaunchSpec,
    c: &Confinement,
    cfg: &crate::config::JailConfig,
) -> Result<(LaunchSpec, Vec<OwnedFd>), JailError> {
    jail_spec_from(dir, spec, c, cfg, FIRST_PASSED_FD)
}

/// The devices a jailed VMM gets: `/dev/kvm` and, for a VM whose memory a userfaultfd fills (or any standby, which
/// may be handed such a VM), `/dev/userfaultfd` where the host has it.
fn jail_devices(uffd: bool) -> Result<Vec<JailDevice>, JailError> {
    let mut devices =
        vec![host_device("/dev/kvm", "kvm").ok_or_else(|| JailError::Spec("this host has no /dev/kvm".into()))?];
    if uffd {
        // Absent on kernels before 6.1; the VMM then needs vm.unprivileged_userfaultfd = 1.
        devices.extend(host_device("/dev/userfaultfd", "userfaultfd"));
    }
    Ok(devices)
}

/// What a standby VMM in `dir` (as `c.uid`, memory slots for `c.mem_mib`) starts with: its jail as a VM's would
/// be, with the control socket kept, and no file-size limit yet (its hand-over lowers it to the VM's).
pub fn standby_spec(dir: &Path, c: &Confinement, cfg: &crate::config::JailConfig) -> Result<StandbySpec, JailError> {
    Ok(StandbySpec {
        jail: JailSpec {
            root: dir.to_path_buf(),
            uid: c.uid,
            gid: c.gid,
            devices: jail_devices(true)?,
            rlimits: JailRlimits { nofile: cfg.nofile, nproc: cfg.pids_max, fsize: libc::RLIM_INFINITY },
            keep_fds: vec![STANDBY_CONTROL_FD],
        },
        seccomp: true,
        mem_mib: (c.mem_mib > 0).then_some(c.mem_mib),
    })
}

/// [`jail_spec`] with the host files from fd `first_fd` on (a standby's hand-over:
/// [`flint_vmm_api::spec::HANDOVER_FIRST_FD`]).
pub fn jail_spec_from(
    dir: &Path,
    spec: &LaunchSpec,
    c: &Confinement,
    cfg: &crate::config::JailConfig,
    first_fd: RawFd,
) -> Result<(LaunchSpec, Vec<OwnedFd>), JailError> {
    let mut out = spec.clone();
    let mut passed: Vec<OwnedFd> = Vec::new();
    let map = |p: &mut PathBuf, write: bool, passed: &mut Vec<OwnedFd>| -> Result<(), JailError> {
        if let Some(rel) = inside(dir, p) {
            *p = rel;
            return Ok(());
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(&*p)
            .map_err(io(format!("open {} for the jailed VMM", p.display())))?;
        *p = PathBuf::from(format!("/dev/fd/{}", first_fd + passed.len() as RawFd));
        passed.push(OwnedFd::from(f));
        Ok(())
    };
    let must_be_inside = |p: &mut PathBuf| -> Result<(), JailError> {
        *p = inside(dir, p).ok_or_else(|| {
            JailError::Spec(format!("{} is outside the VM's directory {}", p.display(), dir.display()))
        })?;
        Ok(())
    };
    if let Some(a) = out.api_sock.as_mut() {
        must_be_inside(a)?;
    }
    let console_inside = |c: &mut String| -> Result<(), JailError> {
        if !matches!(c.as_str(), "stdout" | "off") {
            let mut p = PathBuf::from(&*c);
            must_be_inside(&mut p)?;
            *c = p.display().to_string();
        }
        Ok(())
    };
    let mut uffd = false;
    // A tap lives in the VM's network namespace, which the jailed VMM cannot enter (its own is empty): flintd
    // attaches to it and hands the VMM the fd.
    let hand_over_tap = |n: &mut Option<flint_vmm_api::config::NetConfig>, passed: &mut Vec<OwnedFd>| {
        let Some(n) = n.as_mut().filter(|n| !n.is_detached() && n.inherited_fd().is_none()) else { return Ok(()) };
        let ns = n
            .netns
            .take()
            .ok_or_else(|| JailError::Spec("a jailed VMM's tap must be in a network namespace flintd made".into()))?;
        let fd = crate::net::open_tap(&ns, &n.tap).map_err(|e| JailError::Spec(e.to_string()))?;
        n.tap = format!("/dev/fd/{}", first_fd + passed.len() as RawFd);
        passed.push(fd);
        Ok::<(), JailError>(())
    };
    // The fence file (flintd's, outside the VM's directory): read-only.
    if let Some(f) = out.fence.as_mut() {
        map(f, false, &mut passed)?;
    }
    match &mut out.launch {
        Launch::Boot(config) => {
            map(&mut config.kernel, false, &mut passed)?;
            if let Some(i) = config.initramfs.as_mut() {
                map(i, false, &mut passed)?;
            }
            for d in config.drives.iter_mut() {
                map(&mut d.path, !d.read_only, &mut passed)?;
            }
            if let Some(v) = config.vsock.as_mut() {
                must_be_inside(&mut v.uds_path)?;
            }
            console_inside(&mut config.console)?;
            hand_over_tap(&mut config.net, &mut passed)?;
        }
        Launch::Restore(r) => {
            // The snapshot's shared state file (outside the VM's directory): read-only.
            map(&mut r.state_path, false, &mut passed)?;
            match &mut r.memory {
                // The shared memory file of the snapshot (outside the VM's directory): read-only is enough for a
                // private (copy-on-write) mapping.
                MemorySource::Private { path } => map(path, false, &mut passed)?,
                MemorySource::Uffd { path } => {
                    must_be_inside(path)?;
                    uffd = true;
                }
                MemorySource::Pager { socket } => {
                    must_be_inside(socket)?;
                    uffd = true;
                }
            }
            if let Some(v) = r.devices.vsock_uds.as_mut() {
                must_be_inside(v)?;
            }
            if let Some(c) = r.devices.console.as_mut() {
                console_inside(c)?;
            }
            // A restored VM's own drives are inside its directory; one outside is an image's shared root, which
            // the VMM gets read-only.
            for p in r.devices.drive_paths.iter_mut().flatten() {
                map(p, false, &mut passed)?;
            }
            hand_over_tap(&mut r.devices.net, &mut passed)?;
        }
    }
    let devices = jail_devices(uffd)?;
    let mem_bytes = if c.mem_mib > 0 { c.mem_mib << 20 } else { 64 << 30 };
    out.jail = Some(JailSpec {
        root: dir.to_path_buf(),
        uid: c.uid,
        gid: c.gid,
        devices,
        rlimits: JailRlimits {
            nofile: cfg.nofile,
            nproc: cfg.pids_max,
            // A snapshot writes the memory image whole; nothing else it writes comes near.
            fsize: mem_bytes + (256 << 20),
        },
        keep_fds: (0..passed.len() as RawFd).map(|i| first_fd + i).collect(),
    });
    Ok((out, passed))
}

/// Gives the VM's directory and everything in it to the jail's uid (it is `/` for the VMM).
pub fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    // Only what is not the uid's yet is changed (a standby's directory is its already): a chown writes the inode.
    let owned = |m: &std::fs::Metadata| (m.uid(), m.gid()) == (uid, gid);
    if !std::fs::symlink_metadata(dir).is_ok_and(|m| owned(&m)) {
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).map_err(io(format!("chown {}", dir.display())))?;
    }
    for e in std::fs::read_dir(dir).map_err(io(format!("read {}", dir.display())))?.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            chown_tree(&p, uid, gid)?;
        } else if !e.metadata().is_ok_and(|m| owned(&m)) {
            std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).map_err(io(format!("chown {}", p.display())))?;
        }
    }
    Ok(())
}

/// Gives `path` (made by flintd inside a VM's directory) to the directory's owner: the jailed VMM's uid, or
/// flintd's own user when the jail is off (then a no-op).
pub fn give_to_dir_owner(dir: &Path, path: &Path) -> Result<(), JailError> {
    let m = std::fs::metadata(dir).map_err(io(format!("stat {}", dir.display())))?;
    let me = std::fs::symlink_metadata(path).map_err(io(format!("stat {}", path.display())))?;
    if (m.uid(), m.gid()) != (me.uid(), me.gid()) {
        std::os::unix::fs::lchown(path, Some(m.uid()), Some(m.gid()))
            .map_err(io(format!("chown {}", path.display())))?;
    }
    Ok(())
}

/// Everything the child needs, prepared before the clone: the child only makes async-signal-safe system calls.
struct ChildArgs {
    sync_read: RawFd,
    sync_write: RawFd,
    /// Every fd the child keeps (sorted): it closes all others first thing (see `spawn`).
    keep: Vec<RawFd>,
    devnull: RawFd,
    log: RawFd,
    passed: Vec<(RawFd, RawFd)>,
    exe: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the parent's ChildArgs, which this child has a private copy of (no CLONE_VM); every
    // call below is an async-signal-safe system call on fds and strings prepared by the parent, and the child
    // either execs or exits without returning into Rust code that could allocate or take a lock.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        libc::close(a.sync_write);
        // Drop every fd inherited from flintd but ours: another spawn's sync pipe among them would keep that
        // child waiting for an EOF only our exec would give (each waiting on the other: a deadlock).
        let mut from: libc::c_uint = 0;
        for &fd in &a.keep {
            if fd as libc::c_uint > from {
                libc::syscall(libc::SYS_close_range, from, fd as libc::c_uint - 1, 0);
            }
            from = fd as libc::c_uint + 1;
        }
        libc::syscall(libc::SYS_close_range, from, libc::c_uint::MAX, 0);
        // Wait until the parent has moved this process into its cgroup (EOF on the pipe).
        let mut b = 0u8;
        loop {
            let n = libc::read(a.sync_read, (&mut b as *mut u8).cast(), 1);
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if libc::setsid() < 0 || libc::dup2(a.devnull, 0) < 0 || libc::dup2(a.log, 1) < 0 || libc::dup2(a.log, 2) < 0 {
            libc::_exit(126);
        }
        for &(src, dst) in &a.passed {
            if libc::dup2(src, dst) < 0 {
                libc::_exit(126);
            }
        }
        libc::execve(a.exe.as_ptr(), a.argv.as_ptr(), a.envp.as_ptr());
        libc::_exit(127)
    }
}

/// Starts `vmm_bin <mode> <spec_path>` (`--spec <dir>/spec.json`, or `--standby <dir>/standby.json`) in new pid,
/// mount, IPC, UTS and network namespaces, in `cgroup`, with stdout/stderr to `log` and `passed` as fds 3, 4, ...;
/// returns its pid and a pidfd.
pub fn spawn(
    vmm_bin: &Path,
    (mode, spec_path): (&str, &Path),
    log: &std::fs::File,
    passed: &[OwnedFd],
    cgroup: Option<&VmCgroup>,
) -> Result<(u32, OwnedFd), JailError> {
    let nul = |what: &str| JailError::Spec(format!("{what} has a NUL byte"));
    let exe = CString::new(vmm_bin.as_os_str().as_bytes()).map_err(|_| nul("the VMM path"))?;
    let args = [
        CString::new("flint-vmm").expect("literal"),
        CString::new(mode).map_err(|_| nul("the VMM's mode"))?,
        CString::new(spec_path.as_os_str().as_bytes()).map_err(|_| nul("the spec path"))?,
    ];
    let env = [CString::new("PATH=/usr/sbin:/usr/bin:/sbin:/bin").expect("literal")];
    let devnull = std::fs::File::open("/dev/null").map_err(io("open /dev/null"))?;
    // Sources moved out of the way of the targets (3, 4, ...), close-on-exec (dup2 clears it on the target).
    let mut high = Vec::new();
    for f in passed {
        // SAFETY: F_DUPFD_CLOEXEC duplicates an fd we own onto a number >= 1024; the result is owned below.
        let fd = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 1024) };
        if fd < 0 {
            return Err(last_os("dup"));
        }
        // SAFETY: a fresh fd nobody else owns.
        high.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    // One spawn at a time from pipe to cgroup join: no child is cloned while another's sync pipe is open (the
    // child closes what it inherits, but only once it runs).
    static SPAWNING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = SPAWNING.lock().unwrap_or_else(|p| p.into_inner());
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(last_os("pipe"));
    }
    // SAFETY: fresh fds from pipe2, owned from here on.
    let (sync_read, sync_write) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let mut keep: Vec<RawFd> = vec![0, 1, 2, sync_read.as_raw_fd(), devnull.as_raw_fd(), log.as_raw_fd()];
    keep.extend(high.iter().map(|f| f.as_raw_fd()));
    keep.sort_unstable();
    keep.dedup();
    let child = ChildArgs {
        sync_read: sync_read.as_raw_fd(),
        sync_write: sync_write.as_raw_fd(),
        keep,
        devnull: devnull.as_raw_fd(),
        log: log.as_raw_fd(),
        passed: high.iter().enumerate().map(|(i, f)| (f.as_raw_fd(), FIRST_PASSED_FD + i as RawFd)).collect(),
        exe,
        argv,
        envp,
    };
    let mut stack = vec![0u8; 256 * 1024];
    // SAFETY: the stack is 256 KiB we own and outlive the clone (the child has its own copy of it: no CLONE_VM);
    // x86-64 stacks grow down, so the child starts at its (16-byte aligned) end; `child` outlives the call.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len()) as usize & !15;
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_NEWPID
                | libc::CLONE_NEWNS
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWUTS
                | libc::CLONE_NEWNET
                | libc::SIGCHLD,
            &child as *const ChildArgs as *mut libc::c_void,
        )
    };
    if pid < 0 {
        return Err(last_os("clone into new namespaces"));
    }
    drop(sync_read);
    // SAFETY: pidfd_open(2) on our own child, which cannot be reaped by anyone else before we wait for it.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    let joined = cgroup.map(|cg| cg.join(pid as u32)).unwrap_or(Ok(()));
    if let Err(e) = joined {
        // SAFETY: kill(2) of the child we just cloned; it has not run anything but its wait yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let mut st = 0;
        // SAFETY: reaps that child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        return Err(e.into());
    }
    drop(sync_write); // the child goes on
    if pidfd < 0 {
        return Err(last_os("pidfd_open"));
    }
    // SAFETY: a fresh pidfd nobody else owns.
    Ok((pid as u32, unsafe { OwnedFd::from_raw_fd(pidfd) }))
}

/// How a reaped child ended, in the words `std::process::ExitStatus` uses.
pub fn describe_status(code: i32, status: i32) -> String {
    match code {
        libc::CLD_EXITED => format!("exit status: {status}"),
        libc::CLD_KILLED | libc::CLD_DUMPED => format!("signal: {status}"),
        _ => format!("ended ({code}, {status})"),
    }
}

/// Waits (blocking) for the child behind `pidfd` and reaps it.
pub fn reap(pidfd: &OwnedFd) -> String {
    // SAFETY: siginfo_t is plain data; waitid fills it for our own child behind the pidfd.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        const P_PIDFD: libc::idtype_t = 3;
        if libc::waitid(P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED) != 0 {
            return format!("wait failed: {}", std::io::Error::last_os_error());
        }
        describe_status(info.si_code, info.si_status())
    }
}

/// Refuses a jail uid range that overlaps an account of the host (`passwd`: a user's uid, `group`: a group's gid —
/// VMMs run with uid = gid) or a subordinate id range (`subuid`, `subgid`: a user's containers): a VMM running as
/// such an id could signal that user's processes or open their files. `etc` is the directory holding them
/// (`/etc`); missing files have no ids.
pub fn check_host_ids(etc: &Path, base: u32, count: u32) -> Result<(), JailError> {
    let end = u64::from(base) + u64::from(count);
    let hits = |a: u64, n: u64| a < end && u64::from(base) < a + n;
    let refuse = |what: String| {
        Err(JailError::UidsTaken(format!(
            "jail uids {base}..{end} overlap {what}: pick a range no account or container of the host uses \
             (jail.uid_base, jail.uid_count)"
        )))
    };
    for (file, field) in [("passwd", 2usize), ("group", 2)] {
        let text = std::fs::read_to_string(etc.join(file)).unwrap_or_default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split(':').collect();
            if let Some(id) = f.get(field).and_then(|v| v.parse::<u64>().ok()) {
                if hits(id, 1) {
                    let kind = if file == "passwd" { "user" } else { "group" };
                    return refuse(format!("{kind} `{}` ({id}) in {}", f[0], etc.join(file).display()));
                }
            }
        }
    }
    for file in ["subuid", "subgid"] {
        let text = std::fs::read_to_string(etc.join(file)).unwrap_or_default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split(':').collect();
            let (Some(a), Some(n)) = (f.get(1).and_then(|v| v.parse().ok()), f.get(2).and_then(|v| v.parse().ok()))
            else {
                continue;
            };
            if hits(a, n) {
                return refuse(format!("{}..{} of `{}` in {}", a, a + n, f[0], etc.join(file).display()));
            }
        }
    }
    Ok(())
}

/// A claim on a range of jail uids for as long as this flintd runs: an exclusive `flock(2)` on
/// `<dir>/<base>-<count>.claim`. Two flintds of one host whose ranges overlap would run VMMs as the same uids, and
/// a VMM could then signal, trace or open the files of a VM of the other flintd: the second one refuses to start.
/// The lock goes with the process (a flintd killed with SIGKILL frees its range; its restart claims it again).
#[derive(Debug)]
pub struct UidClaim {
    _file: std::fs::File,
    path: PathBuf,
}

impl Drop for UidClaim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `flock(fd, op | LOCK_NB)`: Ok(true) locked, Ok(false) held by another open file.
fn try_flock(f: &std::fs::File, op: i32) -> Result<bool, std::io::Error> {
    // SAFETY: flock(2) on an fd this function borrows for the call; it only changes the lock.
    if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Claims `[base, base + count)` in `dir` for `owner` (written into the claim, for the error a later flintd
/// gets). Claims left by flintds that have ended (unlocked files) are removed; a held claim that overlaps is an
/// error naming both ranges and the owner.
pub fn claim_uids(dir: &Path, base: u32, count: u32, owner: &str) -> Result<UidClaim, JailError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |what: &str, p: &Path, source: std::io::Error| JailError::Io {
        what: format!("jail uid claims: {what} {}", p.display()),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| err("create", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| err("chmod", dir, e))?;
    let open = |p: &Path, create: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
    };
    // One claimer at a time looks at the others' claims and adds its own.
    let guard_path = dir.join(".lock");
    let guard = open(&guard_path, true).map_err(|e| err("open", &guard_path, e))?;
    // SAFETY: as in try_flock; blocking, and every holder keeps it only for this function's few file operations.
    if unsafe { libc::flock(guard.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(err("lock", &guard_path, std::io::Error::last_os_error()));
    }
    let end = u64::from(base) + u64::from(count);
    for entry in std::fs::read_dir(dir).map_err(|e| err("read", dir, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((b, c)) = name.strip_suffix(".claim").and_then(|r| r.split_once('-')) else { continue };
        let (Ok(b), Ok(c)) = (b.parse::<u64>(), c.parse::<u64>()) else { continue };
        let path = entry.path();
        let Ok(f) = open(&path, false) else { continue };
        if try_flock(&f, libc::LOCK_EX).map_err(|e| err("lock", &path, e))? {
            // Its flintd has ended: a stale claim.
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if b < end && u64::from(base) < b + c {
            let who = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(JailError::UidsTaken(format!(
                "jail uids {base}..{end} overlap {b}..{} claimed by a running flintd ({}): give each flintd on a \
                 host a range of its own (jail.uid_base, jail.uid_count)",
                b + c,
                who.trim()
            )));
        }
    }
    let path = dir.join(format!("{base}-{count}.claim"));
    let mut file = open(&path, true).map_err(|e| err("open", &path, e))?;
    if !try_flock(&file, libc::LOCK_EX).map_err(|e| err("lock", &path, e))? {
        return Err(JailError::UidsTaken(format!("jail uid claims: {} is held by another flintd", path.display())));
    }
    file.set_len(0).and_then(|_| file.write_all(owner.as_bytes())).map_err(|e| err("write", &path, e))?;
    Ok(UidClaim { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges_of_host_accounts_and_containers_are_refused() {
        let etc = std::env::temp_dir().join(format!("flint-etc-{}", std::process::id()));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("passwd"), "root:x:0:0::/root:/bin/sh\nsvc:x:900100:900100::/:/bin/false\n").unwrap();
        std::fs::write(etc.join("group"), "wheel:x:10:\nbig:x:950000:\n").unwrap();
        std::fs::write(etc.join("subuid"), "alice:100000:65536\n").unwrap();
        std::fs::write(etc.join("subgid"), "# none\n").unwrap();
        let e = check_host_ids(&etc, 900000, 1000).unwrap_err().to_string();
        assert!(e.contains("user `svc` (900100)"), "{e}");
        let e = check_host_ids(&etc, 949000, 2000).unwrap_err().to_string();
        assert!(e.contains("group `big` (950000)"), "{e}");
        let e = check_host_ids(&etc, 165000, 1000).unwrap_err().to_string();
        assert!(e.contains("100000..165536 of `alice`"), "{e}");
        check_host_ids(&etc, 970000, 10000).unwrap();
        check_host_ids(&etc.join("missing"), 0, 10).unwrap();
        let _ = std::fs::remove_dir_all(&etc);
    }

    #[test]
    fn overlapping_uid_ranges_are_refused_while_held() {
        let dir = std::env::temp_dir().join(format!("flint-uid-claims-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = claim_uids(&dir, 900_000, 1000, "pid 1, data /a").unwrap();
        // flock(2) locks belong to open files: a second open in this process conflicts as another flintd would.
        let e = claim_uids(&dir, 900_500, 1000, "b").unwrap_err().to_string();
        assert!(e.contains("900500..901500 overlap 900000..901000") && e.contains("pid 1, data /a"), "{e}");
        assert!(claim_uids(&dir, 900_000, 1000, "b").is_err(), "the same range twice");
        let c = claim_uids(&dir, 901_000, 1000, "c").expect("an adjacent range is free");
        drop(a);
        let b = claim_uids(&dir, 900_500, 500, "b").expect("free once the first claim is dropped");
        // A claim whose flintd ended without removing it (SIGKILL) is stale: unlocked, so it is taken over.
        std::fs::write(dir.join("800000-100.claim"), "gone").unwrap();
        let d = claim_uids(&dir, 800_050, 10, "d").expect("a stale claim is no obstacle");
        assert!(!dir.join("800000-100.claim").exists());
        drop((b, c, d));
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from(".lock")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
