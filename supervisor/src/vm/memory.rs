//! Guest memory of restored VMs: one shared memory file per snapshot that every eager clone maps copy-on-write,
//! and the page server of a lazily restored VM; snapshots deleted with their shared file.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flint_vmm_api::lock;
use tracing::{info, warn};

use super::error::StartError;
use super::{Manager, Resource, Vm};
use crate::launcher::Proc;

/// How many snapshot images' shared file names are remembered (each holds a copy of its chunk list).
const SHARED_PATHS_REMEMBERED: usize = 256;

impl Manager {
    /// Where a snapshot's shared memory file lives: named by a hash of the memory image's manifest entry (its
    /// chunk list), so a file can never stand for other content, even if a snapshot id is reused.
    pub fn shared_memory_path(&self, manifest: &flint_snapshot_store::Manifest) -> Option<PathBuf> {
        self.shared_path(manifest, "memory")
    }

    /// Where a snapshot's shared copy of image `name` (`memory`, `state`) lives, named as the memory file is.
    /// The name hashes the image's whole chunk list (serialized: ~0.3 ms at 256 MiB), so it is remembered per
    /// snapshot and image, and reused only while the manifest's entry is equal to the one it was made from.
    fn shared_path(&self, manifest: &flint_snapshot_store::Manifest, name: &str) -> Option<PathBuf> {
        let image = manifest.image(name)?;
        let memo_key = (manifest.id.clone(), name.to_string());
        if let Some((entry, path)) = lock(&self.shared_paths).get(&memo_key) {
            if entry == image {
                return Some(path.clone());
            }
        }
        let key = flint_snapshot_store::ChunkId::of(&serde_json::to_vec(image).ok()?).to_hex();
        let path = self.cfg.data_dir.join("shared").join(format!("{}.{name}", &key[..32]));
        let mut memo = lock(&self.shared_paths);
        if memo.len() >= SHARED_PATHS_REMEMBERED {
            memo.clear();
        }
        memo.insert(memo_key, (image.clone(), path.clone()));
        Some(path)
    }

    /// Whether the snapshot's shared state and memory files are written (a restore then reads no chunk).
    pub(super) fn shared_files_ready(&self, manifest: &flint_snapshot_store::Manifest) -> bool {
        ["state", "memory"].iter().all(|name| {
            let size = manifest.image(name).map(|i| i.size);
            self.shared_path(manifest, name).is_some_and(|p| std::fs::metadata(p).is_ok_and(|m| Some(m.len()) == size))
        })
    }

    /// The snapshot's memory image as one file every eager clone maps MAP_PRIVATE (their page cache is shared;
    /// each clone's writes are its own copy-on-write pages). Written once from the store (temp file, then
    /// renamed: a file clones map is never written again); later clones find it. Deleting it while clones run is
    /// safe: their mappings hold the inode.
    pub(super) async fn shared_memory(&self, manifest: &flint_snapshot_store::Manifest) -> Result<PathBuf, StartError> {
        self.shared_image(manifest, "memory").await
    }

    /// The snapshot's state image as one file every restore of it reads (read-only; a jailed VMM gets it as an
    /// fd): written from the store once, as the memory file is, instead of a copy per VM on each restore's path.
    pub(super) async fn shared_state(&self, manifest: &flint_snapshot_store::Manifest) -> Result<PathBuf, StartError> {
        self.shared_image(manifest, "state").await
    }

    async fn shared_image(&self, manifest: &flint_snapshot_store::Manifest, name: &str) -> Result<PathBuf, StartError> {
        let path = self
            .shared_path(manifest, name)
            .ok_or_else(|| StartError::Invalid(format!("snapshot `{}` has no {name} image", manifest.id)))?;
        let size = manifest.image(name).map(|i| i.size).unwrap_or(0);
        let is_ready = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.len() == size);
        if is_ready(&path) {
            return Ok(path);
        }
        let gate = lock(&self.shared_writes).entry(path.display().to_string()).or_default().clone();
        let _turn = gate.lock().await;
        if !is_ready(&path) {
            let dir = path.parent().unwrap_or(Path::new("/"));
            std::fs::create_dir_all(dir)
                .map_err(|source| StartError::Io { what: format!("create {}", dir.display()), source })?;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let fetched = self.store.get_image(&manifest.id, name, &tmp).await;
            if let Err(e) = fetched {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
            std::fs::rename(&tmp, &path)
                .map_err(|source| StartError::Io { what: format!("rename {}", path.display()), source })?;
            info!(snapshot = %manifest.id, path = %path.display(), "shared {name} file written");
        }
        lock(&self.shared_writes).remove(&path.display().to_string());
        Ok(path)
    }

