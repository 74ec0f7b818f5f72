//! E2B compatibility (docs/e2b.md): flintd serves the surface the unchanged `e2b` and `e2b-code-interpreter` SDKs
//! drive — the control plane (REST), envd's data plane (Connect RPCs, `/files`, `/health`) and the code
//! interpreter (`/execute`, contexts) — and translates it to Flint: an E2B sandbox is a session, a template a
//! template, pause a hibernation, envd the vsock agent, the code interpreter the warm Python runner. No daemon runs
//! in the guest for it, sandboxes without a network work, and access tokens never enter guest memory.
//!
//! One listener (`[e2b] listen`, `flintd --e2b-listen`) serves both planes, routed per request: the
//! `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers, else a `Host: <port>-<id>.<domain>`, else the control plane. With
//! a certificate it serves TLS (HTTP/1.1 by ALPN) for the SDK's `E2B_DOMAIN` mode.
pub mod b64;
pub mod connect;
mod control;
mod envd;
mod interp;
pub mod keys;
pub mod multipart;
mod procs;
mod server;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use flint_vmm_api::{lock, now_unix_ms};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::Config;
use crate::db::Db;
use crate::services::sessions::Sessions;
use crate::services::templates::Templates;
use crate::tasks::Tasks;
use crate::vm;

pub use control::{control_segments, detail, error, list_page};
pub use envd::percent_decode;
pub use envd::{not_found as sandbox_not_found, Target};
pub use server::{data_plane_target, dispatch_from_router, serve, FLEET_PREFIX};

use crate::db::E2B_SANDBOXES as SANDBOXES;

/// `[e2b]` in flintd's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct E2bConfig {
    /// Where the E2B endpoint listens, plain HTTP (both planes); none: off.
    pub listen: Option<SocketAddr>,
    /// Where it listens with TLS (needs `tls_cert` and `tls_key`); none: off. Both may be on.
    pub tls_listen: Option<SocketAddr>,
    /// The domain of Host routing (`<port>-<id>.<domain>`, `api.<domain>`); with TLS, what clients set as
    /// `E2B_DOMAIN` (it may carry the port: `flint.localhost:8443`).
    pub domain: String,
    /// PEM certificate chain (a wildcard for `*.<domain>` and `api.<domain>`) and key, for `tls_listen`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The guest account commands and files are for when the SDK names none (E2B's templates: `user`).
    pub user: String,
    /// Largest file upload (`POST /files`), bytes.
    pub max_upload_bytes: u64,
    /// A sandbox's lifetime when `create` gives no `timeout`, and the longest one may ask for, seconds.
    pub default_timeout_s: u64,
    pub max_timeout_s: u64,
    /// Template ids served by another template when no template of their own exists: by default the code
    /// interpreter's `code-interpreter-v1` is `base` (the `e2b` image has the warm runner).
    pub aliases: BTreeMap<String, String>,
}

impl Default for E2bConfig {
    fn default() -> Self {
        E2bConfig {
            listen: None,
            tls_listen: None,
            domain: "flint.localhost".into(),
            tls_cert: None,
            tls_key: None,
            user: "user".into(),
            max_upload_bytes: 256 << 20,
            default_timeout_s: 300,
            max_timeout_s: 24 * 3600,
            aliases: [("code-interpreter-v1".to_string(), "base".to_string())].into(),
        }
    }
}

/// The session annotation that carries a sandbox's record.
pub const ANNOTATION: &str = "e2b";

/// The envd version flintd reports: the highest whose features it serves (docs/e2b.md).
pub const ENVD_VERSION: &str = "0.5.7";

/// What happens at a sandbox's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    #[default]
    Kill,
    Pause,
}

/// An E2B sandbox's record (table `e2b_sandboxes`); its session (same id) holds everything else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    /// As the caller named it (`base`, `code-interpreter-v1`, a snapshot id).
    pub template_id: String,
    pub started_unix_ms: u64,
    /// The deadline: killed (or paused) then; `set_timeout` moves it, `connect` only up.
    pub end_unix_ms: u64,
    pub on_timeout: OnTimeout,
    /// Explicitly paused (`pause`): the data plane answers "not found" until `connect`. An idle hibernation is
    /// not a pause: the next call wakes it.
    pub paused: bool,
    /// `secure`: the data plane needs this in `X-Access-Token` (never given to the guest).
    pub access_token: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub cpu_count: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    /// Code-interpreter runs per context (`number_of_executions`).
    #[serde(default)]
    pub executions: BTreeMap<String, u64>,
}

/// One sandbox as this host holds it: its record and its processes (started through `Process.Start`).
pub struct Sandbox {
    pub rec: Mutex<SandboxRecord>,
    pub procs: Arc<procs::Procs>,
    /// Its polling directory watchers (`CreateWatcher`).
    pub watchers: watch::Watchers,
}

impl Sandbox {
    fn new(rec: SandboxRecord) -> Sandbox {
        Sandbox { rec: Mutex::new(rec), procs: Default::default(), watchers: Default::default() }
    }

