//! The VM manager: one `flint-vmm` child per VM, records in the state database, snapshots in the store.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flint_agent::client::{AgentClient, Endpoint};
use flint_snapshot_store::{ImageSource, SnapshotDraft, SnapshotInfo, Store, StoreConfig, StoreError};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::Config;
use crate::db::{Db, TEMPLATES, VMS};
use crate::http;

/// What a failed operation tells the API caller; mapped to an HTTP status in `api.rs`.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    VmFailed(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        let msg = flint_snapshot_store::error_chain(&e);
        match e {
            StoreError::InvalidInput(_) => OpError::BadRequest(msg),
            StoreError::NotFound { .. } | StoreError::NoImage { .. } => OpError::NotFound(msg),
            StoreError::Unavailable(_) | StoreError::NoRemote => OpError::Unavailable(msg),
            _ => OpError::Internal(msg),
        }
    }
}

impl From<crate::db::DbError> for OpError {
    fn from(e: crate::db::DbError) -> Self {
        OpError::Internal(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    Starting,
    Running,
    Paused,
    Stopping,
    Failed,
    /// flintd restarted and the VMM process was gone.
    Lost,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub status: VmStatus,
    pub pid: Option<u32>,
    /// Process start time (clock ticks since boot, /proc/PID/stat field 22): tells our VMM from a reused pid.
    pub pid_start: Option<u64>,
    pub dir: PathBuf,
    pub image: Option<String>,
    /// Snapshot (or template's snapshot) the VM was restored from.
    pub snapshot: Option<String>,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub created_unix_ms: u64,
    /// VMM start → agent answers.
    pub ready_ms: Option<f64>,
    /// For restored VMs: fetching the snapshot's images from the store.
    pub fetch_ms: Option<f64>,
    pub error: Option<String>,
    /// Restored lazily: memory is fetched from the store as the guest touches it.
    #[serde(default)]
    pub lazy: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub name: String,
    pub image: String,
    pub init: Vec<String>,
    pub snapshot: String,
    pub created_unix_ms: u64,
    pub boot_ms: f64,
    pub init_ms: f64,
    pub snapshot_ms: f64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub mem_mib: Option<u64>,
    #[serde(default)]
    pub vcpus: Option<u8>,
    /// Extra block devices (host paths), in order: /dev/vda, /dev/vdb, ...
    #[serde(default)]
    pub drives: Vec<DriveSpec>,
    /// Environment for the VM's execs (set through the agent once it answers).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DriveSpec {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    pub id: String,
    /// Upload to the remote tier too.
    #[serde(default)]
    pub publish: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    pub name: String,
    #[serde(default)]
    pub image: Option<String>,
    /// Command run once in the fresh VM before the snapshot (e.g. warm up a runtime).
    #[serde(default)]
    pub init: Vec<String>,
    #[serde(default)]
    pub publish: bool,
    #[serde(default)]
    pub mem_mib: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateClones {
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default = "one")]
    pub count: u32,
    /// Environment for the clones' later execs (set by the agent's refresh).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Start before the memory has arrived: pages come from the store (L1, else S3) on first touch, the recorded
    /// working set is prefetched. Otherwise the memory image is fetched whole first.
    #[serde(default)]
    pub lazy: bool,
}

fn one() -> u32 {
    1
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Start time of a process (to recognise our VMM after a flintd restart), or None if it is gone.
pub fn pid_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    // Fields after the command: state is field 3; starttime is field 22.
    let state = after.split_whitespace().next()?;
    if state == "Z" {
        return None;
    }
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Counters for /metrics.
#[derive(Default)]
pub struct Metrics {
    pub boots: AtomicU64,
    pub boot_ms_sum: AtomicU64,
    pub restores: AtomicU64,
    pub restore_ms_sum: AtomicU64,
    pub snapshots: AtomicU64,
    pub snapshot_ms_sum: AtomicU64,
    pub vm_failures: AtomicU64,
    pub requests: AtomicU64,
}

pub struct Daemon {
    pub cfg: Config,
    store_spec: flint_snapshot_store::StoreSpec,
    db: Db,
    pub store: Store,
    vms: Mutex<HashMap<String, VmRecord>>,
    agents: tokio::sync::Mutex<HashMap<String, Arc<AgentClient>>>,
    restore_slots: tokio::sync::Semaphore,
    pub metrics: Metrics,
    seq: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn valid_id(what: &str, id: &str) -> Result<(), OpError> {
    flint_snapshot_store::manifest::check_name(what, id).map_err(OpError::BadRequest)
}

impl Daemon {
    pub fn open(cfg: Config) -> Result<Arc<Daemon>, String> {
        std::fs::create_dir_all(cfg.data_dir.join("vms"))
            .map_err(|e| format!("create {}: {e}", cfg.data_dir.join("vms").display()))?;
        let db = Db::open(&cfg.data_dir.join("flintd.redb")).map_err(|e| e.to_string())?;
        let mut scfg = StoreConfig::new(&cfg.data_dir.join("store"));
        scfg.local_budget = cfg.store.local_budget_bytes;
        scfg.chunk_size = cfg.store.chunk_size;
        scfg.s3 = cfg.store.s3.clone();
        if let Some(f) = &cfg.store.secret_file {
            let text = std::fs::read_to_string(f).map_err(|e| format!("read {}: {e}", f.display()))?;
            scfg.secret = Some(flint_snapshot_store::Secret::from_hex(&text)?);
        }
        let store = Store::open(scfg).map_err(|e| format!("snapshot store: {e}"))?;
        let store_spec = flint_snapshot_store::StoreSpec {
            local_dir: cfg.data_dir.join("store"),
            local_budget: cfg.store.local_budget_bytes,
            secret_file: cfg.store.secret_file.clone(),
            s3: cfg.store.s3.clone(),
        };
        let slots = cfg.max_parallel_restores.max(1);
        let d = Arc::new(Daemon {
            cfg,
            store_spec,
            db,
            store,
            vms: Mutex::new(HashMap::new()),
            agents: tokio::sync::Mutex::new(HashMap::new()),
            restore_slots: tokio::sync::Semaphore::new(slots),
            metrics: Metrics::default(),
            seq: AtomicU64::new(0),
        });
        d.adopt()?;
        Ok(d)
    }

    /// After a restart: VMMs still running (same pid and start time) are adopted and watched again; the rest are
    /// marked lost.
    fn adopt(self: &Arc<Self>) -> Result<(), String> {
        let records: Vec<VmRecord> = self.db.all(VMS).map_err(|e| e.to_string())?;
        for mut rec in records {
            let alive = rec.pid.and_then(pid_start_time).is_some_and(|t| Some(t) == rec.pid_start);
            if matches!(rec.status, VmStatus::Running | VmStatus::Paused | VmStatus::Starting) {
                if alive {
                    info!(vm = %rec.id, pid = ?rec.pid, "re-adopted a running VMM");
                    if let Some(pid) = rec.pid {
                        self.watch_adopted(rec.id.clone(), pid, rec.pid_start);
                    }
                } else {
                    warn!(vm = %rec.id, "VMM is gone after a flintd restart; marking the VM lost");
                    rec.status = VmStatus::Lost;
                    rec.error = Some("the VMM process was not running when flintd restarted".into());
                    let _ = self.db.put(VMS, &rec.id, &rec);
                }
            }
            lock(&self.vms).insert(rec.id.clone(), rec);
        }
        Ok(())
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut VmRecord)) -> Option<VmRecord> {
        let rec = {
            let mut vms = lock(&self.vms);
            let rec = vms.get_mut(id)?;
            f(rec);
            rec.clone()
        };
        let _ = self.db.put(VMS, id, &rec);
        Some(rec)
    }

    pub fn list(&self) -> Vec<VmRecord> {
        let mut v: Vec<VmRecord> = lock(&self.vms).values().cloned().collect();
        v.sort_by(|a, b| a.created_unix_ms.cmp(&b.created_unix_ms).then(a.id.cmp(&b.id)));
        v
    }

    pub fn get(&self, id: &str) -> Result<VmRecord, OpError> {
        lock(&self.vms).get(id).cloned().ok_or_else(|| OpError::NotFound(format!("no VM `{id}`")))
    }

    /// The VMM's own description (timings, restore breakdown, userfaultfd and store counters), if it answers.
    pub async fn vmm_describe(&self, id: &str) -> Option<serde_json::Value> {
        let rec = self.get(id).ok()?;
        rec.pid?;
        let (status, body) =
            http::request(&rec.dir.join("api.sock"), "GET", "/vm", None, Duration::from_secs(5)).await.ok()?;
        if status != 200 {
            return None;
        }
        serde_json::from_slice(&body).ok()
    }

    /// Named images: the config's, then directories under `<data_dir>/images`.
    pub fn images(&self) -> BTreeMap<String, PathBuf> {
        let mut out = self.cfg.images.clone();
        if let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join("images")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                out.entry(name).or_insert_with(|| e.path());
            }
        }
        out.retain(|_, dir| dir.join("vmlinux").is_file() && dir.join("initramfs.cpio").is_file());
        out
    }

