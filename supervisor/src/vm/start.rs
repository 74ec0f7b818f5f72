//! Starting a VM, booted from an image or restored from a snapshot. Both go the same way:
//!
//! 1. reserve: an id, a place in the quotas, a uid and a network block, a directory (in memory: a restart
//!    removes a directory or network namespace no record owns);
//! 2. what the VM needs on the host: its disks (boot) or its images from the store (restore), its network;
//! 3. spawn the VMM and record it, in `starting` with its pid (the first of at most two durable commits: a
//!    restart finds the VMM and finishes the start); a lazy restore then gets its page server;
//! 4. wait for the agent and give it its env (boot) or refresh it (restore: clock, entropy, env, hostname);
//! 5. the record in `running` (or `paused`, for a pool) with its pid, timings and shape: the second commit.
//!
//! A failure at any step releases everything acquired so far, newest first, and removes the record.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flint_agent::client::AgentClient;
use flint_vmm_api::config::{check_mem_mib, check_vcpus, DriveConfig, NetConfig, VmConfig, VsockConfig};
use flint_vmm_api::spec::{HostDevices, Launch, LaunchSpec, MemorySource, RestoreSpec};
use flint_vmm_api::{lock, now_unix_ms};
use tracing::{info, warn, Instrument};

use super::error::StartError;
use super::meta::SnapshotMeta;
use super::model::*;
use super::{EventKind, Manager, Resource, Vm};
use crate::drives;
use crate::launcher::Proc;

/// A restore as a caller asks for it.
#[derive(Debug, Clone, Default)]
pub struct Restore {
    pub snapshot: String,
    /// Environment for the VM's execs (set by the agent's refresh).
    pub env: BTreeMap<String, String>,
    /// Memory from the store on first touch (working set prefetched) instead of fetched whole first.
    pub lazy: bool,
    /// Log dirty pages: the VM's next snapshot may be a diff on this one (a session's hibernation).
    pub track_dirty: bool,
    pub owner: Option<OwnerTag>,
    /// The guest's hostname; default: the VM's id.
    pub hostname: Option<String>,
    /// A network of its own.
    pub network: Option<crate::net::NetworkRequest>,
    /// The new VM's id starts with this (default `clone`).
    pub id_prefix: Option<String>,
    /// Leave it paused once its agent answered (a warm pool's VM).
    pub paused: bool,
    /// A CPU limit (a fraction of a core); none: the snapshot's.
    pub cpu: Option<f64>,
    /// The dead man's switch the VMM arms (a cluster host's session VMs: docs/cluster.md).
    pub fence: Option<PathBuf>,
}

