//! State file format version 1 (flint-vmm 0.1 before per-device state): kept to read snapshots taken before the
//! upgrade (a session hibernated by the previous release must wake on this one). Devices were a list of transport
//! states matched by position; they get the ids the configuration gives them, with empty model state.
use serde::{Deserialize, Serialize};

use super::{device_ids, CpuIdentity, DeviceState, ModelState, SerialSnapshot, SnapshotState, TransportState};
use super::{VcpuState, VmState};
use crate::config::VmConfig;
use crate::host::HostProfile;

/// Everything in a version-1 state file, field for field.
#[derive(Serialize, Deserialize)]
pub struct SnapshotStateV1 {
    pub created_unix_ms: u64,
    pub vmm_version: String,
    pub host_profile: HostProfile,
    pub cpu: CpuIdentity,
    pub config: VmConfig,
    pub cmdline: String,
    pub memory_layout: Vec<(u64, u64)>,
    pub memory_is_diff: bool,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: Vec<TransportState>,
    pub serial: SerialSnapshot,
}

/// A version-1 state as the current version. A device list longer or shorter than the configuration's is kept as
/// is (ids `dev<N>` for the extra ones), so the restore reports the mismatch by id.
pub fn upgrade(old: SnapshotStateV1) -> SnapshotState {
    let ids = device_ids(&old.config);
    let devices = old
        .devices
        .into_iter()
        .enumerate()
        .map(|(i, transport)| DeviceState {
            id: ids.get(i).cloned().unwrap_or_else(|| format!("dev{i}")),
            transport,
            model: ModelState::default(),
        })
        .collect();
    SnapshotState {
        created_unix_ms: old.created_unix_ms,
        vmm_version: old.vmm_version,
        host_profile: old.host_profile,
        cpu: old.cpu,
        config: old.config,
        cmdline: old.cmdline,
        memory_layout: old.memory_layout,
        memory_is_diff: old.memory_is_diff,
        vm: old.vm,
        vcpus: old.vcpus,
        devices,
        serial: old.serial,
    }
}

/// The current state in version 1's layout (what the previous release wrote): for tests and for handing a
/// snapshot back to a host still running the previous release. Fails when a device carries model state, which
/// version 1 cannot hold.
pub fn downgrade(s: SnapshotState) -> Result<SnapshotStateV1, String> {
    if let Some(d) = s.devices.iter().find(|d| !d.model.data.is_empty()) {
        return Err(format!("device {} has model state, which format version 1 cannot hold", d.id));
    }
    Ok(SnapshotStateV1 {
        created_unix_ms: s.created_unix_ms,
        vmm_version: s.vmm_version,
        host_profile: s.host_profile,
        cpu: s.cpu,
        config: s.config,
        cmdline: s.cmdline,
        memory_layout: s.memory_layout,
        memory_is_diff: s.memory_is_diff,
        vm: s.vm,
        vcpus: s.vcpus,
        devices: s.devices.into_iter().map(|d| d.transport).collect(),
        serial: s.serial,
    })
}
