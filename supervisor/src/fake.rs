//! A launcher without KVM, for unit tests of the daemon's workflows: each "VMM" is a record in a table with a
//! control API that keeps run state, writes small snapshot files and reports the configuration it was started with;
//! its guest agent is the real flint-agent server in host mode on a Unix socket in the VM's directory.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use flint_agent::client::Endpoint;
use flint_agent::listen::{ListenAddr, Listener};
use flint_agent::server::{serve_connection, Agent, Settings};
use flint_vmm_api::config::VmConfig;
use flint_vmm_api::describe::{BootTimings, RunState, VmDescription};
use flint_vmm_api::snapshot::{SnapshotReport, SnapshotRequest};
use flint_vmm_api::spec::Launch;
use flint_vmm_api::{lock, HostProfile, LaunchSpec};

use crate::launcher::{BoxFut, Launcher, Proc, VmmControl, VmmError};

/// The directory the fake VMs' agent serves as `/`.
pub fn agent_root() -> PathBuf {
    agent_root_of(std::process::id())
}

/// The directory the fake VMs' agent of process `pid` serves (a test removes that of a flintd it killed).
pub fn agent_root_of(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("flint-fake-agent-{pid}"))
}

/// One agent (and one reaper: it waits for any child) for every fake VM of the test process, on its own runtime.
fn agent_runtime() -> &'static (tokio::runtime::Runtime, Arc<Agent>) {
    static RT: OnceLock<(tokio::runtime::Runtime, Arc<Agent>)> = OnceLock::new();
    RT.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let root = agent_root();
        std::fs::create_dir_all(&root).unwrap();
        // The accounts E2B's SDKs run commands as (`user`, `root`), both this process's own uid: the fake VMs'
        // agent runs on the host.
        let (uid, gid) = (std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&root).unwrap()), unsafe {
            // SAFETY: getgid(2) has no preconditions.
            libc::getgid()
        });
        for d in ["etc", "root", "home/user", "tmp"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(
            root.join("etc/passwd"),
            format!("root:x:{uid}:{gid}:root:/root:/bin/sh\nuser:x:{uid}:{gid}:user:/home/user:/bin/sh\n"),
        )
        .unwrap();
        extern "C" fn remove_root() {
            let _ = std::fs::remove_dir_all(agent_root());
        }
        // SAFETY: atexit(3) with a plain function that only removes this process's own temporary directory;
        // it runs once, when the test process exits, after every test (and every use of the agent) has ended.
        unsafe { libc::atexit(remove_root) };
        let agent = Agent::new(Settings { root: root.clone(), hooks_dir: root.join("hooks"), ..Default::default() });
        rt.spawn(agent.reaper.clone().run());
        (rt, agent)
    })
}

struct FakeVm {
    dir: PathBuf,
    start: u64,
    config: VmConfig,
    alive: bool,
    paused: bool,
    /// Stopped by `freeze` (SIGSTOP for a real VMM).
    frozen: bool,
    exit: tokio::sync::watch::Sender<bool>,
    agent_task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Inner {
    vms: Mutex<HashMap<u32, FakeVm>>,
    next_pid: AtomicU32,
    /// The next this many VMs get no agent (a guest that never answers).
    silent: AtomicU32,
    /// The next this many VMs get an agent that answers its hello and refuses everything else (a refresh fails).
    refusing: AtomicU32,
    /// The next this many spawns fail.
    failing_spawns: AtomicU32,
    /// Standby "VMMs" waiting (pid → directory, uid), and how many were handed a VM.
    standbys: Mutex<HashMap<u32, (PathBuf, u32)>>,
    handovers: AtomicU32,
}

#[derive(Clone, Default)]
pub struct FakeLauncher {
    inner: Arc<Inner>,
}

impl FakeLauncher {
    pub fn pid_of(&self, dir: &Path) -> Option<u32> {
        lock(&self.inner.vms).iter().find(|(_, v)| v.dir == dir && v.alive).map(|(p, _)| *p)
    }

    /// The next `n` VMs started get no agent: their guest never answers.
    pub fn silence_next_agents(&self, n: u32) {
        self.inner.silent.store(n, Ordering::Relaxed);
    }

    /// The next `n` VMs' agents answer their hello and refuse every request after it.
    pub fn refuse_next_agents(&self, n: u32) {
        self.inner.refusing.store(n, Ordering::Relaxed);
    }

