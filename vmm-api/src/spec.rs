//! What a VMM process is started to do: flintd writes a [`LaunchSpec`] as JSON into the VM's directory and starts
//! `flint-vmm --spec FILE`; the command-line flags of flint-vmm build the same value.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{NetConfig, VmConfig};

/// Largest spec file flint-vmm reads.
pub const MAX_SPEC_BYTES: u64 = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LaunchSpec {
    /// The control API socket (mode 0600).
    #[serde(default)]
    pub api_sock: Option<PathBuf>,
    /// Install the seccomp filter before the first vCPU runs (off only for debugging).
    #[serde(default = "yes")]
    pub seccomp: bool,
    pub launch: Launch,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Launch {
    /// Boot a kernel.
    Boot(VmConfig),
    /// Restore a snapshot into this new process.
    Restore(RestoreSpec),
}

/// A restore: the state file, where memory comes from, and the host side of every device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RestoreSpec {
    pub state_path: PathBuf,
    pub memory: MemorySource,
    #[serde(default)]
    pub devices: HostDevices,
    /// Turn dirty-page logging on or off (default: as in the snapshot).
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// The memory file is a diff's base with the diff merged onto it (a diff state file restores only so).
    #[serde(default)]
    pub merged_memory: bool,
}

/// Host-side resources a restore opens instead of what the snapshot names.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostDevices {
    #[serde(default)]
    pub vsock_uds: Option<PathBuf>,
    /// Serial console: a file path, "stdout" or "off".
    #[serde(default)]
    pub console: Option<String>,
    /// The console's size limit on this host (default: the snapshot's).
    #[serde(default)]
    pub console_limit_bytes: Option<u64>,
    #[serde(default)]
    pub net: Option<NetConfig>,
    /// Replaces the drives' paths, in order (as many as the snapshot has drives).
    #[serde(default)]
    pub drive_paths: Option<Vec<PathBuf>>,
}

/// Where a restored guest's memory comes from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "mode", deny_unknown_fields)]
pub enum MemorySource {
    /// mmap(MAP_PRIVATE) of a memory file: copy-on-write, clones share the page cache.
    Private { path: PathBuf },
    /// Anonymous memory filled on first touch from a memory file by the VMM's own userfaultfd handler.
    Uffd { path: PathBuf },
    /// Anonymous memory filled on first touch by an external page server: the VMM creates the userfaultfd,
    /// registers guest memory and hands the fd over this Unix socket (see [`crate::pager`]). The VMM holds no
    /// store credentials and makes no network connection.
    Pager { socket: PathBuf },
}

impl MemorySource {
    pub fn mode_name(&self) -> &'static str {
        match self {
            MemorySource::Private { .. } => "private",
            MemorySource::Uffd { .. } => "uffd",
            MemorySource::Pager { .. } => "pager",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_and_refuses_unknown_fields() {
        let spec = LaunchSpec {
            api_sock: Some("/vm/api.sock".into()),
            seccomp: true,
            launch: Launch::Restore(RestoreSpec {
                state_path: "/vm/state".into(),
                memory: MemorySource::Pager { socket: "/vm/pager.sock".into() },
                devices: HostDevices { vsock_uds: Some("/vm/v.sock".into()), ..Default::default() },
                track_dirty_pages: None,
                merged_memory: false,
            }),
        };
        let text = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<LaunchSpec>(&text).unwrap(), spec);
        let e = serde_json::from_str::<LaunchSpec>(
            r#"{"launch":{"restore":{"state_path":"/s","memory":{"mode":"private","path":"/m"},"bogus":1}}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = serde_json::from_str::<LaunchSpec>(
            r#"{"launch":{"restore":{"state_path":"/s","memory":{"mode":"store","path":"/m"}}}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("store"), "{e}");
    }
}
