//! Snapshots: pause → save vCPU, VM and device state (plain data) plus guest memory → restore
//! in a new flint-vmm process. See docs/snapshot-format.md.
pub mod cpu;
pub mod format;
pub mod memory;
pub mod store_source;
pub mod uffd;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::host::HostProfile;
pub use cpu::{CpuIdentity, VcpuState, VmState};

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

/// A virtio-mmio transport and its queues. Device models keep no other state worth saving:
/// block and rng are stateless between requests, net drops frames in flight, and vsock resets
/// every connection (the guest is told through a transport-reset event).
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

/// Everything in a state file.
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
    pub devices: Vec<TransportState>,
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

/// What a snapshot request wants.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub state_path: std::path::PathBuf,
    pub mem_path: std::path::PathBuf,
    #[serde(default)]
    pub kind: SnapshotKind,
    /// Resume the VM afterwards (default); false leaves it paused.
    #[serde(default = "yes")]
    pub resume: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    #[default]
    Full,
    Diff,
}

/// What a snapshot cost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SnapshotReport {
    pub pause_us: u64,
    pub save_state_us: u64,
    pub write_state_us: u64,
    pub write_memory_us: u64,
    pub total_us: u64,
    pub state_bytes: u64,
    pub memory: memory::WriteStats,
    pub guest_memory_bytes: u64,
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

/// Reads and validates a state file.
pub fn read_state(path: &std::path::Path) -> Result<SnapshotState, RestoreError> {
    let bytes = std::fs::read(path).map_err(|e| RestoreError::ReadState(path.display().to_string(), e))?;
    Ok(format::decode(&bytes)?)
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
    Uffd(#[from] uffd::UffdError),
    #[error("the snapshot's memory file is a diff: merge it onto its base (flint-vmm --merge-diff BASE DIFF) and restore with --merged-memory")]
    DiffMemory,
    #[error("the snapshot's devices do not match its configuration: {0}")]
    Devices(String),
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
