//! The VM configuration (JSON file or command-line flags), validated before anything starts.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::host::HostProfile;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Uncompressed ELF vmlinux.
    pub kernel: PathBuf,
    /// Uncompressed initramfs (cpio), optional when a root drive is given.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Appended to the kernel command line Flint builds.
    #[serde(default)]
    pub cmdline_extra: String,
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    #[serde(default)]
    pub net: Option<NetConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default = "default_true")]
    pub rng: bool,
    /// A virtio-balloon device with free page reporting: memory the guest frees goes back to the host, and diff
    /// snapshots leave it out. Off in configurations written before it existed.
    #[serde(default)]
    pub balloon: bool,
    /// Where the serial console goes: a file path, "stdout" or "off".
    #[serde(default = "default_console")]
    pub console: String,
    /// Most bytes a console file and its one rotated predecessor (`<path>.1`) hold together: a guest writing to
    /// its serial port cannot fill the host disk. Each holds at most half; the older half is dropped.
    #[serde(default = "default_console_limit")]
    pub console_limit_bytes: u64,
    /// Force a host profile instead of detecting it.
    #[serde(default)]
    pub host_profile: Option<HostProfile>,
    /// Log dirtied guest pages (KVM dirty log) so diff snapshots can be taken.
    #[serde(default)]
    pub track_dirty_pages: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Boot from this drive (root=/dev/vdX).
    #[serde(default)]
    pub root: bool,
    /// Limits on the guest's I/O to this drive (none: unlimited).
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Firecracker's rate limiter: a token bucket for bytes and one for operations; a request waits until both have
/// its tokens.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

/// `size` tokens, refilled from empty to full in `refill_time_ms` (so `size / refill_time` per second), plus a
/// one-time burst spent first and never refilled.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: u64,
    pub refill_time_ms: u64,
}

