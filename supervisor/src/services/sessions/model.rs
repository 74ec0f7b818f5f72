//! Session records, their states and transitions, and the requests that make and change them.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Its first VM is being restored.
    Starting,
    /// A VM runs it.
    Running,
    /// Pre-stop, hooks, diff snapshot, store: on the way to `hibernated`.
    Hibernating,
    /// No process, no guest memory: only its snapshot in the store.
    Hibernated,
    /// Being restored from its last hibernation.
    Waking,
    /// Its VM was lost (or a step failed with nothing to go back to); a wake restores the last hibernation.
    Failed,
}

impl SessionState {
    pub const ALL: [SessionState; 6] = [
        SessionState::Starting,
        SessionState::Running,
        SessionState::Hibernating,
        SessionState::Hibernated,
        SessionState::Waking,
        SessionState::Failed,
    ];

    /// The transition table (deletion is not a state: a deleted session has no record).
    pub fn can_become(self, to: SessionState) -> bool {
        use SessionState::*;
        matches!(
            (self, to),
            (Starting, Running | Failed)
                | (Running, Hibernating | Failed)
                | (Hibernating, Hibernated | Running | Failed)
                | (Hibernated, Waking)
                | (Waking, Running | Hibernated | Failed)
                | (Failed, Waking)
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            SessionState::Starting => "starting",
            SessionState::Running => "running",
            SessionState::Hibernating => "hibernating",
            SessionState::Hibernated => "hibernated",
            SessionState::Waking => "waking",
            SessionState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    /// Snapshot (a diff on the last one) into the store and stop the VM; the next call wakes it.
    #[default]
    Hibernate,
    /// Delete the session.
    Stop,
}

/// A command run in the guest before every hibernation (flush a cache, close connections).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreStop {
    pub argv: Vec<String>,
    #[serde(default = "default_pre_stop_ms")]
    pub timeout_ms: u64,
}

fn default_pre_stop_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub state: SessionState,
    /// Template it was created from (if any) and the snapshot it first started from.
    pub template: Option<String>,
    pub origin: String,
    /// The snapshot a wake restores: its origin, then its latest hibernation (or fork point).
    pub base: String,
    /// Whether `base` was made for sessions (a hibernation or fork), so it is released when nothing uses it.
    #[serde(default)]
    pub base_owned: bool,
    /// The VM running it (while starting, running, hibernating).
    pub vm: Option<String>,
    pub idle_timeout_s: u64,
    pub ttl_s: Option<u64>,
    pub max_lifetime_s: Option<u64>,
    /// Whether hibernated time counts toward `ttl_s` (never toward `max_lifetime_s`, which is wall time).
    #[serde(default)]
    pub ttl_counts_hibernated: bool,
    pub on_idle: OnIdle,
    pub pre_stop: Option<PreStop>,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub created_unix_ms: u64,
    /// Milliseconds spent awake (running, hibernating or waking) before the current run began.
    pub awake_ms: u64,
    /// When the current run began (wall clock), while awake.
    pub awake_since_unix_ms: Option<u64>,
    pub hibernations: u64,
    pub wakes: u64,
    pub last_hibernate_ms: Option<f64>,
    pub last_wake_ms: Option<f64>,
    /// Bytes the last hibernation added to the store (new chunks only: the pages it dirtied).
    pub last_hibernate_stored_bytes: Option<u64>,
    /// Snapshots made for this session so far (names the next one).
    pub generation: u64,
    /// The highest lease epoch this session's record has seen (hosts sharing a bucket): a new claim's is higher.
    #[serde(default)]
    pub lease_epoch: u64,
    /// A hibernation in progress: the snapshot it is writing (a restart finishes or abandons it).
    pub pending_base: Option<String>,
    /// The next snapshot of the session must be full, not a diff: a snapshot that failed after the VMM read (and
    /// so restarted) its dirty-page log leaves no log that covers everything since the base.
    #[serde(default)]
    pub full_next: bool,
    /// Earlier bases of this session still in use when they were replaced (a lazily restored VM reads its
    /// memory from one); released once nothing uses them.
    #[serde(default)]
    pub stale_bases: Vec<String>,
    pub forked_from: Option<String>,
    pub error: Option<String>,
    /// The host (flintd) holding the session's lease in the bucket, when hosts share one.
    pub host: Option<String>,
    /// The network every VM of the session gets (egress policy, exposed ports): rebuilt at each wake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::net::NetworkRequest>,
    /// A CPU limit, a fraction of one core (default: the template's or snapshot's); kept across wakes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// What services built on sessions keep with them (the E2B endpoint's sandbox, under `e2b`): carried with
    /// the record wherever it goes, so a host that wakes the session elsewhere has it too. Not set by the API.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl SessionRecord {
    /// A new session's record, `starting` from `snapshot`.
    pub fn new(
        id: &str,
        req: &CreateSession,
        snapshot: String,
        idle_timeout_s: u64,
        base_owned: bool,
        forked_from: Option<String>,
        now: u64,
    ) -> SessionRecord {
        SessionRecord {
            id: id.to_string(),
            state: SessionState::Starting,
            template: req.template.clone(),
            origin: snapshot.clone(),
            base: snapshot,
            base_owned,
            vm: None,
            idle_timeout_s,
            ttl_s: req.ttl_s,
            max_lifetime_s: req.max_lifetime_s,
            ttl_counts_hibernated: req.ttl_counts_hibernated,
            on_idle: req.on_idle,
            pre_stop: req.pre_stop.clone(),
            env: req.env.clone(),
            metadata: req.metadata.clone(),
            cpu: req.cpu,
            created_unix_ms: now,
            awake_ms: 0,
            awake_since_unix_ms: Some(now),
            hibernations: 0,
            wakes: 0,
            last_hibernate_ms: None,
            last_wake_ms: None,
            last_hibernate_stored_bytes: None,
            generation: 0,
            lease_epoch: 0,
            pending_base: None,
            full_next: false,
            stale_bases: Vec::new(),
            forked_from,
            error: None,
            host: None,
            network: req.network.clone(),
            annotations: req.annotations.clone(),
        }
    }

