//! Sessions: the sandbox a tenant holds, addressed by a session id. A session runs in a VM restored from its
//! base snapshot; idle, it hibernates (pre-stop command and hooks, a diff snapshot of the pages it dirtied
//! layered on its base, the VMM stops) and the next call wakes it from that snapshot. Every change goes through
//! the session's [`SessionSlot`] (one operation at a time, database first). With hosts sharing a bucket, a lease
//! object in the bucket (compare-and-swap) says which host runs the session. See docs/sessions.md.
pub mod model;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flint_agent::client::AgentClient;
use flint_vmm_api::{lock, now_unix_ms};
use tracing::{info, warn, Instrument};

use crate::daemon::{valid_id, Daemon, RestoreOpts, SnapshotHow};
use crate::db::{Db, SESSIONS};
use crate::vm::model::{OpError, VmStatus};
pub use model::*;

/// Lease objects live under `coord/sessions/` in the bucket.
const LEASE_KIND: &str = "sessions";

/// The one owner of a session's record. Operations that change the session (create, hibernate, wake, fork,
/// delete) hold `op` for their whole duration; calls that use it (exec, files) hold an [`Activity`], which keeps
/// it from going idle.
pub struct SessionSlot {
    pub op: tokio::sync::Mutex<()>,
    rec: Mutex<(SessionRecord, bool)>,
    active: AtomicUsize,
    last_active_ms: AtomicU64,
    /// The version of the lease object this host last wrote (while it holds the session).
    lease: Mutex<Option<String>>,
    lease_renewed_ms: AtomicU64,
}

impl SessionSlot {
    fn new(rec: SessionRecord) -> Arc<SessionSlot> {
        Arc::new(SessionSlot {
            op: tokio::sync::Mutex::new(()),
            rec: Mutex::new((rec, false)),
            active: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(now_unix_ms()),
            lease: Mutex::new(None),
            lease_renewed_ms: AtomicU64::new(0),
        })
    }

    pub fn get(&self) -> SessionRecord {
        lock(&self.rec).0.clone()
    }

    fn remove(&self, db: &Db) -> Result<(), OpError> {
        let mut g = lock(&self.rec);
        db.delete(SESSIONS, &g.0.id)?;
        g.1 = true;
        Ok(())
    }

    /// Persists a changed copy of the record, then makes it the record; a state change must be in the table.
    pub(crate) fn commit(&self, db: &Db, f: impl FnOnce(&mut SessionRecord)) -> Result<SessionRecord, OpError> {
        let mut g = lock(&self.rec);
        let (rec, removed) = &mut *g;
        if *removed {
            return Err(OpError::NotFound(format!("session `{}` was deleted", rec.id)));
        }
        let mut next = rec.clone();
        f(&mut next);
        if next.state != rec.state && !rec.state.can_become(next.state) {
            return Err(OpError::Conflict(format!(
                "session `{}` is {}; it cannot become {}",
                rec.id,
                rec.state.name(),
                next.state.name()
            )));
        }
        db.put(SESSIONS, &next.id, &next)?;
        *rec = next.clone();
        Ok(next)
    }

    fn touch(&self) {
        self.last_active_ms.store(now_unix_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since the last call began or ended (0 while one runs).
    pub fn idle_ms(&self, now: u64) -> u64 {
        if self.active.load(Ordering::Relaxed) > 0 {
            return 0;
        }
        now.saturating_sub(self.last_active_ms.load(Ordering::Relaxed))
    }
}

/// A call using a session (an exec until its stream ends, a file transfer): the session is not idle while one
/// lives.
pub struct Activity(Arc<SessionSlot>);

impl Activity {
    fn new(slot: &Arc<SessionSlot>) -> Activity {
        slot.active.fetch_add(1, Ordering::Relaxed);
        slot.touch();
        Activity(slot.clone())
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A latency histogram for `/metrics` (Prometheus buckets, milliseconds).
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; HISTOGRAM_BOUNDS_MS.len()],
    count: AtomicU64,
    sum_ms: AtomicU64,
}

pub const HISTOGRAM_BOUNDS_MS: [u64; 12] = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000];

impl Histogram {
    pub fn observe(&self, ms: f64) {
        for (i, b) in HISTOGRAM_BOUNDS_MS.iter().enumerate() {
            if ms <= *b as f64 {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms.round() as u64, Ordering::Relaxed);
    }

    /// Exposition lines for `name` (cumulative buckets, +Inf, sum, count).
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (i, b) in HISTOGRAM_BOUNDS_MS.iter().enumerate() {
            out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {}\n", self.buckets[i].load(Ordering::Relaxed)));
        }
        let count = self.count.load(Ordering::Relaxed);
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {count}\n"));
        out.push_str(&format!("{name}_sum {}\n{name}_count {count}\n", self.sum_ms.load(Ordering::Relaxed)));
    }
}

#[derive(Default)]
pub struct SessionMetrics {
    pub hibernate_ms: Histogram,
    pub wake_ms: Histogram,
    pub idle_hibernations: AtomicU64,
    pub hibernate_stored_bytes: AtomicU64,
    pub expired: AtomicU64,
}

/// Whether this host may coordinate sessions with others through the bucket.
#[derive(Clone, Debug)]
enum Coord {
    Unknown,
    On,
    Off(String),
}

/// The session table and what sessions share.
pub struct Sessions {
    pub(crate) map: Mutex<HashMap<String, Arc<SessionSlot>>>,
    /// This host's name in leases.
    pub host: String,
    coord: tokio::sync::Mutex<Coord>,
    pub metrics: SessionMetrics,
}

impl Sessions {
    pub fn new(host: String) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            host,
            coord: tokio::sync::Mutex::new(Coord::Unknown),
            metrics: SessionMetrics::default(),
        }
    }

    pub fn records(&self) -> Vec<SessionRecord> {
        let slots: Vec<_> = lock(&self.map).values().cloned().collect();
        let mut v: Vec<_> = slots.iter().map(|s| s.get()).collect();
        v.sort_by(|a, b| a.created_unix_ms.cmp(&b.created_unix_ms).then(a.id.cmp(&b.id)));
        v
    }

    pub(crate) fn slot(&self, id: &str) -> Option<Arc<SessionSlot>> {
        lock(&self.map).get(id).cloned()
    }
}

