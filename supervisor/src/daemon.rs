//! flintd's composition: the VM layer and the services on it, wired once, and the few workflows that span
//! services (a call that names a VM or a session, a template with its pool, a snapshot some service may hold).
//! This is the only `impl Daemon`; everything else lives in the layer or service it belongs to.
//!
//! ```text
//!   api/ (HTTP edge)        net::front (exposed ports)        e2b/ (E2B edge)
//!          \                         |                          /
//!           `--------------------- Daemon ---------------------'
//!                 |          |          |          |         |
//!              sessions -> pools -> templates    network   images
//!                 \__________\__________\___________|_________/
//!                                    vm::Manager
//!                     launcher (flint-vmm) · net (netns, nft, DNS) · store · db
//! ```
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use flint_agent::client::AgentClient;
use flint_snapshot_store::Store;

use crate::config::Config;
use crate::db::Db;
use crate::error::{Classify, Kind, Refusal};
use crate::launcher::{Launcher, ProcessLauncher};
use crate::net::Networks;
use crate::services::images::Images;
use crate::services::network::NetworkService;
use crate::services::pools::Pools;
use crate::services::sessions::{Activity, SessionError, Sessions};
use crate::services::templates::{CreateTemplate, TemplateError, TemplateRecord, Templates};
use crate::tasks::Tasks;
use crate::vm::{self, VmError};

pub struct Daemon {
    pub cfg: Arc<Config>,
    pub db: Arc<Db>,
    pub store: Store,
    pub vms: Arc<vm::Manager>,
    pub templates: Arc<Templates>,
    pub pools: Arc<Pools>,
    pub sessions: Arc<Sessions>,
    pub network: NetworkService,
    pub images: Images,
    /// The E2B-compatible service (its endpoint listens only with `[e2b] listen`; its keys are managed either way).
    pub e2b: Arc<crate::e2b::E2b>,
    pub tasks: Tasks,
    /// API requests served (for /metrics).
    pub requests: AtomicU64,
}