    /// The next `n` spawns fail (as a VMM that cannot start).
    pub fn fail_next_spawns(&self, n: u32) {
        self.inner.failing_spawns.store(n, Ordering::Relaxed);
    }

    /// Whether the VM in `dir` is stopped by `freeze`.
    pub fn frozen(&self, dir: &Path) -> bool {
        lock(&self.inner.vms).values().any(|v| v.dir == dir && v.alive && v.frozen)
    }

    pub fn running(&self) -> usize {
        lock(&self.inner.vms).values().filter(|v| v.alive).count()
    }

    /// Standbys waiting, and how many were handed a VM so far.
    pub fn standbys(&self) -> (usize, u32) {
        (lock(&self.inner.standbys).len(), self.inner.handovers.load(Ordering::Relaxed))
    }
}

impl Inner {
    fn kill(&self, pid: u32) {
        if let Some(v) = lock(&self.vms).get_mut(&pid) {
            if v.alive {
                v.alive = false;
                v.agent_task.abort();
                let _ = std::fs::remove_file(v.dir.join("agent.sock"));
                let _ = v.exit.send(true);
            }
        }
    }
}

impl Launcher for FakeLauncher {
    fn spawn(
        &self,
        dir: &Path,
        spec: &LaunchSpec,
        _jail: Option<crate::launcher::Confinement>,
    ) -> Result<Proc, VmmError> {
        let config = match &spec.launch {
            Launch::Boot(c) => c.clone(),
            Launch::Restore(r) => {
                let text = std::fs::read(&r.state_path)
                    .map_err(|source| VmmError::Io { what: "fake state".into(), source })?;
                let mut c: VmConfig = serde_json::from_slice(&text)
                    .map_err(|e| VmmError::Malformed { what: "fake state", why: e.to_string() })?;
                // As flint-vmm: never a host path from the snapshot.
                let paths = r.devices.drive_paths.clone().unwrap_or_default();
                if paths.len() != c.drives.len() {
                    return Err(VmmError::Malformed {
                        what: "restore",
                        why: format!("{} drive paths given, the snapshot has {} drives", paths.len(), c.drives.len()),
                    });
                }
                for (d, p) in c.drives.iter_mut().zip(paths) {
                    d.path = p;
                }
                c
            }
        };
        config.validate_limits()?;
        let take = |n: &AtomicU32| n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
        if take(&self.inner.failing_spawns) {
            return Err(VmmError::Io { what: "start the fake VMM".into(), source: std::io::Error::other("injected") });
        }
        let pid = 1_000_000 + self.inner.next_pid.fetch_add(1, Ordering::Relaxed);
        let (rt, agent) = agent_runtime();
        let sock = dir.join("agent.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = {
            let _enter = rt.enter();
            Listener::bind(&ListenAddr::Unix(sock))
                .map_err(|source| VmmError::Io { what: "fake agent".into(), source })?
        };
        let agent = agent.clone();
        let silent = take(&self.inner.silent);
        let refusing = take(&self.inner.refusing);
        let agent_task = rt.spawn(async move {
            if silent {
                // Accepts nothing: connections wait in the backlog and the hello never comes.
                let _keep = listener;
                std::future::pending::<()>().await;
                return;
            }
            while let Ok(s) = listener.accept().await {
                if refusing {
                    tokio::spawn(refuse_after_hello(s));
                } else {
                    tokio::spawn(serve_connection(agent.clone(), s));
                }
            }
        });
        let (exit, _) = tokio::sync::watch::channel(false);
        let vm = FakeVm {
            dir: dir.to_path_buf(),
            start: 7,
            config,
            alive: true,
            paused: false,
            frozen: false,
            exit,
            agent_task,
        };
        lock(&self.inner.vms).insert(pid, vm);
        Ok(Proc { pid, start: 7 })
    }

    fn standby(&self, dir: &Path, jail: crate::launcher::Confinement) -> Result<crate::launcher::Standby, VmmError> {
        if !dir.is_dir() {
            return Err(VmmError::Io { what: "fake standby".into(), source: std::io::Error::other("no directory") });
        }
        let pid = 1_000_000 + self.inner.next_pid.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.standbys).insert(pid, (dir.to_path_buf(), jail.uid));
        Ok(crate::launcher::Standby {
            proc: Proc { pid, start: STANDBY_START },
            dir: dir.to_path_buf(),
            uid: jail.uid,
            mem_mib: jail.mem_mib,
            ctl: None,
        })
    }