    /// Lets go of what streams from its VM (processes, watches): the VM is going.
    fn release(&self) {
        self.procs.clear();
        self.watchers.clear();
    }
}

/// The E2B service.
pub struct E2b {
    pub cfg: Arc<Config>,
    db: Arc<Db>,
    pub sessions: Arc<Sessions>,
    pub templates: Arc<Templates>,
    pub vms: Arc<vm::Manager>,
    pub keys: keys::Keys,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    tasks: Tasks,
}

/// Why an E2B call failed: the status and message the SDK is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct E2bError {
    pub status: u16,
    pub message: String,
}

impl E2bError {
    pub fn new(status: u16, message: impl Into<String>) -> E2bError {
        E2bError { status, message: message.into() }
    }
}

impl From<crate::services::sessions::SessionError> for E2bError {
    fn from(e: crate::services::sessions::SessionError) -> E2bError {
        use crate::error::Classify;
        E2bError::new(e.kind().status(), e.to_string())
    }
}

impl From<crate::db::DbError> for E2bError {
    fn from(e: crate::db::DbError) -> E2bError {
        E2bError::new(500, e.to_string())
    }
}

impl E2b {
    /// The service over the sessions, with the sandboxes of the previous run (whose sessions still exist).
    pub fn open(
        cfg: Arc<Config>,
        db: Arc<Db>,
        sessions: Arc<Sessions>,
        templates: Arc<Templates>,
        vms: Arc<vm::Manager>,
        tasks: Tasks,
    ) -> Result<Arc<E2b>, crate::db::DbError> {
        let mut map = HashMap::new();
        for rec in db.all::<SandboxRecord>(SANDBOXES)? {
            if sessions.session(&rec.id).is_some() {
                map.insert(rec.id.clone(), Arc::new(Sandbox::new(rec)));
            } else {
                warn!(sandbox = %rec.id, "an E2B sandbox whose session is gone: forgotten");
                db.delete(SANDBOXES, &rec.id)?;
            }
        }
        let e = Arc::new(E2b {
            keys: keys::Keys::new(db.clone()),
            cfg,
            db,
            sessions,
            templates,
            vms,
            sandboxes: Mutex::new(map),
            tasks,
        });
        e.start_deadlines();
        Ok(e)
    }

    /// The sandbox as this host knows it.
    pub fn local(&self, id: &str) -> Option<Arc<Sandbox>> {
        lock(&self.sandboxes).get(id).cloned()
    }

    /// The sandbox `id`. On a host of a fleet (sessions coordinated across hosts) a sandbox this host does not
    /// hold is read from its session's record as the fleet has it (the owner key), which carries the sandbox's
    /// record under the `e2b` annotation: a sandbox created, paused or woken on another host is known here,
    /// with its latest state. One past its deadline that is to be killed is killed instead (no host kills an
    /// unheld sandbox at its deadline: the first call after it does).
    pub async fn sandbox(&self, id: &str) -> Option<Arc<Sandbox>> {
        let local = self.local(id);
        if (local.is_some() && self.sessions.held_here(id)) || !self.sessions.cross_host().await {
            return local;
        }
        let session = match self.sessions.fleet_record(id).await {
            Ok(Some(s)) => s,
            // Gone from the fleet (killed through another host): a copy here is forgotten.
            Ok(None) if local.is_some() && self.sessions.session(id).is_none() => {
                self.forget(id);
                return None;
            }
            _ => return local,
        };
        let Some(rec) = session.annotations.get(ANNOTATION).and_then(|t| serde_json::from_str::<SandboxRecord>(t).ok())
        else {
            return local;
        };
        let unheld = session.host.is_none() && !self.sessions.held_here(id);
        if rec.end_unix_ms <= now_unix_ms() && rec.on_timeout == OnTimeout::Kill && unheld {
            info!(sandbox = %id, "an E2B sandbox found past its deadline: killed");
            self.adopt(rec, local).ok()?;
            let _ = self.kill(id).await;
            return None;
        }
        self.adopt(rec, local).ok()
    }

    /// Takes the fleet's record of a sandbox as this host's (a new sandbox here, or a stale one brought up to date).
    fn adopt(&self, rec: SandboxRecord, local: Option<Arc<Sandbox>>) -> Result<Arc<Sandbox>, E2bError> {
        match local {
            Some(l) => {
                if *lock(&l.rec) != rec {
                    self.db.put(SANDBOXES, &rec.id, &rec)?;
                    *lock(&l.rec) = rec;
                }
                Ok(l)
            }
            None => {
                self.db.put(SANDBOXES, &rec.id, &rec)?;
                let s = Arc::new(Sandbox::new(rec.clone()));
                Ok(lock(&self.sandboxes).entry(rec.id).or_insert(s).clone())
            }
        }
    }

    pub fn sandboxes(&self) -> Vec<Arc<Sandbox>> {
        lock(&self.sandboxes).values().cloned().collect()
    }

