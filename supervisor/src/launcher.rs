//! How flintd starts, watches and stops VMM processes and reaches their control API: the [`Launcher`] trait, its
//! real implementation ([`ProcessLauncher`]: `flint-vmm --spec`, its own session, a cleared environment, exit
//! watched through a pidfd) and, for unit tests of the workflows without KVM, a fake (`fake.rs`).
use std::collections::HashMap;
use std::future::Future;
use std::os::unix::io::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flint_agent::client::Endpoint;
use flint_vmm_api::describe::VmDescription;
use flint_vmm_api::snapshot::{SnapshotReport, SnapshotRequest, SnapshotResponse};
use flint_vmm_api::{lock, paths, LaunchSpec};
use serde::{Deserialize, Serialize};

use crate::cgroup::Hierarchy;
use crate::config::JailConfig;
pub use crate::jail::Confinement;

/// How long a standby VMM may take to enter its jail and make its KVM VM.
const STANDBY_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits for a standby's `ready` on its control socket (a blocking read with a timeout: the launcher's standby
/// starts run on a blocking thread).
fn wait_ready(ctl: &OwnedFd, timeout: std::time::Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: 0 };
    // SAFETY: setsockopt(2) with a timeval we own, on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            ctl.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = [0u8; 16];
    // SAFETY: recv(2) into a buffer we own, of its length.
    let n = unsafe { libc::recv(ctl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let clear = libc::timeval { tv_sec: 0, tv_usec: 0 };
    // SAFETY: as above (no timeout again for the hand-over's own exchanges).
    unsafe {
        libc::setsockopt(
            ctl.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&clear as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    match n {
        5 if &buf[..5] == b"ready" => Ok(()),
        n if n < 0 => Err(std::io::Error::last_os_error()),
        0 => Err(std::io::Error::other("it exited first (its vmm.log says why)")),
        _ => Err(std::io::Error::other("it sent something other than `ready`")),
    }
}

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a VMM could not be started or did not do what its control API was asked.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The jail cannot be set up on this host (not root, no cgroups): no VM can start until that is fixed.
    #[error("{0}")]
    JailUnavailable(String),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The VMM's control socket did not answer (the VMM is gone or stuck).
    #[error("VMM: {0}")]
    Unreachable(#[from] crate::http::HttpError),
    /// The VMM refused the call (`status` is its HTTP status).
    #[error("VMM: {path}: {message}")]
    Refused { path: String, status: u16, message: String },
    #[error("VMM: malformed {what} answer: {why}")]
    Malformed { what: &'static str, why: String },
    /// The launch spec breaks the VMM's limits (checked by the fake VMM as the real one would).
    #[error("{0}")]
    Config(#[from] flint_vmm_api::config::ConfigError),
    #[error("{0} is outside the jailed VM's directory")]
    Outside(PathBuf),
}

impl crate::error::Classify for VmmError {
    fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            VmmError::JailUnavailable(_) => Kind::Unavailable,
            VmmError::Jail(e) => e.kind(),
            VmmError::Io { .. } | VmmError::Outside(_) => Kind::Internal,
            VmmError::Refused { status: 409, .. } => Kind::Conflict,
            VmmError::Unreachable(_) | VmmError::Refused { .. } | VmmError::Malformed { .. } => Kind::Guest,
            VmmError::Config(_) => Kind::Invalid,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

/// A VMM process: pid and start time (a pid alone may be reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    pub pid: u32,
    pub start: u64,
}

/// A VMM process started ahead of any VM ([`Launcher::standby`]): jailed in its own directory as its own uid,
/// its KVM VM (and memory slots for `mem_mib`) made, waiting for one launch spec.
#[derive(Debug)]
pub struct Standby {
    pub proc: Proc,
    /// Its directory, the jail's `/`: renamed to the VM's directory when it is taken.
    pub dir: PathBuf,
    pub uid: u32,
    /// The guest memory its memory slots are for.
    pub mem_mib: u64,
    /// flintd's end of its control socket (none for the fake launcher's).
    pub ctl: Option<OwnedFd>,
}

/// Starts and supervises VMM processes.
pub trait Launcher: Send + Sync + 'static {
    /// Starts a VMM for `spec` with its files in `dir`, jailed as `jail` says; returns once the process exists.
    fn spawn(&self, dir: &Path, spec: &LaunchSpec, jail: Option<Confinement>) -> Result<Proc, VmmError>;
    /// Starts a standby VMM in `dir` (empty, made by the caller), jailed as `jail` says (its uid, memory slots for
    /// `mem_mib`).
    fn standby(&self, _dir: &Path, _jail: Confinement) -> Result<Standby, VmmError> {
        Err(VmmError::JailUnavailable("this launcher has no standby VMMs".into()))
    }
    /// Makes standby `s` the VMM of the VM in `dir` (the standby's directory, renamed by the caller) and hands it
    /// `spec`, as `spawn` would start a VMM for it, jailed as `jail` says (`jail.uid` must be the standby's).
    /// On an error the standby is gone (killed and reaped).
    fn hand_over(&self, s: Standby, dir: &Path, spec: &LaunchSpec, jail: Confinement) -> Result<Proc, VmmError> {
        let _ = (s, dir, spec, jail);
        Err(VmmError::JailUnavailable("this launcher has no standby VMMs".into()))
    }
    /// Ends a standby nobody took or whose hand-over failed; resolves once it is reaped and its cgroup removed.
    fn discard(&self, s: Standby) -> BoxFut<'static, ()> {
        self.kill(s.proc);
        let exited = self.exited(s.proc);
        Box::pin(async move {
            exited.await;
        })
    }
    /// Frees what a VM's jail holds on the host (its cgroup) once its VMM is gone.
    fn release(&self, _dir: &Path) {}
    /// Watches a VMM this flintd did not start (re-adopted after a restart) as `spawn` watches its own: its
    /// memory against its cgroup's limit (`jailed`: it has a cgroup).
    fn readopt(&self, _p: Proc, _dir: &Path, _jailed: bool) {}
    /// Whether `p` is still running (same pid, same start time).
    fn alive(&self, p: Proc) -> bool;
    /// SIGKILL, if `p` is still the process we started.
    fn kill(&self, p: Proc);
    /// Stops every thread of `p` at once (SIGSTOP: its vCPUs leave the guest and stay out) or lets it go on
    /// (SIGCONT), if `p` is still the process we started. Unlike the VMM's own pause it needs no answer from the
    /// VMM and waits for no operation in progress: what a host that lost its claim on a session does first.
    fn freeze(&self, p: Proc, frozen: bool);
    /// Resolves when `p` has exited, with how it ended.
    fn exited(&self, p: Proc) -> BoxFut<'static, String>;
    /// The control API of the VMM whose files are in `dir` (`jailed`: it was started jailed, and sees paths
    /// relative to `dir`).
    fn vmm(&self, dir: &Path, jailed: bool) -> Arc<dyn VmmControl>;
    /// Where the guest agent of the VM in `dir` answers.
    fn agent_endpoint(&self, dir: &Path) -> Endpoint;
    /// VMM processes running for VM directories under `vms_dir` (found by their launch spec's path), with the
    /// directory each runs for: after a crash, the ones no record owns are stopped.
    fn running_under(&self, vms_dir: &Path) -> Vec<(Proc, PathBuf)>;
}

/// A VMM's control API, typed by the contract.
pub trait VmmControl: Send + Sync {
    fn describe(&self) -> BoxFut<'_, Result<VmDescription, VmmError>>;
    fn pause(&self) -> BoxFut<'_, Result<(), VmmError>>;
    fn resume(&self) -> BoxFut<'_, Result<(), VmmError>>;
    fn shutdown(&self) -> BoxFut<'_, Result<(), VmmError>>;
    fn snapshot(&self, req: SnapshotRequest) -> BoxFut<'_, Result<SnapshotReport, VmmError>>;
}

/// Start time of a process (clock ticks since boot, /proc/PID/stat field 22), or None if it is gone or a zombie.
pub fn pid_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let state = after.split_whitespace().next()?;
    if state == "Z" {
        return None;
    }
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether VMMs can be jailed on this host.
enum JailSetup {
    Ready(JailConfig, Hierarchy),
    Unavailable(String),
}

impl JailSetup {
    fn ready(&self) -> Result<(&JailConfig, &Hierarchy), VmmError> {
        match self {
            JailSetup::Ready(c, h) => Ok((c, h)),
            JailSetup::Unavailable(why) => Err(VmmError::JailUnavailable(why.clone())),
        }
    }
}

/// The real launcher: one `flint-vmm` process per VM.
pub struct ProcessLauncher {
    pub vmm_bin: PathBuf,
    /// Children this flintd started unjailed, reaped by their exit watcher.
    children: Mutex<HashMap<u32, tokio::process::Child>>,
    /// Pidfds of jailed children (cloned into their namespaces), reaped by their exit watcher.
    jailed: Arc<Mutex<HashMap<u32, Arc<OwnedFd>>>>,
    /// The jail's configuration and this host's cgroups, or why VMs cannot be jailed here.
    jail: JailSetup,
    /// This flintd's claim on the jail's uid range, held while the launcher lives.
    uid_claim: Option<crate::jail::UidClaim>,
}

impl ProcessLauncher {
    /// With `jail`, every VMM is jailed; flintd must then run as root on a host with cgroups, or VMs refuse to
    /// start and say what is missing.
    pub fn new(vmm_bin: PathBuf, jail: Option<JailConfig>) -> Self {
        let jail = match jail {
            None => JailSetup::Unavailable("the jail is off".into()),
            // SAFETY: geteuid(2) has no preconditions.
            Some(_) if unsafe { libc::geteuid() } != 0 => JailSetup::Unavailable(
                "the jail needs root (to make namespaces, device nodes and cgroups, and to change uid): run flintd \
                 as root, or set jail.enabled = false / --no-jail (debugging only: VMMs then run unconfined)"
                    .to_string(),
            ),
            Some(cfg) => {
                let in_unit = std::env::var_os("INVOCATION_ID").is_some();
                let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
                match Hierarchy::detect(Path::new("/sys/fs/cgroup")).and_then(|h| h.delegated(in_unit, &own)) {
                    Ok(h) => JailSetup::Ready(cfg, h),
                    Err(e) => JailSetup::Unavailable(format!("the jail needs cgroups: {e}")),
                }
            }
        };
        ProcessLauncher { vmm_bin, children: Mutex::new(HashMap::new()), jailed: Arc::default(), jail, uid_claim: None }
    }

    /// With the jail on (and flintd root), claims the jail's uid range for this flintd (`jail::claim_uids`): an
    /// error when another running flintd of this host has claimed an overlapping one.
    pub fn claim_uids(&mut self, owner: &str) -> Result<(), crate::jail::JailError> {
        if let JailSetup::Ready(cfg, _) = &self.jail {
            crate::jail::check_host_ids(Path::new("/etc"), cfg.uid_base, cfg.uid_count)?;
            self.uid_claim = Some(crate::jail::claim_uids(&cfg.claims_dir, cfg.uid_base, cfg.uid_count, owner)?);
        }
        Ok(())
    }

    fn spawn_jailed(&self, dir: &Path, spec: &LaunchSpec, c: Confinement) -> Result<Proc, VmmError> {
        let (cfg, hierarchy) = self.jail.ready()?;
        let (jspec, passed) = crate::jail::jail_spec(dir, spec, &c, cfg)?;
        let log = write_launch_files(dir, &jspec)?;
        let log_path = dir.join("vmm.log");
        let cgroup = hierarchy
            .create(&cfg.cgroup, &cgroup_name(c.uid), Self::limits(cfg, &c))
            .map_err(crate::jail::JailError::from)?;
        crate::jail::chown_tree(dir, c.uid, c.gid)?;
        let (pid, pidfd) =
            crate::jail::spawn(&self.vmm_bin, ("--spec", &spec_path(dir)), &log, &passed, Some(&cgroup))?;
        let start = pid_start_time(pid).unwrap_or(0);
        lock(&self.jailed).insert(pid, Arc::new(pidfd));
        let p = Proc { pid, start };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(watch_memory(cgroup, p, log_path));
        }
        Ok(p)
    }
}

impl ProcessLauncher {
    /// A VM's cgroup limits: its guest memory plus the VMM's allowance, the jail's CPU weight and tasks, its CPU
    /// limit.
    fn limits(cfg: &JailConfig, c: &Confinement) -> crate::cgroup::Limits {
        crate::cgroup::Limits {
            memory_bytes: (c.mem_mib.max(1) + cfg.vmm_overhead_for(c.mem_mib.max(1))) << 20,
            cpu_weight: cfg.cpu_weight,
            pids: cfg.pids_max,
            cpu_max: c.cpu,
        }
    }

    fn start_standby(&self, dir: &Path, c: Confinement) -> Result<Standby, VmmError> {
        let (cfg, hierarchy) = self.jail.ready()?;
        let spec = crate::jail::standby_spec(dir, &c, cfg)?;
        let path = dir.join("standby.json");
        let text = serde_json::to_vec_pretty(&spec)
            .map_err(|e| VmmError::Malformed { what: "standby spec", why: e.to_string() })?;
        std::fs::write(&path, text).map_err(io_err(format!("write {}", path.display())))?;
        let log_path = dir.join("vmm.log");
        let log = std::fs::File::create(&log_path).map_err(io_err(format!("create {}", log_path.display())))?;
        // The cgroup the VM it is handed keeps (named after the uid, which the VM keeps too): moving a process
        // that holds a KVM VM into another cgroup cost 6-15 ms here, creating one ahead nothing on the path.
        let cgroup = hierarchy
            .create(&cfg.cgroup, &cgroup_name(c.uid), Self::limits(cfg, &c))
            .map_err(crate::jail::JailError::from)?;
        crate::jail::chown_tree(dir, c.uid, c.gid)?;
        let mut pair = [0; 2];
        // SAFETY: socketpair(2) writes two fds into the array; both are owned right after.
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, pair.as_mut_ptr()) }
            < 0
        {
            cgroup.remove();
            return Err(io_err("socketpair")(std::io::Error::last_os_error()));
        }
        // SAFETY: fresh fds from socketpair, owned from here on.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        let spawned = crate::jail::spawn(&self.vmm_bin, ("--standby", &path), &log, &[theirs], Some(&cgroup));
        let (pid, pidfd) = match spawned {
            Ok(x) => x,
            Err(e) => {
                cgroup.remove();
                return Err(e.into());
            }
        };
        let start = pid_start_time(pid).unwrap_or(0);
        lock(&self.jailed).insert(pid, Arc::new(pidfd));
        let standby = Standby {
            proc: Proc { pid, start },
            dir: dir.to_path_buf(),
            uid: c.uid,
            mem_mib: c.mem_mib,
            ctl: Some(ours),
        };
        // Offered for hand-over only once it says it is ready (jailed, its KVM VM made): until then it still opens
        // paths in its directory, which a hand-over renames.
        if let Err(e) = wait_ready(standby.ctl.as_ref().expect("just set"), STANDBY_READY_TIMEOUT) {
            self.kill(standby.proc);
            cgroup.remove();
            return Err(io_err(format!("standby VMM {pid} did not get ready"))(e));
        }
        Ok(standby)
    }

    fn hand_over_to(&self, s: &mut Standby, dir: &Path, spec: &LaunchSpec, c: Confinement) -> Result<Proc, VmmError> {
        let (cfg, hierarchy) = self.jail.ready()?;
        if c.uid != s.uid {
            return Err(VmmError::Io {
                what: "hand a VM to a standby VMM".into(),
                source: std::io::Error::other(format!("the VM runs as uid {}, the standby as {}", c.uid, s.uid)),
            });
        }
        // Taken alive (`take_standby`); if it has exited since, the send below fails (its socket is closed).
        let (jspec, passed) = crate::jail::jail_spec_from(dir, spec, &c, cfg, flint_vmm_api::spec::HANDOVER_FIRST_FD)?;
        let body =
            serde_json::to_vec(&jspec).map_err(|e| VmmError::Malformed { what: "launch spec", why: e.to_string() })?;
        let ctl = s.ctl.take().ok_or_else(|| VmmError::Io {
            what: "hand a VM to a standby VMM".into(),
            source: std::io::Error::other("it was handed one already"),
        })?;
        // Its cgroup (made with the standby, named after the uid) gets the VM's limits before it runs anything of
        // the VM's: only what differs from the standby's is written.
        let cgroup = hierarchy.vm_cgroup(&cfg.cgroup, &cgroup_name(c.uid));
        let (was, now) =
            (Self::limits(cfg, &Confinement { cpu: None, mem_mib: s.mem_mib, ..c }), Self::limits(cfg, &c));
        hierarchy.update(&cgroup, &was, &now).map_err(crate::jail::JailError::from)?;
        crate::jail::chown_tree(dir, c.uid, c.gid)?;
        send_spec(&ctl, &body, &passed).map_err(io_err("hand the launch spec to a standby VMM"))?;
        let spec_file = spec_path(dir);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(watch_memory(cgroup, s.proc, dir.join("vmm.log")));
                // For whoever looks at the VM's directory: what it was started with. Written beside the restore,
                // not before it goes on.
                handle.spawn_blocking(move || std::fs::write(spec_file, body));
            }
            Err(_) => drop(std::fs::write(spec_file, body)),
        }
        Ok(s.proc)
    }
}

