//! Sessions: the sandbox a tenant holds, addressed by a session id. A session runs in a VM restored from its
//! base snapshot (owner tag `session`/id); idle, it hibernates (pre-stop command and hooks, a diff snapshot of
//! the pages it dirtied layered on its base, the VM deleted) and the next call wakes it from that snapshot.
//! Every change goes through the session's [`Owner`] (one operation at a time, database first). With hosts
//! sharing a bucket, a lease says which host runs the session (`lease.rs`). See docs/sessions.md.
mod lease;
pub use lease::DrainReport;
pub mod model;
#[doc(hidden)]
pub mod owners;
#[cfg(test)]
mod tests;
mod tick;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Instant;

use flint_snapshot_store::StoreError;
use flint_vmm_api::{lock, now_unix_ms};
use tracing::{info, warn, Instrument};

use crate::config::Config;
use crate::db::{Db, SESSIONS};
use crate::error::{Classify, Kind};
use crate::owner::{CommitError, Owner};
use crate::services::pools::Pools;
use crate::services::templates::Templates;
use crate::tasks::Tasks;
use crate::vm::{self, OwnerTag, SnapshotHow};
pub use lease::Coord;
pub use model::*;

/// The owner tag of a session's VMs.
pub const OWNER: &str = "session";

fn tag(id: &str) -> OwnerTag {
    OwnerTag::new(OWNER, id)
}

