//! Sessions across hosts sharing a bucket: a lease object per session (`coord/sessions/<id>`, compare-and-swap)
//! says which host runs it, and carries the session's record as of its last hibernation, so any host can wake it.
//!
//! Fencing (docs/sessions.md): the holder renews its claim every third of `lease_s`, beside whatever operation
//! runs on the session. A holder that cannot renew pauses the session's VM when half the lease has passed since
//! its last successful renewal was sent, and stops it at two thirds; another host takes a lapsed claim over only
//! `max_clock_skew_ms` after its expiry. Every take-over raises the lease's epoch, the fencing token: snapshots
//! published under a claim carry it in their names, and every write of the lease object names the version read,
//! so a host that lost its claim publishes nothing the next holder could read.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use flint_vmm_api::{lock, now_unix_ms};
use tracing::{info, warn};

use super::{Session, SessionError, SessionLease, SessionRecord, SessionState, Sessions};
use crate::cluster::host::RegisterError;

/// This host's claim on a session.
#[derive(Clone, Debug)]
pub(crate) struct Held {
    /// The lease object's version this host last wrote (the next write names it).
    version: String,
    /// The claim's fencing token.
    pub epoch: u64,
    /// The record the lease object carries (a renewal sends it again: renewing publishes nothing new).
    published: SessionRecord,
    /// When the last successful write was sent: by this host's clock the claim holds until this + `lease_s`.
    sent_ms: u64,
    /// The host lease's generation the claim was made under (etcd: a claim lives as long as its host lease).
    host_gen: u64,
}

/// What the upkeep tick does about a held lease.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LeaseDue {
    Nothing,
    Renew,
    /// No renewal for half the lease: pause the VM (renewals go on).
    Freeze,
    /// No renewal for two thirds of the lease: stop the VM, give the claim up.
    Fence {
        since_ms: u64,
    },
    /// The host lease is alive again (etcd): resume the paused VM.
    Thaw,
    /// The host lease the claim was made under ended (etcd): the claim is gone.
    Lost,
}

/// Whether this host may coordinate sessions with others through the bucket.
#[derive(Clone, Debug)]
pub enum Coord {
    Unknown,
    On,
    Off(String),
}

impl Sessions {
    /// Whether sessions are coordinated through the bucket; probes it (once) for conditional writes.
    pub(super) async fn coordinated(&self) -> Result<bool, SessionError> {
        if !self.cfg.sessions.cross_host || !self.vms.store.has_remote() {
            return Ok(false);
        }
        let mut c = self.coord.lock().await;
        if let Coord::Unknown = *c {
            *c = match self.owners.register().await {
                Ok(()) => {
                    info!(backend = self.owners.backend(), "sessions may move between hosts");
                    Coord::On
                }
                Err(RegisterError::Refused(e)) => {
                    warn!(error = %e, "sessions stay on the host that made them");
                    Coord::Off(e)
                }
                // Unreachable: try again next time.
                Err(RegisterError::Unreachable(e)) => {
                    return Err(SessionError::Unavailable(format!(
                        "registering this host ({}): {e}",
                        self.owners.backend()
                    )))
                }
            };
        }
        Ok(matches!(*c, Coord::On))
    }

    /// Whether sessions move between hosts, as known now (no probe): `on`, `off` with why, `unknown`.
    pub fn coord_state(&self) -> (&'static str, Option<String>) {
        if !self.cfg.sessions.cross_host || !self.vms.store.has_remote() {
            let why = if self.cfg.sessions.cross_host { "no S3 tier" } else { "sessions.cross_host = false" };
            return ("off", Some(why.into()));
        }
        match self.coord.try_lock().as_deref() {
            Ok(Coord::On) => ("on", None),
            Ok(Coord::Off(e)) => ("off", Some(e.clone())),
            Ok(Coord::Unknown) | Err(_) => ("unknown", None),
        }
    }

