//! VM and template records, the VM status transition table, and the errors every operation returns.
use std::collections::BTreeMap;
use std::path::PathBuf;

use flint_snapshot_store::StoreError;
use serde::{Deserialize, Serialize};

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
    /// A quota of flintd's config (`[limits]`) would be exceeded: nothing was started.
    #[error("{0}")]
    QuotaExceeded(String),
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
            StoreError::Exists { .. } | StoreError::Busy(_) => OpError::Conflict(msg),
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

impl From<flint_vmm_api::config::ConfigError> for OpError {
    fn from(e: flint_vmm_api::config::ConfigError) -> Self {
        OpError::BadRequest(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

impl VmStatus {
    pub const ALL: [VmStatus; 6] =
        [VmStatus::Starting, VmStatus::Running, VmStatus::Paused, VmStatus::Stopping, VmStatus::Failed, VmStatus::Lost];

    /// The transition table: every status change goes through it (Cloud Hypervisor's `valid_transition`).
    pub fn can_become(self, to: VmStatus) -> bool {
        use VmStatus::*;
        matches!(
            (self, to),
            (Starting, Running | Failed | Stopping | Lost)
                | (Running, Paused | Stopping | Failed | Lost)
                | (Paused, Running | Stopping | Failed | Lost)
                | (Stopping, Failed | Lost)
                | (Failed, Stopping)
                | (Lost, Stopping)
        )
    }

    /// A VMM process should exist in this status.
    pub fn has_process(self) -> bool {
        matches!(self, VmStatus::Starting | VmStatus::Running | VmStatus::Paused | VmStatus::Stopping)
    }

    pub fn name(self) -> &'static str {
        match self {
            VmStatus::Starting => "starting",
            VmStatus::Running => "running",
            VmStatus::Paused => "paused",
            VmStatus::Stopping => "stopping",
            VmStatus::Failed => "failed",
            VmStatus::Lost => "lost",
        }
    }
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
    /// A disk-rooted image's VM: the size of its own writable disk (its storage quota), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u64>,
    /// The drive index of its mount slot (a disk image's VM: `vdc`), which dynamic mounts fill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_slot: Option<usize>,
    /// What is mounted through the slot (at most one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<VolumeMount>,
    /// Snapshot (or template's snapshot) the VM was restored from.
    pub snapshot: Option<String>,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub created_unix_ms: u64,
    /// VMM start → agent answers.
    pub ready_ms: Option<f64>,
    /// For restored VMs: fetching the snapshot's images from the store.
    pub fetch_ms: Option<f64>,
    /// VMM started → its agent connected (the guest answering over vsock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_ms: Option<f64>,
    /// The agent's refresh (clock, entropy, env, hostname, after-restore hooks) or, after a boot, setting the env.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_ms: Option<f64>,
    /// Of `refresh_ms`, the time the guest's agent spent on it (what it reports): the rest is flintd's and the
    /// vsock's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_guest_ms: Option<f64>,
    /// Of `refresh_ms`, flintd's wait for the agent's answer (request sent → answer read: the VMM's vsock device,
    /// the guest kernel and the agent); the rest is flintd's own (and, for a pool's hand-out, the VMM's resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_agent_ms: Option<f64>,
    /// A pool's hand-out: the VMM's resume of the paused pooled VM (part of `refresh_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_ms: Option<f64>,
    /// The agent's time per refresh step (clock, entropy, env_hostname, network, hooks), µs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refresh_steps_us: BTreeMap<String, u64>,
    /// Building the VM's network (namespace, tap, veth, addresses, nftables, DNS proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_ms: Option<f64>,
    pub error: Option<String>,
    /// Restored lazily: memory is fetched from the store as the guest touches it.
    #[serde(default)]
    pub lazy: bool,
    /// Environment for the VM's execs, set through the agent once it answers (kept so that a VM still starting
    /// when flintd restarts gets it too).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The VM's drives, in order. A restored VM's drives are its own files (in its directory), written from the
    /// snapshot's drive images.
    #[serde(default)]
    pub drives: Vec<DriveSpec>,
    /// The uid (and gid) the VM's jailed VMM runs as; none when the jail is off.
    #[serde(default)]
    pub uid: Option<u32>,
    /// The session this VM runs (it is started and stopped by the session's wakes and hibernations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The template whose warm pool holds this VM (paused, not yet handed out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The VM's network (docs/networking.md); none: no network (its card is detached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::net::VmNet>,
}

impl VmRecord {
    pub fn proc(&self) -> Option<crate::launcher::Proc> {
        Some(crate::launcher::Proc { pid: self.pid?, start: self.pid_start? })
    }
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
    /// Clones kept restored and paused for this template (its warm pool).
    #[serde(default)]
    pub pool_size: u32,
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
    /// Extra block devices (host paths), in order: /dev/vda, /dev/vdb, ... (after a disk-rooted image's root
    /// and disk: /dev/vdc, ...).
    #[serde(default)]
    pub drives: Vec<DriveSpec>,
    /// Environment for the VM's execs (set through the agent once it answers).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A network of its own (egress policy, exposed ports); none: no network.
    #[serde(default)]
    pub network: Option<crate::net::NetworkRequest>,
    /// A disk-rooted image's VM: the size of its writable disk (storage quota), MiB; default: the image's.
    #[serde(default)]
    pub disk_mib: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DriveSpec {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Limits on the guest's I/O to the drive (bytes and operations per refill time); kept in its snapshots, so
    /// clones have the same limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<flint_vmm_api::config::RateLimiterConfig>,
    /// Set by flintd, never by a caller: this drive is a disk-rooted image's read-only root (`name@sha256`),
    /// shared by every VM of the image and named, not stored, by snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A host directory mounted into a running VM (docs/images.md, "Dynamic mounts"): a copy of it, as an ext4
/// filesystem written into the VM's mount slot.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// Absolute host directory.
    pub source: PathBuf,
    /// Absolute path in the guest.
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// `POST /v1/images`: an OCI image layout (directory or tar) or a `docker save` archive, by host path.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    pub name: String,
    pub oci: PathBuf,
    /// The writable disk of the image's VMs, MiB (default 256).
    #[serde(default)]
    pub disk_mib: Option<u64>,
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
    #[serde(default)]
    pub vcpus: Option<u8>,
    /// A disk-rooted image's template: its writable disk's size (every clone's and session's quota), MiB.
    #[serde(default)]
    pub disk_mib: Option<u64>,
    /// Drives of the template's VM: their content at snapshot time is part of the snapshot, and every clone gets
    /// its own copy.
    #[serde(default)]
    pub drives: Vec<DriveSpec>,
    /// Clones to keep restored and paused for the template (its warm pool); 0: none.
    #[serde(default)]
    pub pool_size: u32,
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
    /// A network of its own for each clone (its own address and MAC).
    #[serde(default)]
    pub network: Option<crate::net::NetworkRequest>,
}

fn one() -> u32 {
    1
}

/// Most extra drives a VM may have (the VMM's device limit leaves room for net, vsock and rng).
pub const MAX_DRIVES: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_table() {
        use VmStatus::*;
        // Every status can be deleted (directly or through Stopping), and nothing leaves Stopping but an end.
        for s in VmStatus::ALL {
            assert!(!s.can_become(s), "{s:?} -> itself is not a transition");
            if s != Stopping {
                assert!(s.can_become(Stopping), "{s:?} cannot be deleted");
            }
        }
        assert!(Starting.can_become(Running));
        assert!(Running.can_become(Paused) && Paused.can_become(Running));
        assert!(!Paused.can_become(Paused) && !Starting.can_become(Paused));
        assert!(!Stopping.can_become(Running) && !Stopping.can_become(Paused));
        assert!(!Failed.can_become(Running) && !Lost.can_become(Running));
        assert!(!Running.can_become(Starting));
        let reachable: usize =
            VmStatus::ALL.iter().map(|a| VmStatus::ALL.iter().filter(|b| a.can_become(**b)).count()).sum();
        assert_eq!(reachable, 4 + 4 + 4 + 2 + 1 + 1);
    }
}