/// The cgroup of the jailed VMM running as `uid` (a standby's, then its VM's: the VM keeps the standby's uid).
fn cgroup_name(uid: u32) -> String {
    format!("vm-{uid}")
}

/// Sends `body` with `fds` as one SCM_RIGHTS message on a SOCK_SEQPACKET socket.
fn send_spec(sock: &OwnedFd, body: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if fds.len() > flint_vmm_api::spec::HANDOVER_MAX_FDS {
        return Err(std::io::Error::other(format!(
            "{} host files, at most {}",
            fds.len(),
            flint_vmm_api::spec::HANDOVER_MAX_FDS
        )));
    }
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let bytes = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds CMSG_SPACE(bytes) (zeroed, 8-aligned); one SCM_RIGHTS header and the
        // fds are written inside it with the CMSG macros.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
        }
    }
    loop {
        // SAFETY: sendmsg(2) of the message built above; the fds stay open (owned by `fds`) across the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return if n as usize == body.len() { Ok(()) } else { Err(std::io::Error::other("short send")) };
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Stops a jailed VMM that is out of memory: its anonymous memory (guest pages it touched, its own heap) fills its
/// cgroup's limit and charges keep failing. The kernel's OOM killer does not act on faults KVM takes for a guest
/// (they are not user faults): depending on the host the VMM's KVM_RUN fails or its vCPUs retry forever. Page
/// cache at the limit is reclaimed, not counted: a VM doing disk I/O at its limit is left alone.
///
/// A check reads one small file, kept open (the failed charges); the full reading only follows a failed charge.
/// (Reading the memory statistics of every running VM twice a second was most of flintd's 3% of a core idle with
/// 100 VMs and 1,000 sessions on the development host: `flint-bench scale`, docs/performance.md.)
async fn watch_memory(cgroup: crate::cgroup::VmCgroup, p: Proc, log: PathBuf) {
    const STRIKES: u32 = 4;
    const EVERY: Duration = Duration::from_secs(1);
    /// The process is checked at least this often (a watch of a VMM that is gone ends).
    const PROCESS_EVERY: u32 = 10;
    let Some(counter) = cgroup.failed_charges() else { return };
    let mut last = counter.read().unwrap_or(0);
    let mut strikes = 0;
    let mut checks = 0u32;
    loop {
        tokio::time::sleep(EVERY).await;
        checks = checks.wrapping_add(1);
        let Some(failed) = counter.read() else { return };
        if failed == last {
            strikes = 0;
            if checks.is_multiple_of(PROCESS_EVERY) && pid_start_time(p.pid) != Some(p.start) {
                return;
            }
            continue;
        }
        if pid_start_time(p.pid) != Some(p.start) {
            return;
        }
        let Some(m) = cgroup.memory() else { return };
        let full = m.anon.saturating_add(8 << 20) >= m.limit;
        strikes = if m.failed_charges > last && full { strikes + 1 } else { 0 };
        last = m.failed_charges;
        if strikes >= STRIKES {
            let msg = format!(
                "flintd: stopped: the VMM reached its memory limit ({} MiB, {} MiB anonymous, {} failed charges; \
                 cgroup {})\n",
                m.limit >> 20,
                m.anon >> 20,
                m.failed_charges,
                cgroup.memory_dir.display()
            );
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&log) {
                use std::io::Write;
                let _ = f.write_all(msg.as_bytes());
            }
            tracing::warn!(pid = p.pid, limit = m.limit, anon = m.anon, "VMM out of memory: stopping it");
            if pid_start_time(p.pid) == Some(p.start) {
                // SAFETY: kill(2) on our own child, whose start time was just checked.
                unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
            }
            return;
        }
    }
}

