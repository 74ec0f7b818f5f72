//! Taking a snapshot of a running VM: the before-checkpoint hook, the VMM's snapshot (memory and state, the VM
//! paused while its drives are copied so that they match), then the store, with the typed metadata
//! ([`SnapshotMeta`]) a restore reads.
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use flint_snapshot_store::{ImageSource, PutReport, SnapshotDraft, SnapshotInfo};
use tracing::{info, Instrument};

use super::error::{SnapshotError, VmError};
use super::meta::{DriveMeta, SnapshotMeta};
use super::model::*;
use super::{Manager, Vm};
use crate::beneath::Beneath;
use crate::drives;

/// How a snapshot is taken.
#[derive(Debug, Clone, Default)]
pub struct SnapshotHow {
    pub publish: bool,
    /// A diff against this snapshot (the one the VM's dirty log started from), stored layered on it.
    pub diff_on: Option<String>,
    /// Leave the VM paused (it is about to stop).
    pub keep_paused: bool,
    /// Who the snapshot is for (a session's hibernation).
    pub owner: Option<OwnerTag>,
}

impl Manager {
    /// Snapshots a running VM into the store as `id` (see [`SnapshotHow`]).
    pub async fn snapshot(
        &self,
        vm: &str,
        id: &str,
        how: &SnapshotHow,
    ) -> Result<(SnapshotInfo, PutReport), SnapshotError> {
        super::valid_id("snapshot id", id).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        let v = self.vm(vm)?;
        let _op = v.rec.op.lock().await;
        let span = tracing::info_span!("vm", id = %vm, op = "snapshot", snapshot = %id);
        self.snapshot_locked(&v, id, how).instrument(span).await
    }

    async fn snapshot_locked(
        &self,
        v: &Arc<Vm>,
        id: &str,
        how: &SnapshotHow,
    ) -> Result<(SnapshotInfo, PutReport), SnapshotError> {
        let rec = v.rec.get();
        let agent = self.agent_of(v).await?;
        agent.before_checkpoint().await.map_err(|e| SnapshotError::Hook { id: rec.id.clone(), why: e.to_string() })?;
        let started = Instant::now();
        let name = format!("snap-{id}");
        let tmp = rec.dir.join(&name);
        std::fs::create_dir_all(&tmp)
            .map_err(|source| SnapshotError::Io { what: format!("create {}", tmp.display()), source })?;
        // A jailed VMM writes the snapshot as its own uid, into its own directory.
        crate::jail::give_to_dir_owner(&rec.dir, &tmp)
            .map_err(|e| SnapshotError::Files { id: rec.id.clone(), why: e.to_string() })?;
        let request = flint_vmm_api::snapshot::SnapshotRequest {
            state_path: tmp.join("state"),
            mem_path: tmp.join("memory"),
            kind: if how.diff_on.is_some() {
                flint_vmm_api::snapshot::SnapshotKind::Diff
            } else {
                flint_vmm_api::snapshot::SnapshotKind::Full
            },
            // With drives, the VM stays paused until each drive is copied: the copies match the memory image.
            resume: rec.drives.is_empty() && !how.keep_paused,
        };
        let result = self.snapshot_files(&rec, id, &name, request, how).await;
        let _ = std::fs::remove_dir_all(&tmp);
        let (manifest, put) = result?;
        let ms = crate::ms_since(started);
        self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        self.metrics.snapshot_ms_sum.fetch_add(ms as u64, Ordering::Relaxed);
        info!(vm = %rec.id, snapshot = %id, ms, "snapshot stored");
        // From the manifest just written: no listing of every snapshot in S3 to describe one.
        Ok((self.store.describe(&manifest, true, how.publish), put))
    }