    /// Why cross-host sessions are off, when the bucket refused the probe.
    pub async fn coord_refusal(&self) -> Option<String> {
        match &*self.coord.lock().await {
            Coord::Off(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// Whether sessions move between hosts on this bucket (probing it if not yet known).
    pub async fn cross_host(&self) -> bool {
        self.coordinated().await.unwrap_or(false)
    }

    /// Whether this host holds session `id`'s claim (it runs it, or is about to).
    pub fn held_here(&self, id: &str) -> bool {
        self.session(id).is_some_and(|s| lock(&s.lease).is_some())
    }

    /// Session `id` as the fleet has it (its owner key's record, holder included) when sessions move between
    /// hosts; none when they do not or it has no owner key.
    pub async fn fleet_record(&self, id: &str) -> Result<Option<SessionRecord>, SessionError> {
        self.shared_record(id).await
    }

    /// Sets (or, with `None`, removes) annotation `key` of session `id`, durably. Other hosts see it once the
    /// session's record is next written to its owner key (its next hibernation, or claim).
    pub fn annotate(&self, id: &str, key: &str, value: Option<String>) -> Result<SessionRecord, SessionError> {
        let s = self.session(id).ok_or_else(|| SessionError::NotFound(format!("no session `{id}`")))?;
        Ok(s.rec.commit(&self.db, |r| match value {
            Some(v) => {
                r.annotations.insert(key.to_string(), v);
            }
            None => {
                r.annotations.remove(key);
            }
        })?)
    }

    /// For a session this host does not know: why the bucket was not asked.
    pub(super) async fn not_here_why(&self) -> String {
        match self.coord_refusal().await {
            Some(e) => format!(" on this host (sessions do not move between hosts on this bucket: {e})"),
            None => String::new(),
        }
    }

    /// The bucket's record of a session this host does not know.
    pub(super) async fn shared_record(&self, id: &str) -> Result<Option<SessionRecord>, SessionError> {
        if !self.coordinated().await? {
            return Ok(None);
        }
        Ok(self.owners.get(id).await?.map(|l| {
            let mut r = l.value.session;
            r.host = l.value.holder;
            r
        }))
    }

    fn lease_ms(&self) -> u64 {
        self.cfg.sessions.lease_s * 1000
    }

    /// What the tick must do about `s`'s claim at `now`.
    pub(super) fn lease_due(&self, s: &Session, now: u64) -> LeaseDue {
        let Some(h) = lock(&s.lease).clone() else { return LeaseDue::Nothing };
        if let Some(host) = self.owners.host_lease() {
            // etcd: the claim lives and lapses with the host lease (no renewal of its own).
            let frozen = s.frozen.load(Ordering::Relaxed);
            return if host.generation != h.host_gen {
                LeaseDue::Lost
            } else if !host.current() && !frozen {
                LeaseDue::Freeze
            } else if host.current() && frozen {
                LeaseDue::Thaw
            } else {
                LeaseDue::Nothing
            };
        }
        let since = now.saturating_sub(h.sent_ms);
        let lease = self.lease_ms();
        if since >= lease - lease / 3 {
            LeaseDue::Fence { since_ms: since }
        } else if since >= lease / 2 && !s.frozen.load(Ordering::Relaxed) {
            LeaseDue::Freeze
        } else if since >= lease / 3 {
            LeaseDue::Renew
        } else {
            LeaseDue::Nothing
        }
    }

    /// Whether this host's claim on `s` is current by its own clock (before the fence deadline).
    pub(super) fn lease_current(&self, s: &Session) -> bool {
        let now = now_unix_ms();
        lock(&s.lease).as_ref().is_some_and(|h| match self.owners.host_lease() {
            Some(host) => host.generation == h.host_gen && host.current(),
            None => now.saturating_sub(h.sent_ms) < self.lease_ms() - self.lease_ms() / 3,
        })
    }

    /// Before a snapshot is published: this host holds a current claim (taken again after a restart).
    pub(super) async fn check_claim(&self, s: &Session) -> Result<(), SessionError> {
        if lock(&s.lease).is_none() {
            self.acquire_lease(s).await?;
        }
        if !self.lease_current(s) {
            return Err(SessionError::Conflict(format!(
                "session `{}`: this host's lease on it lapsed (the bucket did not answer its renewals); nothing is \
                 published under it",
                s.rec.get().id
            )));
        }
        Ok(())
    }

    /// The name of the next snapshot of a session: `<id>.h<generation>`, and `.e<epoch>` under a claim (two
    /// hosts that both believed they held the session never make the same name).
    pub(super) fn snapshot_name(&self, s: &Session, rec: &SessionRecord) -> String {
        match lock(&s.lease).as_ref() {
            Some(h) => format!("{}.h{}.e{}", rec.id, rec.generation + 1, h.epoch),
            None => format!("{}.h{}", rec.id, rec.generation + 1),
        }
    }

    /// Writes the lease object at `version` (`None`: creates it) and, when this host keeps holding it, records
    /// the claim. `Ok(false)`: another writer changed it first (this host's claim, if any, is gone).
    async fn put_lease(
        &self,
        s: &Session,
        rec: SessionRecord,
        epoch: u64,
        holding: bool,
        version: Option<&str>,
        renewal: bool,
    ) -> Result<bool, SessionError> {
        let sent = now_unix_ms();
        let host_gen = self.owners.host_lease().map_or(0, |l| l.generation);
        let lease = SessionLease {
            holder: holding.then(|| self.host.clone()),
            expires_unix_ms: if holding { sent + self.lease_ms() } else { 0 },
            epoch,
            session: rec.clone(),
            last_holder: Some(self.host.clone()),
        };
        match self.owners.put(&rec.id, &lease, version).await? {
            Some(v) => {
                let mut held = lock(&s.lease);
                // A renewal that ends after the claim was given up (fenced meanwhile) does not bring it back.
                if !(renewal && held.is_none()) {
                    *held = holding.then_some(Held { version: v, epoch, published: rec, sent_ms: sent, host_gen });
                }
                Ok(true)
            }
            None => {
                *lock(&s.lease) = None;
                Ok(false)
            }
        }
    }

    /// A new session's lease: refused if the bucket has one (another host's session of that id).
    pub(super) async fn create_lease(&self, s: &Session) -> Result<(), SessionError> {
        let _io = s.lease_io.lock().await;
        let rec = s.rec.commit(&self.db, |r| r.lease_epoch += 1)?;
        if !self.put_lease(s, published(&rec), rec.lease_epoch, true, None, false).await? {
            return Err(SessionError::Conflict(format!("session `{}` already exists in the bucket", rec.id)));
        }
        Ok(())
    }

    /// Takes the session's lease in the bucket for this host: refused (409, naming the holder) while another
    /// host's claim is current (until `max_clock_skew_ms` past its expiry). Returns the bucket's record of the
    /// session (the newest, whoever hibernated it).
    pub(super) async fn acquire_lease(&self, s: &Session) -> Result<SessionRecord, SessionError> {
        let _io = s.lease_io.lock().await;
        let id = s.rec.get().id;
        let now = now_unix_ms();
        let cur = self.owners.get(&id).await?;
        if let Some(cur) = &cur {
            if let Some(h) = cur.value.holder.as_ref().filter(|h| **h != self.host) {
                let until = cur.value.expires_unix_ms + self.cfg.sessions.max_clock_skew_ms;
                if until > now {
                    return Err(SessionError::Conflict(format!(
                        "session `{id}` is held by host `{h}` (its lease runs {} ms more, with the allowed clock \
                         skew); call that host, or wait for it to hibernate the session",
                        until - now
                    )));
                }
                warn!(session = %id, holder = %h, "taking over a session whose host's lease lapsed");
            }
        }
        // The fencing token: above every epoch seen, in the bucket or here.
        let seen = cur.as_ref().map_or(0, |c| c.value.epoch.max(c.value.session.lease_epoch));
        let rec = s.rec.commit(&self.db, |r| r.lease_epoch = r.lease_epoch.max(seen) + 1)?;
        // Made before the bucket was shared, or its object was lost: this host's record is the truth.
        let theirs = cur.as_ref().map_or_else(|| published(&rec), |c| c.value.session.clone());
        let carried = SessionRecord { lease_epoch: rec.lease_epoch, ..theirs.clone() };
        if !self.put_lease(s, carried, rec.lease_epoch, true, cur.as_ref().map(|c| c.version.as_str()), false).await? {
            return Err(SessionError::Conflict(format!("session `{id}`: another host took its lease just now; retry")));
        }
        Ok(theirs)
    }

    /// Writes the session's lease object from this host's record (`holding`: this host keeps running it, else
    /// it sleeps and anyone may wake it). Refused if this host's claim lapsed by its own clock, or if another host
    /// replaced the object (this host lost its claim).
    pub(super) async fn write_lease(&self, s: &Session, holding: bool) -> Result<(), SessionError> {
        let _io = s.lease_io.lock().await;
        let rec = s.rec.get();
        let Some(held) = lock(&s.lease).clone() else {
            return Err(SessionError::Conflict(format!("session `{}`: this host holds no lease on it", rec.id)));
        };
        if !self.lease_current(s) {
            return Err(SessionError::Conflict(format!(
                "session `{}`: this host's claim lapsed ({} ms since its last renewal); it publishes nothing more",
                rec.id,
                now_unix_ms().saturating_sub(held.sent_ms)
            )));
        }
        let rec = SessionRecord { lease_epoch: rec.lease_epoch.max(held.epoch), ..published(&rec) };
        if !self.put_lease(s, rec.clone(), held.epoch, holding, Some(&held.version), false).await? {
            return Err(SessionError::Conflict(format!("session `{}`: another host took its lease", rec.id)));
        }
        Ok(())
    }

    /// Extends this host's claim (the lease object carries the same record). `Ok(false)`: another host took it.
    pub(super) async fn renew(&self, s: &Session) -> Result<bool, SessionError> {
        let _io = s.lease_io.lock().await;
        let Some(held) = lock(&s.lease).clone() else { return Ok(true) };
        if self.owners.host_lease().is_some() {
            // etcd: the host's keep-alive renews every claim of the host at once.
            return Ok(true);
        }
        self.put_lease(s, held.published.clone(), held.epoch, true, Some(&held.version), true).await
    }

    /// The session for a call: this host's, else (hosts sharing a bucket) the bucket's, recorded here as
    /// hibernated so it can be woken.
    pub(super) async fn for_call(&self, id: &str) -> Result<Option<Arc<Session>>, SessionError> {
        if let Some(s) = self.session(id) {
            return Ok(Some(s));
        }
        if !self.coordinated().await? {
            return Ok(None);
        }
        let Some(l) = self.owners.get(id).await? else { return Ok(None) };
        let mut rec = l.value.session;
        if rec.id != id {
            return Err(SessionError::Conflict(format!(
                "the bucket's lease for `{id}` describes session `{}`",
                rec.id
            )));
        }
        rec.state = SessionState::Hibernated;
        rec.vm = None;
        rec.pending_base = None;
        rec.awake_since_unix_ms = None;
        let s = {
            let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
            map.get_or_insert_with(id, || Session::new(rec.clone(), false))
        };
        s.rec.commit(&self.db, |_| ())?;
        info!(session = %id, holder = ?l.value.holder, "session known from the bucket");
        Ok(Some(s))
    }

    /// Before a wake: the lease (hosts sharing a bucket), and the newest record of the session, whoever
    /// hibernated it last.
    pub(super) async fn claim_for_wake(&self, s: &Session) -> Result<(), SessionError> {
        if !self.coordinated().await? {
            return Ok(());
        }
        let theirs = self.acquire_lease(s).await?;
        let mine = s.rec.get();
        // The newer record wins: the bucket's when another host ran and hibernated the session since; this host's
        // when its own last hibernation was stored but a crash kept it from reaching the bucket.
        if theirs.generation >= mine.generation {
            s.rec.commit(&self.db, |r| {
                *r = SessionRecord {
                    state: mine.state,
                    vm: None,
                    host: Some(self.host.clone()),
                    lease_epoch: mine.lease_epoch.max(theirs.lease_epoch),
                    ..theirs
                };
            })?;
        }
        Ok(())
    }

    pub(super) async fn release_after_failed_wake(&self, s: &Session) {
        if lock(&s.lease).is_some() {
            if let Err(l) = self.write_lease(s, false).await {
                warn!(session = %s.rec.get().id, error = %l, "could not release the lease after a failed wake");
            }
        }
    }

    /// Writes the session's record (its new base) to its lease object in the bucket when hosts share one, taking
    /// the lease first if this host does not hold it (after a restart); `holding`: this host keeps running it.
    /// False if the bucket could not be told (the old base must then stay: the bucket's record still names it).
    pub(super) async fn publish_base(&self, s: &Session, holding: bool) -> bool {
        if !self.coordinated().await.unwrap_or(false) {
            return true;
        }
        let id = s.rec.get().id;
        if lock(&s.lease).is_none() {
            if let Err(e) = self.acquire_lease(s).await {
                warn!(session = %id, error = %e, "could not take the session's lease to record its new base");
                return false;
            }
        }
        match self.write_lease(s, holding).await {
            Ok(()) => true,
            Err(e) => {
                warn!(session = %id, error = %e, "could not record the session's new base in the bucket");
                false
            }
        }
    }

    /// Before a delete: only the host holding the session (or any host while it sleeps) may end it.
    pub(super) async fn claim_for_delete(&self, s: &Session) -> Result<(), SessionError> {
        if self.coordinated().await.unwrap_or(false) && lock(&s.lease).is_none() {
            self.acquire_lease(s).await?;
        }
        Ok(())
    }

    pub(super) async fn drop_lease(&self, id: &str) {
        if let Err(e) = self.owners.delete(id).await {
            warn!(session = %id, error = %e, "could not delete the session's lease object");
        }
    }

    /// This host lost its claim on the session (another host took it, or it could not renew in time): stop
    /// running it here at once, so two hosts never run it together. The VMM is killed before anything waits
    /// (an operation in progress on the session or its VM finds it gone); then, holding `op`, the session is
    /// recorded failed (a wake restores its last hibernation, on whichever host then holds it).
    pub(super) async fn fence(&self, s: &Session, why: &str) {
        let id = s.rec.get().id;
        warn!(session = %id, error = why, "lost the session's lease; stopping its VM");
        self.metrics.lease_fences.fetch_add(1, Ordering::Relaxed);
        *lock(&s.lease) = None;
        for v in self.vms.owned_by(super::OWNER, &id) {
            let _ = self.vms.kill_now(&v.id);
        }
        let _op = s.rec.op.lock().await;
        self.remove_vms(&id).await;
        s.frozen.store(false, Ordering::Relaxed);
        if s.rec.removed() {
            return;
        }
        let r = s.rec.commit(&self.db, |r| {
            if matches!(r.state, SessionState::Running | SessionState::Hibernating) {
                r.state = SessionState::Failed;
            }
            r.vm = None;
            r.pending_base = None;
            r.error = Some(format!("this host lost its lease on the session: {why}"));
            if let Some(t) = r.awake_since_unix_ms.take() {
                r.awake_ms += now_unix_ms().saturating_sub(t);
            }
        });
        if let Err(e) = r {
            warn!(session = %id, error = %e, "could not record a lost lease");
        }
    }

    /// Pauses (`frozen`) or resumes the session's VM at once, for a claim that may be lapsing.
    pub(super) fn freeze(&self, s: &Session, frozen: bool) {
        let id = s.rec.get().id;
        if s.frozen.swap(frozen, Ordering::Relaxed) == frozen {
            return;
        }
        if frozen {
            self.metrics.lease_freezes.fetch_add(1, Ordering::Relaxed);
            warn!(session = %id, "no lease renewal for half the lease: pausing the session's VM");
        } else {
            info!(session = %id, "the lease is renewed again: resuming the session's VM");
        }
        for v in self.vms.owned_by(super::OWNER, &id) {
            let _ = self.vms.freeze(&v.id, frozen);
        }
    }
}

/// What draining a host did (`POST /v1/hosts/{id}/drain`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DrainReport {
    pub host: String,
    pub draining: bool,
    /// Running sessions hibernated (routers wake them on other hosts at their next call).
    pub hibernated: Vec<String>,
    /// Sessions that could not be hibernated, and why (they keep running here).
    pub failed: std::collections::BTreeMap<String, String>,
}

impl Sessions {
    /// Drains this host of a cluster (`on`): routers place nothing new on it, and its running sessions are
    /// hibernated so that their next call wakes them elsewhere. `!on` takes it back into placement.
    pub async fn drain(self: &Arc<Self>, host: &str, on: bool) -> Result<DrainReport, SessionError> {
        let Some(m) = &self.membership else {
            return Err(SessionError::Invalid("this host is in no cluster ([cluster] etcd is not set)".into()));
        };
        if host != self.host {
            return Err(SessionError::NotFound(format!("this is host `{}`, not `{host}`", self.host)));
        }
        m.draining.store(on, Ordering::Relaxed);
        m.refresh().await.map_err(|e| SessionError::Unavailable(format!("publishing the drain: {e}")))?;
        info!(draining = on, "host drain changed");
        let mut report =
            DrainReport { host: self.host.clone(), draining: on, hibernated: vec![], failed: Default::default() };
        if !on {
            return Ok(report);
        }
        for rec in self.records() {
            if rec.state != SessionState::Running {
                continue;
            }
            match self.hibernate(&rec.id).await {
                Ok(_) => report.hibernated.push(rec.id),
                Err(e) => {
                    report.failed.insert(rec.id, e.to_string());
                }
            }
        }
        Ok(report)
    }
}

/// The record a lease object carries: no VM or host (those are the holder's own).
fn published(rec: &SessionRecord) -> SessionRecord {
    SessionRecord { vm: None, host: None, ..rec.clone() }
}