impl ProcessLauncher {
    /// The cgroup a jailed VM in `dir` has (or had).
    fn cgroup_of(&self, dir: &Path) -> Option<crate::cgroup::VmCgroup> {
        use std::os::unix::fs::MetadataExt;
        let (cfg, h) = self.jail.ready().ok()?;
        // A jailed VM's directory belongs to its uid (flintd gives it; the VMM cannot give it away: no CAP_CHOWN).
        let uid = std::fs::symlink_metadata(dir).ok()?.uid();
        (uid != 0).then(|| h.vm_cgroup(&cfg.cgroup, &cgroup_name(uid)))
    }
}

/// Writes `<dir>/spec.json` and creates `<dir>/vmm.log` (the VMM's stdout and stderr), returning the log.
fn write_launch_files(dir: &Path, spec: &LaunchSpec) -> Result<std::fs::File, VmmError> {
    let text =
        serde_json::to_vec_pretty(spec).map_err(|e| VmmError::Malformed { what: "launch spec", why: e.to_string() })?;
    std::fs::write(spec_path(dir), text).map_err(io_err(format!("write {}", spec_path(dir).display())))?;
    let log_path = dir.join("vmm.log");
    std::fs::File::create(&log_path).map_err(io_err(format!("create {}", log_path.display())))
}

