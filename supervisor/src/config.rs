//! flintd configuration: TOML, every field optional; the embedded defaults work with no file at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flint_snapshot_store::S3Config;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The API socket (mode 0660).
    pub socket: PathBuf,
    /// VM directories, the state database and the local snapshot cache live here.
    pub data_dir: PathBuf,
    /// The VMM binary; default: `flint-vmm` next to `flintd`, else on PATH.
    pub vmm_bin: Option<PathBuf>,
    /// Named guest images: directories holding `vmlinux` and `initramfs.cpio`. Directories under
    /// `<data_dir>/images/` are images too, named after the directory.
    pub images: BTreeMap<String, PathBuf>,
    pub vm: VmDefaults,
    pub store: StoreSection,
    /// How long a booting VM may take to answer its agent.
    pub agent_timeout_s: u64,
    /// How long a restored VM may take to answer its agent (and refresh): past it that clone fails and frees
    /// its restore slot, so one snapshot whose agent never answers cannot hold up every restore.
    pub restore_agent_timeout_s: u64,
    /// Restores run at most this many at once (they are CPU-bound).
    pub max_parallel_restores: usize,
    /// Most bytes one `GET /v1/vms/{id}/files` returns (a guest file, or device, may be endless).
    pub max_file_read_bytes: u64,
    /// Group that owns the API socket (mode 0660): its members may drive flintd without root.
    pub socket_group: Option<String>,
    /// The scheduling slice flintd's own threads ask the kernel for, in µs (`sched_setattr(2)`: SCHED_OTHER with
    /// `sched_runtime`, which EEVDF takes as the task's slice on Linux 6.12 and later; earlier kernels ignore it).
    /// Beside busy guests, a short slice lets a woken API thread run sooner. 0: the kernel's default.
    pub sched_slice_us: u64,
    /// VMMs run their vCPU threads as `SCHED_IDLE`: flintd's threads (and each VMM's API and device threads)
    /// preempt a running vCPU the moment they wake, rather than waiting out its slice; over time each VM's cgroup
    /// keeps its CPU weight. Keeps the API's tail latency flat beside busy guests (docs/performance.md).
    pub vcpu_sched_idle: bool,
    pub limits: Limits,
    pub jail: JailConfig,
    pub sessions: SessionsConfig,
    pub pools: PoolsConfig,
    pub standby: StandbyConfig,
    pub network: crate::net::NetworkConfig,
    /// The E2B-compatible endpoint (docs/e2b.md); off unless `listen` is set.
    pub e2b: crate::e2b::E2bConfig,
    /// Hosts coordinated through etcd (docs/cluster.md); off unless `etcd` lists endpoints.
    pub cluster: crate::cluster::ClusterConfig,
}

/// Warm pools (docs/performance.md): per template, clones restored ahead of demand and kept paused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolsConfig {
    /// Pooled VMs over all templates (each is a paused VM: its memory stays allocated).
    pub max_total: usize,
}

impl Default for PoolsConfig {
    fn default() -> Self {
        PoolsConfig { max_total: 16 }
    }
}

/// Standby VMMs (docs/operations.md): VMM processes started ahead, jailed, with their KVM VM and memory slots
/// made, each waiting for one VM's launch spec. A restore (or boot) of a VM whose memory size has standbys takes
/// one instead of starting a process: the process start, the jail and KVM's per-VM setup leave its path. Only with
/// the jail; invisible to the API; never reused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StandbyConfig {
    /// Standby VMMs kept per memory size (0: none).
    pub count: usize,
    /// Guest memory sizes (MiB) standbys are kept for: their memory slots are made for that size.
    pub mem_mib: Vec<u64>,
}

impl Default for StandbyConfig {
    fn default() -> Self {
        StandbyConfig { count: 2, mem_mib: vec![256] }
    }
}