/// Why flintd could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("snapshot store: {}", crate::error::store_message(.0))]
    Store(#[from] flint_snapshot_store::StoreError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("sessions: {0}")]
    Sessions(#[from] SessionError),
}

/// Why a call that names a VM or a session could not reach its VM.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no VM or session `{0}`{1}")]
    NotFound(String, String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("{0}")]
    Held(String),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Snapshot(#[from] vm::SnapshotError),
    #[error(transparent)]
    Delete(#[from] vm::SnapshotDeleteError),
    #[error(transparent)]
    Start(Box<vm::StartFailure>),
}

impl Classify for CallError {
    fn kind(&self) -> Kind {
        match self {
            CallError::NotFound(..) => Kind::NotFound,
            CallError::Vm(e) => e.kind(),
            CallError::Session(e) => e.kind(),
            CallError::Held(_) => Kind::Conflict,
            CallError::Template(e) => e.kind(),
            CallError::Snapshot(e) => e.kind(),
            CallError::Delete(e) => e.kind(),
            CallError::Start(e) => e.kind(),
        }
    }
}

/// The store configuration flintd's config describes (built in this one place).
pub fn store_config(cfg: &Config) -> Result<flint_snapshot_store::StoreConfig, OpenError> {
    let mut scfg = flint_snapshot_store::StoreConfig::new(&cfg.data_dir.join("store"));
    scfg.local_budget = cfg.store.local_budget_bytes;
    scfg.chunk_size = cfg.store.chunk_size;
    scfg.s3 = cfg.store.s3.clone();
    if let Some(f) = &cfg.store.secret_file {
        let io = |source| OpenError::Io { what: format!("read {}", f.display()), source };
        let text = std::fs::read_to_string(f).map_err(io)?;
        let secret = flint_snapshot_store::Secret::from_hex(&text)
            .map_err(|e| OpenError::Config(crate::config::ConfigError::Invalid(format!("{}: {e}", f.display()))))?;
        scfg.secret = Some(secret);
    }
    Ok(scfg)
}

impl Daemon {
    /// Opens the state and the store, claims the jail's uids, then re-adopts the VMs and sessions of the previous
    /// run. Must run inside a tokio runtime.
    pub fn open(cfg: Config) -> Result<Arc<Daemon>, OpenError> {
        cfg.check()?;
        let mut launcher = ProcessLauncher::new(cfg.vmm_bin(), cfg.jail.enabled.then(|| cfg.jail.clone()));
        launcher.claim_uids(&format!("pid {}, data dir {}", std::process::id(), cfg.data_dir.display()))?;
        Self::open_with(cfg, Arc::new(launcher))
    }

    pub fn open_with(cfg: Config, launcher: Arc<dyn Launcher>) -> Result<Arc<Daemon>, OpenError> {
        let net = Arc::new(Networks::new(cfg.network.clone(), &cfg.data_dir));
        Self::open_parts(cfg, launcher, net)
    }

    /// As [`Daemon::open_with`], on the given networks (unit tests give a fake host's).
    pub fn open_parts(cfg: Config, launcher: Arc<dyn Launcher>, net: Arc<Networks>) -> Result<Arc<Daemon>, OpenError> {
        use std::os::unix::fs::PermissionsExt;
        cfg.check()?;
        crate::private_umask();
        let io = |what: String| move |source| OpenError::Io { what, source };
        let vms_dir = cfg.data_dir.join("vms");
        std::fs::create_dir_all(&vms_dir).map_err(io(format!("create {}", vms_dir.display())))?;
        // Guest memory, snapshots and drives live here: only flintd's user may enter (even if it existed before).
        std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod 0700 {}", cfg.data_dir.display())))?;
        let db = Arc::new(Db::open(&cfg.data_dir.join("flintd.redb"))?);
        let store = Store::open(store_config(&cfg)?)?;
        let host = crate::services::sessions::host_id(&cfg).map_err(io("the host id".into()))?;
        let cfg = Arc::new(cfg);
        let tasks = Tasks::new();
        let vms = vm::Manager::open(cfg.clone(), db.clone(), store.clone(), launcher, net, tasks.clone())?;
        let templates = Arc::new(Templates::new(vms.clone(), db.clone()));
        let pools = Pools::open(vms.clone(), templates.clone(), cfg.pools.max_total, tasks.clone());
        let sessions = Sessions::open(
            cfg.clone(),
            db.clone(),
            vms.clone(),
            templates.clone(),
            pools.clone(),
            host,
            tasks.clone(),
        )?;
        let e2b = crate::e2b::E2b::open(
            cfg.clone(),
            db.clone(),
            sessions.clone(),
            templates.clone(),
            vms.clone(),
            tasks.clone(),
        )?;
        Ok(Arc::new(Daemon {
            e2b,
            network: NetworkService::new(cfg.clone(), vms.clone(), sessions.clone()),
            images: Images::new(vms.clone()),
            cfg,
            db,
            store,
            vms,
            templates,
            pools,
            sessions,
            tasks,
            requests: AtomicU64::new(0),
        }))
    }

    /// The VM a call names: a VM id, or a session id (woken first if it sleeps). The [`Activity`] keeps the
    /// session awake until dropped (a session's VM named directly counts as the session's activity too).
    pub async fn target(&self, id: &str) -> Result<(String, Option<Activity>), CallError> {
        if let Ok(v) = self.vms.get(id) {
            let activity = v
                .owner
                .as_ref()
                .filter(|o| o.kind == crate::services::sessions::OWNER)
                .and_then(|o| self.sessions.activity(&o.id));
            return Ok((id.to_string(), activity));
        }
        match self.sessions.awake(id).await? {
            Some((vm, activity)) => Ok((vm, Some(activity))),
            None => Err(CallError::NotFound(id.into(), self.sessions_elsewhere().await)),
        }
    }

    async fn sessions_elsewhere(&self) -> String {
        match self.sessions.coord_refusal().await {
            Some(e) => format!(" on this host (sessions do not move between hosts on this bucket: {e})"),
            None => String::new(),
        }
    }

    /// The agent of the VM a call names (see [`Daemon::target`]).
    pub async fn agent(&self, id: &str) -> Result<(Arc<AgentClient>, Option<Activity>), CallError> {
        let (vm, activity) = self.target(id).await?;
        Ok((self.vms.agent(&vm).await?, activity))
    }

    /// Boots a VM a caller asked for (its id, if given, is no session's, whatever the case).
    pub async fn create_vm(&self, req: vm::CreateVm) -> Result<vm::VmRecord, CallError> {
        if let Some(s) = req.id.as_deref().and_then(|id| self.sessions.find_id(id)) {
            return Err(CallError::Held(format!("`{s}` is a session id: calls could not tell them apart")));
        }
        self.vms.create(req, None).await.map_err(|e| CallError::Start(Box::new(e)))
    }

    /// Deletes a VM a caller started (a service's VM goes through its service).
    pub async fn delete_vm(&self, id: &str) -> Result<(), CallError> {
        if let Some(o) = self.vms.get(id)?.owner.filter(|o| o.kind == crate::services::sessions::OWNER) {
            return Err(CallError::Held(format!("VM `{id}` runs session `{}`: delete or hibernate the session", o.id)));
        }
        Ok(self.vms.delete(id).await?)
    }

    /// Snapshots a VM a caller started: a session's VM is snapshotted by its session (a snapshot restarts the
    /// dirty-page log its next hibernation's diff starts from).
    pub async fn snapshot_vm(
        &self,
        id: &str,
        req: vm::CreateSnapshot,
    ) -> Result<flint_snapshot_store::SnapshotInfo, CallError> {
        if let Some(o) = self.vms.get(id)?.owner.filter(|o| o.kind == crate::services::sessions::OWNER) {
            return Err(CallError::Held(format!(
                "VM `{id}` runs session `{}`: snapshot it with POST /v1/sessions/{}/fork or /hibernate",
                o.id, o.id
            )));
        }
        let how = vm::SnapshotHow { publish: req.publish, ..Default::default() };
        Ok(self.vms.snapshot(id, &req.id, &how).await?.0)
    }

    /// A template, then its warm pool.
    pub async fn create_template(&self, req: CreateTemplate) -> Result<TemplateRecord, TemplateError> {
        let t = self.templates.create(req, self.cfg.pools.max_total).await?;
        if t.pool_size > 0 {
            self.pools.refill(&t.name);
        }
        Ok(t)
    }

    /// Forgets a template (its snapshot stays) and deletes its warm pool's VMs.
    pub async fn delete_template(&self, name: &str) -> Result<(), TemplateError> {
        self.templates.delete(name)?;
        self.pools.drain(name, 0).await;
        Ok(())
    }

    /// Deletes a snapshot unless something still needs it: a template made from it, a session that wakes from
    /// it, a running VM restored lazily from it.
    pub async fn delete_snapshot(&self, id: &str, remote: bool) -> Result<(), CallError> {
        if let Some(t) = self.templates.using_snapshot(id)? {
            return Err(CallError::Held(format!("snapshot `{id}` is template `{t}`'s: delete the template first")));
        }
        if let Some(s) = self.sessions.uses_snapshot(id) {
            return Err(CallError::Held(format!(
                "snapshot `{id}` is session `{s}`'s (a wake restores it): delete the session first"
            )));
        }
        Ok(self.vms.delete_snapshot(id, remote).await?)
    }

    /// Stops accepting background work and waits up to `deadline` for what is in flight (VMs keep running).
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        self.tasks.shutdown(deadline).await
    }
}

/// The front end's view of the daemon: authorise a request for an exposed port from what this host knows
/// before anything wakes, then route it (a hibernated session is woken). A session this host does not know is
/// looked up in the bucket only for a request that presents a token (cross-host wake through the front end needs
/// the port's token).
pub struct FrontRoutes(pub std::sync::Weak<Daemon>);

impl FrontRoutes {
    async fn authorise(d: &Daemon, id: &str, port: u16, token: Option<&str>) -> Result<String, Refusal> {
        let denied = || Refusal::new(Kind::Unauthorized, format!("port {port} of `{id}` needs its access token"));
        let check = |e: &crate::net::ExposedPort| match (&e.token, token) {
            (None, _) => Ok(()),
            (Some(want), Some(t)) if crate::net::front::same(t, want) => Ok(()),
            (Some(_), Some(_)) => {
                Err(Refusal::new(Kind::Unauthorized, format!("wrong access token for port {port} of `{id}`")))
            }
            (Some(_), None) => Err(denied()),
        };
        let id = d.find_id(id).unwrap_or_else(|| id.to_string());
        match d.network.exposed(&id, port).map_err(Refusal::from)? {
            Some(e) => check(&e).map(|_| id),
            None if token.is_none() || !d.sessions.cross_host().await => {
                Err(Refusal::new(Kind::NotFound, format!("no VM or session `{id}` on this host")))
            }
            None => {
                let rec = d.sessions.get(&id).await.map_err(Refusal::from)?;
                let e = rec
                    .network
                    .as_ref()
                    .and_then(|n| n.ports.get(&port))
                    .ok_or_else(|| Refusal::new(Kind::NotFound, format!("port {port} of `{id}` is not exposed")))?;
                check(e).map(|_| id)
            }
        }
    }
}

impl crate::net::front::Resolve for FrontRoutes {
    fn resolve(
        &self,
        id: String,
        port: u16,
        token: Option<String>,
    ) -> crate::launcher::BoxFut<'_, Result<crate::net::front::Target, Refusal>> {
        Box::pin(async move {
            let d = self.0.upgrade().ok_or_else(|| Refusal::new(Kind::Unavailable, "flintd is stopping"))?;
            let routed = async {
                let id = Self::authorise(&d, &id, port, token.as_deref()).await?;
                // Authorised: now (and only now) a hibernated session wakes, and counts as active.
                let (vm, activity) = d.target(&id).await?;
                let route = d.vms.route(&vm, port)?;
                Ok::<_, Refusal>(crate::net::front::Target { addr: route.addr, guard: Box::new(activity), name: None })
            }
            .await;
            let c = &d.vms.net.counters;
            let counter = if routed.is_ok() { &c.front_routed } else { &c.front_refused };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            routed
        })
    }
}

impl Daemon {
    /// The VM or session id a name means, whatever its case (ids are unique case-insensitively; DNS names arrive
    /// lower-cased).
    pub fn find_id(&self, name: &str) -> Option<String> {
        if self.vms.contains(name) || self.sessions.session(name).is_some() {
            return Some(name.to_string());
        }
        self.vms.find_id(name).or_else(|| self.sessions.find_id(name))
    }
}
