//! Who runs a session, behind one trait with two backends (docs/cluster.md):
//! - [`S3Owners`]: a lease object per session in the bucket (`coord/sessions/<id>`), changed by conditional
//!   writes and renewed per claim — for one or two hosts without etcd;
//! - [`EtcdOwners`]: the session's entry (`<prefix>sessions/<id>`: its record as of the last hibernation) and an
//!   owner key (`<prefix>owners/<id>`: the holder's host id) bound to the holder's host lease; both change only in
//!   one transaction conditioned on both keys' revisions. Claims live as long as the host lease (no per-claim
//!   renewal) and vanish with it when the host dies.
//!
//! Both hand the lease logic (lease.rs) the same thing: the session's [`SessionLease`] and a version that the next
//! write must name.
use std::sync::Arc;

use flint_snapshot_store::Store;
use flint_snapshot_store::Versioned;
use flint_vmm_api::now_unix_ms;

use super::{SessionError, SessionLease};
use crate::cluster::etcd::{Cmp, EtcdError, Op};
use crate::cluster::host::{HostLease, Membership, RegisterError};
use crate::launcher::BoxFut;

/// Session ownership, as the lease logic needs it.
pub(crate) trait Owners: Send + Sync {
    /// `s3` or `etcd`.
    fn backend(&self) -> &'static str;
    /// Joins: checks the backend and registers this host id (once per run; again is harmless).
    fn register(&self) -> BoxFut<'_, Result<(), RegisterError>>;
    /// The session's entry: who holds it (with the holder's claim's expiry) and its last published record.
    fn get<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<Option<Versioned<SessionLease>>, SessionError>>;
    /// Writes the entry if it is still at `version` (`None`: if there is none). `Ok(None)`: changed meanwhile
    /// (or the claim it names is gone): nothing was written.
    fn put<'a>(
        &'a self,
        id: &'a str,
        lease: &'a SessionLease,
        version: Option<&'a str>,
    ) -> BoxFut<'a, Result<Option<String>, SessionError>>;
    fn delete<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<(), SessionError>>;
    /// For a backend whose claims live as long as the host's lease: that lease (`None`: claims are renewed one
    /// by one).
    fn host_lease(&self) -> Option<HostLease>;
}

/// Lease objects live under `coord/sessions/` in the bucket.
const LEASE_KIND: &str = "sessions";
/// Host registrations (one per host id) under `coord/hosts/`.
const HOSTS_KIND: &str = "hosts";

/// A host id's registration in the bucket: the data directory that owns it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct HostRegistration {
    host: String,
    nonce: String,
    registered_unix_ms: u64,
}

