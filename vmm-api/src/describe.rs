//! `GET /vm`: the VMM's description of its VM.
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::host::HostProfile;

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest reset itself (i8042 reset line): Linux `reboot`, `poweroff` or `panic` with `reboot=k`.
    GuestReset,
    /// The guest stopped in a way the VMM treats as a shutdown (HLT with interrupts off, a system event).
    GuestShutdown { detail: String },
    /// Asked to stop through the control API or a signal.
    Requested,
    /// The VM failed: emulation failure, failed entry, triple fault, KVM error.
    Failed { message: String },
}

impl ExitReason {
    /// The flint-vmm process exit code for this reason (see docs/vmm.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset | ExitReason::GuestShutdown { .. } | ExitReason::Requested => 0,
            ExitReason::Failed { .. } => 2,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "the guest reset itself (i8042 reset)"),
            ExitReason::GuestShutdown { detail } => write!(f, "the guest shut down: {detail}"),
            ExitReason::Requested => write!(f, "stop requested"),
            ExitReason::Failed { message } => write!(f, "the VM failed: {message}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
    Exited,
}

/// Time spent in each phase of building and booting.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BootTimings {
    pub kvm_setup_us: u64,
    pub memory_us: u64,
    pub kernel_load_us: u64,
    pub devices_us: u64,
    pub vcpus_us: u64,
    /// From process start (a standby VMM: the hand-over of its launch spec) to the first KVM_RUN.
    pub process_to_first_run_us: u64,
    /// `CLOCK_MONOTONIC` at the first KVM_RUN, µs ([`crate::monotonic_us`]): comparable with flintd's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_run_clock_us: Option<u64>,
    /// From the first KVM_RUN to the kernel handing over to /init.
    pub first_run_to_init_us: Option<u64>,
}

/// Time spent in each phase of a restore.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RestoreTimings {
    pub read_state_us: u64,
    pub kvm_setup_us: u64,
    pub memory_us: u64,
    pub devices_us: u64,
    pub vm_state_us: u64,
    pub vcpu_state_us: u64,
    /// How memory is provided: private, uffd or pager.
    pub mode: Option<String>,
    /// The state file's format version (an older one was upgraded on read).
    #[serde(default)]
    pub format_version: u32,
    /// A standby VMM: its KVM VM (and memory slots, if their layout matched) were made before the hand-over.
    #[serde(default)]
    pub prepared: bool,
}

/// Exits a vCPU took.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VcpuCounters {
    pub exits: u64,
    pub pio_exits: u64,
    pub mmio_exits: u64,
}

/// Counters of a userfaultfd page server (the VMM's own for `uffd`, flintd's for `pager`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct UffdReport {
    pub faults: u64,
    pub pages_copied: u64,
    pub zero_pages: u64,
    pub bytes_read: u64,
    pub handler_us: u64,
    pub failed: bool,
    pub prefetched_units: u64,
    pub unit_bytes: u64,
    /// Units first faulted by the guest, in first-touch order (the restore's working set).
    pub touched_units: Vec<u32>,
    /// The page source's own counters (store hits, bytes fetched, ...).
    #[serde(default)]
    pub source: serde_json::Value,
}

/// What `GET /vm` answers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmDescription {
    pub state: RunState,
    pub exit: Option<ExitReason>,
    pub host_profile: HostProfile,
    pub config: VmConfig,
    pub cmdline: String,
    pub timings: BootTimings,
    pub vcpus: Vec<VcpuCounters>,
    /// Each device's own description (type, transport state, device counters).
    pub devices: Vec<serde_json::Value>,
    pub unhandled_pio: u64,
    pub unhandled_mmio: u64,
    pub restore: Option<RestoreTimings>,
    /// Present for a `uffd` restore (the VMM serves its own faults).
    pub uffd: Option<UffdReport>,
    pub rss_kib: Option<u64>,
}

/// The answer to pause, resume and shutdown.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StateResponse {
    pub state: RunState,
}