/// Sessions: sandboxes that hibernate to the store when idle and wake on the next call (docs/sessions.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// A session's idle timeout when its request names none.
    pub idle_timeout_s: u64,
    /// Wake lazily (memory from the store on first touch, working set prefetched) rather than fetching the
    /// memory image whole first.
    pub lazy_wake: bool,
    /// Hosts sharing the bucket may wake each other's sessions: hibernations are published to S3 and a lease
    /// object in the bucket (conditional writes) says which host runs a session. Needs an S3 tier that honours
    /// conditional writes (flintd probes it).
    pub cross_host: bool,
    /// How long a host's claim on a running session lasts without renewal (renewed every third of it): a host
    /// that dies loses its sessions after this. A host that cannot renew fences itself first: it pauses the
    /// session's VM half-way through the lease and stops it at two thirds (docs/sessions.md).
    pub lease_s: u64,
    /// The most the clocks of hosts sharing a bucket may differ: another host's lapsed claim is taken over only
    /// this long after its expiry (with the holder's own fence a third of the lease early, hosts whose clocks
    /// differ by less than `max_clock_skew_ms` + lease_s/3 never run a session at once).
    pub max_clock_skew_ms: u64,
    /// This host's name in leases; default: the hostname and a random suffix kept in `<data_dir>/host-id`.
    pub host_id: Option<String>,
    /// How often idle timeouts, lifetimes and leases are checked.
    pub tick_ms: u64,
    /// Sessions this host keeps (hibernated ones included).
    pub max_sessions: usize,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            idle_timeout_s: 300,
            lazy_wake: true,
            cross_host: true,
            lease_s: 30,
            max_clock_skew_ms: 2000,
            host_id: None,
            tick_ms: 500,
            max_sessions: 10_000,
        }
    }
}

/// The jail every VMM runs in (docs/security.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailConfig {
    /// Off only for debugging (`flintd --no-jail`): VMMs then run as flintd's user, unconfined.
    pub enabled: bool,
    /// Each VM runs as its own uid and gid from `[uid_base, uid_base + uid_count)`, never root.
    pub uid_base: u32,
    pub uid_count: u32,
    /// Where flintds of this host claim their uid ranges (one locked file each): a flintd whose range overlaps a
    /// running flintd's refuses to start.
    pub claims_dir: PathBuf,
    /// The cgroup under each hierarchy that holds one cgroup per VM.
    pub cgroup: String,
    /// The VMM's memory beyond guest memory (its own heap, device queues, KVM's page tables): the cgroup's limit
    /// is guest memory plus this. None: sized from the guest's memory ([`JailConfig::vmm_overhead_for`]).
    pub vmm_overhead_mib: Option<u64>,
    /// CPU weight of each VM (1-10000; 100 is an ordinary process's share).
    pub cpu_weight: u32,
    /// Tasks (threads) each VMM may have: its pids limit and RLIMIT_NPROC.
    pub pids_max: u64,
    /// Open files each VMM may have.
    pub nofile: u64,
}

impl JailConfig {
    /// What a VMM of `guest_mib` may hold beyond its guest's memory: `vmm_overhead_mib` if set, else 32 MiB plus
    /// 1/64 of the guest's memory (36 MiB at 256 MiB, 64 MiB at 2 GiB). Measured (`flint-bench standby` and
    /// `scale`, docs/performance.md): 2-3 MiB for 256 MiB guests, idle or under calls; KVM's own tables grow with
    /// the guest memory a guest touches (about 1/256 of it under shadow paging), hence the part that scales.
    pub fn vmm_overhead_for(&self, guest_mib: u64) -> u64 {
        self.vmm_overhead_mib.unwrap_or(32 + guest_mib / 64)
    }
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            enabled: true,
            uid_base: 900_000,
            uid_count: 65_536,
            claims_dir: PathBuf::from("/run/flint/jail-uids"),
            cgroup: "flint".into(),
            vmm_overhead_mib: None,
            cpu_weight: 100,
            pids_max: 128,
            nofile: 4096,
        }
    }
}

/// Quotas on what API callers may start; exceeding one is a 429 with the quota named, and nothing starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// VMs that are starting, running, paused or stopping (failed and lost ones hold nothing).
    pub max_vms: usize,
    /// Sum of those VMs' guest memory, MiB; 0: no limit (guest memory is touched lazily, so hosts overcommit).
    pub max_total_mem_mib: u64,
    /// The overcommit policy (docs/operations.md): those VMs' guest memory may add up to at most this multiple of
    /// the host's RAM (MemTotal); 0: no limit. Clones share their snapshot's pages and free page reporting gives
    /// freed memory back, so a host carries far more guest memory than it has; past the ratio a start is a 429.
    pub memory_overcommit: f64,
    /// Clones one `POST /v1/clones` may ask for.
    pub max_clones_per_call: u32,
    /// Largest writable disk (storage quota) of a disk-rooted image's VM, MiB; 0: no limit.
    pub max_disk_mib: u64,
    /// Sum of every VM's disks at their full size (writable disk and mount slot are sparse: they grow as guests
    /// write), MiB; 0: no limit. Set it to what the data filesystem can give VMs, and guests can never fill it.
    pub max_total_disk_mib: u64,
    /// A VM with disks is refused while the data filesystem has less free than this, MiB (the database, the
    /// store and running guests need room); 0: no check.
    pub min_free_disk_mib: u64,
}