impl RateLimiterConfig {
    /// A bucket that cannot work is a configuration error, not a silent "unlimited".
    pub fn check(&self) -> Result<(), String> {
        for (what, b) in [("bandwidth", &self.bandwidth), ("ops", &self.ops)] {
            if let Some(b) = b {
                if b.size == 0 || b.refill_time_ms == 0 {
                    return Err(format!("rate limiter {what}: size and refill_time_ms must be positive"));
                }
                if b.refill_time_ms > 3_600_000 {
                    return Err(format!("rate limiter {what}: refill_time_ms is over an hour"));
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Name of an existing tap device, or `/dev/fd/N`: an inherited fd of a tap its parent attached (how flintd
    /// hands a jailed VMM, whose own network namespace is empty, its tap; the jail's convention for every host
    /// file). Empty: a card with no host side ("detached"): frames the guest sends are dropped and none arrive.
    /// flintd boots every VM with a card, detached unless the VM has a network, so its snapshots' clones may be
    /// given one.
    pub tap: String,
    /// Network namespace holding the tap (a path such as /var/run/netns/NAME).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Guest MAC address (aa:bb:cc:dd:ee:ff); derived from the tap name when absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// Limits on frames the guest receives.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on frames the guest sends.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetConfig {
    /// A card with no host side (see `tap`).
    pub fn detached() -> Self {
        NetConfig { tap: String::new(), netns: None, mac: None, rx_rate_limiter: None, tx_rate_limiter: None }
    }
    pub fn is_detached(&self) -> bool {
        self.tap.is_empty()
    }

    /// The inherited fd `tap` names (`/dev/fd/N`), if it names one.
    pub fn inherited_fd(&self) -> Option<Result<i32, String>> {
        let n = self.tap.strip_prefix("/dev/fd/")?;
        Some(
            n.parse::<i32>()
                .ok()
                .filter(|fd| *fd >= 3)
                .ok_or_else(|| format!("tap {:?}: not an inherited fd", self.tap)),
        )
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    #[serde(default = "default_cid")]
    pub guest_cid: u64,
    /// Host-side Unix socket (Firecracker-compatible `CONNECT <port>` protocol).
    pub uds_path: PathBuf,
}

fn default_mem() -> u64 {
    256
}
fn default_vcpus() -> u8 {
    1
}
fn default_true() -> bool {
    true
}
fn default_console() -> String {
    "stdout".into()
}
/// Default [`VmConfig::console_limit_bytes`]: 16 MiB.
pub const DEFAULT_CONSOLE_LIMIT: u64 = 16 << 20;
/// Smallest console limit (two 4 KiB halves).
pub const MIN_CONSOLE_LIMIT: u64 = 8192;
fn default_console_limit() -> u64 {
    DEFAULT_CONSOLE_LIMIT
}
fn default_cid() -> u64 {
    3
}

/// Most vCPUs a VM may have (MP table and CPUID topology limits of this VMM).
pub const MAX_VCPUS: u8 = 8;
/// Least guest memory (the guest kernel and its initramfs need room).
pub const MIN_MEM_MIB: u64 = 64;
/// Most guest memory.
pub const MAX_MEM_MIB: u64 = 65536;
/// Most virtio devices (IRQs 5..=23).
pub const MAX_VIRTIO_DEVICES: usize = 19;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("vcpus must be between 1 and {MAX_VCPUS}, not {0}")]
    Vcpus(u8),
    #[error("mem_mib must be a multiple of 2 between {MIN_MEM_MIB} and {MAX_MEM_MIB}, not {0}")]
    Memory(u64),
    #[error("{0} does not exist or is not a regular file")]
    MissingFile(PathBuf),
    #[error("neither an initramfs nor a root drive is configured: the guest would have no root filesystem")]
    NoRoot,
    #[error("more than one drive is marked as root")]
    TwoRoots,
    #[error("too many devices: at most {MAX_VIRTIO_DEVICES} virtio devices")]
    TooManyDevices,
    #[error("MAC address {0:?} is not six colon-separated hex bytes")]
    Mac(String),
    #[error("vsock guest_cid must be between 3 and 2^32-1, not {0}")]
    Cid(u64),
    #[error("cmdline_extra may not contain newlines or NUL bytes")]
    Cmdline,
    #[error("{0}")]
    RateLimiter(String),
}

/// Parses the short form of a drive's limits used by the CLIs: `bw=BYTES_PER_SECOND` and `iops=N` per second, each
/// a bucket of a quarter second's worth refilled every 250 ms (bursts stay short). Returns false for an option
/// that is not a limit.
pub fn parse_limit_option(opt: &str, limiter: &mut Option<RateLimiterConfig>) -> Result<bool, String> {
    let Some((k, v)) = opt.split_once('=') else { return Ok(false) };
    let bucket = |v: &str| -> Result<TokenBucketConfig, String> {
        let per_s: u64 =
            v.parse().ok().filter(|n| *n >= 4).ok_or_else(|| format!("`{opt}`: expected a number >= 4"))?;
        Ok(TokenBucketConfig { size: per_s / 4, one_time_burst: 0, refill_time_ms: 250 })
    };
    match k {
        "bw" => limiter.get_or_insert_with(Default::default).bandwidth = Some(bucket(v)?),
        "iops" => limiter.get_or_insert_with(Default::default).ops = Some(bucket(v)?),
        _ => return Ok(false),
    }
    Ok(true)
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initramfs: None,
            mem_mib: default_mem(),
            vcpus: default_vcpus(),
            cmdline_extra: String::new(),
            drives: Vec::new(),
            net: None,
            vsock: None,
            rng: true,
            balloon: true,
            console: default_console(),
            console_limit_bytes: DEFAULT_CONSOLE_LIMIT,
            host_profile: None,
            track_dirty_pages: false,
        }
    }

    /// Every check: the limits, then that the files exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_limits()?;
        let files =
            std::iter::once(&self.kernel).chain(self.initramfs.iter()).chain(self.drives.iter().map(|d| &d.path));
        for f in files {
            let is_file = crate::spec::open_host_file(f, false).and_then(|h| h.metadata()).is_ok_and(|m| m.is_file());
            if !is_file {
                return Err(ConfigError::MissingFile(f.clone()));
            }
        }
        Ok(())
    }

    /// The checks that need no file system: what flintd checks at its API edge (a 400 there, not a failed VM).
    pub fn validate_limits(&self) -> Result<(), ConfigError> {
        check_vcpus(self.vcpus)?;
        check_mem_mib(self.mem_mib)?;
        for d in &self.drives {
            if let Some(l) = &d.rate_limiter {
                l.check().map_err(|e| ConfigError::RateLimiter(format!("drive {}: {e}", d.path.display())))?;
            }
        }
        let roots = self.drives.iter().filter(|d| d.root).count();
        if roots > 1 {
            return Err(ConfigError::TwoRoots);
        }
        if roots == 0 && self.initramfs.is_none() {
            return Err(ConfigError::NoRoot);
        }
        let n = self.drives.len()
            + usize::from(self.net.is_some())
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
            + usize::from(self.balloon);
        if n > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices);
        }
        if let Some(n) = &self.net {
            for l in [&n.rx_rate_limiter, &n.tx_rate_limiter].into_iter().flatten() {
                l.check().map_err(|e| ConfigError::RateLimiter(format!("net: {e}")))?;
            }
        }
        if let Some(mac) = self.net.as_ref().and_then(|n| n.mac.as_ref()) {
            parse_mac(mac).ok_or_else(|| ConfigError::Mac(mac.clone()))?;
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
                return Err(ConfigError::Cid(v.guest_cid));
            }
        }
        if self.cmdline_extra.contains(['\n', '\0']) {
            return Err(ConfigError::Cmdline);
        }
        Ok(())
    }
}