/// A start that failed: why, and the VM's record as it was when it failed (nothing of it is left).
#[derive(Debug)]
pub struct StartFailure {
    pub vm: Option<Box<VmRecord>>,
    pub error: Box<StartError>,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for StartFailure {}

impl crate::error::Classify for StartFailure {
    fn kind(&self) -> crate::error::Kind {
        self.error.kind()
    }
}

impl From<StartError> for StartFailure {
    fn from(error: StartError) -> Self {
        StartFailure { vm: None, error: Box::new(error) }
    }
}

/// The guest's own time for a refresh, from the agent's answer.
pub(crate) fn refresh_guest_ms(answer: Option<&flint_agent::protocol::Response>) -> Option<f64> {
    match answer {
        Some(flint_agent::protocol::Response::Refreshed { guest_us: Some(us), .. }) => Some(*us as f64 / 1000.0),
        _ => None,
    }
}

/// A disk-rooted image's VM's writable disk size: at least [`crate::image::MIN_DISK_MIB`], at most `max` (0: no
/// limit).
pub fn check_disk_mib(mib: u64, max: u64) -> Result<(), DiskSizeError> {
    if mib < crate::image::MIN_DISK_MIB || (max > 0 && mib > max) {
        return Err(DiskSizeError { mib, max });
    }
    Ok(())
}

/// A disk size [`check_disk_mib`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("disk_mib {mib}: between {} and limits.max_disk_mib = {max}", crate::image::MIN_DISK_MIB)]
pub struct DiskSizeError {
    pub mib: u64,
    pub max: u64,
}

/// The drive index of a disk image's VM's mount slot (`vdc`, after the image's root and the VM's disk).
pub(crate) const MOUNT_SLOT: usize = 2;

/// A disk-rooted image's VM's own files in its directory `dir`: its writable disk (`mib`, ext4) and its mount slot
/// (`slot_mib`, sparse, empty until a dynamic mount writes it).
fn make_vm_disks(dir: &Path, mib: u64, slot_mib: u64) -> Result<(), StartError> {
    let disk = drives::clone_path(dir, 1);
    crate::image::make_disk(&disk, mib)?;
    let slot_file = drives::clone_path(dir, MOUNT_SLOT);
    std::fs::File::create(&slot_file)
        .and_then(|f| f.set_len(slot_mib << 20))
        .map_err(|source| StartError::Io { what: format!("create {}", slot_file.display()), source })
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let what = what.into();
    move |source| StartError::Io { what, source }
}

impl Manager {
    /// A new VM in `starting` (in memory until its VMM is spawned), with an empty directory.
    fn reserve(
        self: &Arc<Self>,
        id: Option<String>,
        prefix: &str,
        network: Option<&crate::net::NetworkRequest>,
        f: impl FnOnce(&mut VmRecord),
    ) -> Result<Arc<Vm>, StartError> {
        let id = match id {
            Some(id) => {
                super::valid_id("VM id", &id).map_err(|e| StartError::Invalid(e.to_string()))?;
                id
            }
            None => self.new_id(prefix),
        };
        let dir = self.vm_dir(&id);
        let mut rec = VmRecord {
            id: id.clone(),
            status: VmStatus::Starting,
            pid: None,
            pid_start: None,
            dir: dir.clone(),
            image: None,
            disk_mib: None,
            cpu: None,
            mount_slot: None,
            mounts: Vec::new(),
            snapshot: None,
            mem_mib: 0,
            vcpus: 0,
            created_unix_ms: now_unix_ms(),
            timings: VmTimings::default(),
            error: None,
            lazy: false,
            env: BTreeMap::new(),
            hostname: None,
            drives: Vec::new(),
            uid: None,
            owner: None,
            network: None,
            track_dirty: false,
        };
        f(&mut rec);
        rec.timings.start_clock_us.get_or_insert_with(flint_vmm_api::monotonic_us);
        // A standby VMM of the VM's memory size, if one waits: its uid becomes the VM's, its directory the VM's.
        let mut standby = self.take_standby(rec.mem_mib);
        let vm = {
            let mut vms = self.vms.write().unwrap_or_else(|p| p.into_inner());
            let give_back = |s: &mut Option<(crate::launcher::Standby, String)>| {
                if let Some((s, _)) = s.take() {
                    self.return_standby(s);
                }
            };
            // Unique whatever the case: a DNS name (the front end's Host routing) does not keep it.
            if let Some(other) = vms.keys().find(|k| k.eq_ignore_ascii_case(&id)) {
                give_back(&mut standby);
                return Err(StartError::Exists(other.clone()));
            }
            let uid = match &standby {
                Some((_, key)) => Some(super::alloc::Uid::From(key)),
                None => self.cfg.jail.enabled.then_some(super::alloc::Uid::Free(&self.cfg.jail)),
            };
            let blocks = network.map(|_| self.net.blocks());
            let disk = rec.disk_budget_mib(self.cfg.vm.mount_slot_mib);
            if disk > 0 {
                if let Err(e) = self.check_free_space() {
                    give_back(&mut standby);
                    return Err(e);
                }
            }
            let reserved = lock(&self.alloc).reserve_with(&id, &self.cfg.limits, (rec.mem_mib, disk), uid, blocks);
            let held = match reserved {
                Ok(h) => h,
                Err(e) => {
                    give_back(&mut standby);
                    return Err(StartError::Quota(e.to_string()));
                }
            };
            rec.uid = held.uid;
            rec.timings.standby = standby.is_some();
            if let (Some(req), Some(index)) = (network, held.net) {
                let mut nonce = [0u8; 1];
                let _ = getrandom::getrandom(&mut nonce);
                let mac = crate::net::Block::new(self.net.cfg.pool, index).map(|b| b.mac(nonce[0])).unwrap_or_default();
                // Its own tokens where asked (`auto`): shown in the answer that starts it alone.
                let mut request = req.clone();
                request.make_tokens();
                rec.network = Some(crate::net::VmNet { index, mac, request });
            }
            let vm = Vm::new(rec, false);
            vm.push(Resource::Allocation);
            vms.insert(id.clone(), vm.clone());
            vm
        };
        let prepared = (|| {
            let _ = std::fs::remove_dir_all(&dir);
            match standby {
                // The jail's `/` is the directory itself, whatever its name.
                Some((s, _)) => {
                    let renamed = std::fs::rename(&s.dir, &dir).map_err(io(format!(
                        "rename {} to {}",
                        s.dir.display(),
                        dir.display()
                    )));
                    *lock(&vm.standby) = Some(s);
                    renamed?;
                }
                None => std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?,
            }
            vm.push(Resource::Dir(dir.clone()));
            Ok::<(), StartError>(())
        })();
        if let Err(e) = prepared {
            self.abandon(&vm);
            return Err(e);
        }
        Ok(vm)
    }