    /// Deletes a snapshot from the store and its shared memory and state files (running clones keep their mappings), unless
    /// a running VM restored lazily from it still reads it (its next cold page would have nowhere to come from).
    /// What else holds snapshots (templates, sessions) is the services' to check first.
    pub async fn delete_snapshot(&self, id: &str, remote: bool) -> Result<(), SnapshotDeleteError> {
        if let Some(vm) =
            self.list().into_iter().find(|r| r.lazy && r.status.has_process() && r.snapshot.as_deref() == Some(id))
        {
            return Err(SnapshotDeleteError::InUse(format!(
                "VM `{}` restores its memory lazily from snapshot `{id}`: delete the VM first",
                vm.id
            )));
        }
        if let Ok(m) = self.store.manifest(id).await {
            for name in ["memory", "state"] {
                if let Some(p) = self.shared_path(&m, name) {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        Ok(self.store.delete(id, remote).await?)
    }

    /// Whether a running VM restored lazily reads snapshot `id`.
    pub fn lazily_read(&self, id: &str) -> bool {
        self.list().iter().any(|v| v.lazy && v.status.has_process() && v.snapshot.as_deref() == Some(id))
    }

    /// Serves a lazily restored VM's memory: waits for its VMM's userfaultfd, then serves faults from the store.
    /// A unit that cannot be provided stops that VM with the page server's message.
    pub(super) async fn serve_memory(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        listener: std::os::unix::net::UnixListener,
        source: Arc<crate::pager::StoreSource>,
        prefetch: Vec<u32>,
        p: Proc,
    ) -> Result<(), crate::pager::PagerError> {
        let on_fatal = self.pager_fatal(vm, p);
        let wait = Duration::from_secs(60);
        let workers = self.cfg.store.lazy_fetch_workers.max(1);
        let served = tokio::task::spawn_blocking(move || {
            crate::pager::accept_and_serve(listener, p.pid, source, prefetch, workers, wait, on_fatal)
        })
        .await
        .map_err(|e| crate::pager::PagerError::Vmm(e.to_string()))??;
        vm.push(Resource::Pager(Arc::new(served)));
        Ok(())
    }

    /// What the page server does when memory cannot be provided: record why, stop the VMM.
    fn pager_fatal(self: &Arc<Self>, vm: &Arc<Vm>, p: Proc) -> flint_uffd::OnFatal {
        let this = Arc::downgrade(self);
        let vm = Arc::downgrade(vm);
        Box::new(move |message: String| {
            let (Some(this), Some(vm)) = (this.upgrade(), vm.upgrade()) else { return };
            warn!(vm = %vm.rec.get().id, %message, "stopping the VM");
            if let Err(e) = vm.rec.commit(&this.db, |r| r.error = Some(message.clone())) {
                warn!(error = %e, "could not record why the page server stopped a VM");
            }
            this.launcher.kill(p);
        })
    }

    /// After a flintd restart: a new page server for a lazily restored VM (its VMM hands the fd over again).
    pub(super) fn readopt_pager(self: &Arc<Self>, vm: &Arc<Vm>, snapshot: &str, dir: &Path, p: Proc) {
        let (this, vm, snapshot, dir) = (self.clone(), vm.clone(), snapshot.to_string(), dir.to_path_buf());
        self.tasks.spawn(async move {
            let result = async {
                let source = Arc::new(crate::pager::StoreSource::open(&this.store, &snapshot).await?);
                let listener = crate::pager::bind(&dir)?;
                this.serve_memory(&vm, listener, source, Vec::new(), p).await
            }
            .await;
            if let Err(e) = result {
                warn!(vm = %vm.rec.get().id, error = %e, "could not serve a re-adopted VM's memory; stopping it");
                let why = format!("page server after a flintd restart: {e}");
                if let Err(db) = vm.rec.commit(&this.db, |r| r.error = Some(why)) {
                    warn!(error = %db, "could not record why a re-adopted VM was stopped");
                }
                this.launcher.kill(p);
            }
        });
    }

    /// Stores the chunks a lazily restored VM touched until its agent was ready and refreshed.
    pub(super) async fn record_working_set(&self, vm: &Arc<Vm>, snapshot: &str) {
        let Some(served) = vm.pager() else { return };
        let units = served.report().touched_units;
        if units.is_empty() {
            return;
        }
        match self.store.put_working_set(snapshot, "memory", &units).await {
            Ok(()) => info!(snapshot, chunks = units.len(), "recorded the restore working set"),
            Err(e) => warn!(snapshot, error = %e, "could not record the working set"),
        }
    }

    /// The page server's counters of a VM whose memory flintd serves.
    pub(super) fn uffd_report(&self, id: &str) -> Option<flint_vmm_api::describe::UffdReport> {
        self.vm(id).ok()?.pager().map(|p| p.report())
    }
}

/// Why a snapshot was not deleted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotDeleteError {
    #[error("{0}")]
    InUse(String),
    #[error("{}", crate::error::store_message(.0))]
    Store(#[from] flint_snapshot_store::StoreError),
}

impl crate::error::Classify for SnapshotDeleteError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            SnapshotDeleteError::InUse(_) => crate::error::Kind::Conflict,
            SnapshotDeleteError::Store(e) => e.kind(),
        }
    }
}