/// The launch spec file in a VM's directory.
pub fn spec_path(dir: &Path) -> PathBuf {
    dir.join("spec.json")
}

impl Launcher for ProcessLauncher {
    fn spawn(&self, dir: &Path, spec: &LaunchSpec, jail: Option<Confinement>) -> Result<Proc, VmmError> {
        if let Some(c) = jail {
            return self.spawn_jailed(dir, spec, c);
        }
        let log = write_launch_files(dir, spec)?;
        let mut cmd = tokio::process::Command::new(&self.vmm_bin);
        cmd.arg("--spec")
            .arg(spec_path(dir))
            // The VMM faces the guest: it gets nothing of flintd's environment (no store credentials, no tokens).
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(io_err("the VMM's log"))?)
            .stderr(log)
            .kill_on_drop(false);
        // SAFETY: setsid() is async-signal-safe; it only detaches the child from flintd's session so a signal to
        // flintd's process group (Ctrl-C, systemd stop of the daemon) does not take the VMs down with it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io_err(format!("start {}", self.vmm_bin.display())))?;
        let pid = child.id().ok_or_else(|| VmmError::Io {
            what: "start the VMM".into(),
            source: std::io::Error::other("it exited at once"),
        })?;
        // A child that already died has no start time: it is still ours (a zombie until reaped), so record 0.
        let start = pid_start_time(pid).unwrap_or(0);
        lock(&self.children).insert(pid, child);
        Ok(Proc { pid, start })
    }

    fn standby(&self, dir: &Path, jail: Confinement) -> Result<Standby, VmmError> {
        self.start_standby(dir, jail)
    }

    fn hand_over(&self, mut s: Standby, dir: &Path, spec: &LaunchSpec, jail: Confinement) -> Result<Proc, VmmError> {
        let r = self.hand_over_to(&mut s, dir, spec, jail);
        if r.is_err() {
            let gone = self.discard(s);
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(gone);
            }
        }
        r
    }

    fn discard(&self, s: Standby) -> BoxFut<'static, ()> {
        self.kill(s.proc);
        let exited = self.exited(s.proc);
        let cgroup = self.jail.ready().ok().map(|(cfg, h)| h.vm_cgroup(&cfg.cgroup, &cgroup_name(s.uid)));
        Box::pin(async move {
            exited.await;
            if let Some(cg) = cgroup {
                let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
            }
        })
    }

    fn alive(&self, p: Proc) -> bool {
        pid_start_time(p.pid) == Some(p.start)
    }

    fn release(&self, dir: &Path) {
        if let Some(cg) = self.cgroup_of(dir) {
            cg.remove();
        }
    }

    fn readopt(&self, p: Proc, dir: &Path, jailed: bool) {
        if let (Some(cg), true) = (self.cgroup_of(dir), jailed) {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(watch_memory(cg, p, dir.join("vmm.log")));
            }
        }
    }

    fn kill(&self, p: Proc) {
        if lock(&self.jailed).contains_key(&p.pid) {
            if self.alive(p) {
                // SAFETY: kill(2) on our own child (its pidfd keeps it from being reaped and its pid reused).
                unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
            }
            return;
        }
        if let Some(child) = lock(&self.children).get_mut(&p.pid) {
            let _ = child.start_kill();
            return;
        }
        if self.alive(p) {
            // SAFETY: kill(2) on a pid whose start time was just checked to be our VMM's.
            unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
        }
    }

    fn freeze(&self, p: Proc, frozen: bool) {
        let known = lock(&self.jailed).contains_key(&p.pid) || lock(&self.children).contains_key(&p.pid);
        if known || self.alive(p) {
            let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on our own child (held by its pidfd or tokio handle, so its pid is not reused), or
            // on a pid whose start time was just checked to be our VMM's.
            unsafe { libc::kill(p.pid as i32, sig) };
        }
    }

    fn exited(&self, p: Proc) -> BoxFut<'static, String> {
        if let Some(pidfd) = lock(&self.jailed).get(&p.pid).cloned() {
            let jailed = self.jailed.clone();
            return Box::pin(async move {
                // A pidfd becomes readable when its process exits; then reap it (it is our child).
                let dup = pidfd.try_clone();
                if let Ok(fd) = dup {
                    // SAFETY: the AsyncFd owns `fd`, a duplicate of the pidfd, open until it is dropped.
                    if let Ok(afd) = unsafe { tokio::io::unix::AsyncFd::register(fd) } {
                        let _ = afd.readable().await;
                    }
                }
                let how = tokio::task::spawn_blocking(move || crate::jail::reap(&pidfd))
                    .await
                    .unwrap_or_else(|e| format!("wait failed: {e}"));
                lock(&jailed).remove(&p.pid);
                how
            });
        }
        if let Some(mut child) = lock(&self.children).remove(&p.pid) {
            return Box::pin(async move {
                match child.wait().await {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                }
            });
        }
        // Not our child (adopted after a flintd restart): watch it through a pidfd, opened only while the pid is
        // still the process we know.
        // SAFETY: pidfd_open(2) with a pid and no flags; the result is checked and owned.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p.pid as libc::c_int, 0) } as i32;
        if fd < 0 || !self.alive(p) {
            if fd >= 0 {
                // SAFETY: closing the fd we just opened.
                unsafe { libc::close(fd) };
            }
            return Box::pin(async { "exited (adopted process)".to_string() });
        }
        // SAFETY: `fd` is a fresh pidfd nobody else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Box::pin(async move {
            // SAFETY: the AsyncFd owns `owned` (an OwnedFd), which stays open and the same fd until it is dropped.
            match unsafe { tokio::io::unix::AsyncFd::register(owned) } {
                Ok(afd) => {
                    let _ = afd.readable().await;
                }
                Err(_) => {
                    // No reactor registration possible: fall back to polling.
                    while pid_start_time(p.pid) == Some(p.start) {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            "exited (adopted process)".to_string()
        })
    }

    fn vmm(&self, dir: &Path, jailed: bool) -> Arc<dyn VmmControl> {
        Arc::new(HttpVmm { sock: dir.join("api.sock"), jail_root: jailed.then(|| dir.to_path_buf()) })
    }

    fn agent_endpoint(&self, dir: &Path) -> Endpoint {
        Endpoint::Vsock { uds: dir.join("vsock.sock"), port: flint_agent::protocol::DEFAULT_PORT }
    }

    fn running_under(&self, vms_dir: &Path) -> Vec<(Proc, PathBuf)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            // A standby handed a VM: its command line names the standby's spec; it is the VMM of the VM directory
            // its uid owns (the uid its cgroup is named after). A standby not handed one owns no VM directory.
            if args.get(1) == Some(&&b"--standby"[..]) {
                use std::os::unix::fs::MetadataExt;
                // (Not /proc/PID's owner: a non-dumpable process's is root.)
                let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
                let uid: u32 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0);
                let dir = std::fs::read_dir(vms_dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .find(|d| uid != 0 && d.metadata().is_ok_and(|m| m.is_dir() && m.uid() == uid))
                    .map(|d| d.path());
                if let (Some(dir), Some(start)) = (dir, pid_start_time(pid)) {
                    out.push((Proc { pid, start }, dir));
                }
                continue;
            }
            // `flint-vmm --spec <vms_dir>/<id>/spec.json`, as `spawn` starts it.
            let Some(i) = args.iter().position(|a| *a == b"--spec") else { continue };
            let Some(spec) = args.get(i + 1).map(|a| PathBuf::from(String::from_utf8_lossy(a).into_owned())) else {
                continue;
            };
            let Some(dir) = spec.parent().filter(|d| d.parent() == Some(vms_dir)) else { continue };
            if let Some(start) = pid_start_time(pid) {
                out.push((Proc { pid, start }, dir.to_path_buf()));
            }
        }
        out
    }
}