    /// Undoes a reservation that never reached a process or the database (synchronous: nothing to stop).
    fn abandon(&self, vm: &Arc<Vm>) {
        let id = vm.rec.get().id;
        if let Some(s) = lock(&vm.standby).take() {
            self.tasks.spawn(self.launcher.discard(s));
        }
        for r in std::mem::take(&mut *lock(&vm.stack)).into_iter().rev() {
            match r {
                Resource::Dir(d) => {
                    let _ = std::fs::remove_dir_all(d);
                }
                Resource::Allocation => lock(&self.alloc).release(&id),
                other => warn!(vm = %id, resource = other.name(), "unexpected resource in an abandoned reservation"),
            }
        }
        let _ = vm.rec.remove(&self.db);
        self.vms.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// Boots a VM from an image and waits until its agent answers.
    pub async fn create(self: &Arc<Self>, req: CreateVm, owner: Option<OwnerTag>) -> Result<VmRecord, StartFailure> {
        let t0 = flint_vmm_api::monotonic_us();
        let image = req.image.clone().unwrap_or_else(|| "default".into());
        let img = self.image(&image).map_err(StartError::from)?;
        let mem = req.mem_mib.unwrap_or(self.cfg.vm.mem_mib);
        let vcpus = req.vcpus.unwrap_or(self.cfg.vm.vcpus);
        // The VMM's own limits, checked here: a 400, not a failed VM.
        check_mem_mib(mem).map_err(StartError::from)?;
        check_vcpus(vcpus).map_err(StartError::from)?;
        self.check_cpu(req.cpu, vcpus)?;
        for d in &req.drives {
            if d.image.is_some() {
                return Err(StartError::Invalid("a drive's `image` is flintd's to set, not a caller's".into()).into());
            }
            if !d.path.is_absolute() || !d.path.is_file() {
                return Err(StartError::Invalid(format!(
                    "drive {} is not an existing file (absolute path)",
                    d.path.display()
                ))
                .into());
            }
        }
        // A disk-rooted image: its read-only root (vda) and the VM's own writable disk (vdb) come first.
        let disk = match &img.root {
            crate::image::Root::Disk { rootfs, disk_mib, .. } => {
                let mib = req.disk_mib.unwrap_or(*disk_mib);
                check_disk_mib(mib, self.cfg.limits.max_disk_mib).map_err(|e| StartError::Invalid(e.to_string()))?;
                Some((rootfs.clone(), mib))
            }
            crate::image::Root::Initramfs if req.disk_mib.is_some() => {
                return Err(StartError::Invalid(format!(
                    "image `{image}` runs from its initramfs and has no disk: disk_mib needs a disk-rooted image"
                ))
                .into())
            }
            crate::image::Root::Initramfs => None,
        };
        let own = if disk.is_some() { 3 } else { 0 };
        if req.drives.len() + own > MAX_DRIVES {
            return Err(
                StartError::Invalid(format!("{} drives: at most {}", req.drives.len(), MAX_DRIVES - own)).into()
            );
        }
        self.check_network(req.id.as_deref(), owner.as_ref(), req.network.as_ref())?;
        let root_ref = img.root_ref();
        let vm = self.reserve(req.id.clone(), "vm", req.network.as_ref(), |r| {
            r.timings.start_clock_us = Some(t0);
            r.image = Some(image.clone());
            r.mem_mib = mem;
            r.vcpus = vcpus;
            r.cpu = req.cpu;
            r.env = req.env.clone();
            r.owner = owner.clone();
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
        let span = tracing::info_span!("vm", id = %vm.rec.get().id, op = "create");
        let _op = vm.rec.op.lock().await;
        let started = Instant::now();
        let result = self.boot(&vm, &img, disk.map(|(_, mib)| mib)).instrument(span).await;
        self.finish_start(&vm, started, result, false, false).await
    }

    async fn boot(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        img: &crate::image::Image,
        disk: Option<u64>,
    ) -> Result<(), StartError> {
        let rec = vm.rec.get();
        let dir = rec.dir.clone();
        let mut config = VmConfig::new(img.dir.join("vmlinux"));
        config.initramfs = Some(img.dir.join("initramfs.cpio"));
        config.mem_mib = rec.mem_mib;
        config.vcpus = rec.vcpus;
        config.drives = rec
            .drives
            .iter()
            .map(|d| DriveConfig {
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
        config.balloon = self.cfg.vm.free_page_reporting;
        config.validate_limits()?;
        if let Some(mib) = disk {
            let (dir, slot_mib) = (dir.clone(), self.cfg.vm.mount_slot_mib);
            tokio::task::spawn_blocking(move || make_vm_disks(&dir, mib, slot_mib)).await.map_err(|e| {
                StartError::Io { what: "make the VM's disks".into(), source: std::io::Error::other(e) }
            })??;
        }
        // Every VM gets a network card, detached without a network: its snapshots' clones may be given one.
        config.net = Some(self.start_network(vm).await?.unwrap_or_else(NetConfig::detached));
        let spec = LaunchSpec {
            api_sock: Some(dir.join("api.sock")),
            seccomp: true,
            jail: None,
            fence: None,
            vcpu_sched_idle: self.cfg.vcpu_sched_idle,
            launch: Launch::Boot(config),
        };
        self.spawn(vm, &spec)?;
        self.await_ready(vm).await
    }

    /// Restores one VM from a snapshot, then refreshes the guest's clock, entropy, env and hostname through the
    /// agent. Eager: the images are fetched whole from the store (S3 on a miss) first. Lazy: only the state image;
    /// flintd's page server serves memory from the store on first touch and prefetches the recorded working set;
    /// the first lazy restore of a snapshot records that working set.
    pub async fn restore(self: &Arc<Self>, req: Restore) -> Result<VmRecord, StartFailure> {
        let t0 = flint_vmm_api::monotonic_us();
        let manifest = self.store.manifest(&req.snapshot).await.map_err(StartError::from)?;
        let meta = SnapshotMeta::load(&manifest.id, &manifest.metadata).map_err(StartError::from)?;
        for (i, d) in meta.drives.iter().enumerate() {
            if d.image.is_none() && manifest.image(&drives::image_name(i)).is_none() {
                return Err(StartError::Invalid(format!(
                    "snapshot `{}` has {} drive(s) but no image `{}`",
                    manifest.id,
                    meta.drives.len(),
                    drives::image_name(i)
                ))
                .into());
            }
        }
        // An image's root comes from this host's image with the recorded digest (never a path from the snapshot).
        let roots: Vec<Option<PathBuf>> = meta
            .drives
            .iter()
            .map(|d| d.image.as_deref().map(|r| self.image_root_for(&manifest.id, r)).transpose())
            .collect::<Result<_, _>>()?;
        let owner_id = req.owner.as_ref().map(|o| o.id.clone());
        self.check_network(owner_id.as_deref(), req.owner.as_ref(), req.network.as_ref())?;
        // The caller's CPU limit, else the snapshot's (a clone or wake keeps its source's spec).
        let cpu = req.cpu.or(meta.cpu);
        self.check_cpu(cpu, meta.vcpus)?;
        let _slot = self
            .restore_slots
            .acquire()
            .await
            .map_err(|e| StartError::Io { what: "the restore slots".into(), source: std::io::Error::other(e) })?;
        let prefix = req.id_prefix.clone().unwrap_or_else(|| "clone".into());
        let vm = self.reserve(None, &prefix, req.network.as_ref(), |r| {
            r.timings.start_clock_us = Some(t0);
            r.snapshot = Some(req.snapshot.clone());
            r.owner = req.owner.clone();
            r.hostname = req.hostname.clone();
            r.image = meta.image.clone();
            // From the snapshot's metadata until the VMM says (after the restore) what it is.
            r.mem_mib = meta.mem_mib;
            r.vcpus = meta.vcpus;
            r.cpu = cpu;
            r.lazy = req.lazy;
            r.track_dirty = req.track_dirty;
            r.env = req.env.clone();
            r.drives = meta
                .drives
                .iter()
                .enumerate()
                .map(|(i, d)| DriveSpec {
                    path: roots[i].clone().unwrap_or_else(|| drives::clone_path(&r.dir, i)),
                    read_only: d.read_only,
                    rate_limiter: d.rate_limiter.clone(),
                    image: d.image.clone(),
                })
                .collect();
            r.disk_mib = meta.disk_mib;
            // Informational: what the guest had mounted through its slot (still mounted in the clone).
            r.mount_slot = meta.mount_slot;
            r.mounts = meta.mounts.clone();
        })?;
        let span = tracing::info_span!("vm", id = %vm.rec.get().id, op = "restore", snapshot = %req.snapshot);
        let _op = vm.rec.op.lock().await;
        let started = Instant::now();
        let result = self.restore_into(&vm, &manifest, &meta, &roots, &req).instrument(span).await;
        let recorded = result.as_ref().is_ok_and(|recorded| *recorded);
        let rec = self.finish_start(&vm, started, result.map(drop), true, req.paused).await?;
        if req.lazy {
            if !recorded {
                self.record_working_set(&vm, &req.snapshot).await;
            }
            if let Err(e) = self.store.rescan() {
                warn!(error = %e, "could not rescan the local snapshot cache");
            }
        }
        Ok(rec)
    }

    /// Steps 2-4 of a restore; whether a working set was already recorded (lazy).
    async fn restore_into(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        manifest: &flint_snapshot_store::Manifest,
        meta: &SnapshotMeta,
        roots: &[Option<PathBuf>],
        req: &Restore,
    ) -> Result<bool, StartError> {
        let dir = vm.rec.get().dir;
        let snapshot = &req.snapshot;
        let t = Instant::now();
        // The snapshot's chunks stay in the local cache while this restore may read them: not at all for an eager
        // restore whose shared files are written and that has no disk of its own to copy (pinning walks every
        // chunk, a fraction of a millisecond on the restore's path).
        let reads_chunks = req.lazy || roots.iter().any(Option::is_none) || !self.shared_files_ready(manifest);
        let _pin = reads_chunks.then(|| self.store.pin(manifest));
        let state = self.shared_state(manifest).await?;
        // Every drive but an image's root is this clone's own file, written from the snapshot's copy.
        for i in (0..meta.drives.len()).filter(|i| roots[*i].is_none()) {
            self.store.get_image(snapshot, &drives::image_name(i), &drives::clone_path(&dir, i)).await?;
        }
        let mut recorded = false;
        let (memory, pager) = if req.lazy {
            let prefetch = self.store.working_set(snapshot).await?.map(|w| w.chunks).unwrap_or_default();
            recorded = !prefetch.is_empty();
            let source = Arc::new(crate::pager::StoreSource::open(&self.store, snapshot).await?);
            let listener = crate::pager::bind(&dir)?;
            (MemorySource::Pager { socket: crate::pager::socket_path(&dir) }, Some((listener, source, prefetch)))
        } else {
            // One memory file per snapshot, mapped copy-on-write by every eager clone: they share its page cache
            // (a clone's own pages are only those it writes).
            (MemorySource::Private { path: self.shared_memory(manifest).await? }, None)
        };
        let fetch_ms = crate::ms_since(t);
        vm.rec.stage(|r| r.timings.fetch_ms = Some(fetch_ms))?;
        let net = self.start_network(vm).await?;
        let drive_paths =
            (0..meta.drives.len()).map(|i| roots[i].clone().unwrap_or_else(|| drives::clone_path(&dir, i)));
        let spec = LaunchSpec {
            api_sock: Some(dir.join("api.sock")),
            seccomp: true,
            jail: None,
            fence: req.fence.clone(),
            vcpu_sched_idle: self.cfg.vcpu_sched_idle,
            launch: Launch::Restore(RestoreSpec {
                state_path: state,
                memory,
                devices: HostDevices {
                    vsock_uds: Some(dir.join("vsock.sock")),
                    console: Some(dir.join("console.log").display().to_string()),
                    console_limit_bytes: Some(self.cfg.vm.console_limit_bytes),
                    net,
                    drive_paths: (!meta.drives.is_empty()).then(|| drive_paths.collect()),
                },
                // A VM whose next snapshot may be a diff on this one logs dirty pages from now. Other clones
                // never take diffs: no log (KVM then need not write-protect pages for it).
                track_dirty_pages: Some(req.track_dirty),
                merged_memory: meta.memory_layered,
            }),
        };
        let p = self.spawn(vm, &spec)?;
        if let Some((listener, source, prefetch)) = pager {
            self.serve_memory(vm, listener, source, prefetch, p).await?;
        }
        self.await_ready(vm).await?;
        Ok(recorded)
    }

    /// This host's disk-rooted image whose root is `reference` (`name@sha256`, from a snapshot): matched by
    /// digest, so a renamed image still serves and a rebuilt one with other bytes never does.
    fn image_root_for(&self, snapshot: &str, reference: &str) -> Result<PathBuf, StartError> {
        let (name, sha) = crate::image::parse_ref(reference)
            .ok_or_else(|| StartError::Invalid(format!("snapshot `{snapshot}`: bad image reference `{reference}`")))?;
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
        Err(StartError::MissingImage(format!(
            "snapshot `{snapshot}` needs image `{name}` with root sha256 {}…, which this host does not have (it has: \
             {}); install that image (images/build.sh {name}, or the same OCI import) to restore it",
            &sha[..12],
            if seen.is_empty() { "no disk images".to_string() } else { seen.join(", ") }
        )))
    }

    /// A CPU limit: within 0.01 core and the VM's vCPUs, and only with the jail (its cgroup enforces it).
    pub fn check_cpu(&self, cpu: Option<f64>, vcpus: u8) -> Result<(), StartError> {
        let Some(c) = cpu else { return Ok(()) };
        if !c.is_finite() || c < 0.01 || c > f64::from(vcpus.max(1)) {
            return Err(StartError::Invalid(format!(
                "cpu {c}: a fraction of a core within 0.01 and the VM's {vcpus} vCPU(s)"
            )));
        }
        if !self.cfg.jail.enabled {
            return Err(StartError::Invalid(
                "a CPU limit needs the jail (the VM's cgroup enforces it); this flintd runs VMMs unjailed".into(),
            ));
        }
        Ok(())
    }

    /// A network request checked against this host's limits before anything starts: its policy, and its plain
    /// TCP ports (within `network.tcp_ports`, not another's; `id`: whose they may already be).
    pub fn check_network(
        &self,
        id: Option<&str>,
        owner: Option<&OwnerTag>,
        n: Option<&crate::net::NetworkRequest>,
    ) -> Result<(), StartError> {
        let Some(n) = n else { return Ok(()) };
        n.check(self.cfg.network.max_rules)?;
        // A VM with an owner leaves its exposed ports' forwards to the owner (which checked them).
        if owner.is_none() {
            self.net.forwards.check(id.unwrap_or(""), n)?;
        }
        Ok(())
    }

    /// Builds the network of a VM whose record has one (namespace, tap, policy, DNS proxy): the card the VMM
    /// attaches to. None: the VM has no network.
    async fn start_network(&self, vm: &Arc<Vm>) -> Result<Option<NetConfig>, StartError> {
        let rec = vm.rec.get();
        let Some(n) = rec.network.clone() else { return Ok(None) };
        let rules = n.request.check(usize::MAX)?;
        let t = Instant::now();
        let (net, id, n2, r2) = (self.net.clone(), rec.id.clone(), n.clone(), rules.clone());
        let ns = tokio::task::spawn_blocking(move || net.setup(&id, &n2, r2))
            .await
            .map_err(|e| StartError::Io { what: "network setup".into(), source: std::io::Error::other(e) })??;
        vm.push(Resource::Network(n.clone()));
        self.net.start_proxy(&rec.id, &n, rules)?;
        vm.rec.stage(|r| r.timings.net_ms = Some(crate::ms_since(t)))?;
        Ok(Some(NetConfig {
            tap: crate::net::TAP.into(),
            netns: Some(ns),
            mac: Some(n.mac.clone()),
            ..NetConfig::detached()
        }))
    }

    /// Starts the VMM for `spec`, records it (the start's first durable commit) and watches it.
    fn spawn(self: &Arc<Self>, vm: &Arc<Vm>, spec: &LaunchSpec) -> Result<Proc, StartError> {
        let rec = vm.rec.get();
        let jail =
            rec.uid.map(|uid| crate::launcher::Confinement { uid, gid: uid, mem_mib: rec.mem_mib, cpu: rec.cpu });
        let standby = lock(&vm.standby).take();
        let p = match (standby, jail) {
            (Some(s), Some(c)) => self.launcher.hand_over(s, &rec.dir, spec, c)?,
            (s, jail) => {
                if let Some(s) = s {
                    self.tasks.spawn(self.launcher.discard(s));
                }
                self.launcher.spawn(&rec.dir, spec, jail)?
            }
        };
        let launched = flint_vmm_api::monotonic_us();
        vm.push(Resource::Process(p));
        vm.rec.commit(&self.db, |r| {
            r.pid = Some(p.pid);
            r.pid_start = Some(p.start);
            r.timings.launch_us = r.timings.start_clock_us.map(|s| launched.saturating_sub(s));
        })?;
        self.watch(vm, p);
        Ok(p)
    }

    /// Marks the VM failed when its VMM exits (unless it is being deleted), and releases what it held on the
    /// host but its directory (logs, console) and its uid, which its record keeps until it is deleted.
    pub(super) fn watch(self: &Arc<Self>, vm: &Arc<Vm>, p: Proc) {
        // Weak: a watcher does not keep the manager alive (its VMMs outlive it by design). A loop of the shutdown:
        // a running VM's watch lasts as long as the VM, which outlives flintd (it is re-adopted and watched again).
        let this = Arc::downgrade(self);
        let weak_vm = Arc::downgrade(vm);
        let exited = self.launcher.exited(p);
        self.tasks.spawn_loop(async move {
            let how = exited.await;
            if let (Some(this), Some(vm)) = (this.upgrade(), weak_vm.upgrade()) {
                this.vmm_exited(&vm, p, how).await;
            }
        });
    }

    async fn vmm_exited(&self, vm: &Arc<Vm>, p: Proc, how: String) {
        let rec = vm.rec.get();
        if rec.proc() != Some(p) || vm.rec.removed() {
            return; // a later VMM of the same record, or already gone
        }
        let log_tail = super::vmm_log_tail(&rec.dir);
        let was_starting = rec.status == VmStatus::Starting;
        let result = vm.rec.commit(&self.db, |r| {
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
                lock(&self.alloc).set_live(&rec.id, false);
                warn!(vm = %rec.id, error = ?rec.error, "VM failed");
                // What a dead VM held but its directory and uid (a start in progress releases those itself).
                if !was_starting {
                    let _op = vm.rec.op.lock().await;
                    let keep = lock(&vm.stack).iter().position(|r| matches!(r, Resource::Dir(_))).map_or(0, |i| i + 1);
                    self.release(vm, keep).await;
                }
                self.emit(&rec, EventKind::Failed(rec.error.clone().unwrap_or_default()));
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(vm = %rec.id, error = %e, "a VMM exit not recorded (the VM is being deleted)"),
        }
    }

    /// Waits for a starting VM's agent, then gives it its env (boot) or refreshes it (restore: clock, entropy,
    /// env, hostname, network); notes what the VMM says it is (vCPUs, memory).
    pub(super) async fn await_ready(&self, vm: &Arc<Vm>) -> Result<(), StartError> {
        let rec = vm.rec.get();
        let id = rec.id.clone();
        let secs = if rec.snapshot.is_some() { self.cfg.restore_agent_timeout_s } else { self.cfg.agent_timeout_s };
        let deadline = Duration::from_secs(secs);
        let started = Instant::now();
        // The first attempts usually come before the VMM has bound its vsock socket (a restored guest answers a
        // few ms later): retry soon, backing off to 50 ms.
        let mut pause = Duration::from_millis(1);
        let agent = loop {
            let rec = vm.rec.get();
            if rec.status == VmStatus::Failed {
                return Err(StartError::Died { id, why: rec.error.unwrap_or_default() });
            }
            match AgentClient::connect(&self.launcher.agent_endpoint(&rec.dir), Duration::from_secs(5)).await {
                Ok(a) => break Arc::new(a),
                Err(e) if started.elapsed() > deadline => {
                    // A guest held to a small CPU share that is busy when it restores can starve its own agent.
                    let why = match rec.cpu {
                        Some(cpu) => format!("{e} (its CPU limit: {cpu} of a core)"),
                        None => e.to_string(),
                    };
                    return Err(StartError::AgentSilent { id, secs, why });
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
            }
        };
        let agent_ms = crate::ms_since(started);
        let t = Instant::now();
        let hostname = rec.hostname.clone().unwrap_or_else(|| id.clone());
        let network = rec.network.as_ref().map(|n| self.net.guest(n)).transpose()?;
        let sent = Instant::now();
        let answer = if rec.snapshot.is_some() || !rec.env.is_empty() || network.is_some() {
            let what = if rec.snapshot.is_some() { "refresh" } else { "set env and network" };
            Some(agent.refresh_with(rec.env.clone(), Some(hostname), network).await.map_err(|e| StartError::Agent {
                id: id.clone(),
                what,
                why: e.to_string(),
            })?)
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
        *vm.agent.lock().await = Some(agent);
        let d = self.launcher.vmm(&rec.dir, rec.uid.is_some()).describe().await?;
        lock(&self.alloc).set_mem(&id, d.config.mem_mib);
        vm.rec.stage(|r| {
            r.vcpus = d.config.vcpus;
            r.mem_mib = d.config.mem_mib;
            if let (Some(first), Some(start)) = (d.timings.first_run_clock_us, r.timings.start_clock_us) {
                r.timings.first_run_us = Some(first.saturating_sub(start));
            }
            r.timings.agent_ms = Some(agent_ms);
            r.timings.refresh_ms = Some(refresh_ms);
            r.timings.refresh_guest_ms = refresh_guest_ms;
            r.timings.refresh_agent_ms = refresh_agent_ms;
            r.timings.refresh_steps_us = steps;
        })?;
        Ok(())
    }

    /// Ends a start: `running` (or `paused`) with what it took, the second durable commit; or everything
    /// released and the record removed.
    pub(super) async fn finish_start(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        started: Instant,
        result: Result<(), StartError>,
        restore: bool,
        paused: bool,
    ) -> Result<VmRecord, StartFailure> {
        let ms = crate::ms_since(started);
        if vm.rec.with(|r| r.timings.standby) {
            self.standby_used();
        }
        let result = match result {
            Ok(()) => self.settle(vm, ms, restore, paused).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(rec) => Ok(rec),
            Err(error) => {
                let mut last = vm.rec.get();
                last.status = VmStatus::Failed;
                last.error = Some(error.to_string());
                info!(vm = %last.id, error = %error, "VM start failed; everything it held is released");
                if let Err(e) = self.forget(vm).await {
                    warn!(vm = %last.id, error = %e, "could not remove a failed start's record");
                }
                self.metrics.vm_failures.fetch_add(1, Ordering::Relaxed);
                Err(StartFailure { vm: Some(Box::new(last)), error: Box::new(error) })
            }
        }
    }

    async fn settle(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        ms: f64,
        restore: bool,
        paused: bool,
    ) -> Result<VmRecord, StartError> {
        let rec = vm.rec.get();
        // A VM without an owner forwards its own plain TCP ports.
        if rec.owner.is_none() {
            if let Some(n) = rec.network.as_ref().filter(|n| n.request.ports.values().any(|e| e.tcp_listen.is_some())) {
                let up: Arc<dyn crate::net::forward::Upstream> = Arc::new(super::ops::VmUpstream::new(self, &rec.id));
                let f = self.net.forwards.reconcile(&rec.id, Some(&n.request), Vec::new(), &up)?;
                vm.push(Resource::Forwards(f));
            }
        }
        if paused {
            self.launcher.vmm(&rec.dir, rec.uid.is_some()).pause().await?;
        }
        vm.rec.stage(|r| {
            r.status = VmStatus::Running;
            r.timings.ready_ms = Some(ms);
        })?;
        let rec = vm.rec.commit(&self.db, |r| {
            if paused {
                r.status = VmStatus::Paused;
            }
        })?;
        let (count, sum) = if restore {
            (&self.metrics.restores, &self.metrics.restore_ms_sum)
        } else {
            (&self.metrics.boots, &self.metrics.boot_ms_sum)
        };
        count.fetch_add(1, Ordering::Relaxed);
        sum.fetch_add(ms as u64, Ordering::Relaxed);
        info!(vm = %rec.id, ms, restore, "VM running");
        self.emit(&rec, EventKind::Running);
        Ok(rec)
    }
}