    pub fn with_host(mut self, host: Option<String>) -> SessionRecord {
        self.host = host;
        self
    }

    /// The request that makes a child of this session (a fork): its settings, metadata and network, but no
    /// plain TCP port (a front-end port forwards to one session: the parent keeps its own).
    pub fn fork_request(&self, req: &ForkSession) -> CreateSession {
        let mut metadata = self.metadata.clone();
        metadata.extend(req.metadata.clone());
        CreateSession {
            template: self.template.clone(),
            snapshot: None,
            id: None,
            idle_timeout_s: Some(self.idle_timeout_s),
            ttl_s: self.ttl_s,
            max_lifetime_s: self.max_lifetime_s,
            ttl_counts_hibernated: self.ttl_counts_hibernated,
            env: self.env.clone(),
            cpu: self.cpu,
            network: self.network.clone().map(|mut n| {
                n.ports.values_mut().for_each(|e| e.tcp_listen = None);
                // A child's ports are its own: never the parent's tokens.
                n.with_new_tokens()
            }),
            metadata,
            on_idle: self.on_idle,
            pre_stop: self.pre_stop.clone(),
            // A fork is a new session: what a service kept with the parent is not the child's.
            annotations: BTreeMap::new(),
        }
    }

    /// Time counted toward `ttl_s` at `now`.
    pub fn ttl_used_ms(&self, now: u64) -> u64 {
        if self.ttl_counts_hibernated {
            now.saturating_sub(self.created_unix_ms)
        } else {
            self.awake_ms + self.awake_since_unix_ms.map_or(0, |s| now.saturating_sub(s))
        }
    }

    /// Why the session must end at `now`, if it must.
    pub fn expired(&self, now: u64) -> Option<String> {
        if let Some(max) = self.max_lifetime_s {
            if now.saturating_sub(self.created_unix_ms) >= max * 1000 {
                return Some(format!("max_lifetime_s {max} reached"));
            }
        }
        if let Some(ttl) = self.ttl_s {
            if self.ttl_used_ms(now) >= ttl * 1000 {
                let how = if self.ttl_counts_hibernated { "" } else { " (awake time)" };
                return Some(format!("ttl_s {ttl} reached{how}"));
            }
        }
        None
    }
}