/// This host's name in session leases: configured, else `<hostname>-<random>` kept in `<data_dir>/host-id` (two
/// flintds on one machine are two hosts).
pub fn host_id(cfg: &crate::config::Config) -> Result<String, String> {
    if let Some(h) = &cfg.sessions.host_id {
        return Ok(h.clone());
    }
    let path = cfg.data_dir.join("host-id");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if valid_id("host id", &t).is_ok() {
            return Ok(t);
        }
    }
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_else(|_| "host".into())
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    let mut r = [0u8; 4];
    getrandom::getrandom(&mut r).map_err(|e| format!("host id: {e}"))?;
    let id = format!("{}-{}", if host.is_empty() { "host" } else { &host }, hex(&r));
    std::fs::write(&path, &id).map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(id)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Daemon {
    fn session_slot(&self, id: &str) -> Result<Arc<SessionSlot>, OpError> {
        self.sessions.slot(id).ok_or_else(|| OpError::NotFound(format!("no session `{id}`")))
    }

    /// After a restart: every session's record is brought back to a true state (its VM was re-adopted or lost;
    /// a hibernation or wake the restart interrupted is finished or undone), then the idle/lifetime/lease loop
    /// starts.
    pub(crate) fn adopt_sessions(self: &Arc<Self>) -> Result<(), String> {
        let records: Vec<SessionRecord> = self.db.all(SESSIONS).map_err(|e| e.to_string())?;
        for rec in records {
            let slot = SessionSlot::new(rec.clone());
            lock(&self.sessions.map).insert(rec.id.clone(), slot.clone());
            let vm = rec.vm.as_deref().and_then(|v| self.get(v).ok());
            let vm_alive = vm.as_ref().is_some_and(|v| v.status.has_process() && v.status != VmStatus::Stopping);
            let fix = match rec.state {
                SessionState::Running if !vm_alive => Some(SessionState::Failed),
                SessionState::Hibernating => {
                    let done = rec.pending_base.as_deref().is_some_and(|p| self.store.has_local_manifest(p));
                    if done {
                        // The snapshot is stored: finish the hibernation (stop the VM) in the background.
                        let (this, slot) = (self.clone(), slot.clone());
                        tokio::spawn(async move {
                            let _op = slot.op.lock().await;
                            if let Err(e) = this.finish_hibernation(&slot, Instant::now(), None).await {
                                warn!(session = %slot.get().id, error = %e, "could not finish an interrupted hibernation");
                            }
                        });
                        None
                    } else if vm_alive {
                        Some(SessionState::Running)
                    } else {
                        Some(SessionState::Failed)
                    }
                }
                SessionState::Starting | SessionState::Waking if vm_alive => Some(SessionState::Running),
                SessionState::Starting => Some(SessionState::Failed),
                SessionState::Waking => Some(SessionState::Hibernated),
                _ => None,
            };
            if let Some(to) = fix {
                let why = match to {
                    SessionState::Failed => Some(format!(
                        "its VM was lost while flintd was down ({}); a wake restores its last hibernation `{}`",
                        rec.state.name(),
                        rec.base
                    )),
                    _ => None,
                };
                // Straight to the true state: a restart is not a transition of the table.
                let mut next = rec.clone();
                next.state = to;
                // An undone hibernation may have restarted the VM's dirty log: its next snapshot is full.
                next.full_next |= rec.state == SessionState::Hibernating;
                next.pending_base = None;
                if to != SessionState::Running {
                    next.vm = None;
                    if let Some(s) = next.awake_since_unix_ms.take() {
                        next.awake_ms += now_unix_ms().saturating_sub(s);
                    }
                }
                if why.is_some() {
                    next.error = why;
                }
                self.db.put(SESSIONS, &next.id, &next).map_err(|e| e.to_string())?;
                *lock(&slot.rec) = (next, false);
                info!(session = %rec.id, from = rec.state.name(), to = to.name(), "session re-adopted");
            }
        }
        // VMs a session does not run (a wake or create interrupted after its VM started, before the session
        // recorded it): nothing can reach them; stopped.
        let orphans: Vec<String> = self
            .list()
            .into_iter()
            .filter(|v| {
                v.session.as_deref().is_some_and(|sid| {
                    self.sessions.slot(sid).is_none_or(|s| s.get().vm.as_deref() != Some(v.id.as_str()))
                })
            })
            .map(|v| v.id)
            .collect();
        if !orphans.is_empty() {
            let this = self.clone();
            tokio::spawn(async move {
                for vm in orphans {
                    warn!(vm = %vm, "stopping a VM no session runs (left by an interrupted wake)");
                    if let Err(e) = this.delete(&vm).await {
                        warn!(vm = %vm, error = %e, "could not stop an orphaned session VM");
                    }
                }
            });
        }
        // Running sessions' leases: taken back (a lease lapsed while flintd was down may have gone to another
        // host: then this host stops running the session).
        let running: Vec<Arc<SessionSlot>> = lock(&self.sessions.map)
            .values()
            .filter(|s| matches!(s.get().state, SessionState::Running | SessionState::Hibernating))
            .cloned()
            .collect();
        if !running.is_empty() {
            let this = self.clone();
            tokio::spawn(async move {
                if !this.coordinated().await.unwrap_or(false) {
                    return;
                }
                for slot in running {
                    let _op = slot.op.lock().await;
                    if slot.get().state != SessionState::Running {
                        continue;
                    }
                    if let Err(e) = this.acquire_lease(&slot).await {
                        this.fence(&slot, &e.to_string()).await;
                    }
                }
            });
        }
        let this = Arc::downgrade(self);
        let tick = Duration::from_millis(self.cfg.sessions.tick_ms);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(d) = this.upgrade() else { return };
                d.session_tick();
            }
        });
        Ok(())
    }

    /// Whether sessions are coordinated through the bucket; probes it (once) for conditional writes.
    async fn coordinated(&self) -> Result<bool, OpError> {
        if !self.cfg.sessions.cross_host || !self.store.has_remote() {
            return Ok(false);
        }
        let mut c = self.sessions.coord.lock().await;
        if let Coord::Unknown = *c {
            *c = match self.store.probe_conditional_writes(&self.sessions.host).await {
                Ok(()) => {
                    info!("the bucket honours conditional writes: sessions may move between hosts");
                    Coord::On
                }
                Err(e) if e.contains("ignores") => {
                    warn!(error = %e, "sessions stay on the host that made them");
                    Coord::Off(e)
                }
                // Unreachable: try again next time.
                Err(e) => return Err(OpError::Unavailable(format!("probing the bucket for conditional writes: {e}"))),
            };
        }
        Ok(matches!(*c, Coord::On))
    }

    /// Why cross-host sessions are off, when the bucket refused the probe.
    async fn coord_refusal(&self) -> Option<String> {
        match &*self.sessions.coord.lock().await {
            Coord::Off(e) => Some(e.clone()),
            _ => None,
        }
    }

    pub fn list_sessions(&self, filter: &BTreeMap<String, String>) -> Vec<SessionRecord> {
        self.sessions
            .records()
            .into_iter()
            .filter(|r| filter.iter().all(|(k, v)| r.metadata.get(k) == Some(v)))
            .collect()
    }

    /// A session's record: this host's, else (hosts sharing a bucket) the bucket's.
    pub async fn get_session(&self, id: &str) -> Result<SessionRecord, OpError> {
        if let Some(s) = self.sessions.slot(id) {
            return Ok(s.get());
        }
        if self.coordinated().await? {
            if let Some(l) = self.store.coord_get::<SessionLease>(LEASE_KIND, id).await? {
                let mut r = l.value.session;
                r.host = l.value.holder;
                return Ok(r);
            }
        }
        Err(OpError::NotFound(format!("no session `{id}`{}", self.not_here_why().await)))
    }

    /// For a session this host does not know: why the bucket was not asked.
    async fn not_here_why(&self) -> String {
        match self.coord_refusal().await {
            Some(e) => format!(" on this host (sessions do not move between hosts on this bucket: {e})"),
            None => String::new(),
        }
    }

    pub async fn create_session(self: &Arc<Self>, req: CreateSession) -> Result<SessionRecord, OpError> {
        let snapshot = match (&req.template, &req.snapshot) {
            (Some(t), None) => self.template(t)?.snapshot,
            (None, Some(s)) => s.clone(),
            _ => return Err(OpError::BadRequest("give exactly one of `template` and `snapshot`".into())),
        };
        self.create_session_from(req, snapshot, false, None).await
    }

    async fn create_session_from(
        self: &Arc<Self>,
        req: CreateSession,
        snapshot: String,
        base_owned: bool,
        forked_from: Option<String>,
    ) -> Result<SessionRecord, OpError> {
        let id = match &req.id {
            Some(id) => id.clone(),
            None => self.new_id("ses"),
        };
        valid_id("session id", &id)?;
        if id.len() > MAX_SESSION_ID {
            return Err(OpError::BadRequest(format!("session id: at most {MAX_SESSION_ID} characters")));
        }
        let idle = req.idle_timeout_s.unwrap_or(self.cfg.sessions.idle_timeout_s);
        if idle == 0 {
            return Err(OpError::BadRequest("idle_timeout_s must be at least 1".into()));
        }
        if req.ttl_s == Some(0) || req.max_lifetime_s == Some(0) {
            return Err(OpError::BadRequest("ttl_s and max_lifetime_s must be at least 1 when given".into()));
        }
        let meta_bytes: usize = req.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if meta_bytes > MAX_METADATA_BYTES {
            return Err(OpError::BadRequest(format!("metadata: {meta_bytes} bytes, at most {MAX_METADATA_BYTES}")));
        }
        if let Some(p) = &req.pre_stop {
            if p.argv.is_empty() || p.timeout_ms == 0 || p.timeout_ms > 600_000 {
                return Err(OpError::BadRequest(
                    "pre_stop: argv must not be empty and timeout_ms must be within 1..=600000".into(),
                ));
            }
        }
        self.check_network(None, req.network.as_ref())?;
        if self.get(&id).is_ok() {
            return Err(OpError::Conflict(format!("`{id}` is a VM id: calls could not tell them apart")));
        }
        // A 404 for an unknown snapshot before anything is recorded.
        self.store.manifest(&snapshot).await?;
        let coordinated = self.coordinated().await?;
        let now = now_unix_ms();
        let rec = SessionRecord {
            id: id.clone(),
            state: SessionState::Starting,
            template: req.template.clone(),
            origin: snapshot.clone(),
            base: snapshot.clone(),
            base_owned,
            vm: None,
            idle_timeout_s: idle,
            ttl_s: req.ttl_s,
            max_lifetime_s: req.max_lifetime_s,
            ttl_counts_hibernated: req.ttl_counts_hibernated,
            on_idle: req.on_idle,
            pre_stop: req.pre_stop.clone(),
            env: req.env.clone(),
            metadata: req.metadata.clone(),
            created_unix_ms: now,
            awake_ms: 0,
            awake_since_unix_ms: Some(now),
            hibernations: 0,
            wakes: 0,
            last_hibernate_ms: None,
            last_wake_ms: None,
            last_hibernate_stored_bytes: None,
            generation: 0,
            pending_base: None,
            full_next: false,
            stale_bases: Vec::new(),
            forked_from,
            network: req.network.clone(),
            error: None,
            host: coordinated.then(|| self.sessions.host.clone()),
        };
        let slot = {
            let mut map = lock(&self.sessions.map);
            if map.contains_key(&id) {
                return Err(OpError::Conflict(format!("session `{id}` already exists")));
            }
            if map.len() >= self.cfg.sessions.max_sessions {
                return Err(OpError::QuotaExceeded(format!(
                    "quota: {} sessions, sessions.max_sessions = {}",
                    map.len(),
                    self.cfg.sessions.max_sessions
                )));
            }
            let slot = SessionSlot::new(rec.clone());
            map.insert(id.clone(), slot.clone());
            slot
        };
        let _op = slot.op.lock().await;
        let span = tracing::info_span!("session", id = %id, op = "create");
        let result = async {
            self.db.put(SESSIONS, &id, &rec)?;
            if coordinated {
                let lease = SessionLease {
                    holder: Some(self.sessions.host.clone()),
                    expires_unix_ms: now + self.cfg.sessions.lease_s * 1000,
                    session: rec.clone(),
                };
                match self.store.coord_put(LEASE_KIND, &id, &lease, None).await? {
                    Some(v) => self.hold_lease(&slot, v),
                    None => return Err(OpError::Conflict(format!("session `{id}` already exists in the bucket"))),
                }
            }
            // A warm pool's VM when the session starts from its template's snapshot, else a restore.
            let pooled = match &req.template {
                Some(t) if req.network.is_none() && self.template(t).is_ok_and(|t| t.snapshot == snapshot) => {
                    self.take_pooled(t, &req.env, Some(&id)).await
                }
                _ => None,
            };
            let vm = match pooled {
                Some(vm) => vm,
                None => {
                    let opts = RestoreOpts {
                        env: req.env.clone(),
                        session: Some(id.clone()),
                        network: req.network.clone(),
                        ..Default::default()
                    };
                    self.restore(&snapshot, &opts).await?
                }
            };
            slot.commit(&self.db, |r| {
                r.state = SessionState::Running;
                r.vm = Some(vm.id.clone());
            })
        }
        .instrument(span)
        .await;
        match result {
            Ok(r) => {
                slot.touch();
                info!(session = %id, vm = ?r.vm, "session running");
                Ok(r)
            }
            Err(e) => {
                // Nothing of a session that never ran is kept; the error says why.
                let _ = slot.remove(&self.db);
                lock(&self.sessions.map).remove(&id);
                if lock(&slot.lease).is_some() {
                    let _ = self.store.coord_delete(LEASE_KIND, &id).await;
                }
                self.remove_session_vms(&id).await;
                Err(e)
            }
        }
    }

    fn hold_lease(&self, slot: &SessionSlot, version: String) {
        *lock(&slot.lease) = Some(version);
        slot.lease_renewed_ms.store(now_unix_ms(), Ordering::Relaxed);
    }

    /// Takes the session's lease in the bucket for this host: refused (409, naming the holder) while another
    /// host's claim is current. Returns the bucket's record of the session (the newest, whoever hibernated it).
    async fn acquire_lease(&self, slot: &SessionSlot) -> Result<SessionRecord, OpError> {
        let id = slot.get().id;
        let now = now_unix_ms();
        let Some(cur) = self.store.coord_get::<SessionLease>(LEASE_KIND, &id).await? else {
            // Made before the bucket was shared, or its object was lost: this host's record is the truth.
            let lease = SessionLease {
                holder: Some(self.sessions.host.clone()),
                expires_unix_ms: now + self.cfg.sessions.lease_s * 1000,
                session: slot.get(),
            };
            let v = self.store.coord_put(LEASE_KIND, &id, &lease, None).await?.ok_or_else(|| {
                OpError::Conflict(format!("session `{id}`: another host created its lease just now; retry"))
            })?;
            self.hold_lease(slot, v);
            return Ok(lease.session);
        };
        if let Some(h) = cur.value.holder.as_ref().filter(|h| **h != self.sessions.host) {
            if cur.value.expires_unix_ms > now {
                return Err(OpError::Conflict(format!(
                    "session `{id}` is held by host `{h}` (its lease runs {} ms more); call that host, or wait for \
                     it to hibernate the session",
                    cur.value.expires_unix_ms - now
                )));
            }
            warn!(session = %id, holder = %h, "taking over a session whose host's lease lapsed");
        }
        let lease = SessionLease {
            holder: Some(self.sessions.host.clone()),
            expires_unix_ms: now + self.cfg.sessions.lease_s * 1000,
            session: cur.value.session.clone(),
        };
        let v =
            self.store.coord_put(LEASE_KIND, &id, &lease, Some(&cur.version)).await?.ok_or_else(|| {
                OpError::Conflict(format!("session `{id}`: another host took its lease just now; retry"))
            })?;
        self.hold_lease(slot, v);
        Ok(cur.value.session)
    }

    /// Writes the session's lease object from this host's record (`holder`: this host while it runs the
    /// session, none when it sleeps). Fails if another host replaced it (this host lost its claim).
    async fn write_lease(&self, slot: &SessionSlot, holding: bool) -> Result<(), OpError> {
        let rec = slot.get();
        let Some(version) = lock(&slot.lease).clone() else {
            return Err(OpError::Conflict(format!("session `{}`: this host holds no lease on it", rec.id)));
        };
        let lease = SessionLease {
            holder: holding.then(|| self.sessions.host.clone()),
            expires_unix_ms: if holding { now_unix_ms() + self.cfg.sessions.lease_s * 1000 } else { 0 },
            session: SessionRecord { vm: None, host: None, ..rec.clone() },
        };
        match self.store.coord_put(LEASE_KIND, &rec.id, &lease, Some(&version)).await? {
            Some(v) => {
                if holding {
                    self.hold_lease(slot, v);
                } else {
                    *lock(&slot.lease) = None;
                }
                Ok(())
            }
            None => {
                *lock(&slot.lease) = None;
                Err(OpError::Conflict(format!("session `{}`: another host took its lease", rec.id)))
            }
        }
    }

    /// The session for a call: this host's, else (hosts sharing a bucket) the bucket's, recorded here as
    /// hibernated so it can be woken.
    async fn session_for_call(&self, id: &str) -> Result<Option<Arc<SessionSlot>>, OpError> {
        if let Some(s) = self.sessions.slot(id) {
            return Ok(Some(s));
        }
        if !self.coordinated().await? {
            return Ok(None);
        }
        let Some(l) = self.store.coord_get::<SessionLease>(LEASE_KIND, id).await? else { return Ok(None) };
        let mut rec = l.value.session;
        if rec.id != id {
            return Err(OpError::Internal(format!("the bucket's lease for `{id}` describes session `{}`", rec.id)));
        }
        rec.state = SessionState::Hibernated;
        rec.vm = None;
        rec.pending_base = None;
        rec.awake_since_unix_ms = None;
        let slot = {
            let mut map = lock(&self.sessions.map);
            map.entry(id.to_string()).or_insert_with(|| SessionSlot::new(rec.clone())).clone()
        };
        self.db.put(SESSIONS, id, &slot.get())?;
        info!(session = %id, holder = ?l.value.holder, "session known from the bucket");
        Ok(Some(slot))
    }

    /// The agent of the VM a call names: a VM id, or a session id (woken first if it sleeps; the returned
    /// [`Activity`] keeps it awake until dropped).
    pub async fn call_agent(self: &Arc<Self>, id: &str) -> Result<(Arc<AgentClient>, Option<Activity>), OpError> {
        let (vm, activity) = self.awake_vm(id).await?;
        Ok((self.agent(&vm).await?, activity))
    }

    /// The VM a call names: a VM id, or a session id (woken first if it sleeps; the returned [`Activity`] keeps
    /// it awake until dropped).
    pub async fn awake_vm(self: &Arc<Self>, id: &str) -> Result<(String, Option<Activity>), OpError> {
        if let Ok(vm) = self.get(id) {
            // A session's VM named directly is still that session's activity.
            let activity = vm.session.as_deref().and_then(|s| self.sessions.slot(s)).map(|s| Activity::new(&s));
            return Ok((id.to_string(), activity));
        }
        let Some(slot) = self.session_for_call(id).await? else {
            return Err(OpError::NotFound(format!("no VM or session `{id}`{}", self.not_here_why().await)));
        };
        let activity = Activity::new(&slot);
        let vm = self.ensure_awake(&slot).await?;
        Ok((vm, Some(activity)))
    }

    /// The VM of a running session, waking it first if it sleeps (concurrent calls wait for the one wake).
    async fn ensure_awake(self: &Arc<Self>, slot: &Arc<SessionSlot>) -> Result<String, OpError> {
        let rec = slot.get();
        if let (SessionState::Running, Some(vm)) = (rec.state, &rec.vm) {
            return Ok(vm.clone());
        }
        let _op = slot.op.lock().await;
        let rec = slot.get();
        match (rec.state, &rec.vm) {
            (SessionState::Running, Some(vm)) => Ok(vm.clone()),
            (SessionState::Hibernated, _) => Ok(self.wake_locked(slot).await?.vm.unwrap_or_default()),
            (SessionState::Failed, _) => Err(OpError::VmFailed(format!(
                "session `{}` failed: {}; `wake` restores its last hibernation",
                rec.id,
                rec.error.unwrap_or_default()
            ))),
            (s, _) => Err(OpError::Conflict(format!("session `{}` is {}", rec.id, s.name()))),
        }
    }

    pub async fn wake_session(self: &Arc<Self>, id: &str) -> Result<SessionRecord, OpError> {
        let Some(slot) = self.session_for_call(id).await? else {
            return Err(OpError::NotFound(format!("no session `{id}`{}", self.not_here_why().await)));
        };
        let _op = slot.op.lock().await;
        match slot.get().state {
            SessionState::Running => Ok(slot.get()),
            SessionState::Hibernated | SessionState::Failed => self.wake_locked(&slot).await,
            s => Err(OpError::Conflict(format!("session `{id}` is {}", s.name()))),
        }
    }

    /// Restores a sleeping (or failed) session from its base; the caller holds `op`.
    async fn wake_locked(self: &Arc<Self>, slot: &Arc<SessionSlot>) -> Result<SessionRecord, OpError> {
        let started = Instant::now();
        let id = slot.get().id;
        let span = tracing::info_span!("session", id = %id, op = "wake");
        async {
            self.remove_session_vms(&id).await; // a failed VM of an earlier run
            if self.coordinated().await? {
                let theirs = self.acquire_lease(slot).await?;
                let mine = slot.get();
                // The newer record wins: the bucket's when another host ran and hibernated the session since; this
                // host's when its own last hibernation was stored but a crash kept it from reaching the bucket.
                if theirs.generation >= mine.generation {
                    slot.commit(&self.db, |r| {
                        *r = SessionRecord {
                            state: mine.state,
                            vm: None,
                            host: Some(self.sessions.host.clone()),
                            ..theirs
                        };
                    })?;
                }
            }
            let rec = slot.commit(&self.db, |r| {
                r.state = SessionState::Waking;
                r.error = None;
            })?;
            let opts = RestoreOpts {
                env: rec.env.clone(),
                lazy: self.cfg.sessions.lazy_wake,
                session: Some(id.clone()),
                network: rec.network.clone(),
                ..Default::default()
            };
            match self.restore(&rec.base, &opts).await {
                Ok(vm) => {
                    let ms = crate::ms_since(started);
                    let r = slot.commit(&self.db, |r| {
                        r.state = SessionState::Running;
                        r.vm = Some(vm.id.clone());
                        r.wakes += 1;
                        r.last_wake_ms = Some(ms);
                        r.awake_since_unix_ms = Some(now_unix_ms());
                    })?;
                    slot.touch();
                    self.sessions.metrics.wake_ms.observe(ms);
                    info!(session = %id, vm = %vm.id, ms, base = %rec.base, "session woke");
                    Ok(r)
                }
                Err(e) => {
                    self.remove_session_vms(&id).await;
                    let _ = slot.commit(&self.db, |r| {
                        r.state = SessionState::Hibernated;
                        r.error = Some(format!("wake: {e}"));
                    });
                    if lock(&slot.lease).is_some() {
                        if let Err(l) = self.write_lease(slot, false).await {
                            warn!(session = %id, error = %l, "could not release the lease after a failed wake");
                        }
                    }
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    pub async fn hibernate_session(self: &Arc<Self>, id: &str) -> Result<SessionRecord, OpError> {
        let slot = self.session_slot(id)?;
        let _op = slot.op.lock().await;
        match slot.get().state {
            SessionState::Hibernated => Ok(slot.get()),
            SessionState::Running => self.hibernate_locked(&slot).await,
            s => Err(OpError::Conflict(format!("session `{id}` is {}", s.name()))),
        }
    }

    /// Pre-stop command, before-checkpoint hooks, a diff snapshot on the base (only the chunks holding pages the
    /// session dirtied are new), VMM stopped. The caller holds `op`. On failure the session keeps running.
    async fn hibernate_locked(self: &Arc<Self>, slot: &Arc<SessionSlot>) -> Result<SessionRecord, OpError> {
        let started = Instant::now();
        let rec = slot.get();
        let id = rec.id.clone();
        let vm = rec.vm.clone().ok_or_else(|| OpError::Internal(format!("session `{id}` runs no VM")))?;
        let snap = format!("{id}.h{}", rec.generation + 1);
        let span = tracing::info_span!("session", id = %id, op = "hibernate");
        async {
            slot.commit(&self.db, |r| {
                r.state = SessionState::Hibernating;
                r.pending_base = Some(snap.clone());
            })?;
            if let Some(p) = &rec.pre_stop {
                self.run_pre_stop(&vm, p).await;
            }
            let how = SnapshotHow {
                publish: self.coordinated().await.unwrap_or(false),
                diff_on: (!rec.full_next).then(|| rec.base.clone()),
                keep_paused: true,
                metadata: BTreeMap::from([("session".to_string(), id.clone())]),
            };
            match self.snapshot_with(&vm, &snap, &how).await {
                Ok((_, put)) => self.finish_hibernation(slot, started, Some(put.new_stored_bytes)).await,
                Err(e) => {
                    // Back to running: the VM may be paused by the failed snapshot.
                    if let Ok(v) = self.get(&vm) {
                        let _ = self.launcher.vmm(&v.dir).resume().await;
                    }
                    let _ = slot.commit(&self.db, |r| {
                        r.state = SessionState::Running;
                        r.pending_base = None;
                        r.full_next = true;
                        r.error = Some(format!("hibernate: {e}"));
                    });
                    slot.touch(); // a full idle period before the next attempt
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The snapshot of a hibernation is stored: stop the VM, make the snapshot the base, release the lease and
    /// the old base. Also finishes a hibernation a flintd restart interrupted. The caller holds `op`.
    async fn finish_hibernation(
        self: &Arc<Self>,
        slot: &Arc<SessionSlot>,
        started: Instant,
        stored: Option<u64>,
    ) -> Result<SessionRecord, OpError> {
        let rec = slot.get();
        let snap = rec.pending_base.clone().ok_or_else(|| OpError::Internal("no hibernation in progress".into()))?;
        self.remove_session_vms(&rec.id).await;
        let ms = crate::ms_since(started);
        let r = slot.commit(&self.db, |r| {
            r.state = SessionState::Hibernated;
            r.base = snap.clone();
            r.base_owned = true;
            r.vm = None;
            r.pending_base = None;
            r.full_next = false;
            r.hibernations += 1;
            r.generation += 1;
            r.last_hibernate_ms = Some(ms);
            r.last_hibernate_stored_bytes = stored;
            r.error = None;
            if let Some(s) = r.awake_since_unix_ms.take() {
                r.awake_ms += now_unix_ms().saturating_sub(s);
            }
        })?;
        // The pages a wake touches first change little between hibernations: the base's recorded working set is
        // the new snapshot's too (same layout), so the next wake prefetches it.
        if let Ok(Some(ws)) = self.store.working_set(&rec.base).await {
            if let Err(e) = self.store.put_working_set(&snap, &ws.image, &ws.chunks).await {
                warn!(session = %rec.id, error = %e, "could not carry the working set over to the new base");
            }
        }
        // The bucket's record must name the new base before the old one can go: another host (or this one after a
        // restart) wakes from it.
        let bucket_ok = self.publish_base(slot, false).await;
        if bucket_ok {
            self.release_bases(slot, Some((&rec.base, rec.base_owned))).await;
        } else {
            self.keep_base(slot, &rec.base, rec.base_owned);
        }
        let m = &self.sessions.metrics;
        m.hibernate_ms.observe(ms);
        m.hibernate_stored_bytes.fetch_add(stored.unwrap_or(0), Ordering::Relaxed);
        info!(session = %rec.id, ms, stored_bytes = ?stored, base = %snap, "session hibernated");
        Ok(r)
    }

    async fn run_pre_stop(&self, vm: &str, p: &PreStop) {
        let agent = match self.agent(vm).await {
            Ok(a) => a,
            Err(e) => return warn!(vm, error = %e, "pre-stop: no agent"),
        };
        let req = flint_agent::protocol::ExecRequest {
            argv: p.argv.clone(),
            timeout_ms: Some(p.timeout_ms),
            ..Default::default()
        };
        let deadline = Duration::from_millis(p.timeout_ms + 5_000);
        match tokio::time::timeout(deadline, agent.exec_output(req)).await {
            Ok(Ok(out)) if out.code == Some(0) => {}
            Ok(Ok(out)) => {
                warn!(vm, code = ?out.code, timed_out = out.timed_out, "pre-stop command failed; hibernating anyway")
            }
            Ok(Err(e)) => warn!(vm, error = %e, "pre-stop command failed; hibernating anyway"),
            Err(_) => warn!(vm, "pre-stop command did not end; hibernating anyway"),
        }
    }

    /// Writes the session's record (its new base) to its lease object in the bucket when hosts share one, taking
    /// the lease first if this host does not hold it (after a restart); `holding`: this host keeps running it.
    /// False if the bucket could not be told (the old base must then stay: the bucket's record still names it).
    async fn publish_base(&self, slot: &SessionSlot, holding: bool) -> bool {
        if !self.coordinated().await.unwrap_or(false) {
            return true;
        }
        let id = slot.get().id;
        if lock(&slot.lease).is_none() {
            if let Err(e) = self.acquire_lease(slot).await {
                warn!(session = %id, error = %e, "could not take the session's lease to record its new base");
                return false;
            }
        }
        match self.write_lease(slot, holding).await {
            Ok(()) => true,
            Err(e) => {
                warn!(session = %id, error = %e, "could not record the session's new base in the bucket");
                false
            }
        }
    }

    /// Keeps a replaced base for later release (the bucket's record may still name it).
    fn keep_base(&self, slot: &SessionSlot, snap: &str, owned: bool) {
        if owned {
            let _ = slot.commit(&self.db, |r| r.stale_bases.push(snap.to_string()));
        }
    }

    /// Releases a session's replaced base, and earlier ones kept because they were still in use (see
    /// [`Daemon::release_snapshots`]); what is still in use stays in the session's `stale_bases`.
    async fn release_bases(&self, slot: &SessionSlot, replaced: Option<(&str, bool)>) {
        let rec = slot.get();
        let mut candidates = rec.stale_bases.clone();
        if let Some((snap, true)) = replaced {
            candidates.push(snap.to_string());
        }
        let kept = self.release_snapshots(candidates).await;
        if kept != rec.stale_bases {
            if let Err(e) = slot.commit(&self.db, |r| r.stale_bases = kept) {
                warn!(session = %rec.id, error = %e, "could not record the session's stale bases");
            }
        }
    }

    /// Deletes each snapshot made for sessions that no session and no lazily restored VM on this host uses any
    /// more (its chunks then go at the next GC); returns those a lazily restored VM still reads.
    async fn release_snapshots(&self, candidates: Vec<String>) -> Vec<String> {
        if candidates.is_empty() {
            return candidates;
        }
        let sessions = self.sessions.records();
        let vms = self.list();
        let mut kept = Vec::new();
        for snap in candidates {
            let s = Some(snap.as_str());
            if vms.iter().any(|v| v.lazy && v.status.has_process() && v.snapshot.as_deref() == s) {
                kept.push(snap);
            } else if !sessions.iter().any(|r| r.base == snap || r.pending_base.as_deref() == s) {
                if let Err(e) = self.delete_stored_snapshot(&snap, self.store.has_remote()).await {
                    warn!(snapshot = %snap, error = %e, "could not release a session snapshot");
                }
            }
        }
        kept
    }

    /// Stops and forgets every VM of a session (its current one, and failed ones of earlier runs).
    async fn remove_session_vms(self: &Arc<Self>, id: &str) {
        let vms: Vec<String> =
            self.list().into_iter().filter(|v| v.session.as_deref() == Some(id)).map(|v| v.id).collect();
        for vm in vms {
            if let Err(e) = self.delete(&vm).await {
                warn!(session = id, vm, error = %e, "could not delete a session's VM");
            }
        }
    }

    pub async fn delete_session(self: &Arc<Self>, id: &str) -> Result<(), OpError> {
        let slot = self.session_for_call(id).await?.ok_or_else(|| OpError::NotFound(format!("no session `{id}`")))?;
        let _op = slot.op.lock().await;
        self.delete_locked(&slot, "deleted").await
    }

    async fn delete_locked(self: &Arc<Self>, slot: &Arc<SessionSlot>, why: &str) -> Result<(), OpError> {
        let rec = slot.get();
        if self.coordinated().await.unwrap_or(false) && lock(&slot.lease).is_none() {
            // Only the host holding the session (or any host while it sleeps) may end it.
            self.acquire_lease(slot).await?;
        }
        self.remove_session_vms(&rec.id).await;
        slot.remove(&self.db)?;
        lock(&self.sessions.map).remove(&rec.id);
        // Its snapshots go with it (its own VMs are gone; other sessions may still use a fork point).
        let mut mine = rec.stale_bases.clone();
        if rec.base_owned {
            mine.push(rec.base.clone());
        }
        let kept = self.release_snapshots(mine).await;
        if !kept.is_empty() {
            warn!(session = %rec.id, ?kept, "snapshots of a deleted session are still read by a VM; delete them later");
        }
        if lock(&slot.lease).take().is_some() {
            if let Err(e) = self.store.coord_delete(LEASE_KIND, &rec.id).await {
                warn!(session = %rec.id, error = %e, "could not delete the session's lease object");
            }
        }
        self.sync_tcp();
        info!(session = %rec.id, why, "session ended");
        Ok(())
    }

    /// New sessions from a session as it is now: a running one is snapshotted (a diff on its base, which
    /// becomes its new base too), a sleeping one forks from its last hibernation. Each child is restored and
    /// refreshed (its own entropy, hostname, ids).
    pub async fn fork_session(self: &Arc<Self>, id: &str, req: ForkSession) -> Result<Vec<SessionRecord>, OpError> {
        if req.count == 0 || req.count > self.cfg.limits.max_clones_per_call {
            return Err(OpError::BadRequest(format!(
                "count must be within 1..={} (limits.max_clones_per_call)",
                self.cfg.limits.max_clones_per_call
            )));
        }
        let slot = self.session_slot(id)?;
        let point = {
            let _op = slot.op.lock().await;
            let rec = slot.get();
            match (rec.state, &rec.vm) {
                (SessionState::Hibernated, _) => rec.base.clone(),
                (SessionState::Running, Some(vm)) => {
                    let snap = format!("{id}.h{}", rec.generation + 1);
                    let how = SnapshotHow {
                        publish: self.coordinated().await.unwrap_or(false),
                        diff_on: (!rec.full_next).then(|| rec.base.clone()),
                        keep_paused: false,
                        metadata: BTreeMap::from([("session".to_string(), id.to_string())]),
                    };
                    if let Err(e) = self.snapshot_with(vm, &snap, &how).await {
                        let _ = slot.commit(&self.db, |r| r.full_next = true);
                        return Err(e);
                    }
                    // The VM's dirty log restarted at this snapshot: it is the session's base from now on.
                    slot.commit(&self.db, |r| {
                        r.base = snap.clone();
                        r.base_owned = true;
                        r.full_next = false;
                        r.generation += 1;
                    })?;
                    if self.publish_base(&slot, true).await {
                        self.release_bases(&slot, Some((&rec.base, rec.base_owned))).await;
                    } else {
                        self.keep_base(&slot, &rec.base, rec.base_owned);
                    }
                    snap
                }
                (s, _) => return Err(OpError::Conflict(format!("session `{id}` is {}", s.name()))),
            }
        };
        let parent = slot.get();
        let children = (0..req.count).map(|_| {
            let mut metadata = parent.metadata.clone();
            metadata.extend(req.metadata.clone());
            let child = CreateSession {
                template: parent.template.clone(),
                snapshot: None,
                id: None,
                idle_timeout_s: Some(parent.idle_timeout_s),
                ttl_s: parent.ttl_s,
                max_lifetime_s: parent.max_lifetime_s,
                ttl_counts_hibernated: parent.ttl_counts_hibernated,
                env: parent.env.clone(),
                // A front-end TCP port forwards to one session: the parent keeps its own.
                network: parent.network.clone().map(|mut n| {
                    n.ports.values_mut().for_each(|e| e.tcp_listen = None);
                    n
                }),
                metadata,
                on_idle: parent.on_idle,
                pre_stop: parent.pre_stop.clone(),
            };
            let (this, point, from) = (self.clone(), point.clone(), id.to_string());
            tokio::spawn(async move { this.create_session_from(child, point, true, Some(from)).await })
        });
        crate::flows::gather(children.collect(), "forks").await
    }

    /// Idle timeouts, lifetimes, lost VMs and lease renewals; each action runs in its own task and skips a
    /// session another operation holds.
    fn session_tick(self: &Arc<Self>) {
        let now = now_unix_ms();
        let slots: Vec<Arc<SessionSlot>> = lock(&self.sessions.map).values().cloned().collect();
        for slot in slots {
            let rec = slot.get();
            let action = if let Some(why) = rec.expired(now) {
                Some(TickAction::End(why))
            } else if rec.state == SessionState::Running {
                let vm_ok = rec.vm.as_deref().and_then(|v| self.get(v).ok()).is_some_and(|v| v.status.has_process());
                if !vm_ok {
                    Some(TickAction::VmLost)
                } else if slot.idle_ms(now) >= rec.idle_timeout_s * 1000 {
                    Some(TickAction::Idle)
                } else if lock(&slot.lease).is_some()
                    && now.saturating_sub(slot.lease_renewed_ms.load(Ordering::Relaxed))
                        >= self.cfg.sessions.lease_s * 1000 / 3
                {
                    Some(TickAction::Renew)
                } else {
                    None
                }
            } else {
                None
            };
            let Some(action) = action else { continue };
            let this = self.clone();
            tokio::spawn(async move {
                let Ok(_op) = slot.op.try_lock() else { return };
                let rec = slot.get();
                let id = rec.id.clone();
                let result = match action {
                    TickAction::End(why) => {
                        this.sessions.metrics.expired.fetch_add(1, Ordering::Relaxed);
                        this.delete_locked(&slot, &why).await
                    }
                    TickAction::Idle if rec.state != SessionState::Running || slot.idle_ms(now_unix_ms()) == 0 => {
                        Ok(())
                    }
                    TickAction::Idle => match rec.on_idle {
                        OnIdle::Hibernate => {
                            this.sessions.metrics.idle_hibernations.fetch_add(1, Ordering::Relaxed);
                            this.hibernate_locked(&slot).await.map(|_| ())
                        }
                        OnIdle::Stop => this.delete_locked(&slot, "idle (on_idle: stop)").await,
                    },
                    TickAction::VmLost => {
                        let err = rec.vm.as_deref().and_then(|v| this.get(v).ok()).and_then(|v| v.error);
                        slot.commit(&this.db, |r| {
                            r.state = SessionState::Failed;
                            r.error = Some(format!(
                                "its VM stopped ({}); a wake restores its last hibernation `{}`",
                                err.unwrap_or_else(|| "gone".into()),
                                r.base
                            ));
                            if let Some(s) = r.awake_since_unix_ms.take() {
                                r.awake_ms += now_unix_ms().saturating_sub(s);
                            }
                        })
                        .map(|_| ())
                    }
                    TickAction::Renew => match this.write_lease(&slot, true).await {
                        Err(OpError::Conflict(e)) => {
                            this.fence(&slot, &e).await;
                            Ok(())
                        }
                        other => other,
                    },
                };
                if let Err(e) = result {
                    warn!(session = %id, error = %e, "session upkeep failed");
                }
            });
        }
    }

    /// Another host took the session (this host's lease lapsed): stop running it here, so two hosts never run
    /// it at once. The caller holds `op`.
    async fn fence(self: &Arc<Self>, slot: &Arc<SessionSlot>, why: &str) {
        let id = slot.get().id;
        warn!(session = %id, error = why, "lost the session's lease; stopping its VM");
        self.remove_session_vms(&id).await;
        *lock(&slot.lease) = None;
        let r = slot.commit(&self.db, |r| {
            r.state = SessionState::Failed;
            r.vm = None;
            r.error = Some(format!("lost its lease to another host: {why}"));
            if let Some(s) = r.awake_since_unix_ms.take() {
                r.awake_ms += now_unix_ms().saturating_sub(s);
            }
        });
        if let Err(e) = r {
            warn!(session = %id, error = %e, "could not record a lost lease");
        }
    }

    /// Why a session cannot move between hosts on this bucket, for the API (`GET /v1/sessions` says it).
    pub async fn sessions_cross_host(&self) -> serde_json::Value {
        let on = self.coordinated().await.unwrap_or(false);
        serde_json::json!({
            "host": self.sessions.host,
            "cross_host": on,
            "refused": self.coord_refusal().await,
        })
    }
}

enum TickAction {
    End(String),
    Idle,
    VmLost,
    Renew,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeLauncher;
    use crate::vm::model::{CreateSnapshot, CreateVm};

    use crate::fake::TestEnv;

    /// Upkeep every 100 ms, eager wakes (the fake VMM has no page server).
    fn env(tag: &str) -> TestEnv {
        let mut e = TestEnv::new(&format!("session-{tag}"));
        e.cfg.sessions.tick_ms = 100;
        e.cfg.sessions.lazy_wake = false;
        e
    }

    /// A daemon on the fake launcher with snapshot `base` of a stopped VM.
    async fn with_base(e: &TestEnv, l: &FakeLauncher) -> Arc<Daemon> {
        let d = e.open(l);
        d.create(CreateVm { id: Some("src".into()), ..Default::default() }).await.unwrap();
        d.snapshot("src", CreateSnapshot { id: "base".into(), publish: false }).await.unwrap();
        d.delete("src").await.unwrap();
        d
    }

    fn session_vms(d: &Daemon, id: &str) -> usize {
        d.list().iter().filter(|v| v.session.as_deref() == Some(id)).count()
    }

    async fn echo(d: &Arc<Daemon>, id: &str) -> String {
        let (agent, _activity) = d.call_agent(id).await.unwrap();
        let out = agent
            .exec_output(flint_agent::protocol::ExecRequest {
                argv: vec!["echo".into(), "hi".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Concurrent calls to a hibernated session share one wake; a session past its ttl (awake time) is deleted by
    /// the upkeep loop, VM and all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_one_wake_and_ttl_ends_a_session() {
        let env = env("wake1");
        let l = FakeLauncher::default();
        let d = with_base(&env, &l).await;
        let req = CreateSession { snapshot: Some("base".into()), id: Some("s".into()), ..Default::default() };
        d.create_session(req).await.unwrap();
        d.hibernate_session("s").await.unwrap();
        let calls: Vec<_> = (0..6)
            .map(|_| {
                let d = d.clone();
                tokio::spawn(async move { echo(&d, "s").await })
            })
            .collect();
        for c in calls {
            assert_eq!(c.await.unwrap(), "hi\n");
        }
        let r = d.get_session("s").await.unwrap();
        assert_eq!((r.state, r.wakes), (SessionState::Running, 1), "six calls, one wake");
        assert_eq!(session_vms(&d, "s"), 1);

        let req = CreateSession {
            snapshot: Some("base".into()),
            id: Some("short".into()),
            ttl_s: Some(1),
            ..Default::default()
        };
        d.create_session(req).await.unwrap();
        let t = Instant::now();
        while d.get_session("short").await.is_ok() {
            assert!(t.elapsed() < Duration::from_secs(10), "not ended after its ttl");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(session_vms(&d, "short"), 0, "its VM went with it");
        d.delete_session("s").await.unwrap();
    }

    /// A hibernation that fails after the VMM restarted its dirty log (here: the base vanished from the store, so
    /// the layered put fails) leaves the session running, and its next snapshot is full (a diff could miss pages
    /// dirtied before the failed one); after that, diffs again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_hibernation_makes_the_next_snapshot_full() {
        let env = env("full");
        let l = FakeLauncher::default();
        let d = with_base(&env, &l).await;
        let req = CreateSession { snapshot: Some("base".into()), id: Some("s".into()), ..Default::default() };
        d.create_session(req).await.unwrap();
        d.store.delete("base", false).await.unwrap();
        let e = d.hibernate_session("s").await.unwrap_err();
        assert!(e.to_string().contains("base"), "{e}");
        let r = d.get_session("s").await.unwrap();
        assert_eq!((r.state, r.full_next), (SessionState::Running, true), "{r:?}");
        assert!(r.error.unwrap().starts_with("hibernate:"));
        assert_eq!(echo(&d, "s").await, "hi\n", "still running, still answering");
        let h = d.hibernate_session("s").await.unwrap();
        let m = d.store.manifest(&h.base).await.unwrap();
        assert!(!m.metadata.contains_key(crate::daemon::MEMORY_LAYERED), "a full snapshot: {:?}", m.metadata);
        assert!(!h.full_next);
        echo(&d, "s").await;
        let h = d.hibernate_session("s").await.unwrap();
        let m = d.store.manifest(&h.base).await.unwrap();
        assert_eq!(m.metadata.get(crate::daemon::MEMORY_LAYERED).map(String::as_str), Some("true"));
        d.delete_session("s").await.unwrap();
    }

    /// A session's life on one host, with the fake VMM: bad requests are 400/404 before anything starts; five
    /// hibernate/wake cycles (each wake by a call, from the latest hibernation; replaced bases released); an
    /// idle timeout hibernates it; fork shares a fork point that lives until the last session using it ends;
    /// records survive a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_hibernate_wake_fork_and_end() {
        let env = env("life");
        let l = FakeLauncher::default();
        let d = with_base(&env, &l).await;
        for (req, want) in [
            (CreateSession::default(), "exactly one of `template` and `snapshot`"),
            (
                CreateSession { snapshot: Some("base".into()), id: Some("x".repeat(65)), ..Default::default() },
                "at most 64",
            ),
            (
                CreateSession { snapshot: Some("base".into()), idle_timeout_s: Some(0), ..Default::default() },
                "at least 1",
            ),
        ] {
            match d.create_session(req).await {
                Err(OpError::BadRequest(m)) => assert!(m.contains(want), "{m}"),
                other => panic!("expected a 400: {other:?}"),
            }
        }
        let missing = CreateSession { snapshot: Some("nope".into()), ..Default::default() };
        assert!(matches!(d.create_session(missing).await, Err(OpError::NotFound(_))));
        assert!(d.list_sessions(&BTreeMap::new()).is_empty() && l.running() == 0, "nothing was started");

        let req = CreateSession {
            snapshot: Some("base".into()),
            id: Some("s1".into()),
            idle_timeout_s: Some(3600),
            metadata: BTreeMap::from([("user".into(), "ada".into())]),
            ..Default::default()
        };
        let s = d.create_session(req).await.unwrap();
        assert_eq!((s.state, s.base.as_str(), s.base_owned), (SessionState::Running, "base", false));
        assert_eq!(echo(&d, "s1").await, "hi\n");
        let filter = BTreeMap::from([("user".to_string(), "ada".to_string())]);
        assert_eq!(d.list_sessions(&filter).len(), 1);
        assert!(d.list_sessions(&BTreeMap::from([("user".to_string(), "bob".to_string())])).is_empty());
        for cycle in 1..=5u64 {
            let h = d.hibernate_session("s1").await.unwrap();
            assert_eq!(h.state, SessionState::Hibernated);
            assert_eq!(h.base, format!("s1.h{cycle}"));
            assert_eq!(session_vms(&d, "s1"), 0, "a hibernated session has no VM");
            let m = d.store.manifest(&h.base).await.unwrap();
            assert_eq!(m.metadata.get(crate::daemon::MEMORY_LAYERED).map(String::as_str), Some("true"));
            let want_parent = if cycle == 1 { "base".to_string() } else { format!("s1.h{}", cycle - 1) };
            assert_eq!(m.parent.as_deref(), Some(want_parent.as_str()), "a hibernation is a diff on the last");
            if cycle > 1 {
                assert!(
                    d.store.manifest(&format!("s1.h{}", cycle - 1)).await.is_err(),
                    "the replaced base is released"
                );
            }
            // A call wakes it.
            assert_eq!(echo(&d, "s1").await, "hi\n");
            let w = d.get_session("s1").await.unwrap();
            assert_eq!((w.state, w.wakes, w.hibernations), (SessionState::Running, cycle, cycle));
            assert_eq!(session_vms(&d, "s1"), 1);
        }
        assert!(d.store.manifest("base").await.is_ok(), "the origin is not the session's to release");
        match d.delete_snapshot("s1.h5", false).await {
            Err(OpError::Conflict(m)) => assert!(m.contains("session `s1`"), "{m}"),
            other => panic!("expected a 409: {other:?}"),
        }

        // Fork a running session: both children and the parent use the fork point.
        let kids = d.fork_session("s1", ForkSession { count: 2, ..Default::default() }).await.unwrap();
        let parent = d.get_session("s1").await.unwrap();
        assert_eq!(parent.base, "s1.h6");
        assert_eq!(kids.len(), 2);
        for k in &kids {
            assert_eq!(
                (k.state, k.base.as_str(), k.forked_from.as_deref()),
                (SessionState::Running, "s1.h6", Some("s1"))
            );
            assert_eq!(k.metadata.get("user").map(String::as_str), Some("ada"));
            assert_eq!(echo(&d, &k.id).await, "hi\n");
        }
        d.delete_session("s1").await.unwrap();
        assert!(d.store.manifest("s1.h6").await.is_ok(), "the children still use the fork point");
        d.delete_session(&kids[0].id).await.unwrap();
        assert!(d.store.manifest("s1.h6").await.is_ok());

        // Idle: no call for idle_timeout_s → hibernated by the upkeep loop; a running call keeps it awake.
        let idle = CreateSession {
            snapshot: Some("base".into()),
            id: Some("idle".into()),
            idle_timeout_s: Some(1),
            ..Default::default()
        };
        d.create_session(idle).await.unwrap();
        let (_agent, activity) = d.call_agent("idle").await.unwrap();
        tokio::time::sleep(Duration::from_millis(1800)).await;
        assert_eq!(d.get_session("idle").await.unwrap().state, SessionState::Running, "a call in progress is activity");
        drop(activity);
        let t = Instant::now();
        while d.get_session("idle").await.unwrap().state != SessionState::Hibernated {
            assert!(t.elapsed() < Duration::from_secs(10), "not hibernated after its idle timeout");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(t.elapsed() >= Duration::from_millis(900), "hibernated before its idle timeout");

        // A restart keeps every session as it was.
        let before: Vec<(String, SessionState, String)> =
            d.list_sessions(&BTreeMap::new()).into_iter().map(|r| (r.id, r.state, r.base)).collect();
        drop(d);
        let d = env.open(&l);
        let after: Vec<(String, SessionState, String)> =
            d.list_sessions(&BTreeMap::new()).into_iter().map(|r| (r.id, r.state, r.base)).collect();
        assert_eq!(before, after);
        assert_eq!(echo(&d, "idle").await, "hi\n", "a session hibernated before the restart wakes after it");
        for s in d.list_sessions(&BTreeMap::new()) {
            d.delete_session(&s.id).await.unwrap();
        }
        assert!(d.store.manifest("s1.h6").await.is_err(), "the fork point went with the last session using it");
        assert_eq!(l.running(), 0);
        assert!(d.list().is_empty(), "no VM of any session is left");
    }
}
