//! This host's membership of a cluster: one etcd lease for the host (`<prefix>hosts/<id>` and every owner key
//! this host holds are bound to it), kept alive every third of its TTL. The host's claims live exactly as long as
//! that lease: one keep-alive per host, whatever the number of sessions.
//!
//! Fencing: etcd ends a lease no sooner than its TTL after the keep-alive that last renewed it arrived, so a host
//! whose last successful keep-alive was *sent* at `t` holds its claims until at least `t + TTL` whatever the
//! clocks say. Past `t + TTL - pause_margin` without a newer success, the host's sessions pause their VMs
//! (reversible: a keep-alive that succeeds again finds the lease, and the claims, alive). A keep-alive answered
//! "no such lease" means the claims are gone: the generation moves on, every claim taken under the old lease is
//! fenced (its VM stopped), and the host registers again under a new lease.
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flint_vmm_api::now_unix_ms;
use tracing::{info, warn};

use super::etcd::{Cmp, Etcd, EtcdError, Op};
use super::{ClusterConfig, HostInfo};

/// Why a host could not join.
#[derive(Debug, Clone)]
pub enum RegisterError {
    /// Refused for good (another flintd has this host id; the bucket cannot coordinate).
    Refused(String),
    /// Not reachable now: try again later.
    Unreachable(String),
}

/// The host lease as sessions see it.
#[derive(Debug, Clone, Copy)]
pub struct HostLease {
    /// Moves on every time the host lease is lost and taken anew: claims made under an older one are gone.
    pub generation: u64,
    /// When the last keep-alive that found the lease alive was sent, CLOCK_MONOTONIC ms (0: never).
    pub ok_sent_ms: u64,
    pub ttl_ms: u64,
    pub margin_ms: u64,
}

impl HostLease {
    /// Whether claims under this lease are certainly still held now (by this host's clock rate).
    pub fn current(&self) -> bool {
        self.ok_sent_ms > 0 && mono_ms().saturating_sub(self.ok_sent_ms) + self.margin_ms < self.ttl_ms
    }
}

/// CLOCK_MONOTONIC in milliseconds: the clock of leases here and of the VMMs' fences (one clock for the host).
pub fn mono_ms() -> u64 {
    flint_vmm_api::monotonic_us() / 1000
}

pub struct Membership {
    pub etcd: Etcd,
    cfg: ClusterConfig,
    pub host: String,
    nonce: String,
    lease: AtomicI64,
    generation: AtomicU64,
    ok_sent_ms: AtomicU64,
    pub draining: AtomicBool,
    /// The host's load, kept up to date by the sessions' tick.
    pub sessions: AtomicUsize,
    pub vms: AtomicUsize,
    /// Guest memory the host's quotas still allow, MiB (`u64::MAX`: no limit).
    pub headroom_mib: AtomicU64,
    pub keepalive_failures: AtomicU64,
    pub leases_lost: AtomicU64,
    /// The dead man's switch of this host's session VMs (`<data_dir>/fence`): the deadline this host's claims
    /// certainly hold until, moved after every successful keep-alive. VMMs hold their vCPUs past it.
    fence: std::fs::File,
    fence_path: std::path::PathBuf,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("host", &self.host).field("lease", &self.lease).finish()
    }
}

