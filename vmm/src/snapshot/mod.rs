//! Snapshots: pause → save vCPU, VM and device state (plain data) plus guest memory → restore
//! in a new flint-vmm process. See docs/snapshot-format.md.
pub mod cpu;
pub mod format;
pub mod memory;
pub mod v1;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::host::HostProfile;
pub use cpu::{CpuIdentity, VcpuState, VmState};
pub use flint_vmm_api::snapshot::{SnapshotKind, SnapshotReport, SnapshotRequest};

/// One virtqueue's position and configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// A virtio-mmio transport and its queues.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub acked_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    pub queues: Vec<QueueSnapshot>,
}

/// The 8250 UART's registers (vm-superio's SerialState as plain data).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// A device model's own state, encoded and versioned by the device (so each device can grow its state without a
/// new state-file format). Empty for devices with nothing to keep: block and rng are stateless between requests,
/// net drops frames in flight, and vsock resets every connection (the guest is told through a transport-reset
/// event).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModelState {
    pub version: u16,
    pub data: Vec<u8>,
}

/// One device: its id (stable across restores: `vda`.., `net0`, `vsock0`, `rng0`), transport and model state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceState {
    pub id: String,
    pub transport: TransportState,
    pub model: ModelState,
}

/// The ids of a configuration's virtio devices, in the order they are created (and in which format version 1
/// listed their states).
pub fn device_ids(config: &VmConfig) -> Vec<String> {
    let mut ids: Vec<String> = (0..config.drives.len()).map(|i| format!("vd{}", (b'a' + i as u8) as char)).collect();
    if config.net.is_some() {
        ids.push("net0".into());
    }
    if config.vsock.is_some() {
        ids.push("vsock0".into());
    }
    if config.rng {
        ids.push("rng0".into());
    }
    if config.balloon {
        ids.push("balloon0".into());
    }
    ids
}

/// Everything in a state file (format version 2).
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    pub created_unix_ms: u64,
    pub vmm_version: String,
    pub host_profile: HostProfile,
    pub cpu: CpuIdentity,
    pub config: VmConfig,
    pub cmdline: String,
    /// (guest physical address, length) of each RAM region, in memory-file order.
    pub memory_layout: Vec<(u64, u64)>,
    /// Whether the memory file is a diff (only pages dirtied since the previous snapshot).
    pub memory_is_diff: bool,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: Vec<DeviceState>,
    pub serial: SerialSnapshot,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM has exited; nothing to snapshot")]
    NotRunning,
    #[error("a diff snapshot needs dirty-page tracking (start the VM with track_dirty_pages)")]
    NoDirtyTracking,
    #[error("cannot save the vCPUs: {0}")]
    Vcpus(String),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuStateError),
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error(transparent)]
    Memory(#[from] memory::MemFileError),
    #[error("cannot write the state file {0}")]
    WriteState(String, #[source] std::io::Error),
}

/// Writes the state file atomically (temporary file, fsync, rename).
pub fn write_state(state: &SnapshotState, path: &std::path::Path) -> Result<u64, SnapshotError> {
    let bytes = format::encode(state)?;
    let tmp = path.with_extension("tmp");
    let p = path.display().to_string();
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| SnapshotError::WriteState(p, e))?;
    Ok(bytes.len() as u64)
}

/// Reads and validates a state file of any readable format version; an older one is upgraded. Returns the state
/// and the version it was written in.
pub fn read_state(path: &std::path::Path) -> Result<(SnapshotState, u32), RestoreError> {
    use std::io::Read;
    // A jailed VMM gets the (shared) state file as an inherited fd.
    let f = flint_vmm_api::spec::open_host_file(path, false)
        .map_err(|e| RestoreError::ReadState(path.display().to_string(), e))?;
    let mut bytes = Vec::new();
    // Never more than the format allows (a state file is small): a huge file is refused, not read into memory.
    f.take(format::MAX_BODY_BYTES + 64)
        .read_to_end(&mut bytes)
        .map_err(|e| RestoreError::ReadState(path.display().to_string(), e))?;
    decode_state(&bytes)
}

/// Decodes a state file's bytes (see [`read_state`]).
pub fn decode_state(bytes: &[u8]) -> Result<(SnapshotState, u32), RestoreError> {
    let (version, body) = format::decode_versioned(bytes)?;
    let state = match version {
        1 => v1::upgrade(format::decode_body(body)?),
        _ => format::decode_body(body)?,
    };
    Ok((state, version))
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot read the state file {0}")]
    ReadState(String, #[source] std::io::Error),
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuStateError),
    #[error(transparent)]
    Memory(#[from] memory::MemFileError),
    #[error(transparent)]
    Uffd(#[from] flint_uffd::UffdError),
    #[error("cannot hand guest memory to the page server at {0}")]
    Pager(String, #[source] std::io::Error),
    #[error("the snapshot's memory file is a diff: merge it onto its base (flint-vmm --merge-diff BASE DIFF) and restore with --merged-memory")]
    DiffMemory,
    #[error("the snapshot's devices do not match its configuration: {0}")]
    Devices(String),
}

pub use flint_vmm_api::now_unix_ms;
