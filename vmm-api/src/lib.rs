//! The one contract between `flintd` and `flint-vmm`, compiled by both (like Firecracker's `vmm_config`).
//!
//! - [`spec`]: what flintd asks a VMM process to do at start ([`spec::LaunchSpec`]: boot a [`config::VmConfig`] or
//!   restore a snapshot with explicit host-side devices and a memory source).
//! - [`config`]: the VM configuration and its limits, checked once here: flintd answers 400 with the same message
//!   the VMM would fail with.
//! - [`snapshot`]: the snapshot request and report of the control API.
//! - [`describe`]: what `GET /vm` answers.
//! - [`pager`]: the hand-over of a userfaultfd to an external page server.
//! - [`http`]: the small HTTP/1.1 codec the VMM's server, flintd's client and the tests share.
//!
//! See docs/vmm.md.
pub mod config;
pub mod describe;
pub mod host;
pub mod http;
pub mod pager;
pub mod snapshot;
pub mod spec;

pub use config::VmConfig;
pub use host::HostProfile;
pub use spec::{LaunchSpec, MemorySource, RestoreSpec};

/// The control API's paths (method, path).
pub mod paths {
    pub const DESCRIBE: (&str, &str) = ("GET", "/vm");
    pub const PAUSE: (&str, &str) = ("PUT", "/vm/pause");
    pub const RESUME: (&str, &str) = ("PUT", "/vm/resume");
    pub const SHUTDOWN: (&str, &str) = ("PUT", "/vm/shutdown");
    pub const SNAPSHOT: (&str, &str) = ("PUT", "/snapshot/create");
}

/// An error and all its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Locks a mutex, taking the data even if a panicking thread poisoned it (the data are plain counters and
/// handles, valid at every point a panic could interrupt).
pub fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Microseconds of `CLOCK_MONOTONIC`: one clock for every process of the host (flintd and its VMMs, which have
/// no time namespace of their own), so a time one process took can be compared with another's.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