    async fn snapshot_files(
        &self,
        rec: &VmRecord,
        id: &str,
        name: &str,
        request: flint_vmm_api::snapshot::SnapshotRequest,
        how: &SnapshotHow,
    ) -> Result<(flint_snapshot_store::Manifest, PutReport), SnapshotError> {
        let files = |why: String| SnapshotError::Files { id: rec.id.clone(), why };
        let vmm = self.launcher.vmm(&rec.dir, rec.uid.is_some());
        let report = vmm.snapshot(request).await?;
        // The VMM's uid owns its directory and may have put a symlink or a FIFO anywhere in it: everything flintd
        // reads or writes there is resolved beneath it without following links (docs/security.md).
        let snapdir = Beneath::open(&rec.dir)
            .and_then(|d| d.dir(Path::new(name)))
            .map_err(|e| files(format!("the snapshot directory: {e}")))?;
        if !rec.drives.is_empty() {
            let copied = copy_drives(rec, &snapdir);
            if rec.status == VmStatus::Running && !how.keep_paused {
                vmm.resume().await?;
            }
            copied?;
        }
        if report.drives as usize != rec.drives.len() {
            return Err(files(format!(
                "the VMM snapshotted {} drive(s), flintd's record has {}",
                report.drives,
                rec.drives.len()
            )));
        }
        let open = |name: &str| {
            snapdir
                .open_regular(Path::new(name))
                .map(Arc::new)
                .map_err(|e| files(format!("the VMM's snapshot file `{name}`: {e}")))
        };
        let memory = match &how.diff_on {
            Some(base) => ImageSource::Layered { base: (base.clone(), "memory".into()), diff: open("memory")? },
            None => ImageSource::Open(open("memory")?),
        };
        let mut draft =
            SnapshotDraft::new(id).image("state", ImageSource::Open(open("state")?)).image("memory", memory);
        for (i, _) in rec.drives.iter().enumerate().filter(|(_, d)| d.image.is_none()) {
            draft = draft.image(&drives::image_name(i), ImageSource::Open(open(&drives::image_name(i))?));
        }
        let mut meta = SnapshotMeta::new(report.mem_mib, report.vcpus);
        meta.vm = Some(rec.id.clone());
        meta.image = rec.image.clone();
        meta.drives = rec
            .drives
            .iter()
            .map(|d| DriveMeta { read_only: d.read_only, image: d.image.clone(), rate_limiter: d.rate_limiter.clone() })
            .collect();
        meta.disk_mib = rec.disk_mib;
        meta.cpu = rec.cpu;
        meta.mount_slot = rec.mount_slot;
        meta.mounts = rec.mounts.clone();
        // The state file says its memory is a diff; the stored image is whole (layered on the base).
        meta.memory_layered = how.diff_on.is_some();
        meta.owner = how.owner.clone();
        meta.store(&mut draft.metadata);
        draft.parent = how.diff_on.clone().or(rec.snapshot.clone());
        draft.vmm_format = Some(report.format_version);
        Ok(self.store.put(draft, how.publish).await?)
    }

    /// The agent of a running VM whose `op` the caller holds.
    pub(super) async fn agent_of(&self, v: &Vm) -> Result<Arc<flint_agent::client::AgentClient>, VmError> {
        let rec = v.rec.get();
        if rec.status != VmStatus::Running {
            return Err(VmError::WrongStatus { id: rec.id, status: rec.status, want: "running" });
        }
        let mut cached = v.agent.lock().await;
        if let Some(a) = cached.as_ref().filter(|a| !a.is_closed()) {
            return Ok(a.clone());
        }
        let mut a = flint_agent::client::AgentClient::connect(
            &self.launcher.agent_endpoint(&rec.dir),
            std::time::Duration::from_secs(10),
        )
        .await
        .map_err(|e| VmError::agent(&rec.id, "agent", &e))?;
        a.call_timeout = call_timeout(a.call_timeout, rec.cpu);
        let a = Arc::new(a);
        *cached = Some(a.clone());
        Ok(a)
    }
}

/// The agent's call timeout for a VM held to `cpu` of a core: the guest answers that much slower (an exec of a VM
/// held to 0.1 of a core took past the 30 s its start may take), so it waits that much longer, at most 10 minutes.
fn call_timeout(base: std::time::Duration, cpu: Option<f64>) -> std::time::Duration {
    match cpu {
        Some(c) if c > 0.0 && c < 1.0 => base.div_f64(c).min(std::time::Duration::from_secs(600)).max(base),
        _ => base,
    }
}

/// Copies each of a paused VM's drives into the snapshot directory `into` (as the store images `drive0`, ...).
/// A drive in the VM's own directory is opened beneath it (its VMM's uid could have swapped it for a link).
fn copy_drives(rec: &VmRecord, into: &Beneath) -> Result<(), SnapshotError> {
    let vmdir =
        Beneath::open(&rec.dir).map_err(|source| SnapshotError::Io { what: rec.dir.display().to_string(), source })?;
    // An image's root is named by the snapshot, not copied.
    for (i, d) in rec.drives.iter().enumerate().filter(|(_, d)| d.image.is_none()) {
        let fail = |e: std::io::Error| SnapshotError::Files {
            id: rec.id.clone(),
            why: format!("copy drive {i} ({}): {e}", d.path.display()),
        };
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_cpu_limited_vm_waits_longer_for_its_agent() {
        let s = Duration::from_secs;
        assert_eq!(super::call_timeout(s(30), None), s(30));
        assert_eq!(super::call_timeout(s(30), Some(0.25)), s(120), "a quarter of a core: four times as long");
        assert_eq!(super::call_timeout(s(30), Some(0.01)), s(600), "at most 10 minutes");
        assert_eq!(super::call_timeout(s(30), Some(1.5)), s(30), "a core or more: the base");
        assert_eq!(super::call_timeout(s(700), Some(0.5)), s(700), "never below the base");
    }
}
