//! The VM manager: one `flint-vmm` per VM (through a [`Launcher`]), one [`Slot`] owning each VM, records in the
//! state database, snapshots in the store. The workflows that span VMs (templates, clones) are in `flows.rs`.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flint_agent::client::AgentClient;
use flint_snapshot_store::{ImageSource, SnapshotDraft, SnapshotInfo, Store, StoreConfig};
use flint_vmm_api::config::{check_mem_mib, check_vcpus, NetConfig, VmConfig, VsockConfig};
use flint_vmm_api::spec::{HostDevices, Launch, LaunchSpec, MemorySource, RestoreSpec};
use flint_vmm_api::{lock, now_unix_ms};
use tracing::{info, warn};

use crate::config::Config;
use crate::db::{Db, TEMPLATES, VMS};
use crate::drives;
use crate::launcher::{Launcher, Proc, ProcessLauncher};
use crate::metrics::Metrics;
use crate::pager;
use crate::vm::model::*;
use crate::vm::Slot;

pub use crate::vm::model::{OpError, VmRecord, VmStatus};

pub struct Daemon {
    pub cfg: Config,
    pub(crate) db: Db,
    pub store: Store,
    pub launcher: Arc<dyn Launcher>,
    pub(crate) vms: Mutex<HashMap<String, Arc<Slot>>>,
    pub(crate) restore_slots: tokio::sync::Semaphore,
    pub metrics: Metrics,
    pub sessions: crate::session::Sessions,
    pub pools: crate::pool::Pools,
    pub net: Arc<crate::net::Networks>,
    /// One writer per shared memory file being made (see [`Daemon::shared_memory`]).
    shared_writes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    seq: AtomicU64,
}

/// A mount point in the guest: absolute, normalised, not `/` nor under the kernel's own filesystems.
fn mount_path(p: &str) -> Result<String, OpError> {
    let bad = |why: &str| OpError::BadRequest(format!("mount path `{p}`: {why}"));
    if !p.starts_with('/') || p.contains('\0') {
        return Err(bad("must be absolute"));
    }
    let parts: Vec<&str> = p.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    if parts.contains(&"..") {
        return Err(bad("may not contain `..`"));
    }
    if parts.is_empty() || matches!(parts[0], "proc" | "sys" | "dev" | "run") {
        return Err(bad("not `/`, /proc, /sys, /dev or /run"));
    }
    Ok(format!("/{}", parts.join("/")))
}

pub(crate) fn valid_id(what: &str, id: &str) -> Result<(), OpError> {
    flint_snapshot_store::manifest::check_name(what, id).map_err(OpError::BadRequest)
}

/// The store configuration flintd's config describes (built in this one place).
pub fn store_config(cfg: &Config) -> Result<StoreConfig, String> {
    let mut scfg = StoreConfig::new(&cfg.data_dir.join("store"));
    scfg.local_budget = cfg.store.local_budget_bytes;
    scfg.chunk_size = cfg.store.chunk_size;
    scfg.s3 = cfg.store.s3.clone();
    if let Some(f) = &cfg.store.secret_file {
        let text = std::fs::read_to_string(f).map_err(|e| format!("read {}: {e}", f.display()))?;
        scfg.secret = Some(flint_snapshot_store::Secret::from_hex(&text)?);
    }
    Ok(scfg)
}

/// A disk image's VM's own files in its directory `dir`: its writable disk (`mib`, ext4) and its mount slot
/// (`slot_mib`, sparse, empty until a dynamic mount writes it), both given to the directory's owner (a jailed VMM
/// opens them as its own uid).
fn make_vm_disks(dir: &Path, mib: u64, slot_mib: u64) -> Result<(), String> {
    let disk = drives::clone_path(dir, 1);
    crate::image::make_disk(&disk, mib)?;
    let slot_file = drives::clone_path(dir, MOUNT_SLOT);
    std::fs::File::create(&slot_file)
        .and_then(|f| f.set_len(slot_mib << 20))
        .map_err(|e| format!("create {}: {e}", slot_file.display()))?;
    crate::jail::give_to_dir_owner(dir, &disk)?;
    crate::jail::give_to_dir_owner(dir, &slot_file)
}