    fn hand_over(
        &self,
        s: crate::launcher::Standby,
        dir: &Path,
        spec: &LaunchSpec,
        jail: crate::launcher::Confinement,
    ) -> Result<Proc, VmmError> {
        let known = lock(&self.inner.standbys).remove(&s.proc.pid);
        let refuse =
            |why: String| Err(VmmError::Io { what: "fake hand-over".into(), source: std::io::Error::other(why) });
        match known {
            None => return refuse(format!("standby {} is not waiting", s.proc.pid)),
            Some((_, uid)) if uid != jail.uid => return refuse(format!("uid {} for standby of uid {uid}", jail.uid)),
            Some(_) if !dir.is_dir() => {
                return refuse(format!("{} is not the renamed standby directory", dir.display()))
            }
            Some(_) => {}
        }
        self.inner.handovers.fetch_add(1, Ordering::Relaxed);
        self.spawn(dir, spec, Some(jail))
    }

    fn alive(&self, p: Proc) -> bool {
        if p.start == STANDBY_START && lock(&self.inner.standbys).contains_key(&p.pid) {
            return true;
        }
        lock(&self.inner.vms).get(&p.pid).is_some_and(|v| v.alive && v.start == p.start)
    }

    fn kill(&self, p: Proc) {
        lock(&self.inner.standbys).remove(&p.pid);
        self.inner.kill(p.pid);
    }

    fn freeze(&self, p: Proc, frozen: bool) {
        if let Some(v) = lock(&self.inner.vms).get_mut(&p.pid).filter(|v| v.alive && v.start == p.start) {
            v.frozen = frozen;
        }
    }

    fn exited(&self, p: Proc) -> BoxFut<'static, String> {
        let rx = lock(&self.inner.vms).get(&p.pid).map(|v| v.exit.subscribe());
        Box::pin(async move {
            if let Some(mut rx) = rx {
                let _ = rx.wait_for(|dead| *dead).await;
            }
            "killed".to_string()
        })
    }

    fn vmm(&self, dir: &Path, _jailed: bool) -> Arc<dyn VmmControl> {
        Arc::new(FakeVmm { inner: self.inner.clone(), pid: self.pid_of(dir) })
    }

    fn agent_endpoint(&self, dir: &Path) -> Endpoint {
        Endpoint::Unix(dir.join("agent.sock"))
    }

    fn running_under(&self, vms_dir: &Path) -> Vec<(Proc, PathBuf)> {
        lock(&self.inner.vms)
            .iter()
            .filter(|(_, v)| v.alive && v.dir.parent() == Some(vms_dir))
            .map(|(pid, v)| (Proc { pid: *pid, start: v.start }, v.dir.clone()))
            .collect()
    }
}

/// The start time of the fake's standbys (its VMs have 7).
const STANDBY_START: u64 = 8;

/// An agent that answers its hello and refuses every request after it.
async fn refuse_after_hello(s: tokio::net::UnixStream) {
    use flint_agent::protocol::{read_frame, write_frame, ErrorCode, Frame, Request, Response, PROTOCOL_VERSION};
    let (mut rd, mut wr) = tokio::io::split(s);
    while let Ok(f) = read_frame(&mut rd).await {
        let answer = match serde_json::from_slice::<Request>(&f.payload) {
            Ok(Request::Hello { .. }) => Response::Hello { version: PROTOCOL_VERSION, agent: "refusing".into() },
            _ => Response::Error { code: ErrorCode::Io, message: "refused by the test".into() },
        };
        if write_frame(&mut wr, &Frame::json(f.stream, &answer)).await.is_err() {
            return;
        }
        let _ = tokio::io::AsyncWriteExt::flush(&mut wr).await;
    }
}

struct FakeVmm {
    inner: Arc<Inner>,
    pid: Option<u32>,
}

impl FakeVmm {
    fn with<T>(&self, f: impl FnOnce(&mut FakeVm) -> T) -> Result<T, VmmError> {
        let mut vms = lock(&self.inner.vms);
        match self.pid.and_then(|p| vms.get_mut(&p)).filter(|v| v.alive) {
            Some(v) => Ok(f(v)),
            None => Err(VmmError::Refused { path: "/".into(), status: 502, message: "connection refused".into() }),
        }
    }
}

