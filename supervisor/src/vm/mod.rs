//! The VM layer: [`Manager`] creates, restores, snapshots, pauses, resumes and deletes VMs, one `flint-vmm` per
//! VM through a [`Launcher`], and reports what happens to them as [`VmEvent`]s.
//!
//! Each VM has one owner, [`Vm`]: its record (durable, through [`Owner`]), its agent connection, and a cleanup
//! stack of everything it holds on the host ([`Resource`]: its place in the quotas and its uid and network block,
//! its directory and disks, its network namespace and DNS proxy, its VMM process and cgroup, its page server,
//! its plain TCP forwards), acquired in that order and released in reverse: by a delete, by a start that failed
//! at any step (then nothing of it is left, not even its record), and after re-adoption (the stack is rebuilt
//! from the record).
//!
//! The services above (sessions, pools, templates, networking, images) use this layer; it imports none of them.
//! A VM a service starts carries the service's opaque [`OwnerTag`].
mod adopt;
pub mod alloc;
pub mod error;
mod memory;
pub mod meta;
pub mod model;
mod ops;
mod snapshot;
mod standby;
mod start;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use flint_agent::client::AgentClient;
use flint_snapshot_store::Store;
use flint_vmm_api::{lock, now_unix_ms};
use tracing::warn;

use crate::config::Config;
use crate::db::{Db, VMS};
use crate::launcher::{Launcher, Proc};
use crate::net::Networks;
use crate::owner::Owner;
use crate::tasks::Tasks;

pub use error::{SnapshotError, StartError, VmError};
pub use memory::SnapshotDeleteError;
pub use model::*;
pub use ops::{HandOut, Route, VmDetail};
pub use snapshot::SnapshotHow;
pub use start::{check_disk_mib, Restore, StartFailure};

/// Something a VM holds on the host, released when the VM goes.
#[derive(Debug)]
pub(crate) enum Resource {
    /// Its place in the quotas, its uid, its network block ([`alloc::Allocator`]).
    Allocation,
    /// Its directory (disks, sockets, logs).
    Dir(PathBuf),
    /// Its network namespace, tap, veth, nftables table and DNS proxy.
    Network(crate::net::VmNet),
    /// Its VMM process and (jailed) cgroup.
    Process(Proc),
    /// The page server of a lazily restored VM.
    Pager(Arc<crate::pager::Served>),
    /// Plain TCP forwards of its exposed ports (a VM without an owner; an owner keeps its own).
    Forwards(Vec<(u16, u16, crate::net::forward::Forward)>),
}

impl Resource {
    fn name(&self) -> &'static str {
        match self {
            Resource::Allocation => "allocation",
            Resource::Dir(_) => "directory",
            Resource::Network(_) => "network",
            Resource::Process(_) => "process",
            Resource::Pager(_) => "pager",
            Resource::Forwards(_) => "forwards",
        }
    }
}

/// One VM: its record and everything it holds.
pub struct Vm {
    pub rec: Owner<VmRecord>,
    agent: tokio::sync::Mutex<Option<Arc<AgentClient>>>,
    stack: Mutex<Vec<Resource>>,
    /// The standby VMM taken for its start, until it is handed the launch spec.
    standby: Mutex<Option<crate::launcher::Standby>>,
}

impl Vm {
    fn new(rec: VmRecord, durable: bool) -> Arc<Vm> {
        Arc::new(Vm {
            rec: Owner::new(rec, VMS, durable),
            agent: Default::default(),
            stack: Mutex::new(Vec::new()),
            standby: Mutex::new(None),
        })
    }

    fn push(&self, r: Resource) {
        lock(&self.stack).push(r);
    }

    /// What the VM holds, by name, in acquisition order (tests).
    pub fn holds(&self) -> Vec<&'static str> {
        lock(&self.stack).iter().map(Resource::name).collect()
    }

    fn pager(&self) -> Option<Arc<crate::pager::Served>> {
        lock(&self.stack).iter().find_map(|r| match r {
            Resource::Pager(p) => Some(p.clone()),
            _ => None,
        })
    }
}

