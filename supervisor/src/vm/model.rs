//! VM records, their status transitions, what a VM is asked to be, and the times a start took.
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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

    /// Counts toward the quotas of `[limits]` (a failed or lost VM holds nothing but its files).
    pub fn holds_quota(self) -> bool {
        !matches!(self, VmStatus::Failed | VmStatus::Lost)
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

/// Who a VM is for, as the service that started it names itself (`session`/`s1`, `pool`/`py`): opaque to the VM
/// layer, which only stores it, lists by it and puts it in events.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OwnerTag {
    pub kind: String,
    pub id: String,
}

impl OwnerTag {
    pub fn new(kind: &str, id: &str) -> OwnerTag {
        OwnerTag { kind: kind.to_string(), id: id.to_string() }
    }

    pub fn is(&self, kind: &str, id: &str) -> bool {
        self.kind == kind && self.id == id
    }
}

/// The times a VM's start took (milliseconds), kept in memory as they are measured and written with the start's
/// last commit (never a commit of their own).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmTimings {
    /// VMM start → agent answers (a pool's hand-out: resume + refresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<f64>,
    /// For restored VMs: fetching the snapshot's images from the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_ms: Option<f64>,
    /// VMM started → its agent connected (the guest answering over vsock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_ms: Option<f64>,
    /// The agent's refresh (clock, entropy, env, hostname, after-restore hooks) or, after a boot, setting the env.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_ms: Option<f64>,
    /// Of `refresh_ms`, the time the guest's agent spent on it (what it reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_guest_ms: Option<f64>,
    /// Of `refresh_ms`, flintd's wait for the agent's answer (request sent → answer read).
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
    /// flintd taking the start → the guest's first instruction (the VMM's first KVM_RUN), µs, on one clock
    /// (`CLOCK_MONOTONIC`): flintd's side of a start with the VMM's, the process start (or a standby's hand-over)
    /// included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_run_us: Option<u64>,
    /// Of `first_run_us`, flintd's part: the start taken → its VMM started (or a standby handed the spec), µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_us: Option<u64>,
    /// Its VMM was a standby (started ahead, jailed, its KVM VM made), handed this VM.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standby: bool,
    /// `CLOCK_MONOTONIC` when flintd took the start, µs (in memory only: the base of `first_run_us`).
    #[serde(skip)]
    pub start_clock_us: Option<u64>,
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
    /// Its CPU limit, a fraction of one core (`cpu.max` of its cgroup); none: its vCPUs' whole cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    pub created_unix_ms: u64,
    #[serde(flatten)]
    pub timings: VmTimings,
    pub error: Option<String>,
    /// Restored lazily: memory is fetched from the store as the guest touches it.
    #[serde(default)]
    pub lazy: bool,
    /// Environment for the VM's execs, set through the agent once it answers (kept so that a VM still starting
    /// when flintd restarts gets it too).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The guest's hostname (given at its refresh); default: the VM's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The VM's drives, in order. A restored VM's drives are its own files (in its directory), written from the
    /// snapshot's drive images.
    #[serde(default)]
    pub drives: Vec<DriveSpec>,
    /// The uid (and gid) the VM's jailed VMM runs as; none when the jail is off.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Who started the VM and answers for it (a session, a warm pool); none: an API caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<OwnerTag>,
    /// The VM's network (docs/networking.md); none: no network (its card is detached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::net::VmNet>,
    /// Whether the VM logs dirty pages (its next snapshot may be a diff on the one it came from).
    #[serde(default)]
    pub track_dirty: bool,
}

impl VmRecord {
    /// Most MiB its sparse disks may take on the data filesystem: its writable disk and its mount slot
    /// (`slot_mib`), at their full size.
    pub fn disk_budget_mib(&self, slot_mib: u64) -> u64 {
        self.disk_mib.unwrap_or(0) + if self.mount_slot.is_some() { slot_mib } else { 0 }
    }

    pub fn proc(&self) -> Option<crate::launcher::Proc> {
        Some(crate::launcher::Proc { pid: self.pid?, start: self.pid_start? })
    }

    /// Whether `owner` is this VM's owner.
    pub fn owned_by(&self, kind: &str, id: &str) -> bool {
        self.owner.as_ref().is_some_and(|o| o.is(kind, id))
    }
}

impl crate::owner::Record for VmRecord {
    type State = VmStatus;
    const WHAT: &'static str = "VM";
    fn key(&self) -> &str {
        &self.id
    }
    fn state(&self) -> VmStatus {
        self.status
    }
    fn state_name(s: VmStatus) -> &'static str {
        s.name()
    }
    fn can_become(from: VmStatus, to: VmStatus) -> bool {
        from.can_become(to)
    }
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
    /// A CPU limit, a fraction of one core (0.01-64: `0.25` is a quarter of a core); needs the jail (cgroups).
    #[serde(default)]
    pub cpu: Option<f64>,
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

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    pub id: String,
    /// Upload to the remote tier too.
    #[serde(default)]
    pub publish: bool,
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

    /// Records an older flintd wrote (timings at the top level, no owner) read as they were.
    #[test]
    fn records_keep_their_json_shape() {
        let json = r#"{"id":"a","status":"running","pid":7,"pid_start":9,"dir":"/d","image":null,"snapshot":"s",
            "mem_mib":256,"vcpus":1,"created_unix_ms":1,"ready_ms":12.5,"fetch_ms":1.0,"error":null,
            "session":"s1","refresh_steps_us":{"clock":3}}"#;
        let r: VmRecord = serde_json::from_str(json).unwrap();
        assert_eq!((r.timings.ready_ms, r.timings.refresh_steps_us.get("clock")), (Some(12.5), Some(&3)));
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["ready_ms"], 12.5, "timings stay top-level fields of the API's answer");
        assert!(back.get("owner").is_none());
        // A record with a network reads back through the flattened detail (its port map's keys are strings).
        let mut r = r;
        let mut req = crate::net::NetworkRequest::default();
        req.ports.insert(8080, Default::default());
        r.network = Some(crate::net::VmNet { index: 1, mac: "m".into(), request: req });
        let detail = super::super::ops::VmDetail { record: r.clone(), vmm: None };
        let back: super::super::ops::VmDetail = serde_json::from_str(&serde_json::to_string(&detail).unwrap()).unwrap();
        assert_eq!(back.record, r);
    }
}