/// This data directory's random nonce (`<data_dir>/host-nonce`, made once).
pub(crate) fn host_nonce(data_dir: &std::path::Path) -> std::io::Result<String> {
    let path = data_dir.join("host-nonce");
    if let Ok(t) = std::fs::read_to_string(&path) {
        if t.trim().len() == 32 {
            return Ok(t.trim().to_string());
        }
    }
    let nonce = crate::net::policy::new_token();
    let tmp = data_dir.join("host-nonce.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(nonce.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(nonce)
}

pub(crate) struct S3Owners {
    pub store: Store,
    pub host: String,
    pub data_dir: std::path::PathBuf,
}

impl S3Owners {
    /// Registers this host's id in the bucket (`coord/hosts/<id>`, create-only) with this data directory's
    /// nonce: two flintds given one `host_id` would otherwise each believe they hold the other's sessions. The
    /// same flintd (same nonce) finds its own registration.
    async fn register_host(&self) -> Result<(), RegisterError> {
        let unreachable = |e: flint_snapshot_store::StoreError| RegisterError::Unreachable(e.to_string());
        let nonce = host_nonce(&self.data_dir).map_err(|e| RegisterError::Unreachable(e.to_string()))?;
        let mine = HostRegistration { host: self.host.clone(), nonce, registered_unix_ms: now_unix_ms() };
        if self.store.coord_put(HOSTS_KIND, &self.host, &mine, None).await.map_err(unreachable)?.is_some() {
            return Ok(());
        }
        let theirs = self.store.coord_get::<HostRegistration>(HOSTS_KIND, &self.host).await.map_err(unreachable)?;
        match theirs {
            Some(t) if t.value.nonce == mine.nonce => Ok(()),
            Some(_) => Err(RegisterError::Refused(format!(
                "host id `{}` is registered in the bucket by another flintd (another data directory): give this \
                 host a sessions.host_id of its own, or delete coord/{HOSTS_KIND}/{} if that flintd is gone for good",
                self.host, self.host
            ))),
            None => Err(RegisterError::Unreachable("the host registration vanished just after it was refused".into())),
        }
    }
}

impl Owners for S3Owners {
    fn backend(&self) -> &'static str {
        "s3"
    }

    fn register(&self) -> BoxFut<'_, Result<(), RegisterError>> {
        Box::pin(async move {
            match self.store.probe_conditional_writes(&self.host).await {
                Ok(()) => self.register_host().await,
                Err(e) if e.contains("ignores") => Err(RegisterError::Refused(e)),
                Err(e) => Err(RegisterError::Unreachable(format!("probing the bucket for conditional writes: {e}"))),
            }
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<Option<Versioned<SessionLease>>, SessionError>> {
        Box::pin(async move { Ok(self.store.coord_get::<SessionLease>(LEASE_KIND, id).await?) })
    }

    fn put<'a>(
        &'a self,
        id: &'a str,
        lease: &'a SessionLease,
        version: Option<&'a str>,
    ) -> BoxFut<'a, Result<Option<String>, SessionError>> {
        Box::pin(async move { Ok(self.store.coord_put(LEASE_KIND, id, lease, version).await?) })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<(), SessionError>> {
        Box::pin(async move { Ok(self.store.coord_delete(LEASE_KIND, id).await?) })
    }

    fn host_lease(&self) -> Option<HostLease> {
        None
    }
}

/// A holder whose owner key exists holds the session for as long as its host lease lives: as far as the lease
/// logic's expiry arithmetic goes, forever.
const HELD: u64 = u64::MAX / 4;

pub(crate) struct EtcdOwners {
    pub m: Arc<Membership>,
    /// The keep-alive loop, started at the first registration.
    pub tasks: crate::tasks::Tasks,
    started: std::sync::atomic::AtomicBool,
}

impl EtcdOwners {
    pub fn new(m: Arc<Membership>, tasks: crate::tasks::Tasks) -> EtcdOwners {
        EtcdOwners { m, tasks, started: Default::default() }
    }

    fn keys(&self, id: &str) -> (String, String) {
        (self.m.key("sessions", id), self.m.key("owners", id))
    }
}

fn unavailable(e: EtcdError) -> SessionError {
    SessionError::Unavailable(e.to_string())
}

/// An etcd entry's version: the entry's and the owner key's mod revisions (`0`: no owner key).
fn version(entry: i64, owner: i64) -> String {
    format!("{entry}:{owner}")
}

impl Owners for EtcdOwners {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    fn register(&self) -> BoxFut<'_, Result<(), RegisterError>> {
        Box::pin(async move {
            if self.m.lease_id() == 0 {
                self.m.register().await?;
            }
            if !self.started.swap(true, std::sync::atomic::Ordering::AcqRel) {
                self.tasks.spawn_loop(self.m.clone().run());
            }
            Ok(())
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<Option<Versioned<SessionLease>>, SessionError>> {
        Box::pin(async move {
            let (entry, owner) = self.keys(id);
            // One read of both keys at one revision.
            let r = self.m.etcd.txn(&[], &[Op::Get(entry.clone()), Op::Get(owner)], &[]).await.map_err(unavailable)?;
            let mut got = r.got.into_iter();
            let (Some(Some(e)), o) = (got.next(), got.next().flatten()) else { return Ok(None) };
            let mut lease: SessionLease = crate::cluster::etcd::decode(&e).map_err(unavailable)?;
            // The owner key is the truth about the holder: it is gone as soon as the holder's host lease is.
            match &o {
                Some(o) => {
                    lease.holder = Some(String::from_utf8_lossy(&o.value).into_owned());
                    lease.expires_unix_ms = HELD;
                }
                None => {
                    lease.holder = None;
                    lease.expires_unix_ms = 0;
                }
            }
            Ok(Some(Versioned { value: lease, version: version(e.mod_revision, o.map_or(0, |o| o.mod_revision)) }))
        })
    }

    fn put<'a>(
        &'a self,
        id: &'a str,
        lease: &'a SessionLease,
        ver: Option<&'a str>,
    ) -> BoxFut<'a, Result<Option<String>, SessionError>> {
        Box::pin(async move {
            let (entry, owner) = self.keys(id);
            let mut when = Vec::new();
            match ver {
                None => when.extend([Cmp::Absent(entry.clone()), Cmp::Absent(owner.clone())]),
                Some(v) => {
                    let parsed = v.split_once(':').and_then(|(e, o)| Some((e.parse().ok()?, o.parse().ok()?)));
                    let Some((e, o)) = parsed else {
                        return Err(SessionError::Internal(format!("etcd entry version `{v}` is not <rev>:<rev>")));
                    };
                    when.push(Cmp::ModRevision(entry.clone(), e));
                    when.push(if o == 0 { Cmp::Absent(owner.clone()) } else { Cmp::ModRevision(owner.clone(), o) });
                }
            }
            let holding = lease.holder.as_deref() == Some(self.m.host.as_str());
            let host_lease = self.m.lease_id();
            if holding && host_lease == 0 {
                return Ok(None);
            }
            let stored = SessionLease { expires_unix_ms: 0, ..lease.clone() };
            let value = serde_json::to_vec(&stored).map_err(|e| SessionError::Internal(e.to_string()))?;
            let mut then = vec![Op::Put { key: entry, value, lease: 0 }];
            then.push(if holding {
                Op::Put { key: owner, value: self.m.host.as_bytes().to_vec(), lease: host_lease }
            } else {
                Op::Delete(owner)
            });
            match self.m.etcd.txn(&when, &then, &[]).await {
                Ok(r) if r.succeeded => Ok(Some(version(r.revision, if holding { r.revision } else { 0 }))),
                Ok(_) => Ok(None),
                // The host lease ended under this claim: the claim is gone (the keep-alive loop registers anew).
                Err(EtcdError::Refused { detail, .. }) if detail.contains("lease not found") => Ok(None),
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<(), SessionError>> {
        Box::pin(async move {
            let (entry, owner) = self.keys(id);
            let r = self.m.etcd.txn(&[], &[Op::Delete(entry), Op::Delete(owner)], &[]).await;
            r.map(drop).map_err(unavailable)
        })
    }

    fn host_lease(&self) -> Option<HostLease> {
        Some(self.m.lease())
    }
}

/// The contract both ownership backends keep, checked against each on real servers by `tests/tests/fleet.rs`
/// (a real S3 server, a real etcd): what the lease logic relies on, whichever backend serves it.
#[doc(hidden)]
pub mod contract {
    use std::sync::Arc;

    use super::{EtcdOwners, Owners, S3Owners, SessionLease};
    use crate::cluster::host::Membership;
    use crate::cluster::ClusterConfig;

    /// Two hosts (`ha`, `hb`, each with its data directory under `dir`) on one bucket of `a`'s and `b`'s stores.
    pub async fn s3(a: flint_snapshot_store::Store, b: flint_snapshot_store::Store, dir: &std::path::Path) {
        let owner = |store, host: &str| {
            let data_dir = dir.join(host);
            std::fs::create_dir_all(&data_dir).unwrap();
            S3Owners { store, host: host.to_string(), data_dir }
        };
        // Whether two concurrent conditional creates of one key can both succeed is the server's doing: s3s-fs, the
        // test server, checks and then writes (docs/sessions.md), so races are checked on etcd only.
        check(&owner(a, "ha"), &owner(b, "hb"), false).await;
    }

    /// Two hosts (`ha`, `hb`) registered in the etcd of `cluster`.
    pub async fn etcd(cluster: &ClusterConfig, dir: &std::path::Path) {
        let tasks = crate::tasks::Tasks::new();
        let owner = |host: &str| {
            let data_dir = dir.join(host);
            std::fs::create_dir_all(&data_dir).unwrap();
            let nonce = super::host_nonce(&data_dir).unwrap();
            let m = Membership::new(cluster, host.to_string(), nonce, &data_dir).expect("an etcd client");
            EtcdOwners::new(Arc::new(m), tasks.clone())
        };
        check(&owner("ha"), &owner("hb"), true).await;
        tasks.shutdown(std::time::Duration::from_secs(5)).await;
    }

    fn lease(holder: Option<&str>, epoch: u64, base: &str) -> SessionLease {
        let session = serde_json::from_value(serde_json::json!({
            "id": "c1", "state": if holder.is_some() { "running" } else { "hibernated" }, "origin": "gold",
            "base": base, "idle_timeout_s": 60, "on_idle": "hibernate", "env": {}, "metadata": {},
            "created_unix_ms": 1, "awake_ms": 0, "hibernations": 0, "wakes": 0, "generation": epoch,
        }))
        .expect("a session record");
        SessionLease {
            holder: holder.map(str::to_string),
            expires_unix_ms: flint_vmm_api::now_unix_ms() + 60_000,
            epoch,
            session,
            last_holder: holder.map(str::to_string),
        }
    }

    /// The contract, as hosts `ha` (`a`) and `hb` (`b`) use it; `races`: whether concurrent creates are checked.
    async fn check(a: &dyn Owners, b: &dyn Owners, races: bool) {
        let backend = a.backend();
        a.register().await.unwrap_or_else(|e| panic!("{backend}: register ha: {e:?}"));
        b.register().await.unwrap_or_else(|e| panic!("{backend}: register hb: {e:?}"));
        assert!(a.get("c1").await.unwrap().is_none(), "{backend}: an unknown session has no entry");
        // Create-only: one write wins, a second create (any host) changes nothing.
        let v1 = a.put("c1", &lease(Some("ha"), 1, "gold"), None).await.unwrap().expect("the first create");
        assert_eq!(b.put("c1", &lease(Some("hb"), 1, "gold"), None).await.unwrap(), None, "{backend}: 2nd create");
        let got = b.get("c1").await.unwrap().expect("the entry");
        assert_eq!((got.value.holder.as_deref(), got.version.as_str()), (Some("ha"), v1.as_str()), "{backend}");
        assert!(got.value.expires_unix_ms > flint_vmm_api::now_unix_ms(), "{backend}: a live claim");
        // Compare-and-swap: a write naming the current version wins; one naming a replaced version changes nothing.
        let v2 = a.put("c1", &lease(Some("ha"), 1, "c1.h1.e1"), Some(&v1)).await.unwrap().expect("the holder's update");
        assert_ne!(v1, v2, "{backend}: every write makes a new version");
        assert_eq!(b.put("c1", &lease(Some("hb"), 2, "x"), Some(&v1)).await.unwrap(), None, "{backend}: stale write");
        let got = b.get("c1").await.unwrap().expect("the entry");
        assert_eq!((got.value.holder.as_deref(), got.value.session.base.as_str()), (Some("ha"), "c1.h1.e1"));
        // Released (hibernated): no holder; then taken over by the other host under the next epoch.
        let v3 = a.put("c1", &lease(None, 1, "c1.h1.e1"), Some(&v2)).await.unwrap().expect("the release");
        let got = b.get("c1").await.unwrap().expect("the entry");
        assert_eq!((got.value.holder.as_deref(), got.version.as_str()), (None, v3.as_str()), "{backend}: released");
        let v4 = b.put("c1", &lease(Some("hb"), 2, "c1.h1.e1"), Some(&v3)).await.unwrap().expect("the take-over");
        let got = a.get("c1").await.unwrap().expect("the entry");
        assert_eq!((got.value.holder.as_deref(), got.value.epoch), (Some("hb"), 2), "{backend}: taken over");
        assert_eq!(a.put("c1", &lease(Some("ha"), 1, "late"), Some(&v3)).await.unwrap(), None, "{backend}: late");
        assert_eq!(got.version, v4);
        // A race of creates of one new id from both hosts: exactly one wins.
        if !races {
            a.delete("c1").await.unwrap();
            assert!(b.get("c1").await.unwrap().is_none(), "{backend}: c1 deleted");
            return;
        }
        let tries: Vec<_> = (0..8)
            .map(|i| {
                let (o, h) = if i % 2 == 0 { (a, "ha") } else { (b, "hb") };
                async move { o.put("c2", &lease(Some(h), 1, "gold"), None).await.unwrap() }
            })
            .collect();
        let won = futures_util::future::join_all(tries).await.into_iter().flatten().count();
        assert_eq!(won, 1, "{backend}: concurrent creates of one id");
        for id in ["c1", "c2"] {
            a.delete(id).await.unwrap();
            assert!(b.get(id).await.unwrap().is_none(), "{backend}: {id} deleted");
        }
    }
}