/// What happened to a VM, for the services that started it (a session whose VM died fails).
#[derive(Debug, Clone, PartialEq)]
pub struct VmEvent {
    pub id: String,
    pub owner: Option<OwnerTag>,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    Running,
    /// The VMM exited (or was killed) while it should have run.
    Failed(String),
    Deleted,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct VmMetrics {
    pub boots: AtomicU64,
    pub boot_ms_sum: AtomicU64,
    pub restores: AtomicU64,
    pub restore_ms_sum: AtomicU64,
    pub snapshots: AtomicU64,
    pub snapshot_ms_sum: AtomicU64,
    pub vm_failures: AtomicU64,
}

pub struct Manager {
    pub cfg: Arc<Config>,
    pub(crate) db: Arc<Db>,
    pub store: Store,
    pub launcher: Arc<dyn Launcher>,
    pub net: Arc<Networks>,
    vms: RwLock<HashMap<String, Arc<Vm>>>,
    alloc: Mutex<alloc::Allocator>,
    restore_slots: tokio::sync::Semaphore,
    /// One writer per shared memory file being made.
    shared_writes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Shared file names already worked out, per (snapshot, image), with the manifest entry they were made from.
    shared_paths: Mutex<HashMap<(String, String), (flint_snapshot_store::Image, PathBuf)>>,
    seq: AtomicU64,
    events: tokio::sync::broadcast::Sender<VmEvent>,
    pub metrics: VmMetrics,
    pub(crate) tasks: Tasks,
    /// Standby VMMs ([`standby`]).
    pub standbys: standby::Standbys,
}

/// A VM id, template name, snapshot id or any name that becomes a path: `[A-Za-z0-9._-]{1,128}`, not `.`-first.
pub fn valid_id(what: &str, id: &str) -> Result<(), flint_snapshot_store::manifest::BadName> {
    flint_snapshot_store::manifest::check_name(what, id)
}

impl Manager {
    /// Opens the VM layer over `db` and re-adopts the VMs of the previous run (must run inside a tokio runtime).
    pub fn open(
        cfg: Arc<Config>,
        db: Arc<Db>,
        store: Store,
        launcher: Arc<dyn Launcher>,
        net: Arc<Networks>,
        tasks: Tasks,
    ) -> Result<Arc<Manager>, crate::db::DbError> {
        let (events, _) = tokio::sync::broadcast::channel(4096);
        let m = Arc::new(Manager {
            restore_slots: tokio::sync::Semaphore::new(cfg.max_parallel_restores.max(1)),
            cfg,
            db,
            store,
            launcher,
            net,
            vms: RwLock::new(HashMap::new()),
            alloc: Mutex::new(alloc::Allocator::default()),
            shared_writes: Mutex::new(HashMap::new()),
            shared_paths: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            events,
            metrics: VmMetrics::default(),
            tasks,
            standbys: standby::Standbys::default(),
        });
        // Shared memory files a restart interrupted while they were written.
        for e in std::fs::read_dir(m.cfg.data_dir.join("shared")).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().contains(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        m.adopt()?;
        m.start_standbys();
        Ok(m)
    }

    /// VM events from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }

    fn emit(&self, rec: &VmRecord, kind: EventKind) {
        let _ = self.events.send(VmEvent { id: rec.id.clone(), owner: rec.owner.clone(), kind });
    }

    pub(crate) fn vm(&self, id: &str) -> Result<Arc<Vm>, VmError> {
        self.vms.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned().ok_or_else(|| VmError::NotFound(id.into()))
    }

    fn all(&self) -> Vec<Arc<Vm>> {
        self.vms.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.vms.read().unwrap_or_else(|p| p.into_inner()).contains_key(id)
    }

    /// The id of the VM `name` names whatever its case (ids are unique case-insensitively).
    pub fn find_id(&self, name: &str) -> Option<String> {
        self.vms.read().unwrap_or_else(|p| p.into_inner()).keys().find(|k| k.eq_ignore_ascii_case(name)).cloned()
    }

    /// Guest memory this host may still promise under its quotas, MiB (`None`: no limit): its own accounting,
    /// which a fleet's placement reads beside the kernel's free memory.
    pub fn mem_headroom_mib(&self) -> Option<u64> {
        flint_vmm_api::lock(&self.alloc).mem_headroom_mib(&self.cfg.limits)
    }

    pub fn len(&self) -> usize {
        self.vms.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every VM, oldest first.
    pub fn list(&self) -> Vec<VmRecord> {
        let mut v: Vec<VmRecord> = self.all().iter().map(|s| s.rec.get()).collect();
        v.sort_by(|a, b| a.created_unix_ms.cmp(&b.created_unix_ms).then(a.id.cmp(&b.id)));
        v
    }

    /// VMs whose owner is (`kind`, `id`).
    pub fn owned_by(&self, kind: &str, id: &str) -> Vec<VmRecord> {
        self.all().iter().filter(|v| v.rec.with(|r| r.owned_by(kind, id))).map(|v| v.rec.get()).collect()
    }

    /// VMs by status (metrics).
    pub fn count_by_status(&self) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::new();
        for v in self.all() {
            *out.entry(v.rec.with(|r| r.status.name())).or_default() += 1;
        }
        out
    }

    pub fn get(&self, id: &str) -> Result<VmRecord, VmError> {
        Ok(self.vm(id)?.rec.get())
    }

    /// The database's record of a VM (tests: it must equal the in-memory one once operations end).
    pub fn durable(&self, id: &str) -> Option<VmRecord> {
        self.vm(id).ok().and_then(|v| v.rec.durable())
    }

    /// What VM `id` holds on the host, in acquisition order (tests).
    pub fn holds(&self, id: &str) -> Vec<&'static str> {
        self.vm(id).map(|v| v.holds()).unwrap_or_default()
    }