impl Limits {
    /// Most guest memory live VMs may hold under [`Limits::memory_overcommit`], MiB (`None`: no limit).
    pub fn overcommit_cap_mib(&self) -> Option<u64> {
        (self.memory_overcommit > 0.0).then(|| (host_ram_mib() as f64 * self.memory_overcommit) as u64)
    }
}

/// This host's RAM (MemTotal), MiB, read once.
pub fn host_ram_mib() -> u64 {
    static RAM: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *RAM.get_or_init(|| crate::cluster::host_memory_mib().0)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_vms: 1024,
            max_total_mem_mib: 0,
            memory_overcommit: 4.0,
            max_clones_per_call: 1000,
            max_disk_mib: 16384,
            max_total_disk_mib: 0,
            min_free_disk_mib: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmDefaults {
    pub mem_mib: u64,
    pub vcpus: u8,
    /// Most bytes a VM's console.log and console.log.1 hold together (the older output is dropped).
    pub console_limit_bytes: u64,
    /// Size of a disk image's VM's mount slot (a sparse drive dynamic mounts fill), MiB: the largest directory
    /// one mount can carry.
    pub mount_slot_mib: u64,
    /// Booted VMs get a virtio-balloon device with free page reporting: memory their guest frees (in blocks of
    /// 4 MiB) goes back to the host, and a hibernation leaves it out. Clones and wakes keep what their snapshot's
    /// VM had.
    pub free_page_reporting: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// L1 byte budget.
    pub local_budget_bytes: u64,
    /// Chunks a lazily restored VM's page server fetches at once (demand faults first, then the working set):
    /// with a remote store each fetch waits a round trip, so more in flight hides the latency.
    pub lazy_fetch_workers: usize,
    pub chunk_size: u32,
    /// File with the 64-hex-digit secret that turns on encryption at rest and authenticates manifests (every host
    /// sharing the bucket needs the same one).
    pub secret_file: Option<PathBuf>,
    /// Remote tier; off unless configured (or FLINT_S3_BUCKET is set).
    pub s3: Option<S3Config>,
    /// Run an S3 tier without a secret: manifests are then plain JSON that anyone who can write the bucket can
    /// forge. Only for a bucket nobody else can write (tests, a single host).
    pub allow_unauthenticated_bucket: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: PathBuf::from("/run/flint/flintd.sock"),
            data_dir: PathBuf::from("/var/lib/flint"),
            vmm_bin: None,
            images: BTreeMap::new(),
            vm: VmDefaults::default(),
            store: StoreSection::default(),
            agent_timeout_s: 300,
            restore_agent_timeout_s: 60,
            max_parallel_restores: 2,
            max_file_read_bytes: 1 << 30,
            socket_group: None,
            sched_slice_us: 0,
            vcpu_sched_idle: true,
            limits: Limits::default(),
            jail: JailConfig::default(),
            sessions: SessionsConfig::default(),
            pools: PoolsConfig::default(),
            standby: StandbyConfig::default(),
            network: crate::net::NetworkConfig::default(),
            e2b: crate::e2b::E2bConfig::default(),
            cluster: crate::cluster::ClusterConfig::default(),
        }
    }
}

impl Default for VmDefaults {
    fn default() -> Self {
        VmDefaults {
            mem_mib: 256,
            vcpus: 1,
            console_limit_bytes: flint_vmm_api::config::DEFAULT_CONSOLE_LIMIT,
            mount_slot_mib: 1024,
            free_page_reporting: true,
        }
    }
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            local_budget_bytes: 20 << 30,
            lazy_fetch_workers: 16,
            chunk_size: flint_snapshot_store::DEFAULT_CHUNK_SIZE,
            secret_file: None,
            s3: None,
            allow_unauthenticated_bucket: false,
        }
    }
}