impl Membership {
    pub fn new(
        cfg: &ClusterConfig,
        host: String,
        nonce: String,
        data_dir: &std::path::Path,
    ) -> Result<Membership, EtcdError> {
        let etcd = Etcd::new(&cfg.etcd, &cfg.tls(), Duration::from_millis(cfg.etcd_timeout_ms))?;
        // Kept across restarts (same inode): re-adopted VMs keep reading it. Its deadline stays what the last run
        // wrote until this run's registration moves it.
        let fence_path = data_dir.join("fence");
        let fence = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&fence_path)
            .map_err(|e| EtcdError::Setup(format!("{}: {e}", fence_path.display())))?;
        if fence.metadata().map(|m| m.len()).unwrap_or(0) < 8 {
            flint_vmm_api::spec::write_fence(&fence, 1)
                .map_err(|e| EtcdError::Setup(format!("{}: {e}", fence_path.display())))?;
        }
        Ok(Membership {
            fence,
            fence_path,
            etcd,
            cfg: cfg.clone(),
            host,
            nonce,
            lease: AtomicI64::new(0),
            generation: AtomicU64::new(1),
            ok_sent_ms: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            sessions: AtomicUsize::new(0),
            vms: AtomicUsize::new(0),
            headroom_mib: AtomicU64::new(u64::MAX),
            keepalive_failures: AtomicU64::new(0),
            leases_lost: AtomicU64::new(0),
        })
    }

    /// The fence file session VMs arm.
    pub fn fence_path(&self) -> &std::path::Path {
        &self.fence_path
    }

    /// Moves the VMMs' deadline to what a keep-alive sent at `sent` (monotonic ms) guarantees; `1`: hold now.
    fn set_fence(&self, deadline: u64) {
        if let Err(e) = flint_vmm_api::spec::write_fence(&self.fence, deadline) {
            warn!(error = %e, "could not move the session VMs' fence");
        }
    }

    fn fence_after(&self, sent: u64) -> u64 {
        sent + self.cfg.lease_ttl_s * 1000 - self.cfg.pause_margin_ms
    }

    pub fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}/{name}", self.cfg.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.cfg.prefix
    }

    /// The current host lease id (0 before registration).
    pub fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::Acquire)
    }

    pub fn lease(&self) -> HostLease {
        HostLease {
            generation: self.generation.load(Ordering::Acquire),
            ok_sent_ms: self.ok_sent_ms.load(Ordering::Acquire),
            ttl_ms: self.cfg.lease_ttl_s * 1000,
            margin_ms: self.cfg.pause_margin_ms,
        }
    }

    fn info(&self) -> HostInfo {
        let (total, available) = super::host_memory_mib();
        // Free for a new session: what the kernel has and what this host's own accounting still allows.
        let free = available.min(self.headroom_mib.load(Ordering::Relaxed));
        HostInfo {
            host: self.host.clone(),
            nonce: self.nonce.clone(),
            advertise: self.cfg.advertise.clone(),
            front: self.cfg.front(),
            labels: self.cfg.labels.clone(),
            mem_total_mib: total,
            mem_free_mib: free,
            sessions: self.sessions.load(Ordering::Relaxed),
            vms: self.vms.load(Ordering::Relaxed),
            cpu_model: super::cpu_model(),
            draining: self.draining.load(Ordering::Relaxed),
            version: env!("CARGO_PKG_VERSION").into(),
            updated_unix_ms: now_unix_ms(),
        }
    }

    /// Takes a host lease and registers `<prefix>hosts/<id>` under it: refused when another flintd (another
    /// data directory's nonce) holds the id.
    pub async fn register(&self) -> Result<(), RegisterError> {
        let unreachable = |e: EtcdError| RegisterError::Unreachable(e.to_string());
        let sent = mono_ms();
        let lease = self.etcd.grant(self.cfg.lease_ttl_s).await.map_err(unreachable)?;
        let key = self.key("hosts", &self.host);
        let value = serde_json::to_vec(&self.info()).map_err(|e| RegisterError::Unreachable(e.to_string()))?;
        let put = Op::Put { key: key.clone(), value: value.clone(), lease };
        let (when, otherwise) = ([Cmp::Absent(key.clone())], [Op::Get(key.clone())]);
        let r = self.etcd.txn(&when, std::slice::from_ref(&put), &otherwise).await.map_err(unreachable)?;
        if !r.succeeded {
            let theirs = r.got.first().cloned().flatten();
            let theirs: Option<HostInfo> = theirs.as_ref().and_then(|kv| super::etcd::decode(kv).ok());
            match theirs {
                Some(t) if t.nonce == self.nonce => {
                    // This flintd, restarted within its old lease's TTL: the registration moves to the new lease.
                    self.etcd.put(&key, &value, lease).await.map_err(unreachable)?;
                }
                _ => {
                    let _ = self.etcd.revoke(lease).await;
                    return Err(RegisterError::Refused(format!(
                        "host id `{}` is registered in etcd ({key}) by another flintd (another data directory): \
                         give this host a sessions.host_id of its own",
                        self.host
                    )));
                }
            }
        }
        self.lease.store(lease, Ordering::Release);
        self.ok_sent_ms.store(sent, Ordering::Release);
        self.set_fence(self.fence_after(sent));
        info!(host = %self.host, lease = format!("{lease:x}"), ttl_s = self.cfg.lease_ttl_s, "registered in etcd");
        Ok(())
    }

    /// Publishes the registration now (after a change an operator made: draining).
    pub async fn refresh(&self) -> Result<(), EtcdError> {
        let lease = self.lease_id();
        if lease == 0 {
            return Err(EtcdError::Unreachable("this host is not registered in etcd yet".into()));
        }
        let v = serde_json::to_vec(&self.info()).map_err(|e| EtcdError::Setup(e.to_string()))?;
        self.etcd.put(&self.key("hosts", &self.host), &v, lease).await.map(drop)
    }

    /// One keep-alive. A lease etcd no longer has ends this generation of claims and registers the host again.
    async fn keep_alive(&self) {
        let lease = self.lease_id();
        let sent = mono_ms();
        match self.etcd.keep_alive(lease).await {
            Ok(Some(_)) => {
                if self.ok_sent_ms.fetch_max(sent, Ordering::AcqRel) < sent {
                    self.set_fence(self.fence_after(sent));
                }
                // The registration's load figures (a plain put: the key is this host's, under its lease).
                if let Ok(v) = serde_json::to_vec(&self.info()) {
                    if let Err(e) = self.etcd.put(&self.key("hosts", &self.host), &v, lease).await {
                        warn!(error = %e, "could not update this host's registration");
                    }
                }
            }
            Ok(None) => {
                // Held first (every session VM of the old lease stops running), then the claims' generation
                // moves on: the sessions' tick fences (kills) those VMs. The host registers again on the loop's
                // next turn, a third of the TTL later — after that tick — so the new lease's deadline never
                // releases a VM of the old one.
                self.set_fence(1);
                self.leases_lost.fetch_add(1, Ordering::Relaxed);
                let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                self.ok_sent_ms.store(0, Ordering::Release);
                self.lease.store(0, Ordering::Release);
                warn!(
                    lease = format!("{lease:x}"),
                    generation = g,
                    "this host's etcd lease ended: its session claims are gone; registering again"
                );
            }
            Err(e) => {
                self.keepalive_failures.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "etcd keep-alive failed");
            }
        }
    }

    /// Keeps the host lease alive until the task set is cancelled. It is never revoked on the way out: VMs outlive
    /// a flintd restart (re-adoption), and their claims must hold until it is back.
    pub async fn run(self: Arc<Self>) {
        let every = Duration::from_millis(self.cfg.lease_ttl_s * 1000 / 3);
        loop {
            tokio::time::sleep(every).await;
            if self.lease_id() == 0 {
                if let Err(e) = self.register().await {
                    warn!(error = ?e, "could not register this host in etcd");
                }
                continue;
            }
            self.keep_alive().await;
        }
    }
}
