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
    /// Confine this process before doing anything else (flintd's jailed launcher); every path of the spec is
    /// then relative to the jail's root, and host files outside it are inherited fds (`/dev/fd/N`).
    #[serde(default)]
    pub jail: Option<JailSpec>,
    /// A dead man's switch (a session VM of a cluster host, docs/cluster.md): a file whose first 8 bytes are a
    /// little-endian deadline in CLOCK_MONOTONIC milliseconds (0: none). Past it the VMM holds its vCPUs — the
    /// guest stops running — until the deadline moves past the clock again. flintd moves it after every etcd
    /// keep-alive that succeeds; a flintd that stops (crash, SIGSTOP, cut off) stops moving it.
    #[serde(default)]
    pub fence: Option<PathBuf>,
    /// vCPU threads run as `SCHED_IDLE` (flintd's `vcpu_sched_idle`): any other task that wakes on their core
    /// (flintd, this VMM's API and device threads) runs at once instead of waiting out the vCPU's slice. The VM's
    /// cgroup keeps its CPU weight against other VMs and the host's tasks over time.
    #[serde(default)]
    pub vcpu_sched_idle: bool,
    pub launch: Launch,
}

/// Reads a fence file's deadline (CLOCK_MONOTONIC ms; 0: none). An unreadable or short file reads as "held"
/// (1): a fence that cannot be read must not let a guest run.
pub fn read_fence(f: &std::fs::File) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    match f.read_exact_at(&mut b, 0) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => 1,
    }
}

/// Writes a fence file's deadline (see [`LaunchSpec::fence`]).
pub fn write_fence(f: &std::fs::File, deadline_ms: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.write_all_at(&deadline_ms.to_le_bytes(), 0)
}

/// What a standby VMM is started with (`flint-vmm --standby FILE`): flintd's launcher starts it jailed (`jail`,
/// its own directory as `/`), with the control socket at [`STANDBY_CONTROL_FD`]. It enters its jail, opens
/// `/dev/kvm` and creates a KVM VM with memory slots for `mem_mib` of guest memory ahead, then waits for one
/// message on the control socket: a [`LaunchSpec`] (JSON) with the host files it names as fds (SCM_RIGHTS),
/// which it moves to [`HANDOVER_FIRST_FD`], `+1`, ... (the spec names them `/dev/fd/N`). It then runs that spec as
/// a VMM started with it would, in the same jail. End of file on the socket (flintd gone, or the standby
/// discarded) ends it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StandbySpec {
    pub jail: JailSpec,
    /// Install the seccomp filters once the VM runs (off only for debugging).
    #[serde(default = "yes")]
    pub seccomp: bool,
    /// Guest memory to make KVM memory slots for ahead, MiB (a launch whose memory has another layout makes its
    /// own VM); none: only the KVM VM.
    #[serde(default)]
    pub mem_mib: Option<u64>,
}

/// The fd a standby VMM's control socket is on.
pub const STANDBY_CONTROL_FD: i32 = 3;

/// The first fd a standby VMM moves the host files it is handed to (they keep their order).
pub const HANDOVER_FIRST_FD: i32 = 100;

/// Most host files one hand-over passes.
pub const HANDOVER_MAX_FDS: usize = 32;

/// How a VMM confines itself. flintd's launcher starts it as pid 1 of new pid, mount, IPC, UTS and network
/// namespaces, already in its cgroups, with only the fds it needs; the VMM then, single-threaded and before it
/// reads anything a guest or a snapshot controls: makes `root` its `/` (pivot_root, the host's tree detached),
/// with a private /dev holding only `devices` and a /proc of its own pid namespace; sets `rlimits`; drops to
/// `uid`/`gid` with no supplementary groups and no capabilities; sets no_new_privs and non-dumpable; closes every
/// fd but stdio and `keep_fds`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JailSpec {
    /// The VM's directory on the host: becomes `/`.
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Device nodes made in the jail's `/dev` (owned by `uid`, mode 0600).
    #[serde(default)]
    pub devices: Vec<JailDevice>,
    pub rlimits: JailRlimits,
    /// Inherited fds that stay open (host files the spec names as `/dev/fd/N`).
    #[serde(default)]
    pub keep_fds: Vec<i32>,
}

/// A character device node in the jail's `/dev`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JailDevice {
    /// Path under `/dev` (`kvm`, `net/tun`, `userfaultfd`).
    pub name: String,
    pub major: u32,
    pub minor: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JailRlimits {
    /// Open files.
    pub nofile: u64,
    /// Tasks of the VM's uid (every thread counts).
    pub nproc: u64,
    /// Largest file the VMM may write (snapshots of guest memory, console).
    pub fsize: u64,
}

/// The fd behind a spec path of the form `/dev/fd/N`: a host file a jailed VMM inherits instead of opening.
pub fn inherited_fd(path: &std::path::Path) -> Option<i32> {
    path.to_str()?.strip_prefix("/dev/fd/")?.parse().ok().filter(|fd| *fd > 2)
}

/// Opens a host file the spec names: an inherited fd (`/dev/fd/N`, duplicated, so the file can be opened more
/// than once) or a path.
pub fn open_host_file(path: &std::path::Path, write: bool) -> std::io::Result<std::fs::File> {
    if let Some(fd) = inherited_fd(path) {
        use std::os::fd::FromRawFd;
        // SAFETY: F_DUPFD_CLOEXEC only reads `fd`; on success the new fd is ours alone.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh fd nobody else owns.
        return Ok(unsafe { std::fs::File::from_raw_fd(dup) });
    }
    std::fs::OpenOptions::new().read(true).write(write).open(path)
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
    fn a_fence_that_cannot_be_read_holds() {
        let path = std::env::temp_dir().join(format!("flint-fence-{}", std::process::id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        assert_eq!(read_fence(&f), 1, "an empty fence file holds");
        write_fence(&f, 0).unwrap();
        assert_eq!(read_fence(&f), 0, "no deadline");
        write_fence(&f, 123_456).unwrap();
        assert_eq!(read_fence(&f), 123_456);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn spec_round_trips_and_refuses_unknown_fields() {
        let spec = LaunchSpec {
            api_sock: Some("/vm/api.sock".into()),
            seccomp: true,
            jail: None,
            fence: Some("/dev/fd/101".into()),
            vcpu_sched_idle: true,
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