/// A disk image's VM's writable disk size: at least [`crate::image::MIN_DISK_MIB`], at most `limits.max_disk_mib`
/// (0: no limit).
fn check_disk_mib(mib: u64, max: u64) -> Result<(), OpError> {
    if mib < crate::image::MIN_DISK_MIB || (max > 0 && mib > max) {
        return Err(OpError::BadRequest(format!(
            "disk_mib {mib}: between {} and limits.max_disk_mib = {max}",
            crate::image::MIN_DISK_MIB
        )));
    }
    Ok(())
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

/// The drive index of a disk image's VM's mount slot (`vdc`, after the image's root and the VM's disk).
const MOUNT_SLOT: usize = 2;

/// Manifest metadata: for each drive, the disk-rooted image whose root it is (`name@sha256`) or null (stored).
const DRIVES_IMAGE: &str = "drives_image";

/// Manifest metadata of a snapshot whose memory image was stored layered on its base (its state file says
/// "diff"; the VMM restores it as merged memory).
pub(crate) const MEMORY_LAYERED: &str = "memory_layered";

/// The guest's own time for a refresh, from the agent's answer.
pub(crate) fn refresh_guest_ms(answer: Option<&flint_agent::protocol::Response>) -> Option<f64> {
    match answer {
        Some(flint_agent::protocol::Response::Refreshed { guest_us: Some(us), .. }) => Some(*us as f64 / 1000.0),
        _ => None,
    }
}

/// How a restore goes beyond the snapshot itself.
#[derive(Debug, Clone, Default)]
pub struct RestoreOpts {
    /// Environment for the VM's execs (set by the agent's refresh).
    pub env: BTreeMap<String, String>,
    /// Memory from the store on first touch (working set prefetched) instead of fetched whole first.
    pub lazy: bool,
    /// The session the VM runs: its guest is named after it and logs dirty pages for the next hibernation.
    pub session: Option<String>,
    /// Log dirty pages (without a session: a pooled VM that may become one).
    pub track_dirty: bool,
    /// The template whose warm pool the VM is for.
    pub pool: Option<String>,
    /// A network of its own.
    pub network: Option<crate::net::NetworkRequest>,
}

/// How a snapshot is taken.
#[derive(Debug, Clone, Default)]
pub(crate) struct SnapshotHow {
    pub publish: bool,
    /// A diff against this snapshot (the one the VM's dirty log started from), stored layered on it.
    pub diff_on: Option<String>,
    /// Leave the VM paused (it is about to stop).
    pub keep_paused: bool,
    pub metadata: BTreeMap<String, String>,
}

impl Daemon {
    /// Opens the state and the store, then re-adopts the VMs of the previous run. Must run inside a tokio runtime.
    pub fn open(cfg: Config) -> Result<Arc<Daemon>, String> {
        cfg.check()?;
        let mut launcher = ProcessLauncher::new(cfg.vmm_bin(), cfg.jail.enabled.then(|| cfg.jail.clone()));
        launcher.claim_uids(&format!("pid {}, data dir {}", std::process::id(), cfg.data_dir.display()))?;
        Self::open_with(cfg, Arc::new(launcher))
    }

    pub fn open_with(cfg: Config, launcher: Arc<dyn Launcher>) -> Result<Arc<Daemon>, String> {
        cfg.check()?;
        crate::private_umask();
        std::fs::create_dir_all(cfg.data_dir.join("vms"))
            .map_err(|e| format!("create {}: {e}", cfg.data_dir.join("vms").display()))?;
        // Guest memory, snapshots and drives live here: only flintd's user may enter (even if it existed before).
        std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod 0700 {}: {e}", cfg.data_dir.display()))?;
        let db = Db::open(&cfg.data_dir.join("flintd.redb")).map_err(|e| e.to_string())?;
        let store = Store::open(store_config(&cfg)?).map_err(|e| format!("snapshot store: {e}"))?;
        let slots = cfg.max_parallel_restores.max(1);
        let sessions = crate::session::Sessions::new(crate::session::host_id(&cfg)?);
        let net = Arc::new(crate::net::Networks::new(cfg.network.clone(), &cfg.data_dir));
        let d = Arc::new(Daemon {
            net,
            cfg,
            db,
            store,
            launcher,
            vms: Mutex::new(HashMap::new()),
            restore_slots: tokio::sync::Semaphore::new(slots),
            metrics: Metrics::default(),
            sessions,
            pools: Default::default(),
            shared_writes: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
        });
        // Shared memory files a restart interrupted while they were written.
        for e in std::fs::read_dir(d.cfg.data_dir.join("shared")).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().contains(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        d.adopt()?;
        d.adopt_sessions()?;
        d.adopt_pools();
        d.sync_tcp();
        Ok(d)
    }

    /// After a restart, each record is brought back to a true status:
    /// - Running / Paused with its VMM alive: watched again; with its VMM gone: Lost.
    /// - Starting with its VMM alive: the start is finished (agent awaited, env or refresh applied) in the
    ///   background; gone: Lost.
    /// - Stopping: the delete is finished (VMM stopped, record and directory removed).
    /// - Failed / Lost: kept for `flint vm ls`.
    ///
    /// A lazily restored VM gets its page server back (its VMM reconnects to the new `pager.sock`).
    fn adopt(self: &Arc<Self>) -> Result<(), String> {
        let records: Vec<VmRecord> = self.db.all(VMS).map_err(|e| e.to_string())?;
        // A VMM no record owns: flintd died between starting it and recording its pid. Nothing can reach it.
        for (p, dir) in self.launcher.running_under(&self.cfg.data_dir.join("vms")) {
            if !records.iter().any(|r| r.proc() == Some(p)) {
                warn!(pid = p.pid, dir = %dir.display(), "stopping a VMM that no record owns");
                self.launcher.kill(p);
                if !records.iter().any(|r| r.dir == dir) {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        for rec in records {
            let alive = rec.proc().is_some_and(|p| self.launcher.alive(p));
            let id = rec.id.clone();
            let status = rec.status;
            let slot = Slot::new(rec);
            lock(&self.vms).insert(id.clone(), slot.clone());
            match (status, alive) {
                (VmStatus::Stopping, _) => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.delete(&id).await {
                            warn!(vm = %id, error = %e, "could not finish deleting a VM after a restart");
                        }
                    });
                }
                (VmStatus::Running | VmStatus::Paused | VmStatus::Starting, true) => {
                    info!(vm = %id, status = status.name(), "re-adopted a running VMM");
                    let rec = slot.get();
                    if let Some(p) = rec.proc() {
                        self.watch(&id, p);
                        self.launcher.readopt(p, &rec.dir);
                    }
                    if rec.lazy {
                        if let Some(snapshot) = rec.snapshot.clone() {
                            self.readopt_pager(&slot, &snapshot, &rec.dir, rec.proc());
                        }
                    }
                    if status == VmStatus::Starting {
                        let this = self.clone();
                        tokio::spawn(async move {
                            let _op = slot.op.lock().await;
                            let started = Instant::now();
                            let result = this.await_ready(&slot).await;
                            let _ = this.finish_start(&slot, started, result, rec.snapshot.is_some());
                        });
                    } else {
                        self.reconcile_run_state(slot.clone());
                    }
                }
                (VmStatus::Running | VmStatus::Paused | VmStatus::Starting, false) => {
                    warn!(vm = %id, "VMM is gone after a flintd restart; marking the VM lost");
                    slot.transition(&self.db, VmStatus::Lost, |r| {
                        r.error = Some("the VMM process was not running when flintd restarted".into());
                        r.pid = None;
                    })
                    .map_err(|e| e.to_string())?;
                }
                (VmStatus::Failed | VmStatus::Lost, _) => {}
            }
        }
        self.adopt_networks();
        Ok(())
    }

    /// After a restart: running VMs get their DNS proxy back and their policy re-applied; namespaces no record
    /// owns are removed.
    fn adopt_networks(self: &Arc<Self>) {
        let records: Vec<VmRecord> = lock(&self.vms).values().map(|s| s.get()).collect();
        let keep: std::collections::HashSet<String> =
            records.iter().filter(|r| r.network.is_some()).map(|r| r.id.clone()).collect();
        self.net.remove_orphans(&keep);
        if !keep.is_empty() {
            if let Err(e) = self.net.ensure_host() {
                warn!(error = %e, "could not set up the host side of VM networks");
            }
        }
        for r in records {
            let (Some(n), VmStatus::Running | VmStatus::Paused | VmStatus::Starting) = (&r.network, r.status) else {
                continue;
            };
            let rules = n.request.check(usize::MAX).unwrap_or_default();
            let redone =
                self.net.set_policy(&r.id, n, rules.clone()).and_then(|_| self.net.start_proxy(&r.id, n, rules));
            match redone {
                Ok(()) => info!(vm = %r.id, "network re-adopted"),
                Err(e) => warn!(vm = %r.id, error = %e, "could not re-adopt the VM's network"),
            }
        }
    }

    /// A VMM left paused or running against its record by an operation that flintd did not finish (killed in a
    /// pause, a resume, or a snapshot that keeps the VM paused while it copies drives): the record, which is
    /// written only when an operation completes, wins, and the VMM is brought back to it.
    fn reconcile_run_state(self: &Arc<Self>, slot: Arc<Slot>) {
        let this = self.clone();
        tokio::spawn(async move {
            let _op = slot.op.lock().await;
            let rec = slot.get();
            let vmm = this.launcher.vmm(&rec.dir);
            let Ok(d) = vmm.describe().await else { return };
            let fix = match (rec.status, d.state) {
                (VmStatus::Running, flint_vmm_api::describe::RunState::Paused) => Some(vmm.resume().await),
                (VmStatus::Paused, flint_vmm_api::describe::RunState::Running) => Some(vmm.pause().await),
                _ => None,
            };
            match fix {
                Some(Ok(())) => info!(vm = %rec.id, status = rec.status.name(), "VMM brought back to its record"),
                Some(Err(e)) => warn!(vm = %rec.id, error = %e, "could not bring the VMM back to its record"),
                None => {}
            }
        });
    }

    pub(crate) fn slot(&self, id: &str) -> Result<Arc<Slot>, OpError> {
        lock(&self.vms).get(id).cloned().ok_or_else(|| OpError::NotFound(format!("no VM `{id}`")))
    }

    pub fn list(&self) -> Vec<VmRecord> {
        let slots: Vec<Arc<Slot>> = lock(&self.vms).values().cloned().collect();
        let mut v: Vec<VmRecord> = slots.iter().map(|s| s.get()).collect();
        v.sort_by(|a, b| a.created_unix_ms.cmp(&b.created_unix_ms).then(a.id.cmp(&b.id)));
        v
    }

    pub fn get(&self, id: &str) -> Result<VmRecord, OpError> {
        Ok(self.slot(id)?.get())
    }

    /// The VMM's own description (timings, restore breakdown, fault counters), if it answers; for a VM whose
    /// memory flintd serves, `uffd` is the page server's counters.
    pub async fn vmm_describe(&self, id: &str) -> Option<serde_json::Value> {
        let slot = self.slot(id).ok()?;
        let rec = slot.get();
        rec.pid?;
        let d = self.launcher.vmm(&rec.dir).describe().await.ok()?;
        let mut v = serde_json::to_value(d).ok()?;
        if let Some(p) = lock(&slot.pager).as_ref() {
            v["uffd"] = serde_json::to_value(p.report()).ok()?;
        }
        Some(v)
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

    /// The named image, loaded (its kind of root, runners), or a 400 that lists the known ones.
    pub fn image(&self, name: &str) -> Result<crate::image::Image, OpError> {
        let images = self.images();
        let dir = images.get(name).ok_or_else(|| {
            OpError::BadRequest(format!(
                "no image `{name}` (known: {})",
                images.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        crate::image::Image::load(name, dir).map_err(OpError::BadRequest)
    }

    /// A dynamic mount (docs/images.md): a copy of host directory `source` as an ext4 filesystem written into the
    /// VM's mount slot, then mounted by the agent at `path` (read-only or read-write). The slot is a drive, so the
    /// mount's content is in the VM's snapshots: clones, hibernated sessions and forks keep it.
    pub async fn mount(&self, vm: &str, m: VolumeMount) -> Result<VmRecord, OpError> {
        let slot = self.slot(vm)?;
        let _op = slot.op.lock().await;
        let rec = slot.get();
        let index = rec.mount_slot.ok_or_else(|| {
            OpError::BadRequest(format!(
                "VM `{vm}` has no mount slot: dynamic mounts need a disk-rooted image's VM (made by this flintd)"
            ))
        })?;
        if let Some(used) = rec.mounts.first() {
            return Err(OpError::Conflict(format!("VM `{vm}`'s mount slot holds {}: unmount it first", used.path)));
        }
        let path = mount_path(&m.path)?;
        if !m.source.is_absolute() || !m.source.is_dir() {
            return Err(OpError::BadRequest(format!(
                "source {} is not an existing directory (absolute path)",
                m.source.display()
            )));
        }
        // The slot is opened beneath the VM's directory (its VMM's uid owns it: a link there must not turn the
        // copy into a write to a host file); the copy is made by a walker that cannot leave the source.
        let rel = drives::file_name(index);
        let slot_file = crate::beneath::Beneath::open(&rec.dir)
            .and_then(|d| d.open_regular_rw(&rel))
            .map_err(|e| OpError::VmFailed(format!("VM `{vm}`'s mount slot: {e}")))?;
        let slot_file = Arc::new(slot_file);
        let scratch = self.cfg.data_dir.join("tmp").join(format!("mount-{vm}"));
        let (source, f) = (m.source.clone(), slot_file.clone());
        let written = tokio::task::spawn_blocking(move || crate::image::fill_slot(&f, &source, &scratch)).await;
        written.map_err(|e| OpError::Internal(e.to_string()))?.map_err(OpError::BadRequest)?;
        let agent = self.agent(vm).await?;
        let device = format!("vd{}", (b'a' + index as u8) as char);
        if let Err(e) = agent.mount(&device, &path, m.read_only).await {
            let _ = crate::image::empty_slot(&slot_file);
            return Err(OpError::VmFailed(format!("mount {} at {path} in VM `{vm}`: {e}", m.source.display())));
        }
        info!(vm, source = %m.source.display(), path, read_only = m.read_only, "directory mounted");
        slot.commit(&self.db, |r| r.mounts = vec![VolumeMount { path, ..m }])
    }

    /// Unmounts a dynamic mount and empties the slot.
    pub async fn unmount(&self, vm: &str, path: &str) -> Result<VmRecord, OpError> {
        let slot = self.slot(vm)?;
        let _op = slot.op.lock().await;
        let rec = slot.get();
        let path = mount_path(path)?;
        let Some(index) = rec.mount_slot.filter(|_| rec.mounts.iter().any(|m| m.path == path)) else {
            return Err(OpError::NotFound(format!("VM `{vm}` has nothing mounted at {path}")));
        };
        self.agent(vm).await?.unmount(&path).await.map_err(|e| OpError::VmFailed(format!("unmount {path}: {e}")))?;
        let slot_file =
            crate::beneath::Beneath::open(&rec.dir).and_then(|d| d.open_regular_rw(&drives::file_name(index)));
        if let Ok(f) = slot_file {
            let _ = crate::image::empty_slot(&f);
        }
        info!(vm, path, "directory unmounted");
        slot.commit(&self.db, |r| r.mounts.retain(|m| m.path != path))
    }

    /// `POST /v1/images`: imports an OCI image layout (directory or tar) or a `docker save` archive as the
    /// disk-rooted image `name` under `<data_dir>/images/` (docs/images.md). The kernel and the agent's initramfs
    /// are the default image's. Appears whole or not at all.
    pub async fn import_image(&self, req: ImportImage) -> Result<serde_json::Value, OpError> {
        valid_id("image name", &req.name)?;
        if self.images().contains_key(&req.name) {
            return Err(OpError::Conflict(format!("image `{}` already exists", req.name)));
        }
        if !req.oci.is_absolute() {
            return Err(OpError::BadRequest(format!("oci: `{}` must be an absolute path", req.oci.display())));
        }
        let disk_mib = req.disk_mib.unwrap_or(256);
        check_disk_mib(disk_mib, self.cfg.limits.max_disk_mib)?;
        let base = self.image("default")?;
        let boot = base.dir.join("boot.cpio");
        if !boot.is_file() {
            return Err(OpError::Internal(format!(
                "the default image ({}) has no boot.cpio (the agent-only initramfs of disk images): rebuild it with images/build.sh",
                base.dir.display()
            )));
        }
        let images_dir = self.cfg.data_dir.join("images");
        let final_dir = images_dir.join(&req.name);
        let work = images_dir.join(format!(".import-{}-{}", req.name, self.new_id("x")));
        let name = req.name.clone();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking({
            let work = work.clone();
            move || -> Result<serde_json::Value, OpError> {
                std::fs::create_dir_all(&work).map_err(|e| OpError::Internal(format!("create {}: {e}", work.display())))?;
                let tree = work.join("tree");
                // What the agent reads at boot, and the directories it mounts on: added to the image's model, so
                // nothing is written through the image's own symlinks (docs/security.md).
                let additions = |imported: &crate::oci::Imported| {
                    let guest = serde_json::json!({"name": name, "env": imported.env, "workdir": imported.workdir, "runners": {}});
                    let mut add = crate::oci::Additions::default();
                    for d in ["etc", "etc/flint", "etc/flint/hooks", "etc/flint/hooks/after-restore.d", "etc/flint/hooks/before-checkpoint.d", "dev", "proc", "sys", "run"] {
                        add.dirs.push((d.to_string(), 0o755, false));
                    }
                    add.dirs.push(("root".into(), 0o700, false));
                    add.dirs.push(("tmp".into(), 0o1777, true));
                    add.files.push(("etc/flint/image.json".into(), 0o644, guest.to_string().into_bytes()));
                    add
                };
                let imported = crate::oci::import_tree(&req.oci, &tree, &work, crate::oci::Bounds::default(), additions)
                    .map_err(|e| OpError::BadRequest(format!("import {}: {e}", req.oci.display())))?;
                let out = work.join("image");
                std::fs::create_dir(&out).map_err(|e| OpError::Internal(e.to_string()))?;
                crate::image::make_rootfs(&tree, &out.join("rootfs.ext4")).map_err(OpError::Internal)?;
                let _ = std::fs::remove_dir_all(&tree);
                let sha = crate::image::sha256_file(&out.join("rootfs.ext4")).map_err(OpError::Internal)?;
                let manifest = crate::image::ImageJson {
                    name: name.clone(),
                    description: format!("imported from {}", req.oci.display()),
                    root: "disk".into(),
                    disk_mib,
                    rootfs_sha256: sha,
                    runners: Vec::new(),
                    env: imported.env.clone(),
                    workdir: imported.workdir.clone(),
                    source: serde_json::json!({
                        "oci": imported.source, "layers": imported.layers, "files": imported.files,
                        "bytes": imported.bytes, "command": imported.command, "skipped_devices": imported.skipped_devices,
                    }),
                };
                let json = serde_json::to_vec_pretty(&manifest).map_err(|e| OpError::Internal(e.to_string()))?;
                std::fs::write(out.join("image.json"), json).map_err(|e| OpError::Internal(e.to_string()))?;
                std::fs::copy(&boot, out.join("initramfs.cpio")).map_err(|e| OpError::Internal(e.to_string()))?;
                std::fs::copy(base.dir.join("vmlinux"), out.join("vmlinux")).map_err(|e| OpError::Internal(e.to_string()))?;
                std::fs::rename(&out, &final_dir).map_err(|e| {
                    OpError::Conflict(format!("image `{name}` appeared meanwhile, or cannot be placed: {e}"))
                })?;
                Ok(serde_json::json!({
                    "name": name, "dir": final_dir, "root": "disk", "disk_mib": disk_mib, "env": imported.env,
                    "workdir": imported.workdir, "layers": imported.layers, "files": imported.files, "bytes": imported.bytes,
                    "source": imported.source,
                }))
            }
        })
        .await
        .map_err(|e| OpError::Internal(e.to_string()))
        .and_then(|r| r);
        let _ = std::fs::remove_dir_all(&work);
        let mut v = result?;
        v["ms"] = serde_json::json!(crate::ms_since(started));
        info!(image = %req.name, ms = v["ms"].as_f64().unwrap_or(0.0), "OCI image imported");
        Ok(v)
    }

    /// This host's disk-rooted image whose root is `reference` (`name@sha256`, from a snapshot): matched by
    /// digest, so a renamed image still serves and a rebuilt one with other bytes never does.
    fn image_root_for(&self, snapshot: &str, reference: &str) -> Result<PathBuf, OpError> {
        let (name, sha) = crate::image::parse_ref(reference)
            .ok_or_else(|| OpError::BadRequest(format!("snapshot `{snapshot}`: bad image reference `{reference}`")))?;
        let mut seen = Vec::new();
        for (n, dir) in self.images() {
            if let Ok(img) = crate::image::Image::load(&n, &dir) {
                if let crate::image::Root::Disk { rootfs, sha256, .. } = img.root {
                    if sha256.eq_ignore_ascii_case(sha) {
                        return Ok(rootfs);
                    }
                    seen.push(format!("{n}@{}", &sha256[..12]));
                }
            }
        }
        Err(OpError::Conflict(format!(
            "snapshot `{snapshot}` needs image `{name}` with root sha256 {}…, which this host does not have (it has: {}); \
             install that image (images/build.sh {name}, or the same OCI import) to restore it",
            &sha[..12],
            if seen.is_empty() { "no disk images".to_string() } else { seen.join(", ") }
        )))
    }

    pub(crate) fn new_id(&self, prefix: &str) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut r = [0u8; 3];
        let _ = getrandom::getrandom(&mut r);
        format!("{prefix}-{:x}{n:x}{:02x}{:02x}{:02x}", now_unix_ms() % 0x10000, r[0], r[1], r[2])
    }

    /// Whether `n` more VMs of `mem_mib` each fit the quotas of `[limits]`, given the VM table.
    pub(crate) fn check_quota(&self, vms: &HashMap<String, Arc<Slot>>, n: usize, mem_mib: u64) -> Result<(), OpError> {
        let limits = &self.cfg.limits;
        let live: Vec<VmRecord> =
            vms.values().map(|s| s.get()).filter(|r| !matches!(r.status, VmStatus::Failed | VmStatus::Lost)).collect();
        if live.len() + n > limits.max_vms {
            return Err(OpError::QuotaExceeded(format!(
                "quota: {} VM(s) live, {n} more would pass limits.max_vms = {}",
                live.len(),
                limits.max_vms
            )));
        }
        let used: u64 = live.iter().map(|r| r.mem_mib).sum();
        let want = used + n as u64 * mem_mib;
        if limits.max_total_mem_mib > 0 && want > limits.max_total_mem_mib {
            return Err(OpError::QuotaExceeded(format!(
                "quota: {used} MiB of guest memory in use, {n} more VM(s) of {mem_mib} MiB would pass \
                 limits.max_total_mem_mib = {}",
                limits.max_total_mem_mib
            )));
        }
        Ok(())
    }

    /// The lowest uid of the jail's range that no VM record holds (failed and lost ones included: their files
    /// are still that uid's).
    fn free_uid(&self, vms: &HashMap<String, Arc<Slot>>) -> Result<u32, OpError> {
        let used: std::collections::HashSet<u32> = vms.values().filter_map(|s| s.get().uid).collect();
        let j = &self.cfg.jail;
        (j.uid_base..j.uid_base.saturating_add(j.uid_count)).find(|u| !used.contains(u)).ok_or_else(|| {
            OpError::QuotaExceeded(format!(
                "every uid of the jail's range ({} from {}) is in use",
                j.uid_count, j.uid_base
            ))
        })
    }

    /// A new VM in `Starting`, persisted, with an empty directory.
    fn reserve(
        &self,
        id: Option<String>,
        prefix: &str,
        network: Option<&crate::net::NetworkRequest>,
        f: impl FnOnce(&mut VmRecord),
    ) -> Result<Arc<Slot>, OpError> {
        let id = match id {
            Some(id) => {
                valid_id("VM id", &id)?;
                id
            }
            None => self.new_id(prefix),
        };
        let dir = self.cfg.data_dir.join("vms").join(&id);
        let mut rec = VmRecord {
            id: id.clone(),
            status: VmStatus::Starting,
            pid: None,
            pid_start: None,
            dir: dir.clone(),
            image: None,
            disk_mib: None,
            mount_slot: None,
            mounts: Vec::new(),
            snapshot: None,
            mem_mib: 0,
            vcpus: 0,
            created_unix_ms: now_unix_ms(),
            ready_ms: None,
            fetch_ms: None,
            error: None,
            lazy: false,
            env: BTreeMap::new(),
            drives: Vec::new(),
            uid: None,
            session: None,
            pool: None,
            agent_ms: None,
            refresh_ms: None,
            net_ms: None,
            refresh_guest_ms: None,
            refresh_agent_ms: None,
            resume_ms: None,
            refresh_steps_us: BTreeMap::new(),
            network: None,
        };
        f(&mut rec);
        let slot = {
            let mut vms = lock(&self.vms);
            if vms.contains_key(&id) {
                return Err(OpError::Conflict(format!("VM `{id}` already exists")));
            }
            self.check_quota(&vms, 1, rec.mem_mib)?;
            if self.cfg.jail.enabled {
                rec.uid = Some(self.free_uid(&vms)?);
            }
            if let Some(req) = network {
                let used = vms.values().filter_map(|s| s.get().network.map(|n| n.index)).collect();
                let block = self.net.allocate(&used).map_err(OpError::QuotaExceeded)?;
                let mut nonce = [0u8; 1];
                let _ = getrandom::getrandom(&mut nonce);
                rec.network =
                    Some(crate::net::VmNet { index: block.index, mac: block.mac(nonce[0]), request: req.clone() });
            }
            let slot = Slot::new(rec.clone());
            vms.insert(id.clone(), slot.clone());
            slot
        };
        let prepared = (|| {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|e| OpError::Internal(format!("create {}: {e}", dir.display())))?;
            self.db.put(VMS, &id, &rec)?;
            Ok(())
        })();
        if let Err(e) = prepared {
            lock(&self.vms).remove(&id);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(slot)
    }

    /// Starts the VMM for `spec`, records its process and watches it.
    fn spawn(self: &Arc<Self>, slot: &Arc<Slot>, spec: &LaunchSpec) -> Result<Proc, OpError> {
        let rec = slot.get();
        let jail = rec.uid.map(|uid| crate::launcher::Confinement { uid, gid: uid, mem_mib: rec.mem_mib });
        let p = self.launcher.spawn(&rec.dir, spec, jail)?;
        if let Err(e) = slot.commit(&self.db, |r| {
            r.pid = Some(p.pid);
            r.pid_start = Some(p.start);
        }) {
            self.launcher.kill(p);
            return Err(e);
        }
        self.watch(&rec.id, p);
        Ok(p)
    }

    /// Marks the VM failed when its VMM exits (unless it is being deleted).
    fn watch(self: &Arc<Self>, id: &str, p: Proc) {
        // Weak: a watcher does not keep a daemon alive (its VMMs outlive it by design).
        let this = Arc::downgrade(self);
        let id = id.to_string();
        let exited = self.launcher.exited(p);
        tokio::spawn(async move {
            let how = exited.await;
            if let Some(this) = this.upgrade() {
                this.vmm_exited(&id, p, how);
            }
        });
    }

    fn vmm_exited(&self, id: &str, p: Proc, how: String) {
        let Ok(slot) = self.slot(id) else { return };
        let rec = slot.get();
        if rec.proc() != Some(p) {
            return; // a later VMM of the same record
        }
        *lock(&slot.pager) = None;
        let log_tail = vmm_log_tail(&rec.dir);
        let result = slot.commit(&self.db, |r| {
            if r.status != VmStatus::Stopping && r.status.can_become(VmStatus::Failed) {
                r.status = VmStatus::Failed;
                let what = format!("VMM {how}: {log_tail}");
                // A reason recorded before the exit (the page server's) comes first.
                r.error = Some(match r.error.take() {
                    Some(first) => format!("{first} ({what})"),
                    None => what,
                });
            }
            r.pid = None;
            r.pid_start = None;
        });
        match result {
            Ok(rec) if rec.status == VmStatus::Failed => {
                self.metrics.vm_failures.fetch_add(1, Ordering::Relaxed);
                warn!(vm = %id, error = ?rec.error, "VM failed");
            }
            Ok(_) => {}
            Err(e) => warn!(vm = %id, error = %e, "could not record a VMM exit"),
        }
    }

    /// The agent of a running VM (one connection per VM, reconnected when it breaks).
    pub async fn agent(&self, id: &str) -> Result<Arc<AgentClient>, OpError> {
        let slot = self.slot(id)?;
        let rec = slot.get();
        if rec.status != VmStatus::Running {
            return Err(OpError::Conflict(format!("VM `{id}` is {}, not running", rec.status.name())));
        }
        let mut cached = slot.agent.lock().await;
        if let Some(a) = cached.as_ref().filter(|a| !a.is_closed()) {
            return Ok(a.clone());
        }
        let a = Arc::new(
            AgentClient::connect(&self.launcher.agent_endpoint(&rec.dir), Duration::from_secs(10))
                .await
                .map_err(|e| OpError::VmFailed(format!("VM `{id}`: agent: {e}")))?,
        );
        *cached = Some(a.clone());
        Ok(a)
    }

    /// Waits for a starting VM's agent, then gives it its env (boot) or refreshes it (restore: clock, entropy,
    /// env, hostname); records what the VMM says it is (vCPUs, memory).
    async fn await_ready(&self, slot: &Arc<Slot>) -> Result<(), OpError> {
        let rec = slot.get();
        let id = rec.id.clone();
        let deadline = Duration::from_secs(if rec.snapshot.is_some() {
            self.cfg.restore_agent_timeout_s
        } else {
            self.cfg.agent_timeout_s
        });
        let started = Instant::now();
        // The first attempts usually come before the VMM has bound its vsock socket (a restored guest answers a
        // few ms later): retry soon, backing off to 50 ms (a fixed 50 ms wait cost every restore ~45 ms).
        let mut pause = Duration::from_millis(1);
        let agent = loop {
            let rec = slot.get();
            if rec.status == VmStatus::Failed {
                return Err(OpError::VmFailed(format!(
                    "VM `{id}` failed while starting: {}",
                    rec.error.unwrap_or_default()
                )));
            }
            match AgentClient::connect(&self.launcher.agent_endpoint(&rec.dir), Duration::from_secs(5)).await {
                Ok(a) => break Arc::new(a),
                Err(e) if started.elapsed() > deadline => {
                    return Err(OpError::VmFailed(format!(
                        "VM `{id}`: the agent did not answer within {deadline:?}: {e}"
                    )))
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
            }
        };
        let agent_ms = crate::ms_since(started);
        let t = Instant::now();
        // A session's guest is named after the session (it keeps the name across wakes); a clone after itself.
        let hostname = rec.session.clone().unwrap_or_else(|| id.clone());
        let network = rec.network.as_ref().map(|n| self.net.guest(n)).transpose().map_err(OpError::Internal)?;
        let sent = Instant::now();
        let answer = if rec.snapshot.is_some() {
            Some(
                agent
                    .refresh_with(rec.env.clone(), Some(hostname), network)
                    .await
                    .map_err(|e| OpError::VmFailed(format!("refresh: {e}")))?,
            )
        } else if !rec.env.is_empty() || network.is_some() {
            Some(
                agent
                    .refresh_with(rec.env.clone(), Some(id.clone()), network)
                    .await
                    .map_err(|e| OpError::VmFailed(format!("set env and network: {e}")))?,
            )
        } else {
            None
        };
        let refresh_agent_ms = answer.as_ref().map(|_| crate::ms_since(sent));
        let refresh_guest_ms = refresh_guest_ms(answer.as_ref());
        let steps = match &answer {
            Some(flint_agent::protocol::Response::Refreshed { steps_us, .. }) => steps_us.clone(),
            _ => BTreeMap::new(),
        };
        let refresh_ms = crate::ms_since(t);
        *slot.agent.lock().await = Some(agent);
        let d = self.launcher.vmm(&rec.dir).describe().await?;
        slot.commit(&self.db, |r| {
            r.vcpus = d.config.vcpus;
            r.mem_mib = d.config.mem_mib;
            r.agent_ms = Some(agent_ms);
            r.refresh_ms = Some(refresh_ms);
            r.refresh_guest_ms = refresh_guest_ms;
            r.refresh_agent_ms = refresh_agent_ms;
            r.refresh_steps_us = steps;
        })?;
        Ok(())
    }

    /// Ends a start: Running, or Failed with no VMM left.
    fn finish_start(
        &self,
        slot: &Arc<Slot>,
        started: Instant,
        result: Result<(), OpError>,
        restore: bool,
    ) -> Result<VmRecord, OpError> {
        let ms = crate::ms_since(started);
        let id = slot.get().id;
        match result {
            Ok(()) => {
                let rec = slot.transition(&self.db, VmStatus::Running, |r| r.ready_ms = Some(ms))?;
                let (count, sum) = if restore {
                    (&self.metrics.restores, &self.metrics.restore_ms_sum)
                } else {
                    (&self.metrics.boots, &self.metrics.boot_ms_sum)
                };
                count.fetch_add(1, Ordering::Relaxed);
                sum.fetch_add(ms as u64, Ordering::Relaxed);
                info!(vm = %id, ms, restore, "VM running");
                Ok(rec)
            }
            Err(e) => {
                // Leave a failed record (for `flint vm ls`) but no running process.
                let rec = slot.get();
                if let Some(p) = rec.proc() {
                    self.launcher.kill(p);
                }
                let recorded = slot.commit(&self.db, |r| {
                    if r.status.can_become(VmStatus::Failed) {
                        r.status = VmStatus::Failed;
                    }
                    if r.error.is_none() {
                        r.error = Some(e.to_string());
                    }
                });
                if let Err(db) = recorded {
                    warn!(vm = %id, error = %db, "could not record a failed start");
                }
                Err(e)
            }
        }
    }

    /// A network request checked against this host's limits: a 400 before anything starts.
    /// `owner`: the session the request is for (its own forwards are no conflict).
    pub(crate) fn check_network(
        &self,
        owner: Option<&str>,
        n: Option<&crate::net::NetworkRequest>,
    ) -> Result<(), OpError> {
        if let Some(n) = n {
            n.check(self.cfg.network.max_rules).map_err(|e| OpError::BadRequest(format!("network: {e}")))?;
        }
        self.check_tcp(owner, n)
    }

    /// Builds the network of a VM whose record has one (namespace, tap, policy, DNS proxy): the card the VMM
    /// attaches to. None: the VM has no network.
    async fn start_network(&self, slot: &Arc<Slot>) -> Result<Option<NetConfig>, OpError> {
        let rec = slot.get();
        let Some(n) = rec.network.clone() else { return Ok(None) };
        let rules = n.request.check(usize::MAX).map_err(OpError::BadRequest)?;
        let t = Instant::now();
        let (net, id, n2, r2) = (self.net.clone(), rec.id.clone(), n.clone(), rules.clone());
        let ns = tokio::task::spawn_blocking(move || net.setup(&id, &n2, r2))
            .await
            .map_err(|e| OpError::Internal(e.to_string()))?
            .map_err(|e| OpError::Unavailable(format!("network: {e}")))?;
        self.net.start_proxy(&rec.id, &n, rules).map_err(|e| OpError::Unavailable(format!("network: {e}")))?;
        let net_ms = crate::ms_since(t);
        slot.commit(&self.db, |r| r.net_ms = Some(net_ms))?;
        Ok(Some(NetConfig {
            tap: crate::net::TAP.into(),
            netns: Some(ns),
            mac: Some(n.mac.clone()),
            ..NetConfig::detached()
        }))
    }

    /// Boots a VM from an image and waits until its agent answers.
    pub async fn create(self: &Arc<Self>, req: CreateVm) -> Result<VmRecord, OpError> {
        let image = req.image.clone().unwrap_or_else(|| "default".into());
        let img = self.image(&image)?;
        let dir_img = img.dir.clone();
        let mem = req.mem_mib.unwrap_or(self.cfg.vm.mem_mib);
        let vcpus = req.vcpus.unwrap_or(self.cfg.vm.vcpus);
        // The VMM's own limits, checked here: a 400, not a failed VM.
        check_mem_mib(mem)?;
        check_vcpus(vcpus)?;
        for d in &req.drives {
            if d.image.is_some() {
                return Err(OpError::BadRequest("a drive's `image` is flintd's to set, not a caller's".into()));
            }
            if !d.path.is_absolute() || !d.path.is_file() {
                return Err(OpError::BadRequest(format!(
                    "drive {} is not an existing file (absolute path)",
                    d.path.display()
                )));
            }
        }
        // A disk-rooted image: its read-only root (vda) and the VM's own writable disk (vdb) come first.
        let disk = match &img.root {
            crate::image::Root::Disk { rootfs, disk_mib, .. } => {
                let mib = req.disk_mib.unwrap_or(*disk_mib);
                check_disk_mib(mib, self.cfg.limits.max_disk_mib)?;
                Some((rootfs.clone(), mib))
            }
            crate::image::Root::Initramfs if req.disk_mib.is_some() => {
                return Err(OpError::BadRequest(format!(
                    "image `{image}` runs from its initramfs and has no disk: disk_mib needs a disk-rooted image"
                )))
            }
            crate::image::Root::Initramfs => None,
        };
        let own = if disk.is_some() { 3 } else { 0 };
        if req.drives.len() + own > MAX_DRIVES {
            return Err(OpError::BadRequest(format!("{} drives: at most {}", req.drives.len(), MAX_DRIVES - own)));
        }
        self.check_network(None, req.network.as_ref())?;
        let root_ref = img.root_ref();
        let slot = self.reserve(req.id, "vm", req.network.as_ref(), |r| {
            r.image = Some(image.clone());
            r.mem_mib = mem;
            r.vcpus = vcpus;
            r.env = req.env.clone();
            r.drives = Vec::new();
            if let Some((rootfs, mib)) = &disk {
                r.disk_mib = Some(*mib);
                r.drives.push(DriveSpec {
                    path: rootfs.clone(),
                    read_only: true,
                    image: root_ref.clone(),
                    ..Default::default()
                });
                r.drives.push(DriveSpec { path: drives::clone_path(&r.dir, 1), ..Default::default() });
                r.drives.push(DriveSpec { path: drives::clone_path(&r.dir, MOUNT_SLOT), ..Default::default() });
                r.mount_slot = Some(MOUNT_SLOT);
            }
            r.drives.extend(req.drives.iter().cloned());
        })?;
        let _op = slot.op.lock().await;
        let rec = slot.get();
        let dir = rec.dir.clone();
        let mut config = VmConfig::new(dir_img.join("vmlinux"));
        config.initramfs = Some(dir_img.join("initramfs.cpio"));
        config.mem_mib = mem;
        config.vcpus = vcpus;
        config.drives = rec
            .drives
            .iter()
            .map(|d| flint_vmm_api::config::DriveConfig {
                path: d.path.clone(),
                read_only: d.read_only,
                root: false,
                rate_limiter: d.rate_limiter.clone(),
            })
            .collect();
        if disk.is_some() {
            config.cmdline_extra = crate::image::DISK_ROOT_CMDLINE.into();
        }
        config.vsock = Some(VsockConfig { guest_cid: 3, uds_path: dir.join("vsock.sock") });
        config.console = dir.join("console.log").display().to_string();
        config.console_limit_bytes = self.cfg.vm.console_limit_bytes;
        config.validate_limits()?;
        let started = Instant::now();
        let result = async {
            if let Some((_, mib)) = &disk {
                let (dir, mib, slot_mib) = (dir.clone(), *mib, self.cfg.vm.mount_slot_mib);
                tokio::task::spawn_blocking(move || make_vm_disks(&dir, mib, slot_mib))
                    .await
                    .map_err(|e| OpError::Internal(e.to_string()))?
                    .map_err(OpError::Internal)?;
            }
            // Every VM gets a network card, detached without a network: its snapshots' clones may be given one.
            config.net = Some(self.start_network(&slot).await?.unwrap_or_else(NetConfig::detached));
            let spec = LaunchSpec {
                api_sock: Some(dir.join("api.sock")),
                seccomp: true,
                jail: None,
                launch: Launch::Boot(config),
            };
            self.spawn(&slot, &spec)?;
            self.await_ready(&slot).await
        }
        .await;
        let rec = self.finish_start(&slot, started, result, false);
        self.sync_tcp();
        rec
    }

    /// Stops a VM (VMM shutdown, then SIGKILL) and forgets it.
    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<(), OpError> {
        let slot = self.slot(id)?;
        let _op = slot.op.lock().await;
        let rec = slot.get();
        if rec.status != VmStatus::Stopping {
            slot.transition(&self.db, VmStatus::Stopping, |_| ())?;
        }
        *slot.agent.lock().await = None;
        if let Some(p) = rec.proc().filter(|p| self.launcher.alive(*p)) {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.launcher.vmm(&rec.dir).shutdown()).await;
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.launcher.alive(p) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.launcher.kill(p);
        }
        *lock(&slot.pager) = None;
        self.launcher.release(&rec.dir);
        if let Some(n) = rec.network.clone() {
            let (net, vm) = (self.net.clone(), id.to_string());
            let _ = tokio::task::spawn_blocking(move || net.teardown(&vm, &n)).await;
        }
        slot.remove(&self.db)?;
        lock(&self.vms).remove(id);
        let _ = std::fs::remove_dir_all(&rec.dir);
        self.sync_tcp();
        info!(vm = %id, "VM deleted");
        Ok(())
    }

    pub async fn pause(&self, id: &str, pause: bool) -> Result<VmRecord, OpError> {
        let slot = self.slot(id)?;
        let _op = slot.op.lock().await;
        let rec = slot.get();
        let (from, to) =
            if pause { (VmStatus::Running, VmStatus::Paused) } else { (VmStatus::Paused, VmStatus::Running) };
        if rec.status != from {
            return Err(OpError::Conflict(format!("VM `{id}` is {}", rec.status.name())));
        }
        let vmm = self.launcher.vmm(&rec.dir);
        if pause {
            vmm.pause().await?;
        } else {
            vmm.resume().await?;
        }
        slot.transition(&self.db, to, |_| ())
    }

    /// Snapshots a running VM into the store: before-checkpoint hook, VMM snapshot (the VM resumes), put.
    pub async fn snapshot(&self, vm: &str, req: CreateSnapshot) -> Result<SnapshotInfo, OpError> {
        let how = SnapshotHow { publish: req.publish, ..Default::default() };
        Ok(self.snapshot_with(vm, &req.id, &how).await?.0)
    }

    /// A snapshot as `how` says: full, or a diff on the snapshot the VM was restored from (or last snapshotted
    /// into), stored as a whole image whose untouched chunks are the base's; the VM resumes or stays paused.
    pub(crate) async fn snapshot_with(
        &self,
        vm: &str,
        id: &str,
        how: &SnapshotHow,
    ) -> Result<(SnapshotInfo, flint_snapshot_store::PutReport), OpError> {
        let req = CreateSnapshot { id: id.to_string(), publish: how.publish };
        valid_id("snapshot id", &req.id)?;
        let slot = self.slot(vm)?;
        let _op = slot.op.lock().await;
        let rec = slot.get();
        let agent = self.agent(vm).await?;
        agent.before_checkpoint().await.map_err(|e| OpError::VmFailed(format!("before-checkpoint hook: {e}")))?;
        let started = Instant::now();
        let tmp = rec.dir.join(format!("snap-{}", req.id));
        std::fs::create_dir_all(&tmp).map_err(|e| OpError::Internal(e.to_string()))?;
        // A jailed VMM writes the snapshot as its own uid, into its own directory.
        crate::jail::give_to_dir_owner(&rec.dir, &tmp).map_err(OpError::Internal)?;
        // With drives, the VM stays paused until each drive is copied: the copies match the memory image.
        let request = flint_vmm_api::snapshot::SnapshotRequest {
            state_path: tmp.join("state"),
            mem_path: tmp.join("memory"),
            kind: if how.diff_on.is_some() {
                flint_vmm_api::snapshot::SnapshotKind::Diff
            } else {
                flint_vmm_api::snapshot::SnapshotKind::Full
            },
            resume: rec.drives.is_empty() && !how.keep_paused,
        };
        let result = async {
            let vmm = self.launcher.vmm(&rec.dir);
            let report = vmm.snapshot(request).await?;
            // The VMM's uid owns its directory and may have put a symlink or a FIFO anywhere in it: everything
            // flintd reads or writes there is resolved beneath it without following links (docs/security.md).
            let snapdir = crate::beneath::Beneath::open(&rec.dir)
                .and_then(|d| d.dir(Path::new(&format!("snap-{}", req.id))))
                .map_err(|e| OpError::VmFailed(format!("the VM's snapshot directory: {e}")))?;
            if !rec.drives.is_empty() {
                let copied = self.copy_drives(&rec, &snapdir);
                if rec.status == VmStatus::Running && !how.keep_paused {
                    vmm.resume().await?;
                }
                copied?;
            }
            if report.drives as usize != rec.drives.len() {
                return Err(OpError::Internal(format!(
                    "the VMM snapshotted {} drive(s), flintd's record has {}",
                    report.drives,
                    rec.drives.len()
                )));
            }
            let open = |name: &str| {
                snapdir
                    .open_regular(Path::new(name))
                    .map(Arc::new)
                    .map_err(|e| OpError::VmFailed(format!("the VMM's snapshot file `{name}`: {e}")))
            };
            let memory = match &how.diff_on {
                Some(base) => ImageSource::Layered { base: (base.clone(), "memory".into()), diff: open("memory")? },
                None => ImageSource::Open(open("memory")?),
            };
            let mut draft =
                SnapshotDraft::new(&req.id).image("state", ImageSource::Open(open("state")?)).image("memory", memory);
            if how.diff_on.is_some() {
                // The state file says its memory is a diff; the stored image is whole (layered on the base).
                draft.metadata.insert(MEMORY_LAYERED.into(), "true".into());
            }
            draft.metadata.extend(how.metadata.clone());
            for (i, _) in rec.drives.iter().enumerate().filter(|(_, d)| d.image.is_none()) {
                draft = draft.image(&drives::image_name(i), ImageSource::Open(open(&drives::image_name(i))?));
            }
            let image_drives: Vec<Option<String>> = rec.drives.iter().map(|d| d.image.clone()).collect();
            if image_drives.iter().any(Option::is_some) {
                draft.metadata.insert(DRIVES_IMAGE.into(), serde_json::to_string(&image_drives).unwrap_or_default());
            }
            if let Some(mib) = rec.disk_mib {
                draft.metadata.insert("disk_mib".into(), mib.to_string());
            }
            if let Some(slot) = rec.mount_slot {
                draft.metadata.insert("mount_slot".into(), slot.to_string());
                if !rec.mounts.is_empty() {
                    draft.metadata.insert("mounts".into(), serde_json::to_string(&rec.mounts).unwrap_or_default());
                }
            }
            let read_only: Vec<bool> = rec.drives.iter().map(|d| d.read_only).collect();
            draft.metadata.insert("drives_read_only".into(), drives::read_only_list(&read_only));
            // The limits are in the VMM's state (clones get them); recorded here so clones' records show them.
            let limits: Vec<_> = rec.drives.iter().map(|d| d.rate_limiter.clone()).collect();
            if limits.iter().any(Option::is_some) {
                draft
                    .metadata
                    .insert("drives_rate_limiters".into(), serde_json::to_string(&limits).unwrap_or_default());
            }
            draft.parent = how.diff_on.clone().or(rec.snapshot.clone());
            draft.vmm_format = Some(report.format_version);
            draft.metadata.insert("vm".into(), vm.to_string());
            if let Some(i) = &rec.image {
                draft.metadata.insert("image".into(), i.clone());
            }
            draft.metadata.insert("mem_mib".into(), report.mem_mib.to_string());
            draft.metadata.insert("vcpus".into(), report.vcpus.to_string());
            draft.metadata.insert("drives".into(), report.drives.to_string());
            let (manifest, put) = self.store.put(draft, req.publish).await?;
            Ok::<_, OpError>((manifest, put))
        }
        .await;
        let _ = std::fs::remove_dir_all(&tmp);
        let (manifest, put) = result?;
        let ms = crate::ms_since(started);
        self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        self.metrics.snapshot_ms_sum.fetch_add(ms as u64, Ordering::Relaxed);
        info!(vm, snapshot = %req.id, ms, "snapshot stored");
        // From the manifest just written: no listing of every snapshot in S3 to describe one.
        Ok((self.store.describe(&manifest, true, req.publish), put))
    }

    /// Copies each of a paused VM's drives into the snapshot directory `into` (as the store images `drive0`, ...).
    /// A drive in the VM's own directory is opened beneath it (its VMM's uid could have swapped it for a link).
    fn copy_drives(&self, rec: &VmRecord, into: &crate::beneath::Beneath) -> Result<(), OpError> {
        let vmdir = crate::beneath::Beneath::open(&rec.dir).map_err(|e| OpError::Internal(e.to_string()))?;
        // An image's root is named by the snapshot, not copied.
        for (i, d) in rec.drives.iter().enumerate().filter(|(_, d)| d.image.is_none()) {
            let fail = |e: std::io::Error| OpError::Internal(format!("copy drive {i} ({}): {e}", d.path.display()));
            let from = match d.path.strip_prefix(&rec.dir) {
                Ok(rel) => vmdir.open_regular(rel),
                Err(_) => std::fs::File::open(&d.path),
            }
            .map_err(fail)?;
            let to = into.create_file(Path::new(&drives::image_name(i)), 0o600).map_err(fail)?;
            let reflinked = drives::copy_files(&from, &to).map_err(fail)?;
            info!(vm = %rec.id, drive = i, reflinked, "drive copied for the snapshot");
        }
        Ok(())
    }

    /// The drives a snapshot holds (their read-only flags, in order), checked against its images: a manifest that
    /// names drives it has no images for is refused before anything starts.
    fn snapshot_drives(
        &self,
        manifest: &flint_snapshot_store::Manifest,
    ) -> Result<(Vec<bool>, Vec<Option<String>>), OpError> {
        let n = match manifest.metadata.get("drives") {
            None => 0,
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= MAX_DRIVES)
                .ok_or_else(|| OpError::BadRequest(format!("snapshot `{}`: bad drive count `{n}`", manifest.id)))?,
        };
        let flags = drives::parse_read_only_list(manifest.metadata.get("drives_read_only").map_or("", |s| s), n)
            .map_err(|e| {
                OpError::BadRequest(format!(
                    "snapshot `{}` has {n} drive(s) but no usable record of them ({e}): it was made before flintd \
                     kept drives in snapshots, and cannot be cloned",
                    manifest.id
                ))
            })?;
        let images: Vec<Option<String>> = match manifest.metadata.get(DRIVES_IMAGE) {
            None => vec![None; n],
            Some(j) => {
                serde_json::from_str::<Vec<Option<String>>>(j).ok().filter(|v| v.len() == n).ok_or_else(|| {
                    OpError::BadRequest(format!("snapshot `{}`: bad `{DRIVES_IMAGE}` record", manifest.id))
                })?
            }
        };
        for i in 0..n {
            if let Some(r) = &images[i] {
                if crate::image::parse_ref(r).is_none() || !flags[i] {
                    return Err(OpError::BadRequest(format!(
                        "snapshot `{}`: drive {i} names image `{r}`, which must be `name@sha256` and read-only",
                        manifest.id
                    )));
                }
                continue;
            }
            if manifest.image(&drives::image_name(i)).is_none() {
                return Err(OpError::BadRequest(format!(
                    "snapshot `{}` has {n} drive(s) but no image `{}`",
                    manifest.id,
                    drives::image_name(i)
                )));
            }
        }
        Ok((flags, images))
    }

    /// Restores one VM from a snapshot, then refreshes the guest's clock, entropy, env and hostname through the
    /// agent. Eager: the images are fetched whole from the store (S3 on a miss) first. Lazy: only the state image;
    /// flintd's page server serves memory from the store on first touch and prefetches the recorded working set;
    /// the first lazy restore of a snapshot records that working set.
    pub async fn restore(self: &Arc<Self>, snapshot: &str, opts: &RestoreOpts) -> Result<VmRecord, OpError> {
        let (env, lazy) = (&opts.env, opts.lazy);
        let manifest = self.store.manifest(snapshot).await?;
        let merged_memory = manifest.metadata.get(MEMORY_LAYERED).is_some_and(|v| v == "true");
        let meta = |k: &str| manifest.metadata.get(k).and_then(|m| m.parse::<u64>().ok());
        let (drive_flags, drive_images) = self.snapshot_drives(&manifest)?;
        // An image's root comes from this host's image with the recorded digest (never a path from the snapshot).
        let image_roots: Vec<Option<PathBuf>> = drive_images
            .iter()
            .map(|r| r.as_deref().map(|r| self.image_root_for(&manifest.id, r)).transpose())
            .collect::<Result<_, _>>()?;
        let drive_path = |dir: &Path, i: usize| image_roots[i].clone().unwrap_or_else(|| drives::clone_path(dir, i));
        // Informational (the VMM applies the limits from its state): an unreadable list shows no limits.
        let drive_limits: Vec<Option<flint_vmm_api::config::RateLimiterConfig>> = manifest
            .metadata
            .get("drives_rate_limiters")
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        self.check_network(opts.session.as_deref(), opts.network.as_ref())?;
        let _slot = self.restore_slots.acquire().await.map_err(|e| OpError::Internal(e.to_string()))?;
        let prefix = opts.session.as_deref().unwrap_or(if opts.pool.is_some() { "pool" } else { "clone" });
        let slot = self.reserve(None, prefix, opts.network.as_ref(), |r| {
            r.snapshot = Some(snapshot.to_string());
            r.session = opts.session.clone();
            r.pool = opts.pool.clone();
            r.image = manifest.metadata.get("image").cloned();
            // From the snapshot's metadata until the VMM says (after the restore) what it is.
            r.mem_mib = meta("mem_mib").unwrap_or(0);
            r.vcpus = meta("vcpus").unwrap_or(0).min(u64::from(u8::MAX)) as u8;
            r.lazy = lazy;
            r.env = env.clone();
            r.drives = drive_flags
                .iter()
                .enumerate()
                .map(|(i, ro)| DriveSpec {
                    path: drive_path(&r.dir, i),
                    read_only: *ro,
                    rate_limiter: drive_limits.get(i).cloned().flatten(),
                    image: drive_images[i].clone(),
                })
                .collect();
            r.disk_mib = meta("disk_mib");
            // Informational: what the guest had mounted through its slot (still mounted in the clone).
            r.mount_slot = meta("mount_slot").map(|m| m as usize).filter(|m| *m < drive_flags.len());
            r.mounts = manifest.metadata.get("mounts").and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default();
        })?;
        let _op = slot.op.lock().await;
        let dir = slot.get().dir;
        let started = Instant::now();
        let mut recorded = false;
        let result = async {
            let t = Instant::now();
            let _pin = self.store.pin(&manifest);
            self.store.get_image(snapshot, "state", &dir.join("state")).await?;
            // Every drive but an image's root is this clone's own file, written from the snapshot's copy.
            for i in (0..drive_flags.len()).filter(|i| image_roots[*i].is_none()) {
                self.store.get_image(snapshot, &drives::image_name(i), &drives::clone_path(&dir, i)).await?;
            }
            let (memory, pager) = if lazy {
                let prefetch = self.store.working_set(snapshot).await?.map(|w| w.chunks).unwrap_or_default();
                recorded = !prefetch.is_empty();
                let source = Arc::new(pager::StoreSource::open(&self.store, snapshot).await?);
                let listener = pager::bind(&dir)?;
                (MemorySource::Pager { socket: pager::socket_path(&dir) }, Some((listener, source, prefetch)))
            } else {
                // One memory file per snapshot, mapped copy-on-write by every eager clone: they share its page
                // cache (a clone's own pages are only those it writes).
                (MemorySource::Private { path: self.shared_memory(&manifest).await? }, None)
            };
            let fetch_ms = crate::ms_since(t);
            slot.commit(&self.db, |r| r.fetch_ms = Some(fetch_ms))?;
            let net = self.start_network(&slot).await?;
            let spec = LaunchSpec {
                api_sock: Some(dir.join("api.sock")),
                seccomp: true,
                jail: None,
                launch: Launch::Restore(RestoreSpec {
                    state_path: dir.join("state"),
                    memory,
                    devices: HostDevices {
                        vsock_uds: Some(dir.join("vsock.sock")),
                        console: Some(dir.join("console.log").display().to_string()),
                        console_limit_bytes: Some(self.cfg.vm.console_limit_bytes),
                        net,
                        drive_paths: (!drive_flags.is_empty())
                            .then(|| (0..drive_flags.len()).map(|i| drive_path(&dir, i)).collect()),
                    },
                    // A session's next hibernation is a diff against this snapshot: log dirty pages from now.
                    // Other clones never take diffs: no log (KVM then need not write-protect pages for it).
                    track_dirty_pages: Some(opts.session.is_some() || opts.track_dirty),
                    merged_memory,
                }),
            };
            let p = self.spawn(&slot, &spec)?;
            if let Some((listener, source, prefetch)) = pager {
                self.serve_memory(&slot, listener, source, prefetch, p).await?;
            }
            self.await_ready(&slot).await
        }
        .await;
        let rec = self.finish_start(&slot, started, result, true);
        self.sync_tcp();
        let rec = rec?;
        if lazy {
            if !recorded {
                self.record_working_set(&slot, snapshot).await;
            }
            if let Err(e) = self.store.rescan() {
                warn!(error = %e, "could not rescan the local snapshot cache");
            }
        }
        Ok(rec)
    }

    /// Where a snapshot's shared memory file lives: named by a hash of the memory image's manifest entry (its
    /// chunk list), so a file can never stand for other content, even if a snapshot id is reused.
    pub(crate) fn shared_memory_path(&self, manifest: &flint_snapshot_store::Manifest) -> Option<PathBuf> {
        let image = manifest.image("memory")?;
        let key = flint_snapshot_store::ChunkId::of(&serde_json::to_vec(image).ok()?).to_hex();
        Some(self.cfg.data_dir.join("shared").join(format!("{}.memory", &key[..32])))
    }

    /// The snapshot's memory image as one file every eager clone maps MAP_PRIVATE (their page cache is shared;
    /// each clone's writes are its own copy-on-write pages). Written once from the store (temp file, then
    /// renamed: a file clones map is never written again); later clones find it. Deleting it while clones run is
    /// safe: their mappings hold the inode.
    async fn shared_memory(&self, manifest: &flint_snapshot_store::Manifest) -> Result<PathBuf, OpError> {
        let path = self
            .shared_memory_path(manifest)
            .ok_or_else(|| OpError::BadRequest(format!("snapshot `{}` has no memory image", manifest.id)))?;
        let size = manifest.image("memory").map(|i| i.size).unwrap_or(0);
        let is_ready = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.len() == size);
        if is_ready(&path) {
            return Ok(path);
        }
        let gate = lock(&self.shared_writes).entry(path.display().to_string()).or_default().clone();
        let _turn = gate.lock().await;
        if !is_ready(&path) {
            let dir = path.parent().unwrap_or(Path::new("/"));
            std::fs::create_dir_all(dir).map_err(|e| OpError::Internal(format!("create {}: {e}", dir.display())))?;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let fetched = self.store.get_image(&manifest.id, "memory", &tmp).await;
            if let Err(e) = fetched {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
            std::fs::rename(&tmp, &path).map_err(|e| OpError::Internal(format!("rename {}: {e}", path.display())))?;
            info!(snapshot = %manifest.id, path = %path.display(), "shared memory file written");
        }
        lock(&self.shared_writes).remove(&path.display().to_string());
        Ok(path)
    }

    /// Deletes a snapshot from the store and its shared memory file (running clones keep their mappings).
    pub(crate) async fn delete_stored_snapshot(&self, id: &str, remote: bool) -> Result<(), OpError> {
        if let Some(p) = self.store.manifest(id).await.ok().and_then(|m| self.shared_memory_path(&m)) {
            let _ = std::fs::remove_file(p);
        }
        Ok(self.store.delete(id, remote).await?)
    }

    /// Serves a lazily restored VM's memory: waits for its VMM's userfaultfd, then serves faults from the store.
    /// A unit that cannot be provided stops that VM with the page server's message.
    async fn serve_memory(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        listener: std::os::unix::net::UnixListener,
        source: Arc<pager::StoreSource>,
        prefetch: Vec<u32>,
        p: Proc,
    ) -> Result<(), OpError> {
        let on_fatal = self.pager_fatal(slot, p);
        let wait = Duration::from_secs(60);
        let workers = self.cfg.store.lazy_fetch_workers.max(1);
        let served = tokio::task::spawn_blocking(move || {
            pager::accept_and_serve(listener, p.pid, source, prefetch, workers, wait, on_fatal)
        })
        .await
        .map_err(|e| OpError::Internal(e.to_string()))??;
        *lock(&slot.pager) = Some(Arc::new(served));
        Ok(())
    }

    /// What the page server does when memory cannot be provided: record why, stop the VMM.
    fn pager_fatal(self: &Arc<Self>, slot: &Arc<Slot>, p: Proc) -> flint_uffd::OnFatal {
        let this = Arc::downgrade(self);
        let slot = Arc::downgrade(slot);
        Box::new(move |message: String| {
            let (Some(this), Some(slot)) = (this.upgrade(), slot.upgrade()) else { return };
            warn!(vm = %slot.get().id, %message, "stopping the VM");
            if let Err(e) = slot.commit(&this.db, |r| r.error = Some(message.clone())) {
                warn!(error = %e, "could not record why the page server stopped a VM");
            }
            this.launcher.kill(p);
        })
    }

    /// After a flintd restart: a new page server for a lazily restored VM (its VMM hands the fd over again).
    fn readopt_pager(self: &Arc<Self>, slot: &Arc<Slot>, snapshot: &str, dir: &Path, p: Option<Proc>) {
        let Some(p) = p else { return };
        let (this, slot, snapshot, dir) = (self.clone(), slot.clone(), snapshot.to_string(), dir.to_path_buf());
        tokio::spawn(async move {
            let result = async {
                let source = Arc::new(pager::StoreSource::open(&this.store, &snapshot).await?);
                let listener = pager::bind(&dir)?;
                this.serve_memory(&slot, listener, source, Vec::new(), p).await
            }
            .await;
            if let Err(e) = result {
                warn!(vm = %slot.get().id, error = %e, "could not serve a re-adopted VM's memory; stopping it");
                if let Err(db) =
                    slot.commit(&this.db, |r| r.error = Some(format!("page server after a flintd restart: {e}")))
                {
                    warn!(error = %db, "could not record why a re-adopted VM was stopped");
                }
                this.launcher.kill(p);
            }
        });
    }

    /// Stores the chunks a lazily restored VM touched until its agent was ready and refreshed.
    async fn record_working_set(&self, slot: &Arc<Slot>, snapshot: &str) {
        let Some(served) = lock(&slot.pager).clone() else { return };
        let units = served.report().touched_units;
        if units.is_empty() {
            return;
        }
        match self.store.put_working_set(snapshot, "memory", &units).await {
            Ok(()) => info!(snapshot, chunks = units.len(), "recorded the restore working set"),
            Err(e) => warn!(snapshot, error = %e, "could not record the working set"),
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

    /// Deletes a snapshot unless something still needs it: a template made from it, or a running VM restored
    /// lazily from it (its next cold page would have nowhere to come from).
    pub async fn delete_snapshot(&self, id: &str, remote: bool) -> Result<(), OpError> {
        if let Some(t) = self.templates()?.into_iter().find(|t| t.snapshot == id) {
            return Err(OpError::Conflict(format!(
                "snapshot `{id}` is template `{}`'s: delete the template first",
                t.name
            )));
        }
        if let Some(s) =
            self.sessions.records().into_iter().find(|s| s.base == id || s.stale_bases.iter().any(|b| b == id))
        {
            return Err(OpError::Conflict(format!(
                "snapshot `{id}` is session `{}`'s (a wake restores it): delete the session first",
                s.id
            )));
        }
        if let Some(vm) =
            self.list().into_iter().find(|r| r.lazy && r.status.has_process() && r.snapshot.as_deref() == Some(id))
        {
            return Err(OpError::Conflict(format!(
                "VM `{}` restores its memory lazily from snapshot `{id}`: delete the VM first",
                vm.id
            )));
        }
        self.delete_stored_snapshot(id, remote).await
    }

    /// Forgets a template (its snapshot stays) and deletes its warm pool's VMs.
    pub async fn delete_template(self: &Arc<Self>, name: &str) -> Result<(), OpError> {
        self.template(name)?;
        self.db.delete(TEMPLATES, name)?;
        self.drain_pool(name, 0).await;
        Ok(())
    }

    /// Changes a VM's record (not its status) through its slot.
    pub(crate) fn commit_vm(&self, id: &str, f: impl FnOnce(&mut VmRecord)) -> Result<VmRecord, OpError> {
        self.slot(id)?.commit(&self.db, f)
    }

    pub(crate) fn put_template(&self, rec: &TemplateRecord) -> Result<(), OpError> {
        Ok(self.db.put(TEMPLATES, &rec.name, rec)?)
    }

    /// The database's record of a VM (for tests: it must equal the in-memory one).
    pub fn db_record(&self, id: &str) -> Result<Option<VmRecord>, OpError> {
        let all: Vec<VmRecord> = self.db.all(VMS)?;
        Ok(all.into_iter().find(|r| r.id == id))
    }

    /// Stops every VMM this daemon knows (`flintd --stop-vms-on-exit`, tests).
    pub async fn stop_all(self: &Arc<Self>) {
        let ids: Vec<String> = lock(&self.vms).keys().cloned().collect();
        for id in ids {
            let _ = self.delete(&id).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeLauncher;
    use flint_vmm_api::describe::RunState;

    use crate::fake::TestEnv as Env;

    fn vm(id: &str) -> CreateVm {
        CreateVm { id: Some(id.into()), ..Default::default() }
    }

    /// The quotas of `[limits]`: exceeding one is a QuotaExceeded (429) naming it, and nothing starts; failed VMs
    /// hold no quota.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quotas_refuse_before_anything_starts() {
        let mut env = Env::new("quota");
        env.cfg.limits =
            crate::config::Limits { max_vms: 3, max_total_mem_mib: 1024, max_clones_per_call: 2, max_disk_mib: 0 };
        let l = FakeLauncher::default();
        let d = env.open(&l);
        let quota = |r: Result<VmRecord, OpError>, what: &str| match r {
            Err(OpError::QuotaExceeded(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("expected a quota error naming {what}: {other:?}"),
        };
        d.create(CreateVm { id: Some("a".into()), mem_mib: Some(512), ..Default::default() }).await.unwrap();
        quota(d.create(CreateVm { mem_mib: Some(768), ..Default::default() }).await, "max_total_mem_mib");
        d.snapshot("a", CreateSnapshot { id: "qa".into(), publish: false }).await.unwrap();
        let clones = |n| d.clones(CreateClones { snapshot: Some("qa".into()), count: n, ..Default::default() });
        match clones(3).await {
            Err(OpError::QuotaExceeded(m)) => assert!(m.contains("max_clones_per_call"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Two clones of 512 MiB would pass the memory quota: refused as a whole, none started.
        match clones(2).await {
            Err(OpError::QuotaExceeded(m)) => assert!(m.contains("max_total_mem_mib"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!((d.list().len(), l.running()), (1, 1));
        d.create(CreateVm { id: Some("b".into()), mem_mib: Some(256), ..Default::default() }).await.unwrap();
        d.create(CreateVm { id: Some("c".into()), mem_mib: Some(128), ..Default::default() }).await.unwrap();
        quota(d.create(CreateVm { mem_mib: Some(64), ..Default::default() }).await, "max_vms");
        // A failed VM holds nothing.
        l.kill(d.get("c").unwrap().proc().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.get("c").unwrap().status != VmStatus::Failed {
            assert!(Instant::now() < deadline, "the exit was not noticed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d.create(CreateVm { id: Some("d".into()), mem_mib: Some(64), ..Default::default() }).await.unwrap();
        d.stop_all().await;
    }

    /// After any mix of operations, a VM that still exists is Running or Paused, its VMM is alive, and the
    /// database holds exactly the in-memory record; a deleted one is gone from both and its VMM stopped.
    fn check(d: &Daemon, l: &FakeLauncher, id: &str) {
        match d.get(id) {
            Ok(rec) => {
                assert!(matches!(rec.status, VmStatus::Running | VmStatus::Paused), "{id}: {rec:?}");
                assert_eq!(d.db_record(id).unwrap().as_ref(), Some(&rec), "{id}: database and memory differ");
                assert!(rec.proc().is_some_and(|p| d.launcher.alive(p)), "{id}: no VMM behind {rec:?}");
            }
            Err(OpError::NotFound(_)) => {
                assert_eq!(d.db_record(id).unwrap(), None, "{id}: deleted but still in the database");
                assert!(l.pid_of(&d.cfg.data_dir.join("vms").join(id)).is_none(), "{id}: VMM left running");
            }
            Err(e) => panic!("{id}: {e}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_interleavings_on_one_vm_end_in_valid_states() {
        let env = Env::new("interleave");
        let l = FakeLauncher::default();
        let d = env.open(&l);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut outcomes: HashMap<&str, usize> = HashMap::new();
        for round in 0..100 {
            let id = format!("vm{round}");
            d.create(vm(&id)).await.unwrap();
            let ops: Vec<u64> = (0..5).map(|_| next() % 5).collect();
            let tasks: Vec<_> = ops
                .iter()
                .enumerate()
                .map(|(i, op)| {
                    let (d, id, op) = (d.clone(), id.clone(), *op);
                    tokio::spawn(async move {
                        match op {
                            0 => d.pause(&id, true).await.map(drop),
                            1 => d.pause(&id, false).await.map(drop),
                            2 => d
                                .snapshot(&id, CreateSnapshot { id: format!("s{id}-{i}"), publish: false })
                                .await
                                .map(drop),
                            3 => d.delete(&id).await,
                            _ => match d.agent(&id).await {
                                Ok(a) => a
                                    .exec_output(flint_agent::protocol::ExecRequest {
                                        argv: vec!["/bin/true".into()],
                                        ..Default::default()
                                    })
                                    .await
                                    .map(drop)
                                    .map_err(|e| OpError::VmFailed(e.to_string())),
                                Err(e) => Err(e),
                            },
                        }
                    })
                })
                .collect();
            for t in tasks {
                let r = t.await.unwrap();
                let k = match r {
                    Ok(()) => "ok",
                    Err(OpError::Conflict(_)) => "conflict",
                    Err(OpError::NotFound(_)) => "not found",
                    Err(OpError::VmFailed(_)) => "vm failed",
                    Err(e) => panic!("round {round}: unexpected error {e}"),
                };
                *outcomes.entry(k).or_default() += 1;
            }
            check(&d, &l, &id);
            if d.get(&id).is_ok() {
                d.delete(&id).await.unwrap();
                check(&d, &l, &id);
            }
        }
        assert_eq!(l.running(), 0, "every VMM stopped");
        // The mix really interleaved: each kind of outcome happened.
        for k in ["ok", "conflict", "not found"] {
            assert!(outcomes.get(k).copied().unwrap_or(0) > 0, "{k} never happened: {outcomes:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readoption_after_a_restart_handles_every_status() {
        let env = Env::new("adopt");
        let l = FakeLauncher::default();
        let d = env.open(&l);
        for id in ["running", "paused", "starting", "stopping", "gone", "failed", "mid-pause", "mid-resume"] {
            d.create(CreateVm { id: Some(id.into()), env: [("K".into(), "v".into())].into(), ..Default::default() })
                .await
                .unwrap();
        }
        d.pause("paused", true).await.unwrap();
        d.pause("mid-resume", true).await.unwrap();
        // Killed mid-operation: the VMM changed run state, the record (written when an operation ends) did not.
        l.vmm(&d.get("mid-pause").unwrap().dir).pause().await.unwrap();
        l.vmm(&d.get("mid-resume").unwrap().dir).resume().await.unwrap();
        // Rewind or advance records to what a crash mid-operation leaves behind.
        let set = |id: &str, f: &dyn Fn(&mut VmRecord)| {
            let slot = d.slot(id).unwrap();
            let mut rec = slot.get();
            f(&mut rec);
            d.db.put(VMS, id, &rec).unwrap();
        };
        set("starting", &|r| r.status = VmStatus::Starting);
        set("stopping", &|r| r.status = VmStatus::Stopping);
        set("failed", &|r| {
            r.status = VmStatus::Failed;
            r.error = Some("boom".into());
        });
        let gone = d.get("gone").unwrap().proc().unwrap();
        // A VMM started just before a crash, whose pid never reached a record.
        let orphan_dir = d.cfg.data_dir.join("vms").join("orphan");
        std::fs::create_dir_all(&orphan_dir).unwrap();
        let mut config = VmConfig::new(env.cfg.images["default"].join("vmlinux"));
        config.initramfs = Some(env.cfg.images["default"].join("initramfs.cpio"));
        let spec = LaunchSpec { api_sock: None, seccomp: true, jail: None, launch: Launch::Boot(config) };
        let orphan = l.spawn(&orphan_dir, &spec, None).unwrap();
        let stopping = d.get("stopping").unwrap().proc().unwrap();
        let failed = d.get("failed").unwrap().proc().unwrap();
        l.kill(failed);
        // flintd "crashes": nothing is stopped. Wait until nothing of it is left (its database is closed), then a
        // VMM dies while no flintd watches.
        let old = Arc::downgrade(&d);
        drop(d);
        let deadline = Instant::now() + Duration::from_secs(10);
        while old.upgrade().is_some() {
            assert!(Instant::now() < deadline, "the old daemon is still referenced");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        l.kill(gone);

        let d = env.open(&l);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let starting = d.get("starting").map(|r| r.status);
            if d.get("stopping").is_err() && starting.as_ref().is_ok_and(|s| *s == VmStatus::Running) {
                break;
            }
            assert!(Instant::now() < deadline, "adoption did not settle: starting {starting:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(d.get("running").unwrap().status, VmStatus::Running);
        assert_eq!(d.get("paused").unwrap().status, VmStatus::Paused);
        assert_eq!(d.get("gone").unwrap().status, VmStatus::Lost);
        assert_eq!(d.get("failed").unwrap().status, VmStatus::Failed);
        // The record wins: the VMMs are brought back to it.
        for (id, want) in [("mid-pause", RunState::Running), ("mid-resume", RunState::Paused)] {
            let vmm = l.vmm(&d.get(id).unwrap().dir);
            let deadline = Instant::now() + Duration::from_secs(10);
            while vmm.describe().await.unwrap().state != want {
                assert!(Instant::now() < deadline, "{id}: the VMM was not brought back to its record");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert!(!l.alive(stopping), "the interrupted delete was finished");
        assert!(!l.alive(orphan), "the VMM no record owned was stopped");
        assert!(!orphan_dir.exists(), "and its directory removed");
        assert_eq!(d.db_record("stopping").unwrap(), None);
        // The VM that was starting got its env through the agent after the restart.
        let a = d.agent("starting").await.unwrap();
        let out = a
            .exec_output(flint_agent::protocol::ExecRequest {
                argv: vec!["/bin/sh".into(), "-c".into(), "echo $K".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "v\n");
        for id in ["running", "paused", "starting", "gone", "failed"] {
            assert_eq!(d.db_record(id).unwrap().as_ref(), Some(&d.get(id).unwrap()), "{id}");
        }
        // An adopted VM's exit is still noticed.
        l.kill(d.get("running").unwrap().proc().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.get("running").unwrap().status != VmStatus::Failed {
            assert!(Instant::now() < deadline, "the adopted VMM's exit went unnoticed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d.stop_all().await;
        assert_eq!(l.running(), 0);
    }

    /// A clone whose agent never answers fails by its own deadline and frees its restore slot: the other clones
    /// of the same call are restored meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restore_whose_agent_never_answers_fails_alone() {
        let mut env = Env::new("stuck");
        env.cfg.restore_agent_timeout_s = 2;
        env.cfg.max_parallel_restores = 1;
        let l = FakeLauncher::default();
        let d = env.open(&l);
        d.create(vm("src")).await.unwrap();
        d.snapshot("src", CreateSnapshot { id: "s".into(), publish: false }).await.unwrap();
        l.silence_next_agents(1);
        let t = Instant::now();
        let clones =
            d.clones(CreateClones { snapshot: Some("s".into()), count: 3, ..Default::default() }).await.unwrap();
        let took = t.elapsed();
        assert_eq!(clones.len(), 2, "the two clones with an agent are restored");
        assert!(took < Duration::from_secs(10), "one silent agent held the single restore slot for {took:?}");
        let failed: Vec<VmRecord> = d.list().into_iter().filter(|r| r.status == VmStatus::Failed).collect();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].error.as_deref().unwrap_or("").contains("did not answer within 2s"), "{failed:?}");
        assert!(!failed[0].proc().is_some_and(|p| l.alive(p)), "no VMM left for the failed clone");
        d.stop_all().await;
    }

    /// What a guest sends cannot grow flintd: a file download is streamed and capped (a 4 GiB file is a 413
    /// before any byte moves; an endless device ends at the cap), whatever size the guest reports.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn guest_files_are_streamed_and_capped() {
        let mut env = Env::new("files");
        env.cfg.max_file_read_bytes = 1 << 20;
        let l = FakeLauncher::default();
        let d = env.open(&l);
        d.create(vm("f")).await.unwrap();
        let root = crate::fake::agent_root();
        let big = root.join("big-4g");
        std::fs::File::create(&big).unwrap().set_len(4 << 30).unwrap();
        let zero = root.join("zero-dev");
        let _ = std::fs::remove_file(&zero);
        let c = std::ffi::CString::new(zero.to_str().unwrap()).unwrap();
        // SAFETY: mknod(2) with a valid C path: a character device 1:5 (/dev/zero) in the test's own directory.
        let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 5)) } == 0;
        let sock = env.dir.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let app = crate::api::router(d.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let get = |path: String| {
            let sock = sock.clone();
            async move { crate::http::request(&sock, "GET", &path, None, Duration::from_secs(60)).await }
        };
        let (status, body) = get("/v1/vms/f/files?path=/big-4g".into()).await.unwrap();
        assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
        assert!(
            String::from_utf8_lossy(&body).contains("over the 1048576-byte limit"),
            "{}",
            String::from_utf8_lossy(&body)
        );
        let (status, body) = get("/v1/vms/f/files?path=/big-4g&limit=100".into()).await.unwrap();
        assert_eq!((status, body.len()), (200, 100));
        // Through the client too: without a limit, a file over the client's maximum is an error, not an
        // allocation of the size the guest reports; with one, exactly that much arrives.
        let a = d.agent("f").await.unwrap();
        let e = a.read_file_limit("/big-4g", None).await.unwrap_err();
        assert_eq!(e.code(), Some(flint_agent::protocol::ErrorCode::TooLarge), "{e}");
        assert_eq!(a.read_file_limit("/big-4g", Some(3 << 20)).await.unwrap().len(), 3 << 20);
        if made {
            // A device reports size 0 and never ends: the body stops at the cap, never complete.
            match get("/v1/vms/f/files?path=/zero-dev".into()).await {
                Ok((200, body)) => panic!("an endless device came back whole ({} bytes)", body.len()),
                Ok((status, body)) => assert!(status >= 400, "{status} {}", body.len()),
                Err(e) => assert!(e.to_string().contains("malformed"), "{e}"),
            }
            let (status, body) = get("/v1/vms/f/files?path=/zero-dev&limit=4096".into()).await.unwrap();
            assert_eq!((status, body.len()), (200, 4096));
            let _ = std::fs::remove_file(&zero);
        }
        let _ = std::fs::remove_file(&big);
        server.abort();
        d.stop_all().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clones_carry_the_snapshot_shape_and_limits_are_400s() {
        let env = Env::new("shape");
        let l = FakeLauncher::default();
        let d = env.open(&l);
        for (req, want) in [
            (CreateVm { vcpus: Some(9), ..Default::default() }, "vcpus must be between 1 and 8, not 9"),
            (CreateVm { mem_mib: Some(257), ..Default::default() }, "mem_mib must be a multiple of 2"),
            (CreateVm { vcpus: Some(0), ..Default::default() }, "vcpus must be between 1 and 8, not 0"),
        ] {
            match d.create(req).await {
                Err(OpError::BadRequest(m)) => assert!(m.contains(want), "{m}"),
                other => panic!("expected a 400: {other:?}"),
            }
        }
        assert!(d.list().is_empty() && l.running() == 0, "nothing was started");
        let src = d
            .create(CreateVm { id: Some("src".into()), vcpus: Some(2), mem_mib: Some(512), ..Default::default() })
            .await
            .unwrap();
        assert_eq!((src.vcpus, src.mem_mib), (2, 512));
        d.snapshot("src", CreateSnapshot { id: "two".into(), publish: false }).await.unwrap();
        let clones =
            d.clones(CreateClones { snapshot: Some("two".into()), count: 3, ..Default::default() }).await.unwrap();
        assert_eq!(clones.len(), 3);
        for c in &clones {
            assert_eq!((c.vcpus, c.mem_mib, c.status), (2, 512, VmStatus::Running), "{c:?}");
            assert_eq!(d.db_record(&c.id).unwrap().as_ref(), Some(c));
        }
        // A template's snapshot cannot be deleted from under it.
        let t = d.create_template(CreateTemplate { name: "tp".into(), ..Default::default() }).await.unwrap();
        match d.delete_snapshot(&t.snapshot, false).await {
            Err(OpError::Conflict(m)) => assert!(m.contains("template `tp`"), "{m}"),
            other => panic!("expected a 409: {other:?}"),
        }
        d.delete_template("tp").await.unwrap();
        d.delete_snapshot(&t.snapshot, false).await.unwrap();
        // A snapshot of a VM with drives holds their content; every clone gets its own copy of each.
        let (disk, ro) = (env.dir.join("disk.img"), env.dir.join("ro.img"));
        let limit = flint_vmm_api::config::RateLimiterConfig {
            bandwidth: Some(flint_vmm_api::config::TokenBucketConfig {
                size: 4096,
                one_time_burst: 0,
                refill_time_ms: 250,
            }),
            ops: None,
        };
        std::fs::write(&disk, b"before".repeat(1000)).unwrap();
        std::fs::write(&ro, b"read-only").unwrap();
        let src = d
            .create(CreateVm {
                id: Some("with-drive".into()),
                drives: vec![
                    DriveSpec { path: disk.clone(), read_only: false, rate_limiter: Some(limit.clone()), image: None },
                    DriveSpec { path: ro.clone(), read_only: true, rate_limiter: None, image: None },
                ],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(src.drives.len(), 2);
        d.snapshot("with-drive", CreateSnapshot { id: "drv".into(), publish: false }).await.unwrap();
        assert_eq!(d.get("with-drive").unwrap().status, VmStatus::Running);
        let vmm = l.vmm(&src.dir);
        assert_eq!(vmm.describe().await.unwrap().state, RunState::Running, "resumed after the drives were copied");
        // The source writes on: the snapshot keeps what the drive held when it was taken.
        std::fs::write(&disk, b"after").unwrap();
        let clones =
            d.clones(CreateClones { snapshot: Some("drv".into()), count: 2, ..Default::default() }).await.unwrap();
        assert_eq!(clones.len(), 2);
        let mut paths = Vec::new();
        for c in &clones {
            assert_eq!(c.drives.len(), 2);
            assert!(c.drives[0].path.starts_with(&c.dir) && !c.drives[0].read_only && c.drives[1].read_only, "{c:?}");
            assert_eq!((c.drives[0].rate_limiter.as_ref(), c.drives[1].rate_limiter.as_ref()), (Some(&limit), None));
            let started = l.vmm(&c.dir).describe().await.unwrap().config.drives;
            assert_eq!(started.iter().map(|d| &d.path).collect::<Vec<_>>(), vec![&c.drives[0].path, &c.drives[1].path]);
            assert_eq!(std::fs::read(&c.drives[0].path).unwrap(), b"before".repeat(1000));
            assert_eq!(std::fs::read(&c.drives[1].path).unwrap(), b"read-only");
            paths.push(c.drives[0].path.clone());
        }
        std::fs::write(&paths[0], b"clone 0 was here").unwrap();
        assert_eq!(std::fs::read(&paths[1]).unwrap(), b"before".repeat(1000), "clones share no drive file");
        assert_eq!(std::fs::read(&disk).unwrap(), b"after");
        // A snapshot of a clone holds the clone's own drive.
        d.snapshot(&clones[0].id, CreateSnapshot { id: "drv2".into(), publish: false }).await.unwrap();
        let again =
            d.clones(CreateClones { snapshot: Some("drv2".into()), count: 1, ..Default::default() }).await.unwrap();
        assert_eq!(std::fs::read(&again[0].drives[0].path).unwrap(), b"clone 0 was here");
        // A manifest that claims drives it has no images for is refused before anything starts.
        let running = l.running();
        let mut m = d.store.manifest("drv").await.unwrap();
        m.metadata.insert("drives".into(), "3".into());
        m.metadata.insert("drives_read_only".into(), "0,0,0".into());
        let forged = d.snapshot_drives(&m).unwrap_err();
        assert!(forged.to_string().contains("no image `drive2`"), "{forged}");
        m.metadata.remove("drives_read_only");
        assert!(d.snapshot_drives(&m).unwrap_err().to_string().contains("cannot be cloned"));
        assert_eq!(l.running(), running);
        d.stop_all().await;
    }
}
