//! `PUT /snapshot/create`: what flintd asks, what the VMM reports.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What a snapshot request wants.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub state_path: PathBuf,
    pub mem_path: PathBuf,
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

/// Bytes written and pages skipped by a memory write.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WriteStats {
    pub bytes_written: u64,
    pub pages_written: u64,
    pub zero_pages_skipped: u64,
    /// Dirtied pages a diff left out because they hold the restored snapshot's page again (the guest freed them
    /// and free page reporting gave them back).
    #[serde(default)]
    pub returned_pages_skipped: u64,
}

/// What a snapshot cost, and what it holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SnapshotReport {
    pub pause_us: u64,
    pub save_state_us: u64,
    pub write_state_us: u64,
    pub write_memory_us: u64,
    pub total_us: u64,
    pub state_bytes: u64,
    pub memory: WriteStats,
    pub guest_memory_bytes: u64,
    /// The snapshot's vCPU count and guest memory (what a restore of it will have).
    #[serde(default)]
    pub vcpus: u8,
    #[serde(default)]
    pub mem_mib: u64,
    /// The state file's format version.
    #[serde(default)]
    pub format_version: u32,
    /// Drives the snapshot's VM has (a restore must give each a host file).
    #[serde(default)]
    pub drives: u32,
}

/// The control API's answer to a snapshot request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SnapshotResponse {
    pub snapshot: SnapshotReport,
}