impl VmmControl for FakeVmm {
    fn describe(&self) -> BoxFut<'_, Result<VmDescription, VmmError>> {
        Box::pin(async move {
            self.with(|v| VmDescription {
                state: if v.paused { RunState::Paused } else { RunState::Running },
                exit: None,
                host_profile: HostProfile::Hardware,
                config: v.config.clone(),
                cmdline: String::new(),
                timings: BootTimings::default(),
                vcpus: vec![Default::default(); v.config.vcpus as usize],
                devices: Vec::new(),
                unhandled_pio: 0,
                unhandled_mmio: 0,
                restore: None,
                uffd: None,
                rss_kib: None,
            })
        })
    }
    fn pause(&self) -> BoxFut<'_, Result<(), VmmError>> {
        Box::pin(async move { self.with(|v| v.paused = true) })
    }
    fn resume(&self) -> BoxFut<'_, Result<(), VmmError>> {
        Box::pin(async move { self.with(|v| v.paused = false) })
    }
    fn shutdown(&self) -> BoxFut<'_, Result<(), VmmError>> {
        Box::pin(async move {
            self.with(|_| ())?;
            if let Some(p) = self.pid {
                self.inner.kill(p);
            }
            Ok(())
        })
    }
    fn snapshot(&self, req: SnapshotRequest) -> BoxFut<'_, Result<SnapshotReport, VmmError>> {
        Box::pin(async move {
            let config = self.with(|v| {
                v.paused |= !req.resume;
                v.config.clone()
            })?;
            let io = |source: std::io::Error| VmmError::Io { what: "fake snapshot".into(), source };
            std::fs::write(&req.state_path, serde_json::to_vec(&config).unwrap_or_default()).map_err(io)?;
            std::fs::write(&req.mem_path, vec![7u8; 8192]).map_err(io)?;
            Ok(SnapshotReport {
                vcpus: config.vcpus,
                mem_mib: config.mem_mib,
                format_version: 2,
                drives: config.drives.len() as u32,
                ..Default::default()
            })
        })
    }
}

/// flintd "crashes": the daemon is dropped with nothing stopped; returns once nothing of it is left (its tasks
/// ended, its database closed), so a new daemon can open the same data directory.
pub async fn crash(d: Arc<crate::daemon::Daemon>) {
    let db = Arc::downgrade(&d.db);
    drop(d);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while db.strong_count() > 0 {
        assert!(std::time::Instant::now() < deadline, "the old daemon's database is still held");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Waits (polling every 20 ms) until `f` holds, at most 20 s.
pub async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what}: not within 20 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A data directory and configuration for a daemon on the fake launcher (one fake image), removed on drop.
pub struct TestEnv {
    pub dir: PathBuf,
    pub cfg: crate::config::Config,
}

impl TestEnv {
    pub fn new(tag: &str) -> TestEnv {
        let dir = std::env::temp_dir().join(format!("flintd-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let img = dir.join("image");
        std::fs::create_dir_all(&img).unwrap();
        std::fs::write(img.join("vmlinux"), b"x").unwrap();
        std::fs::write(img.join("initramfs.cpio"), b"x").unwrap();
        let mut cfg = crate::config::Config { data_dir: dir.join("data"), agent_timeout_s: 10, ..Default::default() };
        cfg.images.insert("default".into(), img);
        TestEnv { dir, cfg }
    }

    pub fn open(&self, l: &FakeLauncher) -> Arc<crate::daemon::Daemon> {
        let net = crate::net::Networks::with_fake_host(self.cfg.network.clone(), &self.cfg.data_dir);
        crate::daemon::Daemon::open_parts(self.cfg.clone(), Arc::new(l.clone()), Arc::new(net)).unwrap()
    }

    /// Whether anything of a VM is left on the host: its directory, its network namespace (the fake host's
    /// file), its record.
    pub fn leftovers(&self, d: &crate::daemon::Daemon, id: &str) -> Vec<String> {
        let mut left = Vec::new();
        if self.cfg.data_dir.join("vms").join(id).exists() {
            left.push("directory".into());
        }
        if self.cfg.data_dir.join("netns").join(id).exists() {
            left.push("network namespace".into());
        }
        if d.vms.contains(id) {
            left.push("VM".into());
        }
        if d.db.get::<crate::vm::VmRecord>(crate::db::VMS, id).ok().flatten().is_some() {
            left.push("record".into());
        }
        left
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