    pub(crate) fn new_id(&self, prefix: &str) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut r = [0u8; 3];
        let _ = getrandom::getrandom(&mut r);
        format!("{prefix}-{:x}{n:x}{:02x}{:02x}{:02x}", now_unix_ms() % 0x10000, r[0], r[1], r[2])
    }

    /// Named images: the config's, then directories under `<data_dir>/images`.
    pub fn images(&self) -> BTreeMap<String, PathBuf> {
        let mut out = self.cfg.images.clone();
        if let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join("images")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue; // an import in progress
                }
                out.entry(name).or_insert_with(|| e.path());
            }
        }
        out.retain(|_, dir| dir.join("vmlinux").is_file() && dir.join("initramfs.cpio").is_file());
        out
    }

    /// The named image, loaded (its kind of root, runners), or why not (listing the known ones).
    pub fn image(&self, name: &str) -> Result<crate::image::Image, crate::image::ImageError> {
        let images = self.images();
        let dir = images.get(name).ok_or_else(|| crate::image::ImageError::Unknown {
            name: name.into(),
            known: images.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        crate::image::Image::load(name, dir)
    }

    /// Whether `n` more VMs of `mem_mib` each fit the quotas (all or nothing, before a multi-VM call starts).
    /// Whether `n` more VMs of `mem_mib` and `disk_mib` each fit the quotas and the data filesystem's free space.
    pub fn check_quota(&self, n: usize, mem_mib: u64, disk_mib: u64) -> Result<(), StartError> {
        if disk_mib > 0 {
            self.check_free_space()?;
        }
        lock(&self.alloc).check(&self.cfg.limits, n, mem_mib, disk_mib).map_err(|e| StartError::Quota(e.to_string()))
    }

    /// The data filesystem has `limits.min_free_disk_mib` free (new disks are refused below it).
    pub fn check_free_space(&self) -> Result<(), StartError> {
        let min = self.cfg.limits.min_free_disk_mib;
        if min == 0 {
            return Ok(());
        }
        let free = free_mib(&self.cfg.data_dir)
            .map_err(|source| StartError::Io { what: format!("statvfs {}", self.cfg.data_dir.display()), source })?;
        if free < min {
            return Err(StartError::Quota(format!(
                "the data filesystem ({}) has {free} MiB free, below limits.min_free_disk_mib = {min}: no new VM disks \
                 until space is freed",
                self.cfg.data_dir.display()
            )));
        }
        Ok(())
    }

    /// Releases what `vm` holds above index `keep` of its stack, newest first (`keep` 0: everything).
    async fn release(&self, vm: &Vm, keep: usize) {
        let rec = vm.rec.get();
        *vm.agent.lock().await = None;
        let standby = lock(&vm.standby).take();
        if let Some(s) = standby {
            // Taken for a start that failed before its hand-over; its uid is the VM's now (released with the
            // allocation below once it is gone).
            self.launcher.discard(s).await;
        }
        loop {
            let next = {
                let mut s = lock(&vm.stack);
                if s.len() <= keep {
                    break;
                }
                s.pop()
            };
            let Some(r) = next else { break };
            match r {
                Resource::Forwards(f) => drop(f),
                Resource::Pager(p) => drop(p),
                Resource::Process(p) => {
                    self.stop_process(&rec, p).await;
                    self.launcher.release(&rec.dir);
                }
                Resource::Network(n) => {
                    let (net, id) = (self.net.clone(), rec.id.clone());
                    let _ = tokio::task::spawn_blocking(move || net.teardown(&id, &n)).await;
                }
                Resource::Dir(d) => {
                    if let Err(e) = std::fs::remove_dir_all(&d) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            warn!(vm = %rec.id, dir = %d.display(), error = %e, "could not remove a VM's directory");
                        }
                    }
                }
                Resource::Allocation => lock(&self.alloc).release(&rec.id),
            }
        }
    }

    /// Stops a VMM: its shutdown, then SIGKILL after 5 s.
    async fn stop_process(&self, rec: &VmRecord, p: Proc) {
        if !self.launcher.alive(p) {
            return;
        }
        let vmm = self.launcher.vmm(&rec.dir, rec.uid.is_some());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), vmm.shutdown()).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.launcher.alive(p) && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.launcher.kill(p);
    }

    /// Forgets VM `vm` entirely: everything released, its record removed.
    async fn forget(&self, vm: &Arc<Vm>) -> Result<(), crate::owner::CommitError> {
        self.release(vm, 0).await;
        let rec = vm.rec.get();
        let removed = vm.rec.remove(&self.db);
        let mut vms = self.vms.write().unwrap_or_else(|p| p.into_inner());
        if vms.get(&rec.id).is_some_and(|v| Arc::ptr_eq(v, vm)) {
            vms.remove(&rec.id);
        }
        removed
    }

    /// Stops every VMM this flintd knows (`flintd --stop-vms-on-exit`, tests).
    pub async fn stop_all(self: &Arc<Self>) {
        let ids: Vec<String> = self.all().iter().map(|v| v.rec.get().id).collect();
        for id in ids {
            let _ = self.delete(&id).await;
        }
    }

    /// The directory VM `id` lives in.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(id)
    }

    fn vms_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("vms")
    }
}

/// Free MiB (for unprivileged users) of the filesystem holding `path`.
fn free_mib(path: &Path) -> std::io::Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs is a plain C struct of integers, for which all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs(3) with a NUL-terminated path that outlives the call and a struct it only writes.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64) >> 20)
}

/// The last lines of a VM's `vmm.log`, read beneath its directory (the VMM's uid could have made it a link to a
/// host file, which would then show in the VM's record), at most its last 4 KiB.
fn vmm_log_tail(dir: &Path) -> String {
    use std::io::{Read, Seek};
    let Ok(mut f) = crate::beneath::Beneath::open(dir).and_then(|d| d.open_regular(Path::new("vmm.log"))) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if f.seek(std::io::SeekFrom::Start(len.saturating_sub(4096))).is_err()
        || f.take(4096).read_to_end(&mut buf).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    text.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ")
}