/// The VMM's control API over its Unix socket.
pub struct HttpVmm {
    pub sock: PathBuf,
    /// A jailed VMM's directory: the paths it is sent are relative to it.
    pub jail_root: Option<PathBuf>,
}

impl HttpVmm {
    async fn call(
        &self,
        (method, path): (&str, &str),
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Vec<u8>, VmmError> {
        // Answers are small (a description, a snapshot report): no more than a little over the cap is ever read
        // from a VMM (whose process a guest may have taken over).
        let cap = MAX_VMM_ANSWER as u64 + 4096;
        let (status, out) =
            crate::http::request_limited(&self.sock, (method, path), body.as_deref(), timeout, cap).await?;
        if status >= 300 {
            let msg = serde_json::from_slice::<serde_json::Value>(&out)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&out).into_owned());
            return Err(VmmError::Refused { path: path.to_string(), status, message: msg });
        }
        if out.len() > MAX_VMM_ANSWER {
            return Err(VmmError::Malformed {
                what: "control",
                why: format!("{} bytes, at most {MAX_VMM_ANSWER}", out.len()),
            });
        }
        Ok(out)
    }
}

/// Most bytes of an answer of a VMM's control API flintd reads (a description with its vCPUs and devices is a few
/// KiB).
const MAX_VMM_ANSWER: usize = 1 << 20;

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T, VmmError> {
    serde_json::from_slice(b).map_err(|e| VmmError::Malformed { what, why: e.to_string() })
}