    fn new_id(&self, prefix: &str) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut r = [0u8; 3];
        let _ = getrandom::getrandom(&mut r);
        format!("{prefix}-{:x}{n:x}{:02x}{:02x}{:02x}", now_ms() % 0x10000, r[0], r[1], r[2])
    }

    fn reserve(&self, id: Option<String>, prefix: &str) -> Result<(String, PathBuf), OpError> {
        let id = match id {
            Some(id) => {
                valid_id("VM id", &id)?;
                id
            }
            None => self.new_id(prefix),
        };
        let dir = self.cfg.data_dir.join("vms").join(&id);
        {
            let mut vms = lock(&self.vms);
            if vms.contains_key(&id) {
                return Err(OpError::Conflict(format!("VM `{id}` already exists")));
            }
            vms.insert(
                id.clone(),
                VmRecord {
                    id: id.clone(),
                    status: VmStatus::Starting,
                    pid: None,
                    pid_start: None,
                    dir: dir.clone(),
                    image: None,
                    snapshot: None,
                    mem_mib: 0,
                    vcpus: 0,
                    created_unix_ms: now_ms(),
                    ready_ms: None,
                    fetch_ms: None,
                    error: None,
                    lazy: false,
                },
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| OpError::Internal(format!("create {}: {e}", dir.display())))?;
        Ok((id, dir))
    }

    /// Spawns a VMM in its own session (it outlives a flintd crash) with stdout/stderr to `vmm.log`.
    fn spawn_vmm(self: &Arc<Self>, id: &str, dir: &Path, args: &[String]) -> Result<u32, OpError> {
        let log = std::fs::File::create(dir.join("vmm.log"))
            .map_err(|e| OpError::Internal(format!("create {}: {e}", dir.join("vmm.log").display())))?;
        let mut cmd = tokio::process::Command::new(self.cfg.vmm_bin());
        cmd.arg("--api-sock")
            .arg(dir.join("api.sock"))
            .arg("--vsock-uds")
            .arg(dir.join("vsock.sock"))
            .arg("--console")
            .arg(dir.join("console.log"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| OpError::Internal(e.to_string()))?)
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
        let mut child =
            cmd.spawn().map_err(|e| OpError::Internal(format!("start {}: {e}", self.cfg.vmm_bin().display())))?;
        let pid = child.id().ok_or_else(|| OpError::Internal("the VMM exited at once".into()))?;
        let start = pid_start_time(pid);
        self.update(id, |r| {
            r.pid = Some(pid);
            r.pid_start = start;
        });
        let this = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let status = child.wait().await;
            this.vmm_exited(&id, status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()));
        });
        Ok(pid)
    }

    fn watch_adopted(self: &Arc<Self>, id: String, pid: u32, start: Option<u64>) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if pid_start_time(pid) != start {
                    this.vmm_exited(&id, "exited (adopted process)".into());
                    return;
                }
            }
        });
    }

    fn vmm_exited(&self, id: &str, how: String) {
        let log_tail = {
            let dir = lock(&self.vms).get(id).map(|r| r.dir.clone());
            dir.and_then(|d| std::fs::read_to_string(d.join("vmm.log")).ok())
                .map(|t| t.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | "))
                .unwrap_or_default()
        };
        let rec = self.update(id, |r| {
            if r.status != VmStatus::Stopping {
                r.status = VmStatus::Failed;
                r.error = Some(format!("VMM {how}: {log_tail}"));
            }
            r.pid = None;
        });
        if let Some(rec) = rec {
            if rec.status == VmStatus::Failed {
                self.metrics.vm_failures.fetch_add(1, Ordering::Relaxed);
                warn!(vm = %id, error = ?rec.error, "VM failed");
            }
        }
    }

    fn endpoint(dir: &Path) -> Endpoint {
        Endpoint::Vsock { uds: dir.join("vsock.sock"), port: flint_agent::protocol::DEFAULT_PORT }
    }

    /// The agent of a running VM (one connection per VM, reconnected when it breaks).
    pub async fn agent(&self, id: &str) -> Result<Arc<AgentClient>, OpError> {
        let rec = self.get(id)?;
        if rec.status != VmStatus::Running {
            return Err(OpError::Conflict(format!("VM `{id}` is {:?}, not running", rec.status).to_lowercase()));
        }
        // One cached connection per VM; reconnect (without holding the map) when it has ended.
        if let Some(a) = self.agents.lock().await.get(id).filter(|a| !a.is_closed()) {
            return Ok(a.clone());
        }
        let a = Arc::new(
            AgentClient::connect(&Self::endpoint(&rec.dir), Duration::from_secs(10))
                .await
                .map_err(|e| OpError::VmFailed(format!("VM `{id}`: agent: {e}")))?,
        );
        self.agents.lock().await.insert(id.to_string(), a.clone());
        Ok(a)
    }

    async fn wait_agent(&self, id: &str, dir: &Path) -> Result<Arc<AgentClient>, OpError> {
        let deadline = Duration::from_secs(self.cfg.agent_timeout_s);
        let started = Instant::now();
        loop {
            let rec = self.get(id)?;
            if rec.status == VmStatus::Failed {
                return Err(OpError::VmFailed(format!(
                    "VM `{id}` failed while starting: {}",
                    rec.error.unwrap_or_default()
                )));
            }
            match AgentClient::connect(&Self::endpoint(dir), Duration::from_secs(5)).await {
                Ok(a) => {
                    let a = Arc::new(a);
                    self.agents.lock().await.insert(id.to_string(), a.clone());
                    return Ok(a);
                }
                Err(e) if started.elapsed() > deadline => {
                    return Err(OpError::VmFailed(format!(
                        "VM `{id}`: the agent did not answer within {deadline:?}: {e}"
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Boots a VM from an image and waits until its agent answers.
    pub async fn create(self: &Arc<Self>, req: CreateVm) -> Result<VmRecord, OpError> {
        let images = self.images();
        let image = req.image.clone().unwrap_or_else(|| "default".into());
        let dir_img = images.get(&image).cloned().ok_or_else(|| {
            OpError::BadRequest(format!(
                "no image `{image}` (known: {})",
                images.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let mem = req.mem_mib.unwrap_or(self.cfg.vm.mem_mib);
        let vcpus = req.vcpus.unwrap_or(self.cfg.vm.vcpus);
        if !(64..=65536).contains(&mem) {
            return Err(OpError::BadRequest(format!("mem_mib {mem} is out of range (64-65536)")));
        }
        if !(1..=32).contains(&vcpus) {
            return Err(OpError::BadRequest(format!("vcpus {vcpus} is out of range (1-32)")));
        }
        for d in &req.drives {
            if !d.path.is_absolute() || !d.path.is_file() {
                return Err(OpError::BadRequest(format!(
                    "drive {} is not an existing file (absolute path)",
                    d.path.display()
                )));
            }
        }
        if req.drives.len() > 8 {
            return Err(OpError::BadRequest(format!("{} drives: at most 8", req.drives.len())));
        }
        let (id, dir) = self.reserve(req.id, "vm")?;
        self.update(&id, |r| {
            r.image = Some(image.clone());
            r.mem_mib = mem;
            r.vcpus = vcpus;
        });
        let started = Instant::now();
        let mut args = vec![
            "--kernel".to_string(),
            dir_img.join("vmlinux").display().to_string(),
            "--initramfs".into(),
            dir_img.join("initramfs.cpio").display().to_string(),
            "--mem".into(),
            mem.to_string(),
            "--vcpus".into(),
            vcpus.to_string(),
        ];
        for d in &req.drives {
            args.push("--drive".into());
            args.push(format!("{}{}", d.path.display(), if d.read_only { ",ro" } else { "" }));
        }
        let result = async {
            self.spawn_vmm(&id, &dir, &args)?;
            let agent = self.wait_agent(&id, &dir).await?;
            if !req.env.is_empty() {
                agent
                    .refresh(req.env.clone(), Some(id.clone()))
                    .await
                    .map_err(|e| OpError::VmFailed(format!("set env: {e}")))?;
            }
            Ok(agent)
        }
        .await;
        self.finish_start(&id, started, result.map(|_| ()), false)
    }

    fn finish_start(
        &self,
        id: &str,
        started: Instant,
        result: Result<(), OpError>,
        restore: bool,
    ) -> Result<VmRecord, OpError> {
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok(()) => {
                let (count, sum) = if restore {
                    (&self.metrics.restores, &self.metrics.restore_ms_sum)
                } else {
                    (&self.metrics.boots, &self.metrics.boot_ms_sum)
                };
                count.fetch_add(1, Ordering::Relaxed);
                sum.fetch_add(ms as u64, Ordering::Relaxed);
                let rec = self
                    .update(id, |r| {
                        r.status = VmStatus::Running;
                        r.ready_ms = Some(ms);
                    })
                    .ok_or_else(|| OpError::NotFound(format!("VM `{id}` vanished")))?;
                info!(vm = %id, ms, restore, "VM running");
                Ok(rec)
            }
            Err(e) => {
                // Leave a failed record (for `flint vm ls`) but no running process.
                if let Some(pid) = self.get(id).ok().and_then(|r| r.pid) {
                    // SAFETY: kill(2) on the VMM's pid, which we spawned and have not reaped.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                self.update(id, |r| {
                    r.status = VmStatus::Failed;
                    r.error = Some(e.to_string());
                });
                Err(e)
            }
        }
    }

    /// Stops a VM (agent shutdown, then the VMM's API, then SIGKILL) and forgets it.
    pub async fn delete(&self, id: &str) -> Result<(), OpError> {
        let rec = self.get(id)?;
        self.update(id, |r| r.status = VmStatus::Stopping);
        self.agents.lock().await.remove(id);
        if let Some(pid) = rec.pid.filter(|p| pid_start_time(*p).is_some() && pid_start_time(*p) == rec.pid_start) {
            let _ = http::request(&rec.dir.join("api.sock"), "PUT", "/vm/shutdown", None, Duration::from_secs(5)).await;
            let deadline = Instant::now() + Duration::from_secs(5);
            while pid_start_time(pid) == rec.pid_start && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if pid_start_time(pid) == rec.pid_start {
                // SAFETY: kill(2) on our VMM's pid, checked against its start time just above.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        lock(&self.vms).remove(id);
        self.db.delete(VMS, id)?;
        let _ = std::fs::remove_dir_all(&rec.dir);
        info!(vm = %id, "VM deleted");
        Ok(())
    }

    pub async fn pause(&self, id: &str, pause: bool) -> Result<VmRecord, OpError> {
        let rec = self.get(id)?;
        let want = if pause { VmStatus::Running } else { VmStatus::Paused };
        if rec.status != want {
            return Err(OpError::Conflict(format!("VM `{id}` is {:?}", rec.status).to_lowercase()));
        }
        let path = if pause { "/vm/pause" } else { "/vm/resume" };
        let (status, body) = http::request(&rec.dir.join("api.sock"), "PUT", path, None, Duration::from_secs(10))
            .await
            .map_err(|e| OpError::VmFailed(format!("VM `{id}`: {e}")))?;
        if status >= 300 {
            return Err(OpError::VmFailed(format!("VM `{id}`: {path}: {}", String::from_utf8_lossy(&body))));
        }
        self.update(id, |r| r.status = if pause { VmStatus::Paused } else { VmStatus::Running })
            .ok_or_else(|| OpError::NotFound(format!("no VM `{id}`")))
    }

    /// Snapshots a running VM into the store: before-checkpoint hook, VMM snapshot (the VM resumes), put.
    pub async fn snapshot(&self, vm: &str, req: CreateSnapshot) -> Result<SnapshotInfo, OpError> {
        valid_id("snapshot id", &req.id)?;
        let rec = self.get(vm)?;
        let agent = self.agent(vm).await?;
        agent.before_checkpoint().await.map_err(|e| OpError::VmFailed(format!("before-checkpoint hook: {e}")))?;
        let started = Instant::now();
        let tmp = rec.dir.join(format!("snap-{}", req.id));
        std::fs::create_dir_all(&tmp).map_err(|e| OpError::Internal(e.to_string()))?;
        let body = serde_json::json!({"state_path": tmp.join("state"), "mem_path": tmp.join("memory"), "resume": true});
        let result = async {
            let (status, out) = http::request(
                &rec.dir.join("api.sock"),
                "PUT",
                "/snapshot/create",
                Some(body.to_string().as_bytes()),
                Duration::from_secs(300),
            )
            .await
            .map_err(|e| OpError::VmFailed(format!("VM `{vm}`: {e}")))?;
            if status >= 300 {
                return Err(OpError::VmFailed(format!("VM `{vm}`: snapshot: {}", String::from_utf8_lossy(&out))));
            }
            let mut draft = SnapshotDraft::new(&req.id)
                .image("state", ImageSource::File(tmp.join("state")))
                .image("memory", ImageSource::File(tmp.join("memory")));
            draft.parent = rec.snapshot.clone();
            draft.vmm_format = Some(1);
            draft.metadata.insert("vm".into(), vm.to_string());
            if let Some(i) = &rec.image {
                draft.metadata.insert("image".into(), i.clone());
            }
            draft.metadata.insert("mem_mib".into(), rec.mem_mib.to_string());
            let (manifest, _) = self.store.put(draft, req.publish).await?;
            Ok(manifest)
        }
        .await;
        let _ = std::fs::remove_dir_all(&tmp);
        let manifest = result?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        self.metrics.snapshot_ms_sum.fetch_add(ms as u64, Ordering::Relaxed);
        info!(vm, snapshot = %req.id, ms, "snapshot stored");
        // From the manifest just written: no listing of every snapshot in S3 to describe one.
        Ok(self.store.describe(&manifest, true, req.publish))
    }

    /// Restores one VM from a snapshot, then refreshes the guest's clock, entropy, env and hostname through the
    /// agent. Eager: the images are fetched whole from the store (S3 on a miss) first. Lazy: only the state image;
    /// the VMM serves memory from the store on first touch and prefetches the recorded working set; the first lazy
    /// restore of a snapshot records that working set.
    pub async fn restore(
        self: &Arc<Self>,
        snapshot: &str,
        env: &BTreeMap<String, String>,
        lazy: bool,
    ) -> Result<VmRecord, OpError> {
        let manifest = self.store.manifest(snapshot).await?;
        let _slot = self.restore_slots.acquire().await.map_err(|e| OpError::Internal(e.to_string()))?;
        let (id, dir) = self.reserve(None, "clone")?;
        let mem_mib = manifest.metadata.get("mem_mib").and_then(|m| m.parse().ok()).unwrap_or(0);
        self.update(&id, |r| {
            r.snapshot = Some(snapshot.to_string());
            r.image = manifest.metadata.get("image").cloned();
            r.mem_mib = mem_mib;
            r.vcpus = 1;
            r.lazy = lazy;
        });
        let started = Instant::now();
        let mut recorded = false;
        let result = async {
            let t = Instant::now();
            let _pin = self.store.pin(&manifest);
            self.store.get_image(snapshot, "state", &dir.join("state")).await?;
            let (mem_arg, mode) = if lazy {
                let prefetch = self.store.working_set(snapshot).await?.map(|w| w.chunks).unwrap_or_default();
                recorded = !prefetch.is_empty();
                let source = serde_json::json!({
                    "store": self.store_spec,
                    "snapshot": snapshot,
                    "image": "memory",
                    "prefetch": prefetch,
                });
                std::fs::write(dir.join("store-source.json"), source.to_string())
                    .map_err(|e| OpError::Internal(format!("write store source: {e}")))?;
                (dir.join("store-source.json"), "store")
            } else {
                self.store.get_image(snapshot, "memory", &dir.join("memory")).await?;
                (dir.join("memory"), "private")
            };
            let fetch_ms = t.elapsed().as_secs_f64() * 1000.0;
            self.update(&id, |r| r.fetch_ms = Some(fetch_ms));
            let args = vec![
                "--restore-state".to_string(),
                dir.join("state").display().to_string(),
                "--restore-mem".into(),
                mem_arg.display().to_string(),
                "--restore-mode".into(),
                mode.into(),
            ];
            self.spawn_vmm(&id, &dir, &args)?;
            let agent = self.wait_agent(&id, &dir).await?;
            agent
                .refresh(env.clone(), Some(id.clone()))
                .await
                .map_err(|e| OpError::VmFailed(format!("refresh: {e}")))?;
            Ok(())
        }
        .await;
        let rec = self.finish_start(&id, started, result, true)?;
        if lazy {
            if !recorded {
                self.record_working_set(&id, snapshot).await;
            }
            if let Err(e) = self.store.rescan() {
                warn!(error = %e, "could not rescan the local snapshot cache");
            }
        }
        Ok(rec)
    }

    /// Stores the chunks a lazily restored VM touched until its agent was ready and refreshed.
    async fn record_working_set(&self, id: &str, snapshot: &str) {
        let Some(d) = self.vmm_describe(id).await else { return };
        let units: Vec<u32> = d["uffd"]["touched_units"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64().map(|u| u as u32)).collect())
            .unwrap_or_default();
        if units.is_empty() {
            return;
        }
        match self.store.put_working_set(snapshot, "memory", &units).await {
            Ok(()) => info!(snapshot, chunks = units.len(), "recorded the restore working set"),
            Err(e) => warn!(snapshot, error = %e, "could not record the working set"),
        }
    }

    pub async fn clones(self: &Arc<Self>, req: CreateClones) -> Result<Vec<VmRecord>, OpError> {
        let snapshot = match (&req.template, &req.snapshot) {
            (Some(t), None) => self.template(t)?.snapshot,
            (None, Some(s)) => s.clone(),
            _ => return Err(OpError::BadRequest("give exactly one of `template` and `snapshot`".into())),
        };
        if req.count == 0 || req.count > 1000 {
            return Err(OpError::BadRequest(format!("count {} is out of range (1-1000)", req.count)));
        }
        // Fetch once (the clones then share the L1 chunks), then restore in parallel up to the slot limit.
        self.store.manifest(&snapshot).await?;
        let tasks: Vec<_> = (0..req.count)
            .map(|_| {
                let this = self.clone();
                let snapshot = snapshot.clone();
                let env = req.env.clone();
                let lazy = req.lazy;
                tokio::spawn(async move { this.restore(&snapshot, &env, lazy).await })
            })
            .collect();
        let mut out = Vec::new();
        let mut first_err = None;
        for t in tasks {
            match t.await {
                Ok(Ok(r)) => out.push(r),
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(e) => first_err = first_err.or(Some(OpError::Internal(e.to_string()))),
            }
        }
        match first_err {
            Some(e) if out.is_empty() => Err(e),
            Some(e) => {
                warn!(error = %e, ok = out.len(), "some clones failed");
                Ok(out)
            }
            None => Ok(out),
        }
    }

    pub fn templates(&self) -> Result<Vec<TemplateRecord>, OpError> {
        Ok(self.db.all(TEMPLATES)?)
    }

    pub fn template(&self, name: &str) -> Result<TemplateRecord, OpError> {
        self.templates()?
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| OpError::NotFound(format!("no template `{name}`")))
    }

    /// SnapStart: boot an image, run the init command once, snapshot, (publish), stop the VM.
    pub async fn create_template(self: &Arc<Self>, req: CreateTemplate) -> Result<TemplateRecord, OpError> {
        valid_id("template name", &req.name)?;
        if self.template(&req.name).is_ok() {
            return Err(OpError::Conflict(format!("template `{}` already exists", req.name)));
        }
        let snapshot = format!("tmpl-{}", req.name);
        if self.store.manifest(&snapshot).await.is_ok() {
            return Err(OpError::Conflict(format!("snapshot `{snapshot}` already exists")));
        }
        let vm = self.create(CreateVm { image: req.image.clone(), mem_mib: req.mem_mib, ..Default::default() }).await?;
        let result = async {
            let boot_ms = vm.ready_ms.unwrap_or(0.0);
            let t = Instant::now();
            if !req.init.is_empty() {
                let agent = self.agent(&vm.id).await?;
                let out = agent
                    .exec_output(flint_agent::protocol::ExecRequest {
                        argv: req.init.clone(),
                        timeout_ms: Some(self.cfg.agent_timeout_s * 1000),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| OpError::VmFailed(format!("init command: {e}")))?;
                if out.code != Some(0) {
                    return Err(OpError::BadRequest(format!(
                        "init command {:?} failed ({:?}): {}",
                        req.init,
                        out.code.map(|c| format!("exit {c}")).or(out.signal.map(|s| format!("signal {s}"))),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
            let init_ms = t.elapsed().as_secs_f64() * 1000.0;
            let t = Instant::now();
            self.snapshot(&vm.id, CreateSnapshot { id: snapshot.clone(), publish: req.publish }).await?;
            let rec = TemplateRecord {
                name: req.name.clone(),
                image: vm.image.clone().unwrap_or_default(),
                init: req.init.clone(),
                snapshot: snapshot.clone(),
                created_unix_ms: now_ms(),
                boot_ms,
                init_ms,
                snapshot_ms: t.elapsed().as_secs_f64() * 1000.0,
            };
            self.db.put(TEMPLATES, &rec.name, &rec)?;
            Ok(rec)
        }
        .await;
        let _ = self.delete(&vm.id).await;
        result
    }

    pub fn delete_template(&self, name: &str) -> Result<(), OpError> {
        self.template(name)?;
        Ok(self.db.delete(TEMPLATES, name)?)
    }

    /// Stops every VMM this daemon started (used by tests and `flintd --stop-vms-on-exit`).
    pub async fn stop_all(&self) {
        let ids: Vec<String> = lock(&self.vms).keys().cloned().collect();
        for id in ids {
            let _ = self.delete(&id).await;
        }
    }
}