/// The vCPU count limit, on its own (for requests that carry only a count).
pub fn check_vcpus(vcpus: u8) -> Result<(), ConfigError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(ConfigError::Vcpus(vcpus));
    }
    Ok(())
}

/// The guest memory limit, on its own.
pub fn check_mem_mib(mem_mib: u64) -> Result<(), ConfigError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) || !mem_mib.is_multiple_of(2) {
        return Err(ConfigError::Memory(mem_mib));
    }
    Ok(())
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// A locally administered unicast MAC derived from a name.
pub fn mac_from_name(name: &str) -> [u8; 6] {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let b = h.to_le_bytes();
    [0x06, b[0], b[1], b[2], b[3], b[4]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> PathBuf {
        std::env::current_exe().unwrap()
    }

    #[test]
    fn rejects_bad_values_with_clear_errors() {
        let mut c = VmConfig::new(kernel());
        assert_eq!(c.validate(), Err(ConfigError::NoRoot));
        c.initramfs = Some(kernel());
        assert_eq!(c.validate(), Ok(()));
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        c.vcpus = 1;
        c.mem_mib = 100 + 1;
        assert_eq!(c.validate(), Err(ConfigError::Memory(101)));
        c.mem_mib = 128;
        c.kernel = "/nonexistent/vmlinux".into();
        assert_eq!(c.validate(), Err(ConfigError::MissingFile("/nonexistent/vmlinux".into())));
        c.kernel = kernel();
        c.net = Some(NetConfig { tap: "tap0".into(), mac: Some("zz:00".into()), ..NetConfig::detached() });
        assert_eq!(c.validate(), Err(ConfigError::Mac("zz:00".into())));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","memory":5}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `memory`"), "{e}");
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("06:00:ac:10:00:02"), Some([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(parse_mac("06:00:ac:10:00"), None);
        assert_eq!(mac_from_name("tap0")[0], 0x06);
        assert_ne!(mac_from_name("tap0"), mac_from_name("tap1"));
    }
}