impl VmmControl for HttpVmm {
    fn describe(&self) -> BoxFut<'_, Result<VmDescription, VmmError>> {
        Box::pin(async move { decode("describe", &self.call(paths::DESCRIBE, None, Duration::from_secs(5)).await?) })
    }
    fn pause(&self) -> BoxFut<'_, Result<(), VmmError>> {
        Box::pin(async move { self.call(paths::PAUSE, None, Duration::from_secs(10)).await.map(drop) })
    }
    fn resume(&self) -> BoxFut<'_, Result<(), VmmError>> {
        Box::pin(async move { self.call(paths::RESUME, None, Duration::from_secs(10)).await.map(drop) })
    }
    fn shutdown(&self) -> BoxFut<'_, Result<(), VmmError>> {
        Box::pin(async move { self.call(paths::SHUTDOWN, None, Duration::from_secs(5)).await.map(drop) })
    }
    fn snapshot(&self, req: SnapshotRequest) -> BoxFut<'_, Result<SnapshotReport, VmmError>> {
        Box::pin(async move {
            let mut req = req;
            if let Some(root) = &self.jail_root {
                for p in [&mut req.state_path, &mut req.mem_path] {
                    let rel = p.strip_prefix(root).map_err(|_| VmmError::Outside(p.clone()))?;
                    *p = Path::new("/").join(rel);
                }
            }
            let body = serde_json::to_vec(&req)
                .map_err(|e| VmmError::Malformed { what: "snapshot request", why: e.to_string() })?;
            let out = self.call(paths::SNAPSHOT, Some(body), Duration::from_secs(300)).await?;
            Ok(decode::<SnapshotResponse>("snapshot", &out)?.snapshot)
        })
    }
}