    /// Writes a sandbox's record after `f` (durably: a restart keeps deadlines and pauses), and into its
    /// session's `e2b` annotation (which goes wherever the session goes: its next hibernation carries it).
    pub fn update(&self, sbx: &Sandbox, f: impl FnOnce(&mut SandboxRecord)) -> Result<SandboxRecord, E2bError> {
        let mut rec = lock(&sbx.rec);
        let mut next = rec.clone();
        f(&mut next);
        self.db.put(SANDBOXES, &next.id, &next)?;
        self.annotate(&next);
        *rec = next.clone();
        Ok(next)
    }

    fn insert(&self, rec: SandboxRecord) -> Result<Arc<Sandbox>, E2bError> {
        self.db.put(SANDBOXES, &rec.id, &rec)?;
        self.annotate(&rec);
        let s = Arc::new(Sandbox::new(rec.clone()));
        lock(&self.sandboxes).insert(rec.id, s.clone());
        Ok(s)
    }

    /// The record as its session's annotation (a session already gone has nothing to carry it).
    fn annotate(&self, rec: &SandboxRecord) {
        let text = serde_json::to_string(rec).unwrap_or_default();
        match self.sessions.annotate(&rec.id, ANNOTATION, Some(text)) {
            Ok(_) | Err(crate::services::sessions::SessionError::NotFound(_)) => {}
            Err(e) => warn!(sandbox = %rec.id, error = %e, "could not keep the E2B record with its session"),
        }
    }

    /// Forgets a sandbox (its session is deleted by the caller).
    fn forget(&self, id: &str) {
        if let Some(s) = lock(&self.sandboxes).remove(id) {
            s.release();
        }
        if let Err(e) = self.db.delete(SANDBOXES, id) {
            warn!(sandbox = %id, error = %e, "could not delete an E2B sandbox's record");
        }
    }

    /// Kills a sandbox: its session and everything of it. `false`: no such sandbox.
    pub async fn kill(&self, id: &str) -> Result<bool, E2bError> {
        let Some(sbx) = self.local(id) else { return Ok(false) };
        sbx.release();
        match self.sessions.delete(id).await {
            Ok(()) => {}
            Err(crate::services::sessions::SessionError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.forget(id);
        info!(sandbox = %id, "E2B sandbox killed");
        Ok(true)
    }

    /// Kills a sandbox wherever it is known ([`E2b::sandbox`]: on a fleet's host, one this host does not hold).
    pub async fn kill_anywhere(&self, id: &str) -> Result<bool, E2bError> {
        if self.sandbox(id).await.is_none() {
            return Ok(false);
        }
        self.kill(id).await
    }

    /// Every second: sandboxes past their deadline are killed, or paused (`on_timeout: pause`).
    fn start_deadlines(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.tasks.spawn_loop(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(e) = me.upgrade() else { return };
                let now = now_unix_ms();
                let fleet = e.sessions.cross_host().await;
                for sbx in e.sandboxes() {
                    let rec = lock(&sbx.rec).clone();
                    if rec.end_unix_ms > now || (rec.paused && rec.on_timeout == OnTimeout::Pause) {
                        continue;
                    }
                    // In a fleet a host acts only on the sandboxes it holds (its record of another may be stale);
                    // one that nobody holds (paused) is looked up in the fleet's record, which kills it there if
                    // its deadline passed there too.
                    if fleet && !e.sessions.held_here(&rec.id) {
                        if rec.on_timeout == OnTimeout::Kill {
                            drop(e.sandbox(&rec.id).await);
                        }
                        continue;
                    }
                    let done = match rec.on_timeout {
                        OnTimeout::Kill => e.kill(&rec.id).await.map(drop),
                        OnTimeout::Pause => e.pause(&rec.id).await.map(drop),
                    };
                    match done {
                        Ok(()) => {
                            info!(sandbox = %rec.id, action = ?rec.on_timeout, "E2B sandbox reached its deadline")
                        }
                        Err(err) => {
                            warn!(sandbox = %rec.id, error = %err.message, "E2B sandbox deadline action failed")
                        }
                    }
                }
            }
        });
    }

    /// Pauses (hibernates) a sandbox. `Ok(false)`: it was paused already. The record says paused before the
    /// hibernation, which carries it to whichever host wakes the sandbox next.
    pub async fn pause(&self, id: &str) -> Result<bool, E2bError> {
        let sbx = self.sandbox(id).await.ok_or_else(|| E2bError::new(404, format!("sandbox {id} not found")))?;
        if lock(&sbx.rec).paused {
            return Ok(false);
        }
        sbx.release();
        self.update(&sbx, |r| r.paused = true)?;
        if let Err(e) = self.sessions.hibernate(id).await {
            self.update(&sbx, |r| r.paused = false)?;
            return Err(e.into());
        }
        Ok(true)
    }
}

/// A new sandbox id: lowercase letters and digits only (E2B's own host parser splits on `-`).
fn new_id() -> String {
    let mut r = [0u8; 10];
    let _ = getrandom::getrandom(&mut r);
    format!("i{}", r.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in ms.
pub fn rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_times_are_what_the_sdk_parses() {
        let id = new_id();
        assert!(id.len() == 21 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{id}");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_405_275_240), "2026-12-04T17:27:55.240Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