impl crate::owner::Record for SessionRecord {
    type State = SessionState;
    const WHAT: &'static str = "session";
    fn key(&self) -> &str {
        &self.id
    }
    fn state(&self) -> SessionState {
        self.state
    }
    fn state_name(s: SessionState) -> &'static str {
        s.name()
    }
    fn can_become(from: SessionState, to: SessionState) -> bool {
        from.can_become(to)
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    /// No call and no running exec for this long → `on_idle` (default: flintd's `sessions.idle_timeout_s`).
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    #[serde(default)]
    pub ttl_s: Option<u64>,
    #[serde(default)]
    pub max_lifetime_s: Option<u64>,
    #[serde(default)]
    pub ttl_counts_hibernated: bool,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub on_idle: OnIdle,
    #[serde(default)]
    pub pre_stop: Option<PreStop>,
    /// A network of its own (kept across hibernations; a new address at each wake).
    #[serde(default)]
    pub network: Option<crate::net::NetworkRequest>,
    /// A CPU limit, a fraction of one core (0.01 up to its vCPUs; needs the jail); default: the template's.
    #[serde(default)]
    pub cpu: Option<f64>,
    /// The new record's annotations (services inside flintd only: never read from a request).
    #[serde(skip)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForkSession {
    #[serde(default = "one")]
    pub count: u32,
    /// Extra metadata for the new sessions (on top of the parent's).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

/// A session's entry in the bucket (`coord/sessions/<id>`), shared by every host: who runs it and until when,
/// and what a wake on any host needs. Changed only by compare-and-swap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionLease {
    /// The host running (or about to run) the session; `None` while it is hibernated.
    pub holder: Option<String>,
    /// The holder's claim lapses at this time unless renewed (a host that died loses the session).
    pub expires_unix_ms: u64,
    /// The fencing token: one more at every take-over of the lease, never less than any seen before. Snapshots
    /// published under a claim carry it in their names, so a host that lost its claim can never publish over
    /// the next holder's.
    #[serde(default)]
    pub epoch: u64,
    /// The session as of its last hibernation (its base is in the bucket).
    pub session: SessionRecord,
    /// The host that wrote this entry last (routers wake the session there if they can: its cache is warm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_holder: Option<String>,
}

/// Most bytes of metadata (keys and values together) a session may carry.
pub const MAX_METADATA_BYTES: usize = 16 << 10;
/// Longest session id (VM and snapshot ids are made from it).
pub const MAX_SESSION_ID: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_table() {
        use SessionState::*;
        for s in SessionState::ALL {
            assert!(!s.can_become(s), "{s:?} -> itself is not a transition");
        }
        // Every state but the transient ones can reach running again.
        assert!(Hibernated.can_become(Waking) && Waking.can_become(Running));
        assert!(Failed.can_become(Waking));
        assert!(!Hibernated.can_become(Running), "a wake goes through waking");
        assert!(!Running.can_become(Hibernated), "a hibernation goes through hibernating");
        assert!(!Starting.can_become(Hibernating));
    }

    #[test]
    fn ttl_counts_awake_time_unless_asked() {
        let req = CreateSession { ttl_s: Some(10), max_lifetime_s: Some(100), ..Default::default() };
        let mut r = SessionRecord::new("s", &req, "o".into(), 1, false, None, 0);
        r.state = SessionState::Hibernated;
        r.awake_ms = 4_000;
        r.awake_since_unix_ms = None;
        // 50 s after creation, 4 s awake: hibernated time does not count.
        assert_eq!(r.expired(50_000), None);
        r.awake_since_unix_ms = Some(45_000);
        assert_eq!(r.expired(50_000), None, "4 + 5 s awake");
        assert!(r.expired(51_000).unwrap().contains("ttl_s 10"));
        r.ttl_counts_hibernated = true;
        r.awake_since_unix_ms = None;
        assert!(r.expired(10_000).unwrap().contains("ttl_s 10"));
        r.ttl_s = None;
        assert!(r.expired(100_000).unwrap().contains("max_lifetime_s 100"));
    }
}

/// A position in the session list's order (oldest first, then by id), written `<created_unix_ms>.<id>`: where a
/// page ends and the next one starts (`GET /v1/sessions?after=`). It names no session that must still exist: a
/// session deleted between two pages does not break the walk.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub created_unix_ms: u64,
    pub id: String,
}

impl Cursor {
    pub fn of(r: &SessionRecord) -> Cursor {
        Cursor { created_unix_ms: r.created_unix_ms, id: r.id.clone() }
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_unix_ms, self.id)
    }
}

/// A cursor that is not `<created_unix_ms>.<id>`.
#[derive(Debug, thiserror::Error)]
#[error("bad list cursor `{0}`: `after` takes the `Flint-Next-After` header of the previous page")]
pub struct BadCursor(pub String);

impl std::str::FromStr for Cursor {
    type Err = BadCursor;
    fn from_str(s: &str) -> Result<Cursor, BadCursor> {
        let (ms, id) = s.split_once('.').ok_or_else(|| BadCursor(s.to_string()))?;
        match ms.parse() {
            Ok(created_unix_ms) if !id.is_empty() => Ok(Cursor { created_unix_ms, id: id.to_string() }),
            _ => Err(BadCursor(s.to_string())),
        }
    }
}

/// One page of the session list: after a cursor (none: from the start), at most `limit` sessions (none: all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub after: Option<Cursor>,
    pub limit: Option<usize>,
}

/// The header of a session list's page that names where the next page starts (absent: the last page).
pub const NEXT_AFTER: &str = "flint-next-after";

/// The most sessions one page may ask for.
pub const MAX_PAGE: usize = 10_000;
