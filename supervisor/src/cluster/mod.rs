//! Many hosts (docs/cluster.md): who owns a session, on etcd (`etcd`) — each flintd registers under one host
//! lease, claims sessions with owner keys bound to it, and commits hibernations in transactions conditioned on
//! its claim — or, for one or two hosts without etcd, on lease objects in the bucket.
pub mod etcd;
pub mod host;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[cluster]`: hosts coordinated through etcd. Off (sessions coordinate through the bucket, if at all) while
/// `etcd` is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// etcd client URLs (`http://10.0.0.1:2379`, or `https://…` with `etcd_ca`).
    pub etcd: Vec<String>,
    /// Every key flintd writes starts with this.
    pub prefix: String,
    /// The host lease's TTL: a host that dies loses its sessions this long after its last keep-alive; a host cut
    /// off from etcd pauses its sessions' VMs before then (`pause_margin_ms` early).
    pub lease_ttl_s: u64,
    /// How long before its lease could have ended a cut-off host pauses its VMs (covers a scheduling delay in
    /// flintd and the clock-rate difference over one TTL; the clocks' offsets do not matter: etcd times leases).
    pub pause_margin_ms: u64,
    /// The address routers reach this host's API at (its cluster listener), published in its registration:
    /// `https://10.0.0.5:7443`.
    pub advertise: Option<String>,
    /// The cluster listener: flintd's API over TCP with mutual TLS, for routers (the Unix socket stays the local
    /// API). Needs `tls_cert`, `tls_key` and `client_ca`.
    pub listen: Option<std::net::SocketAddr>,
    /// The front end for exposed ports as routers reach it (`flint-router --front-listen`): this host's front end
    /// (docs/networking.md) over mutual TLS with the listener's certificate and `client_ca`, each request carrying
    /// its client's address from the router.
    pub front_listen: Option<std::net::SocketAddr>,
    /// Where routers reach `front_listen` (`10.0.0.5:7444`), published in the registration; by default
    /// `front_listen` itself (which must then name an address, not 0.0.0.0).
    pub front_advertise: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The CA whose certificates the listener accepts (the fleet's routers'): anyone holding one drives this host
    /// as its API socket would allow root to.
    pub client_ca: Option<PathBuf>,
    /// Labels routers may place by (`zone = "a"`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// A request to etcd that takes longer failed (no quorum, a partition).
    pub etcd_timeout_ms: u64,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            etcd: Vec::new(),
            prefix: "/flint/".into(),
            lease_ttl_s: 10,
            pause_margin_ms: 1500,
            advertise: None,
            listen: None,
            front_listen: None,
            front_advertise: None,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            labels: Default::default(),
            etcd_timeout_ms: 2000,
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
        }
    }
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.etcd.is_empty()
    }

    /// Where routers reach this host's front end: `front_advertise`, else `front_listen`.
    pub fn front(&self) -> Option<String> {
        self.front_advertise.clone().or_else(|| self.front_listen.map(|a| a.to_string()))
    }

    /// Refuses settings the cluster cannot run with.
    pub fn check(&self) -> Result<(), crate::config::ConfigError> {
        let bad = |m: String| Err(crate::config::ConfigError::Invalid(m));
        let mutual_tls = self.tls_cert.is_some() && self.tls_key.is_some() && self.client_ca.is_some();
        if self.listen.is_some() && !mutual_tls {
            return bad(
                "cluster.listen serves the whole API: it needs tls_cert, tls_key and client_ca (mutual TLS)".into()
            );
        }
        if self.front_listen.is_some() && !mutual_tls {
            return bad(
                "cluster.front_listen trusts the client addresses routers send: it needs tls_cert, tls_key and \
                 client_ca (mutual TLS)"
                    .into(),
            );
        }
        if let Some(f) = self.front_listen.filter(|f| f.ip().is_unspecified() && self.front_advertise.is_none()) {
            return bad(format!("cluster.front_listen {f}: give front_advertise, the address routers reach it at"));
        }
        if let Some(a) = &self.front_advertise {
            if a.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
                return bad(format!("cluster.front_advertise `{a}`: give host:port"));
            }
        }
        if let Some(a) = &self.advertise {
            if !a.starts_with("https://") {
                return bad(format!("cluster.advertise `{a}`: give the cluster listener's URL, https://host:port"));
            }
        }
        if !self.enabled() {
            return Ok(());
        }
        if !(self.prefix.starts_with('/') && self.prefix.ends_with('/')) {
            return bad(format!("cluster.prefix `{}`: give it as /name/", self.prefix));
        }
        if !(3..=300).contains(&self.lease_ttl_s) {
            return bad(format!("cluster.lease_ttl_s {}: give 3 to 300 seconds", self.lease_ttl_s));
        }
        // The keep-alive runs every third of the TTL: the margin must leave at least one more try.
        if self.pause_margin_ms * 3 > self.lease_ttl_s * 1000 {
            return bad(format!(
                "cluster.pause_margin_ms {} is more than a third of lease_ttl_s {}",
                self.pause_margin_ms, self.lease_ttl_s
            ));
        }
        if self.etcd_timeout_ms == 0 || self.etcd_timeout_ms * 3 > self.lease_ttl_s * 1000 {
            return bad(format!(
                "cluster.etcd_timeout_ms {}: give 1 ms up to a third of lease_ttl_s",
                self.etcd_timeout_ms
            ));
        }
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > 63 || v.len() > 255 {
                return bad(format!("cluster.labels `{k}`: names of 1-63 bytes, values up to 255"));
            }
        }
        Ok(())
    }

    pub fn tls(&self) -> etcd::EtcdTls {
        etcd::EtcdTls { ca: self.etcd_ca.clone(), cert: self.etcd_cert.clone(), key: self.etcd_key.clone() }
    }
}

/// What a host publishes about itself in `<prefix>hosts/<id>` (bound to its host lease: it vanishes with the
/// host). Routers place by it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub host: String,
    /// This data directory's random nonce: two flintds given one host id refuse to share it.
    pub nonce: String,
    pub advertise: Option<String>,
    /// Where routers send exposed-port requests (`host:port` of `cluster.front_listen`, mutual TLS).
    #[serde(default)]
    pub front: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The host's memory, and what is free of it now (MemAvailable).
    pub mem_total_mib: u64,
    pub mem_free_mib: u64,
    pub sessions: usize,
    pub vms: usize,
    pub cpu_model: String,
    pub draining: bool,
    pub version: String,
    pub updated_unix_ms: u64,
}

/// `MemTotal` and `MemAvailable` from /proc/meminfo, in MiB.
pub fn host_memory_mib() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// The host CPU's model name (snapshots restore only on a compatible CPU).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_default()
}