/// Why a session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("quota: {0}")]
    Quota(String),
    /// The session failed (its VM was lost); a wake restores its last hibernation.
    #[error("{0}")]
    Failed(String),
    /// The bucket the sessions are coordinated through cannot be reached now.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Start(#[from] vm::StartFailure),
    #[error(transparent)]
    Snapshot(Box<vm::SnapshotError>),
    #[error(transparent)]
    Vm(Box<vm::VmError>),
    #[error("{}", crate::error::store_message(.0))]
    Store(#[from] StoreError),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error(transparent)]
    Policy(#[from] crate::net::PolicyError),
    #[error(transparent)]
    Forward(#[from] crate::net::forward::ForwardError),
    #[error(transparent)]
    Template(Box<crate::services::templates::TemplateError>),
}

/// `?` on the big errors of the layers below boxes them (a session error stays small).
macro_rules! boxed_from {
    ($($variant:ident($t:ty)),*) => {$(
        impl From<$t> for SessionError {
            fn from(e: $t) -> Self {
                SessionError::$variant(Box::new(e))
            }
        }
    )*};
}
boxed_from!(Snapshot(vm::SnapshotError), Vm(vm::VmError), Template(crate::services::templates::TemplateError));

impl Classify for SessionError {
    fn kind(&self) -> Kind {
        use SessionError as E;
        match self {
            E::NotFound(_) => Kind::NotFound,
            E::Invalid(_) => Kind::Invalid,
            E::Conflict(_) => Kind::Conflict,
            E::Quota(_) => Kind::Quota,
            E::Failed(_) => Kind::Guest,
            E::Unavailable(_) => Kind::Unavailable,
            E::Internal(_) => Kind::Internal,
            E::Start(e) => e.kind(),
            E::Snapshot(e) => e.kind(),
            E::Vm(e) => e.kind(),
            E::Store(e) => e.kind(),
            E::Commit(e) => e.kind(),
            E::Db(_) => Kind::Internal,
            E::Policy(e) => e.kind(),
            E::Forward(e) => e.kind(),
            E::Template(e) => e.kind(),
        }
    }
}

/// One session: its record (through its owner) and what this host keeps about it in memory.
pub struct Session {
    pub rec: Owner<SessionRecord>,
    active: AtomicUsize,
    last_active_ms: AtomicU64,
    /// This host's claim on the session in the bucket, while it holds one.
    lease: Mutex<Option<lease::Held>>,
    /// One writer of the session's lease object at a time (renewals run beside operations).
    lease_io: tokio::sync::Mutex<()>,
    /// A renewal is in flight (the tick starts no second one).
    renewing: std::sync::atomic::AtomicBool,
    /// Its VM is paused because renewals failed (resumed when one succeeds, stopped at the fence deadline).
    frozen: std::sync::atomic::AtomicBool,
    /// The session's plain TCP forwards (they outlive its VMs: a connection wakes it).
    forwards: Mutex<Vec<(u16, u16, crate::net::forward::Forward)>>,
}

impl Session {
    fn new(rec: SessionRecord, durable: bool) -> Arc<Session> {
        Arc::new(Session {
            rec: Owner::new(rec, SESSIONS, durable),
            active: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(now_unix_ms()),
            lease: Mutex::new(None),
            lease_io: tokio::sync::Mutex::new(()),
            renewing: std::sync::atomic::AtomicBool::new(false),
            frozen: std::sync::atomic::AtomicBool::new(false),
            forwards: Mutex::new(Vec::new()),
        })
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

/// A call using a session (an exec until its stream ends, a file transfer, a front-end connection): the session
/// is not idle while one lives.
pub struct Activity(Arc<Session>);

impl Activity {
    fn new(s: &Arc<Session>) -> Activity {
        s.active.fetch_add(1, Ordering::Relaxed);
        s.touch();
        Activity(s.clone())
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
    /// Lease renewals that failed (the bucket unreachable or refusing).
    pub lease_renew_failures: AtomicU64,
    /// Sessions whose VM this host paused, or stopped, because it could not renew their lease.
    pub lease_freezes: AtomicU64,
    pub lease_fences: AtomicU64,
}

/// This host's sessions by id, and in the list's order (oldest first, then by id): a page of the list is read
/// from its cursor on, without walking the sessions before it.
#[derive(Default)]
struct SessionMap {
    /// Each session with the position it was filed at in `order`.
    by_id: HashMap<String, (Cursor, Arc<Session>)>,
    order: BTreeMap<Cursor, Arc<Session>>,
}

impl SessionMap {
    fn get(&self, id: &str) -> Option<&Arc<Session>> {
        self.by_id.get(id).map(|(_, s)| s)
    }

    fn contains_key(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    fn len(&self) -> usize {
        self.by_id.len()
    }

    fn keys(&self) -> impl Iterator<Item = &String> {
        self.by_id.keys()
    }

    fn values(&self) -> impl Iterator<Item = &Arc<Session>> {
        self.order.values()
    }

    fn insert(&mut self, id: String, s: Arc<Session>) {
        let at = s.rec.with(Cursor::of);
        if let Some((was, _)) = self.by_id.insert(id, (at.clone(), s.clone())) {
            self.order.remove(&was);
        }
        self.order.insert(at, s);
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Session>> {
        let (at, s) = self.by_id.remove(id)?;
        self.order.remove(&at);
        Some(s)
    }

    /// The session `id`, filed from `make()` if there is none.
    fn get_or_insert_with(&mut self, id: &str, make: impl FnOnce() -> Arc<Session>) -> Arc<Session> {
        if let Some(s) = self.get(id) {
            return s.clone();
        }
        let s = make();
        self.insert(id.to_string(), s.clone());
        s
    }

    /// The sessions after `after` (all with none), in the list's order.
    fn after<'a>(&'a self, after: Option<&Cursor>) -> Box<dyn Iterator<Item = &'a Arc<Session>> + 'a> {
        use std::ops::Bound::{Excluded, Unbounded};
        match after {
            Some(c) => Box::new(self.order.range((Excluded(c.clone()), Unbounded)).map(|(_, s)| s)),
            None => Box::new(self.order.values()),
        }
    }
}

/// The sessions service.
pub struct Sessions {
    cfg: Arc<Config>,
    db: Arc<Db>,
    vms: Arc<vm::Manager>,
    templates: Arc<Templates>,
    pools: Arc<Pools>,
    map: RwLock<SessionMap>,
    /// This host's name in leases.
    pub host: String,
    coord: tokio::sync::Mutex<Coord>,
    /// Who runs a session: etcd in a cluster, else lease objects in the bucket.
    owners: Arc<dyn owners::Owners>,
    /// This host's membership of an etcd cluster.
    pub membership: Option<Arc<crate::cluster::host::Membership>>,
    pub metrics: SessionMetrics,
    tasks: Tasks,
    me: Weak<Sessions>,
}

/// This host's name in session leases: configured, else `<hostname>-<random>` kept in `<data_dir>/host-id` (two
/// flintds on one machine are two hosts).
pub fn host_id(cfg: &Config) -> Result<String, std::io::Error> {
    if let Some(h) = &cfg.sessions.host_id {
        return Ok(h.clone());
    }
    let path = cfg.data_dir.join("host-id");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if vm::valid_id("host id", &t).is_ok() {
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
    getrandom::getrandom(&mut r).map_err(|e| std::io::Error::other(e.to_string()))?;
    let suffix: String = r.iter().map(|x| format!("{x:02x}")).collect();
    let id = format!("{}-{suffix}", if host.is_empty() { "host" } else { &host });
    std::fs::write(&path, &id)?;
    Ok(id)
}

impl Sessions {
    /// The sessions service over the VM layer; re-adopts the sessions of the previous run and starts the upkeep
    /// loop.
    pub fn open(
        cfg: Arc<Config>,
        db: Arc<Db>,
        vms: Arc<vm::Manager>,
        templates: Arc<Templates>,
        pools: Arc<Pools>,
        host: String,
        tasks: Tasks,
    ) -> Result<Arc<Sessions>, SessionError> {
        let membership = if cfg.cluster.enabled() {
            let nonce = owners::host_nonce(&cfg.data_dir)
                .map_err(|e| SessionError::Internal(format!("{}/host-nonce: {e}", cfg.data_dir.display())))?;
            let m = crate::cluster::host::Membership::new(&cfg.cluster, host.clone(), nonce, &cfg.data_dir)
                .map_err(|e| SessionError::Invalid(format!("[cluster]: {e}")))?;
            Some(Arc::new(m))
        } else {
            None
        };
        let owners: Arc<dyn owners::Owners> = match &membership {
            Some(m) => Arc::new(owners::EtcdOwners::new(m.clone(), tasks.clone())),
            None => Arc::new(owners::S3Owners {
                store: vms.store.clone(),
                host: host.clone(),
                data_dir: cfg.data_dir.clone(),
            }),
        };
        let s = Arc::new_cyclic(|me| Sessions {
            cfg,
            db,
            vms,
            templates,
            pools,
            map: RwLock::new(SessionMap::default()),
            host,
            coord: tokio::sync::Mutex::new(Coord::Unknown),
            owners,
            membership,
            metrics: SessionMetrics::default(),
            tasks,
            me: me.clone(),
        });
        s.adopt()?;
        if s.membership.is_some() {
            // A cluster's hosts register at once: routers place by the registrations.
            let me = s.clone();
            s.tasks.spawn_loop(async move {
                while let Err(e) = me.coordinated().await {
                    warn!(error = %e, "could not join the cluster yet; trying again in 2 s");
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            });
        }
        Ok(s)
    }

    /// The fence a session VM arms (a cluster host's).
    fn fence_file(&self) -> Option<std::path::PathBuf> {
        self.membership.as_ref().map(|m| m.fence_path().to_path_buf())
    }

    fn all(&self) -> Vec<Arc<Session>> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    pub(crate) fn session(&self, id: &str) -> Option<Arc<Session>> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    fn must(&self, id: &str) -> Result<Arc<Session>, SessionError> {
        self.session(id).ok_or_else(|| SessionError::NotFound(format!("no session `{id}`")))
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The id of the session `name` names whatever its case (ids are unique case-insensitively).
    pub fn find_id(&self, name: &str) -> Option<String> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).keys().find(|k| k.eq_ignore_ascii_case(name)).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every session, oldest first.
    pub fn records(&self) -> Vec<SessionRecord> {
        self.all().iter().map(|s| s.rec.get()).collect()
    }

    /// Sessions by state (metrics).
    pub fn count_by_state(&self) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::new();
        for s in self.all() {
            *out.entry(s.rec.with(|r| r.state.name())).or_default() += 1;
        }
        out
    }

    /// Every session whose metadata has every pair of `filter`, oldest first.
    pub fn list(&self, filter: &BTreeMap<String, String>) -> Vec<SessionRecord> {
        self.page(filter, &Page::default()).0
    }

    /// One page of [`Sessions::list`]: the sessions after `page.after`, at most `page.limit`, and where the next
    /// page starts if any session is left after this one. Records are copied only for the page.
    pub fn page(&self, filter: &BTreeMap<String, String>, page: &Page) -> (Vec<SessionRecord>, Option<Cursor>) {
        let limit = page.limit.unwrap_or(usize::MAX);
        let mut more = false;
        let picked: Vec<Arc<Session>> = {
            let map = self.map.read().unwrap_or_else(|p| p.into_inner());
            let mut picked = Vec::new();
            for s in map.after(page.after.as_ref()) {
                if !s.rec.with(|r| filter.iter().all(|(k, v)| r.metadata.get(k) == Some(v))) {
                    continue;
                }
                if picked.len() == limit {
                    more = true;
                    break;
                }
                picked.push(s.clone());
            }
            picked
        };
        let out: Vec<SessionRecord> = picked.iter().map(|s| s.rec.get()).collect();
        let next = if more { out.last().map(Cursor::of) } else { None };
        (out, next)
    }

    /// Whether a session uses snapshot `id` (its base, a base being written, one kept for a lazy VM).
    pub fn uses_snapshot(&self, id: &str) -> Option<String> {
        self.all().iter().find_map(|s| {
            s.rec.with(|r| {
                (r.base == id || r.pending_base.as_deref() == Some(id) || r.stale_bases.iter().any(|b| b == id))
                    .then(|| r.id.clone())
            })
        })
    }

    /// A session's record: this host's, else (hosts sharing a bucket) the bucket's.
    pub async fn get(&self, id: &str) -> Result<SessionRecord, SessionError> {
        if let Some(s) = self.session(id) {
            return Ok(s.rec.get());
        }
        if let Some(r) = self.shared_record(id).await? {
            return Ok(r);
        }
        Err(SessionError::NotFound(format!("no session `{id}`{}", self.not_here_why().await)))
    }

    /// Creates a session from a template or a snapshot: its first VM is a warm pool's (the template's) or a
    /// restore.
    pub async fn create(self: &Arc<Self>, req: CreateSession) -> Result<SessionRecord, SessionError> {
        let snapshot = match (&req.template, &req.snapshot) {
            (Some(t), None) => self.templates.get(t)?.snapshot,
            (None, Some(s)) => s.clone(),
            _ => return Err(SessionError::Invalid("give exactly one of `template` and `snapshot`".into())),
        };
        self.create_from(req, snapshot, false, None).await
    }

    fn check_create(&self, req: &CreateSession, id: &str) -> Result<u64, SessionError> {
        vm::valid_id("session id", id).map_err(|e| SessionError::Invalid(e.to_string()))?;
        if id.len() > MAX_SESSION_ID {
            return Err(SessionError::Invalid(format!("session id: at most {MAX_SESSION_ID} characters")));
        }
        let idle = req.idle_timeout_s.unwrap_or(self.cfg.sessions.idle_timeout_s);
        if idle == 0 {
            return Err(SessionError::Invalid("idle_timeout_s must be at least 1".into()));
        }
        if req.ttl_s == Some(0) || req.max_lifetime_s == Some(0) {
            return Err(SessionError::Invalid("ttl_s and max_lifetime_s must be at least 1 when given".into()));
        }
        let meta_bytes: usize = req.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if meta_bytes > MAX_METADATA_BYTES {
            return Err(SessionError::Invalid(format!("metadata: {meta_bytes} bytes, at most {MAX_METADATA_BYTES}")));
        }
        if let Some(p) = &req.pre_stop {
            if p.argv.is_empty() || p.timeout_ms == 0 || p.timeout_ms > 600_000 {
                return Err(SessionError::Invalid(
                    "pre_stop: argv must not be empty and timeout_ms must be within 1..=600000".into(),
                ));
            }
        }
        if let Some(n) = &req.network {
            n.check(self.cfg.network.max_rules)?;
            self.vms.net.forwards.check(id, n)?;
        }
        if let Some(vm) = self.vms.find_id(id) {
            return Err(SessionError::Conflict(format!("`{vm}` is a VM id: calls could not tell them apart")));
        }
        if let Some(other) = self.find_id(id) {
            return Err(SessionError::Conflict(format!(
                "session `{other}` already exists (ids are unique whatever their case)"
            )));
        }
        Ok(idle)
    }

    async fn create_from(
        self: &Arc<Self>,
        mut req: CreateSession,
        snapshot: String,
        base_owned: bool,
        forked_from: Option<String>,
    ) -> Result<SessionRecord, SessionError> {
        let id = req.id.clone().unwrap_or_else(|| self.vms.new_id("ses"));
        let idle = self.check_create(&req, &id)?;
        // Its own tokens where asked (`auto`), shown in this answer alone.
        if let Some(n) = req.network.as_mut() {
            n.make_tokens();
        }
        // A 404 for an unknown snapshot before anything is recorded.
        self.vms.store.manifest(&snapshot).await?;
        let coordinated = self.coordinated().await?;
        let rec = SessionRecord::new(&id, &req, snapshot.clone(), idle, base_owned, forked_from, now_unix_ms())
            .with_host(coordinated.then(|| self.host.clone()));
        let s = {
            let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
            if map.contains_key(&id) {
                return Err(SessionError::Conflict(format!("session `{id}` already exists")));
            }
            if map.len() >= self.cfg.sessions.max_sessions {
                return Err(SessionError::Quota(format!(
                    "{} sessions, sessions.max_sessions = {}",
                    map.len(),
                    self.cfg.sessions.max_sessions
                )));
            }
            let s = Session::new(rec.clone(), false);
            map.insert(id.clone(), s.clone());
            s
        };
        let _op = s.rec.op.lock().await;
        let span = tracing::info_span!("session", id = %id, op = "create");
        let result = self.first_vm(&s, &req, &snapshot, coordinated).instrument(span).await;
        match result {
            Ok(r) => {
                s.touch();
                info!(session = %id, vm = ?r.vm, "session running");
                Ok(r)
            }
            Err(e) => {
                // Nothing of a session that never ran is kept; the error says why.
                let _ = s.rec.remove(&self.db);
                self.map.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
                lock(&s.forwards).clear();
                if lock(&s.lease).is_some() {
                    self.drop_lease(&id).await;
                }
                self.remove_vms(&id).await;
                Err(e)
            }
        }
    }

    /// The create's steps once its record is reserved: the record, the lease, the forwards, the first VM.
    async fn first_vm(
        self: &Arc<Self>,
        s: &Arc<Session>,
        req: &CreateSession,
        snapshot: &str,
        coordinated: bool,
    ) -> Result<SessionRecord, SessionError> {
        let id = s.rec.get().id;
        s.rec.commit(&self.db, |_| ())?;
        if coordinated {
            self.create_lease(s).await?;
        }
        self.reconcile_forwards(s)?;
        // A warm pool's VM when the session starts from its template's snapshot, else a restore.
        let pooled = match &req.template {
            // A cluster host's session VMs arm the fence at launch; a pooled VM was launched without one.
            Some(t)
                if self.membership.is_none()
                    && req.network.is_none()
                    && req.cpu.is_none()
                    && self.templates.get(t).is_ok_and(|t| t.snapshot == snapshot) =>
            {
                self.pools.take(t, &req.env, Some(tag(&id)), Some(id.clone()), true).await
            }
            _ => None,
        };
        let vm = match pooled {
            Some(vm) => vm,
            None => {
                let r = vm::Restore {
                    snapshot: snapshot.to_string(),
                    env: req.env.clone(),
                    track_dirty: true,
                    owner: Some(tag(&id)),
                    hostname: Some(id.clone()),
                    network: req.network.clone(),
                    id_prefix: Some(id.clone()),
                    cpu: req.cpu,
                    fence: self.fence_file(),
                    ..Default::default()
                };
                self.vms.restore(r).await?
            }
        };
        Ok(s.rec.commit(&self.db, |r| {
            r.state = SessionState::Running;
            r.vm = Some(vm.id.clone());
            // The limit in force (the caller's, else the template's), kept for every wake.
            r.cpu = vm.cpu;
        })?)
    }

    /// Starts or stops the session's plain TCP forwards to match its network request.
    fn reconcile_forwards(&self, s: &Arc<Session>) -> Result<(), SessionError> {
        let rec = s.rec.get();
        let mut f = lock(&s.forwards);
        let have = std::mem::take(&mut *f);
        let up: Arc<dyn crate::net::forward::Upstream> =
            Arc::new(SessionUpstream { sessions: self.me.clone(), id: rec.id.clone() });
        *f = self.vms.net.forwards.reconcile(&rec.id, rec.network.as_ref(), have, &up)?;
        Ok(())
    }

    /// The VM of a session id for a call, woken first if it sleeps; the returned [`Activity`] keeps it awake until
    /// dropped. `None`: no such session (here, or in the bucket).
    pub async fn awake(self: &Arc<Self>, id: &str) -> Result<Option<(String, Activity)>, SessionError> {
        let Some(s) = self.for_call(id).await? else { return Ok(None) };
        let activity = Activity::new(&s);
        let vm = self.ensure_awake(&s).await?;
        Ok(Some((vm, activity)))
    }

    /// A session's activity, for a call that names its VM directly.
    pub fn activity(&self, id: &str) -> Option<Activity> {
        self.session(id).map(|s| Activity::new(&s))
    }

    /// The VM of a running session, waking it first if it sleeps (concurrent calls wait for the one wake).
    async fn ensure_awake(self: &Arc<Self>, s: &Arc<Session>) -> Result<String, SessionError> {
        if let (SessionState::Running, Some(vm)) = s.rec.with(|r| (r.state, r.vm.clone())) {
            return Ok(vm);
        }
        let _op = s.rec.op.lock().await;
        let rec = s.rec.get();
        match (rec.state, &rec.vm) {
            (SessionState::Running, Some(vm)) => Ok(vm.clone()),
            (SessionState::Hibernated, _) => Ok(self.wake_locked(s).await?.vm.unwrap_or_default()),
            (SessionState::Failed, _) => Err(SessionError::Failed(format!(
                "session `{}` failed: {}; `wake` restores its last hibernation",
                rec.id,
                rec.error.unwrap_or_default()
            ))),
            (st, _) => Err(SessionError::Conflict(format!("session `{}` is {}", rec.id, st.name()))),
        }
    }

    pub async fn wake(self: &Arc<Self>, id: &str) -> Result<SessionRecord, SessionError> {
        let Some(s) = self.for_call(id).await? else {
            return Err(SessionError::NotFound(format!("no session `{id}`{}", self.not_here_why().await)));
        };
        let _op = s.rec.op.lock().await;
        match s.rec.get().state {
            SessionState::Running => Ok(s.rec.get()),
            SessionState::Hibernated | SessionState::Failed => self.wake_locked(&s).await,
            st => Err(SessionError::Conflict(format!("session `{id}` is {}", st.name()))),
        }
    }

    /// Restores a sleeping (or failed) session from its base; the caller holds `op`.
    async fn wake_locked(self: &Arc<Self>, s: &Arc<Session>) -> Result<SessionRecord, SessionError> {
        let started = Instant::now();
        let id = s.rec.get().id;
        let span = tracing::info_span!("session", id = %id, op = "wake");
        async {
            self.remove_vms(&id).await; // a failed VM of an earlier run
            self.claim_for_wake(s).await?;
            let rec = s.rec.commit(&self.db, |r| {
                r.state = SessionState::Waking;
                r.error = None;
            })?;
            let r = vm::Restore {
                snapshot: rec.base.clone(),
                env: rec.env.clone(),
                lazy: self.cfg.sessions.lazy_wake,
                track_dirty: true,
                owner: Some(tag(&id)),
                hostname: Some(id.clone()),
                network: rec.network.clone(),
                id_prefix: Some(id.clone()),
                paused: false,
                cpu: rec.cpu,
                fence: self.fence_file(),
            };
            match self.vms.restore(r).await {
                Ok(vm) => {
                    let ms = crate::ms_since(started);
                    let r = s.rec.commit(&self.db, |r| {
                        r.state = SessionState::Running;
                        r.vm = Some(vm.id.clone());
                        r.wakes += 1;
                        r.last_wake_ms = Some(ms);
                        r.awake_since_unix_ms = Some(now_unix_ms());
                    })?;
                    s.touch();
                    self.metrics.wake_ms.observe(ms);
                    info!(session = %id, vm = %vm.id, ms, base = %rec.base, "session woke");
                    Ok(r)
                }
                Err(e) => {
                    self.remove_vms(&id).await;
                    let _ = s.rec.commit(&self.db, |r| {
                        r.state = SessionState::Hibernated;
                        r.error = Some(format!("wake: {e}"));
                    });
                    self.release_after_failed_wake(s).await;
                    Err(e.into())
                }
            }
        }
        .instrument(span)
        .await
    }

    pub async fn hibernate(self: &Arc<Self>, id: &str) -> Result<SessionRecord, SessionError> {
        let s = self.must(id)?;
        let _op = s.rec.op.lock().await;
        match s.rec.get().state {
            SessionState::Hibernated => Ok(s.rec.get()),
            SessionState::Running => self.hibernate_locked(&s).await,
            st => Err(SessionError::Conflict(format!("session `{id}` is {}", st.name()))),
        }
    }

    /// Pre-stop command, before-checkpoint hooks, a diff snapshot on the base (only the chunks holding pages the
    /// session dirtied are new), VM deleted. The caller holds `op`. On failure the session keeps running.
    async fn hibernate_locked(self: &Arc<Self>, s: &Arc<Session>) -> Result<SessionRecord, SessionError> {
        let started = Instant::now();
        let rec = s.rec.get();
        let id = rec.id.clone();
        let vm = rec.vm.clone().ok_or_else(|| SessionError::Conflict(format!("session `{id}` runs no VM")))?;
        let publish = self.coordinated().await.unwrap_or(false);
        if publish {
            self.check_claim(s).await?;
        }
        let snap = self.snapshot_name(s, &rec);
        let span = tracing::info_span!("session", id = %id, op = "hibernate");
        async {
            s.rec.commit(&self.db, |r| {
                r.state = SessionState::Hibernating;
                r.pending_base = Some(snap.clone());
            })?;
            if let Some(p) = &rec.pre_stop {
                self.run_pre_stop(&vm, p).await;
            }
            // The pre-stop command may have run long: the claim must still hold before anything is published.
            if publish && !self.lease_current(s) {
                let _ = s.rec.commit(&self.db, |r| {
                    r.state = SessionState::Running;
                    r.pending_base = None;
                });
                return Err(SessionError::Conflict(format!(
                    "session `{id}`: this host's lease lapsed during the hibernation; nothing was published"
                )));
            }
            let how = SnapshotHow {
                publish,
                diff_on: (!rec.full_next).then(|| rec.base.clone()),
                keep_paused: true,
                owner: Some(tag(&id)),
            };
            match self.vms.snapshot(&vm, &snap, &how).await {
                Ok((_, put)) => self.finish_hibernation(s, started, Some(put.new_stored_bytes)).await,
                Err(e) => {
                    // Back to running: the VM may be paused by the failed snapshot.
                    if let Ok(v) = self.vms.get(&vm) {
                        let _ = self.vms.launcher.vmm(&v.dir, v.uid.is_some()).resume().await;
                    }
                    let _ = s.rec.commit(&self.db, |r| {
                        r.state = SessionState::Running;
                        r.pending_base = None;
                        r.full_next = true;
                        r.error = Some(format!("hibernate: {e}"));
                    });
                    s.touch(); // a full idle period before the next attempt
                    Err(e.into())
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The snapshot of a hibernation is stored: delete the VM, make the snapshot the base, release the lease and
    /// the old base. Also finishes a hibernation a flintd restart interrupted. The caller holds `op`.
    async fn finish_hibernation(
        self: &Arc<Self>,
        s: &Arc<Session>,
        started: Instant,
        stored: Option<u64>,
    ) -> Result<SessionRecord, SessionError> {
        let rec = s.rec.get();
        let snap = rec
            .pending_base
            .clone()
            .ok_or_else(|| SessionError::Conflict(format!("session `{}`: no hibernation in progress", rec.id)))?;
        self.remove_vms(&rec.id).await;
        let ms = crate::ms_since(started);
        let r = s.rec.commit(&self.db, |r| {
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
            if let Some(t) = r.awake_since_unix_ms.take() {
                r.awake_ms += now_unix_ms().saturating_sub(t);
            }
        })?;
        // The pages a wake touches first change little between hibernations: the base's recorded working set is
        // the new snapshot's too (same layout), so the next wake prefetches it.
        if let Ok(Some(ws)) = self.vms.store.working_set(&rec.base).await {
            if let Err(e) = self.vms.store.put_working_set(&snap, &ws.image, &ws.chunks).await {
                warn!(session = %rec.id, error = %e, "could not carry the working set over to the new base");
            }
        }
        // The bucket's record must name the new base before the old one can go: another host (or this one after a
        // restart) wakes from it.
        if self.publish_base(s, false).await {
            self.release_bases(s, Some((&rec.base, rec.base_owned))).await;
        } else {
            self.keep_base(s, &rec.base, rec.base_owned);
        }
        self.metrics.hibernate_ms.observe(ms);
        self.metrics.hibernate_stored_bytes.fetch_add(stored.unwrap_or(0), Ordering::Relaxed);
        info!(session = %rec.id, ms, stored_bytes = ?stored, base = %snap, "session hibernated");
        Ok(r)
    }

    async fn run_pre_stop(&self, vm: &str, p: &PreStop) {
        let agent = match self.vms.agent(vm).await {
            Ok(a) => a,
            Err(e) => return warn!(vm, error = %e, "pre-stop: no agent"),
        };
        let req = flint_agent::protocol::ExecRequest {
            argv: p.argv.clone(),
            timeout_ms: Some(p.timeout_ms),
            ..Default::default()
        };
        let deadline = std::time::Duration::from_millis(p.timeout_ms + 5_000);
        match tokio::time::timeout(deadline, agent.exec_output(req)).await {
            Ok(Ok(out)) if out.code == Some(0) => {}
            Ok(Ok(out)) => {
                warn!(vm, code = ?out.code, timed_out = out.timed_out, "pre-stop command failed; hibernating anyway")
            }
            Ok(Err(e)) => warn!(vm, error = %e, "pre-stop command failed; hibernating anyway"),
            Err(_) => warn!(vm, "pre-stop command did not end; hibernating anyway"),
        }
    }

    /// Keeps a replaced base for later release (the bucket's record may still name it).
    fn keep_base(&self, s: &Session, snap: &str, owned: bool) {
        if owned {
            let _ = s.rec.commit(&self.db, |r| r.stale_bases.push(snap.to_string()));
        }
    }

    /// Releases a session's replaced base, and earlier ones kept because they were still in use; what is still in
    /// use stays in the session's `stale_bases`.
    async fn release_bases(&self, s: &Session, replaced: Option<(&str, bool)>) {
        let rec = s.rec.get();
        let mut candidates = rec.stale_bases.clone();
        if let Some((snap, true)) = replaced {
            candidates.push(snap.to_string());
        }
        let kept = self.release_snapshots(candidates).await;
        if kept != rec.stale_bases {
            if let Err(e) = s.rec.commit(&self.db, |r| r.stale_bases = kept) {
                warn!(session = %rec.id, error = %e, "could not record the session's stale bases");
            }
        }
    }

    /// Deletes each snapshot made for sessions that no session and no lazily restored VM on this host uses any
    /// more (its chunks then go at the next GC); returns those a lazily restored VM still reads.
    async fn release_snapshots(&self, candidates: Vec<String>) -> Vec<String> {
        let mut kept = Vec::new();
        for snap in candidates {
            if self.vms.lazily_read(&snap) {
                kept.push(snap);
            } else if self.uses_snapshot_as_base(&snap).is_none() {
                if let Err(e) = self.vms.delete_snapshot(&snap, self.vms.store.has_remote()).await {
                    warn!(snapshot = %snap, error = %e, "could not release a session snapshot");
                }
            }
        }
        kept
    }

    fn uses_snapshot_as_base(&self, id: &str) -> Option<String> {
        self.all()
            .iter()
            .find_map(|s| s.rec.with(|r| (r.base == id || r.pending_base.as_deref() == Some(id)).then(|| r.id.clone())))
    }

    /// Deletes every VM of a session (its current one, and failed ones of earlier runs).
    async fn remove_vms(&self, id: &str) {
        for v in self.vms.owned_by(OWNER, id) {
            if let Err(e) = self.vms.delete(&v.id).await {
                warn!(session = id, vm = %v.id, error = %e, "could not delete a session's VM");
            }
        }
    }

    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<(), SessionError> {
        let s = self.for_call(id).await?.ok_or_else(|| SessionError::NotFound(format!("no session `{id}`")))?;
        let _op = s.rec.op.lock().await;
        self.delete_locked(&s, "deleted").await
    }

    async fn delete_locked(self: &Arc<Self>, s: &Arc<Session>, why: &str) -> Result<(), SessionError> {
        let rec = s.rec.get();
        self.claim_for_delete(s).await?;
        self.remove_vms(&rec.id).await;
        s.rec.remove(&self.db)?;
        self.map.write().unwrap_or_else(|p| p.into_inner()).remove(&rec.id);
        lock(&s.forwards).clear();
        // Its snapshots go with it (its own VMs are gone; other sessions may still use a fork point).
        let mut mine = rec.stale_bases.clone();
        if rec.base_owned {
            mine.push(rec.base.clone());
        }
        let kept = self.release_snapshots(mine).await;
        if !kept.is_empty() {
            warn!(session = %rec.id, ?kept, "snapshots of a deleted session are still read by a VM; delete them later");
        }
        if lock(&s.lease).take().is_some() {
            self.drop_lease(&rec.id).await;
        }
        info!(session = %rec.id, why, "session ended");
        Ok(())
    }

    /// New sessions from a session as it is now: a running one is snapshotted (a diff on its base, which becomes
    /// its new base too), a sleeping one forks from its last hibernation. Each child is restored and refreshed
    /// (its own entropy, hostname, ids).
    pub async fn fork(self: &Arc<Self>, id: &str, req: ForkSession) -> Result<Vec<SessionRecord>, SessionError> {
        if req.count == 0 || req.count > self.cfg.limits.max_clones_per_call {
            return Err(SessionError::Invalid(format!(
                "count must be within 1..={} (limits.max_clones_per_call)",
                self.cfg.limits.max_clones_per_call
            )));
        }
        let s = self.must(id)?;
        let point = self.fork_point(&s).await?;
        let parent = s.rec.get();
        let children = (0..req.count).map(|_| {
            let child = parent.fork_request(&req);
            let (this, point, from) = (self.clone(), point.clone(), id.to_string());
            self.tasks.spawn(async move { this.create_from(child, point, true, Some(from)).await })
        });
        crate::services::gather(children.collect(), "forks").await
    }

    /// The snapshot a fork starts from: a sleeping session's base, or a new one of a running session.
    async fn fork_point(self: &Arc<Self>, s: &Arc<Session>) -> Result<String, SessionError> {
        let _op = s.rec.op.lock().await;
        let rec = s.rec.get();
        let id = rec.id.clone();
        match (rec.state, &rec.vm) {
            (SessionState::Hibernated, _) => Ok(rec.base.clone()),
            (SessionState::Running, Some(vm)) => {
                let publish = self.coordinated().await.unwrap_or(false);
                if publish {
                    self.check_claim(s).await?;
                }
                let snap = self.snapshot_name(s, &rec);
                let how = SnapshotHow {
                    publish,
                    diff_on: (!rec.full_next).then(|| rec.base.clone()),
                    keep_paused: false,
                    owner: Some(tag(&id)),
                };
                if let Err(e) = self.vms.snapshot(vm, &snap, &how).await {
                    let _ = s.rec.commit(&self.db, |r| r.full_next = true);
                    return Err(e.into());
                }
                // The VM's dirty log restarted at this snapshot: it is the session's base from now on.
                s.rec.commit(&self.db, |r| {
                    r.base = snap.clone();
                    r.base_owned = true;
                    r.full_next = false;
                    r.generation += 1;
                })?;
                if self.publish_base(s, true).await {
                    self.release_bases(s, Some((&rec.base, rec.base_owned))).await;
                } else {
                    self.keep_base(s, &rec.base, rec.base_owned);
                }
                Ok(snap)
            }
            (st, _) => Err(SessionError::Conflict(format!("session `{id}` is {}", st.name()))),
        }
    }

    /// A session's network request changed by `f` (checked whole first); applied to its VM running now, its
    /// forwards changed to match.
    pub async fn change_network(
        self: &Arc<Self>,
        id: &str,
        f: impl FnOnce(&mut crate::net::NetworkRequest) -> Result<(), crate::net::PolicyError>,
    ) -> Result<SessionRecord, SessionError> {
        let s = self.must(id)?;
        // Waits for a hibernation or wake to end (its VM then is what the record says).
        let _op = s.rec.op.lock().await;
        let rec = s.rec.get();
        let mut next = rec.network.clone().ok_or_else(|| {
            SessionError::Conflict(format!("session `{id}` has no network (create it with a `network` request)"))
        })?;
        f(&mut next)?;
        next.check(self.cfg.network.max_rules)?;
        self.vms.net.forwards.check(id, &next)?;
        let r = s.rec.commit(&self.db, |r| r.network = Some(next.clone()))?;
        self.reconcile_forwards(&s)?;
        if let Some(vm) = r.vm.clone() {
            self.vms.set_network(&vm, next).await?;
        }
        Ok(r)
    }
}

/// A session's plain TCP forwards wake it per connection.
struct SessionUpstream {
    sessions: Weak<Sessions>,
    id: String,
}

impl crate::net::forward::Upstream for SessionUpstream {
    fn connect(
        &self,
        port: u16,
    ) -> crate::launcher::BoxFut<'_, Result<crate::net::forward::Destination, crate::error::Refusal>> {
        Box::pin(async move {
            let s = self
                .sessions
                .upgrade()
                .ok_or_else(|| crate::error::Refusal::new(Kind::Unavailable, "flintd is stopping"))?;
            let (vm, activity) = s
                .awake(&self.id)
                .await?
                .ok_or_else(|| crate::error::Refusal::new(Kind::NotFound, format!("no session `{}`", self.id)))?;
            let route = s.vms.route(&vm, port)?;
            Ok((route.addr, Box::new(activity) as Box<dyn Send>))
        })
    }
}
