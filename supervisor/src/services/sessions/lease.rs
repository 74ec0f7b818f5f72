//! Sessions across hosts sharing a bucket: a lease object per session (`coord/sessions/<id>`, compare-and-swap)
//! says which host runs it, and carries the session's record as of its last hibernation, so any host can wake it.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use flint_vmm_api::{lock, now_unix_ms};
use tracing::{info, warn};

use super::{Session, SessionError, SessionLease, SessionRecord, SessionState, Sessions};

/// Lease objects live under `coord/sessions/` in the bucket.
const LEASE_KIND: &str = "sessions";

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
            *c = match self.vms.store.probe_conditional_writes(&self.host).await {
                Ok(()) => {
                    info!("the bucket honours conditional writes: sessions may move between hosts");
                    Coord::On
                }
                Err(e) if e.contains("ignores") => {
                    warn!(error = %e, "sessions stay on the host that made them");
                    Coord::Off(e)
                }
                // Unreachable: try again next time.
                Err(e) => {
                    return Err(SessionError::Unavailable(format!("probing the bucket for conditional writes: {e}")))
                }
            };
        }
        Ok(matches!(*c, Coord::On))
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
        Ok(self.vms.store.coord_get::<SessionLease>(LEASE_KIND, id).await?.map(|l| {
            let mut r = l.value.session;
            r.host = l.value.holder;
            r
        }))
    }

    fn lease_for(&self, rec: SessionRecord, holding: bool) -> SessionLease {
        SessionLease {
            holder: holding.then(|| self.host.clone()),
            expires_unix_ms: if holding { now_unix_ms() + self.cfg.sessions.lease_s * 1000 } else { 0 },
            session: rec,
        }
    }

    fn hold_lease(&self, s: &Session, version: String) {
        *lock(&s.lease) = Some(version);
        s.lease_renewed_ms.store(now_unix_ms(), Ordering::Relaxed);
    }

    /// A new session's lease: refused if the bucket has one (another host's session of that id).
    pub(super) async fn create_lease(&self, s: &Session) -> Result<(), SessionError> {
        let rec = s.rec.get();
        let lease = self.lease_for(rec.clone(), true);
        match self.vms.store.coord_put(LEASE_KIND, &rec.id, &lease, None).await? {
            Some(v) => {
                self.hold_lease(s, v);
                Ok(())
            }
            None => Err(SessionError::Conflict(format!("session `{}` already exists in the bucket", rec.id))),
        }
    }

    /// Takes the session's lease in the bucket for this host: refused (409, naming the holder) while another
    /// host's claim is current. Returns the bucket's record of the session (the newest, whoever hibernated it).
    pub(super) async fn acquire_lease(&self, s: &Session) -> Result<SessionRecord, SessionError> {
        let id = s.rec.get().id;
        let now = now_unix_ms();
        let Some(cur) = self.vms.store.coord_get::<SessionLease>(LEASE_KIND, &id).await? else {
            // Made before the bucket was shared, or its object was lost: this host's record is the truth.
            let lease = self.lease_for(s.rec.get(), true);
            let v = self.vms.store.coord_put(LEASE_KIND, &id, &lease, None).await?.ok_or_else(|| {
                SessionError::Conflict(format!("session `{id}`: another host created its lease just now; retry"))
            })?;
            self.hold_lease(s, v);
            return Ok(lease.session);
        };
        if let Some(h) = cur.value.holder.as_ref().filter(|h| **h != self.host) {
            if cur.value.expires_unix_ms > now {
                return Err(SessionError::Conflict(format!(
                    "session `{id}` is held by host `{h}` (its lease runs {} ms more); call that host, or wait for \
                     it to hibernate the session",
                    cur.value.expires_unix_ms - now
                )));
            }
            warn!(session = %id, holder = %h, "taking over a session whose host's lease lapsed");
        }
        let lease = self.lease_for(cur.value.session.clone(), true);
        let v = self.vms.store.coord_put(LEASE_KIND, &id, &lease, Some(&cur.version)).await?.ok_or_else(|| {
            SessionError::Conflict(format!("session `{id}`: another host took its lease just now; retry"))
        })?;
        self.hold_lease(s, v);
        Ok(cur.value.session)
    }

    /// Writes the session's lease object from this host's record (`holding`: this host keeps running it, else
    /// it sleeps and anyone may wake it). Fails if another host replaced it (this host lost its claim).
    pub(super) async fn write_lease(&self, s: &Session, holding: bool) -> Result<(), SessionError> {
        let rec = s.rec.get();
        let Some(version) = lock(&s.lease).clone() else {
            return Err(SessionError::Conflict(format!("session `{}`: this host holds no lease on it", rec.id)));
        };
        let lease = self.lease_for(SessionRecord { vm: None, host: None, ..rec.clone() }, holding);
        match self.vms.store.coord_put(LEASE_KIND, &rec.id, &lease, Some(&version)).await? {
            Some(v) => {
                if holding {
                    self.hold_lease(s, v);
                } else {
                    *lock(&s.lease) = None;
                }
                Ok(())
            }
            None => {
                *lock(&s.lease) = None;
                Err(SessionError::Conflict(format!("session `{}`: another host took its lease", rec.id)))
            }
        }
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
        let Some(l) = self.vms.store.coord_get::<SessionLease>(LEASE_KIND, id).await? else { return Ok(None) };
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
            map.entry(id.to_string()).or_insert_with(|| Session::new(rec.clone(), false)).clone()
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
                *r = SessionRecord { state: mine.state, vm: None, host: Some(self.host.clone()), ..theirs };
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
        if let Err(e) = self.vms.store.coord_delete(LEASE_KIND, id).await {
            warn!(session = %id, error = %e, "could not delete the session's lease object");
        }
    }

    /// Another host took the session (this host's lease lapsed): stop running it here, so two hosts never run
    /// it at once. The caller holds `op`.
    pub(super) async fn fence(&self, s: &Session, why: &str) {
        let id = s.rec.get().id;
        warn!(session = %id, error = why, "lost the session's lease; stopping its VM");
        self.remove_vms(&id).await;
        *lock(&s.lease) = None;
        let r = s.rec.commit(&self.db, |r| {
            r.state = SessionState::Failed;
            r.vm = None;
            r.error = Some(format!("lost its lease to another host: {why}"));
            if let Some(t) = r.awake_since_unix_ms.take() {
                r.awake_ms += now_unix_ms().saturating_sub(t);
            }
        });
        if let Err(e) = r {
            warn!(session = %id, error = %e, "could not record a lost lease");
        }
    }
}