pub const DEFAULT_CONFIG_PATH: &str = "/etc/flint/flintd.toml";

/// Why flintd's configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config: {0}")]
    Parse(#[from] toml::de::Error),
    /// A setting flintd must not run with.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// `path` if given (it must exist), else /etc/flint/flintd.toml if present, else the defaults; then the
    /// environment (`FLINT_S3_BUCKET`, `FLINT_S3_ENDPOINT`, `FLINT_S3_PREFIX`) fills in an unconfigured S3 tier.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => {
                Some(std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.to_path_buf(), source })?)
            }
            None => std::fs::read_to_string(DEFAULT_CONFIG_PATH).ok(),
        };
        let mut cfg: Config = match text {
            Some(t) => toml::from_str(&t)?,
            None => Config::default(),
        };
        if cfg.store.s3.is_none() {
            if let Ok(bucket) = std::env::var("FLINT_S3_BUCKET") {
                let mut s3 = S3Config::new(&bucket);
                s3.endpoint = std::env::var("FLINT_S3_ENDPOINT").ok();
                s3.prefix = std::env::var("FLINT_S3_PREFIX").unwrap_or_default();
                cfg.store.s3 = Some(s3);
            }
        }
        Ok(cfg)
    }

    /// Refuses a configuration flintd must not run with.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.sessions.lease_s < 3 || self.sessions.tick_ms == 0 || self.sessions.tick_ms > 60_000 {
            return invalid("sessions: lease_s must be at least 3 and tick_ms within 1..=60000".into());
        }
        if self.sessions.tick_ms * 4 > self.sessions.lease_s * 1000 {
            return invalid(format!(
                "sessions: tick_ms ({}) must be at most a quarter of lease_s ({} s): renewals and the self-fence \
                 run on the tick",
                self.sessions.tick_ms, self.sessions.lease_s
            ));
        }
        if self.sessions.max_clock_skew_ms > 600_000 {
            return invalid("sessions: max_clock_skew_ms must be at most 600000".into());
        }
        if let Some(h) = &self.sessions.host_id {
            flint_snapshot_store::manifest::check_name("sessions.host_id", h)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if !(self.sched_slice_us == 0 || (100..=100_000).contains(&self.sched_slice_us)) {
            return invalid(format!(
                "sched_slice_us {}: 0 (the kernel's default) or within 100..=100000 (what the kernel takes)",
                self.sched_slice_us
            ));
        }
        let o = self.limits.memory_overcommit;
        if !(o == 0.0 || (0.1..=100.0).contains(&o)) {
            return invalid(format!("limits.memory_overcommit {o}: 0 (no limit) or within 0.1..=100 (times the RAM)"));
        }
        let j = &self.jail;
        if j.uid_base == 0 || j.uid_count == 0 || u64::from(j.uid_base) + u64::from(j.uid_count) > u64::from(u32::MAX) {
            return invalid(format!(
                "jail: uid_base must be at least 1 (VMMs never run as root) and uid_count at least 1, within 32-bit \
                 uids (uid_base {} + uid_count {})",
                j.uid_base, j.uid_count
            ));
        }
        if self.standby.count > 16 {
            return invalid(format!("standby.count {} : at most 16 per memory size", self.standby.count));
        }
        for &m in &self.standby.mem_mib {
            if let Err(e) = flint_vmm_api::config::check_mem_mib(m) {
                return invalid(format!("standby.mem_mib: {e}"));
            }
        }
        self.cluster.check()?;
        if self.cluster.enabled() && self.sessions.tick_ms * 2 > self.cluster.lease_ttl_s * 1000 / 3 {
            return invalid(format!(
                "sessions.tick_ms ({}) must be at most a sixth of cluster.lease_ttl_s ({} s): a lost lease's VMs are \
                 stopped by the tick before the host registers again",
                self.sessions.tick_ms, self.cluster.lease_ttl_s
            ));
        }
        if self.cluster.enabled() && (self.store.s3.is_none() || !self.sessions.cross_host) {
            return invalid(
                "cluster.etcd is set, but sessions cannot move between hosts: hosts of a cluster share an S3 tier \
                 (store.s3) and keep sessions.cross_host = true"
                    .into(),
            );
        }
        if !j.claims_dir.is_absolute() {
            return invalid(format!("jail.claims_dir must be an absolute path (it is `{}`)", j.claims_dir.display()));
        }
        if self.store.s3.is_some() && self.store.secret_file.is_none() && !self.store.allow_unauthenticated_bucket {
            return invalid(
                "an S3 tier is configured without a store secret: anyone who can write the bucket could publish a \
                 snapshot this host would restore. Set store.secret_file (64 hex digits, the same on every host of \
                 the bucket), or, for a bucket nobody else can write, store.allow_unauthenticated_bucket = true"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn vmm_bin(&self) -> PathBuf {
        if let Some(p) = &self.vmm_bin {
            return p.clone();
        }
        if let Ok(exe) = std::env::current_exe() {
            if let Some(dir) = exe.parent() {
                let p = dir.join("flint-vmm");
                if p.is_file() {
                    return p;
                }
            }
        }
        PathBuf::from("flint-vmm")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_defaults_and_typos_are_errors() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c, Config::default());
        let c: Config =
            toml::from_str("socket = \"/tmp/x.sock\"\n[vm]\nmem_mib = 512\n[store.s3]\nbucket = \"b\"\n").unwrap();
        assert_eq!(c.vm.mem_mib, 512);
        assert_eq!(c.store.s3.unwrap().bucket, "b");
        let e = toml::from_str::<Config>("sockett = 1").unwrap_err().to_string();
        assert!(e.contains("sockett"), "{e}");
        assert!(Config::load(Some(Path::new("/nonexistent.toml")))
            .unwrap_err()
            .to_string()
            .contains("/nonexistent.toml"));
    }

    #[test]
    fn the_vmm_allowance_scales_with_the_guest_unless_set() {
        let mut j = JailConfig::default();
        assert_eq!((j.vmm_overhead_for(256), j.vmm_overhead_for(2048)), (36, 64));
        j.vmm_overhead_mib = Some(0);
        assert_eq!(j.vmm_overhead_for(2048), 0);
        let c: Config = toml::from_str("[jail]\nvmm_overhead_mib = 100\n").unwrap();
        assert_eq!(c.jail.vmm_overhead_for(256), 100);
    }

    #[test]
    fn an_s3_tier_needs_a_secret_or_an_explicit_opt_out() {
        let mut c: Config = toml::from_str("[store.s3]\nbucket = \"b\"\n").unwrap();
        assert!(c.check().unwrap_err().to_string().contains("store.secret_file"));
        c.store.allow_unauthenticated_bucket = true;
        assert!(c.check().is_ok());
        c.store.allow_unauthenticated_bucket = false;
        c.store.secret_file = Some("/etc/flint/store.secret".into());
        assert!(c.check().is_ok());
        assert!(Config::default().check().is_ok(), "no S3 tier: nothing to authenticate");
    }

    #[test]
    fn a_scheduling_slice_is_one_the_kernel_takes() {
        for (toml, ok) in
            [("sched_slice_us = 0\n", true), ("sched_slice_us = 100\n", true), ("sched_slice_us = 50\n", false)]
        {
            let c: Config = toml::from_str(toml).unwrap();
            assert_eq!(c.check().is_ok(), ok, "{toml}: {:?}", c.check());
        }
        let c: Config = toml::from_str("sched_slice_us = 200000\n").unwrap();
        assert!(c.check().unwrap_err().to_string().contains("within 100..=100000"));
    }

    #[test]
    fn vcpu_threads_are_idle_class_unless_turned_off() {
        assert!(Config::default().vcpu_sched_idle);
        let c: Config = toml::from_str("vcpu_sched_idle = false\n").unwrap();
        assert!(!c.vcpu_sched_idle && c.check().is_ok());
    }

    #[test]
    fn a_jail_uid_range_never_holds_root_or_wraps() {
        for (toml, why) in [
            ("[jail]\nuid_base = 0\n", "uid_base must be at least 1"),
            ("[jail]\nuid_count = 0\n", "uid_count at least 1"),
            ("[jail]\nuid_base = 4294967000\nuid_count = 1000\n", "within 32-bit uids"),
            ("[jail]\nclaims_dir = \"run/claims\"\n", "absolute path"),
        ] {
            let c: Config = toml::from_str(toml).unwrap();
            let e = c.check().unwrap_err().to_string();
            assert!(e.contains(why), "{toml}: {e}");
        }
    }
}
