//! Templates (SnapStart): boot an image, run an init command once, snapshot, delete the VM. Clones and sessions
//! start from the template's snapshot (or take a VM of its warm pool, `pools.rs`).
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::db::{Db, TEMPLATES};
use crate::error::{Classify, Kind};
use crate::vm::{self, CreateVm, DriveSpec, OwnerTag, SnapshotHow};

/// The owner tag of a template's build VM.
pub const OWNER: &str = "template";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub name: String,
    pub image: String,
    pub init: Vec<String>,
    pub snapshot: String,
    pub created_unix_ms: u64,
    pub boot_ms: f64,
    pub init_ms: f64,
    pub snapshot_ms: f64,
    /// Clones kept restored and paused for this template (its warm pool).
    #[serde(default)]
    pub pool_size: u32,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    pub name: String,
    #[serde(default)]
    pub image: Option<String>,
    /// Command run once in the fresh VM before the snapshot (e.g. warm up a runtime).
    #[serde(default)]
    pub init: Vec<String>,
    #[serde(default)]
    pub publish: bool,
    #[serde(default)]
    pub mem_mib: Option<u64>,
    #[serde(default)]
    pub vcpus: Option<u8>,
    /// A disk-rooted image's template: its writable disk's size (every clone's and session's quota), MiB.
    #[serde(default)]
    pub disk_mib: Option<u64>,
    /// Drives of the template's VM: their content at snapshot time is part of the snapshot, and every clone gets
    /// its own copy.
    #[serde(default)]
    pub drives: Vec<DriveSpec>,
    /// Clones to keep restored and paused for the template (its warm pool); 0: none.
    #[serde(default)]
    pub pool_size: u32,
    /// A CPU limit, a fraction of one core: the template's VM's, and its clones' and sessions' unless they ask.
    #[serde(default)]
    pub cpu: Option<f64>,
}

/// Why a template operation (or a clone of one) failed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("no template `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Exists(String),
    #[error("quota: {0}")]
    Quota(String),
    #[error("init command {argv:?} failed ({how}): {stderr}")]
    Init { argv: Vec<String>, how: String, stderr: String },
    #[error(transparent)]
    Start(#[from] vm::StartFailure),
    #[error(transparent)]
    Snapshot(#[from] vm::SnapshotError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error("{}", crate::error::store_message(.0))]
    Store(#[from] flint_snapshot_store::StoreError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
}

impl Classify for TemplateError {
    fn kind(&self) -> Kind {
        match self {
            TemplateError::NotFound(_) => Kind::NotFound,
            TemplateError::Invalid(_) | TemplateError::Init { .. } => Kind::Invalid,
            TemplateError::Exists(_) => Kind::Conflict,
            TemplateError::Quota(_) => Kind::Quota,
            TemplateError::Start(e) => e.kind(),
            TemplateError::Snapshot(e) => e.kind(),
            TemplateError::Vm(e) => e.kind(),
            TemplateError::Store(e) => e.kind(),
            TemplateError::Db(_) => Kind::Internal,
        }
    }
}

pub struct Templates {
    vms: Arc<vm::Manager>,
    db: Arc<Db>,
}

impl Templates {
    pub fn new(vms: Arc<vm::Manager>, db: Arc<Db>) -> Templates {
        Templates { vms, db }
    }

    pub fn list(&self) -> Result<Vec<TemplateRecord>, TemplateError> {
        Ok(self.db.all(TEMPLATES)?)
    }

    pub fn get(&self, name: &str) -> Result<TemplateRecord, TemplateError> {
        self.db.get(TEMPLATES, name)?.ok_or_else(|| TemplateError::NotFound(name.into()))
    }

    /// The template made from snapshot `id`, if any.
    pub fn using_snapshot(&self, id: &str) -> Result<Option<String>, TemplateError> {
        Ok(self.list()?.into_iter().find(|t| t.snapshot == id).map(|t| t.name))
    }

    pub(crate) fn put(&self, rec: &TemplateRecord) -> Result<(), TemplateError> {
        Ok(self.db.put(TEMPLATES, &rec.name, rec)?)
    }

    /// Forgets a template (its snapshot stays; its pool is the pools service's to drain).
    pub fn delete(&self, name: &str) -> Result<(), TemplateError> {
        self.get(name)?;
        Ok(self.db.delete(TEMPLATES, name)?)
    }

    /// SnapStart: boot an image, run the init command once, snapshot, (publish), delete the VM.
    pub async fn create(&self, req: CreateTemplate, max_pool: usize) -> Result<TemplateRecord, TemplateError> {
        vm::valid_id("template name", &req.name).map_err(|e| TemplateError::Invalid(e.to_string()))?;
        if req.pool_size as usize > max_pool {
            return Err(TemplateError::Quota(format!(
                "pool size {} is over pools.max_total = {max_pool}",
                req.pool_size
            )));
        }
        if self.get(&req.name).is_ok() {
            return Err(TemplateError::Exists(format!("template `{}` already exists", req.name)));
        }
        let snapshot = format!("tmpl-{}", req.name);
        if self.vms.store.manifest(&snapshot).await.is_ok() {
            return Err(TemplateError::Exists(format!("snapshot `{snapshot}` already exists")));
        }
        let create = CreateVm {
            image: req.image.clone(),
            mem_mib: req.mem_mib,
            vcpus: req.vcpus,
            drives: req.drives.clone(),
            disk_mib: req.disk_mib,
            cpu: req.cpu,
            ..Default::default()
        };
        let vm = self.vms.create(create, Some(OwnerTag::new(OWNER, &req.name))).await?;
        let result = self.init_and_snapshot(&req, &vm, &snapshot).await;
        if let Err(e) = self.vms.delete(&vm.id).await {
            warn!(vm = %vm.id, error = %e, "could not delete the template's build VM");
        }
        result
    }

    async fn init_and_snapshot(
        &self,
        req: &CreateTemplate,
        vm: &vm::VmRecord,
        snapshot: &str,
    ) -> Result<TemplateRecord, TemplateError> {
        let boot_ms = vm.timings.ready_ms.unwrap_or(0.0);
        let t = Instant::now();
        if !req.init.is_empty() {
            let agent = self.vms.agent(&vm.id).await?;
            let out = agent
                .exec_output(flint_agent::protocol::ExecRequest {
                    argv: req.init.clone(),
                    timeout_ms: Some(self.vms.cfg.agent_timeout_s * 1000),
                    ..Default::default()
                })
                .await
                .map_err(|e| vm::VmError::agent(&vm.id, "init command", &e))?;
            if out.code != Some(0) {
                return Err(TemplateError::Init {
                    argv: req.init.clone(),
                    how: out
                        .code
                        .map(|c| format!("exit {c}"))
                        .or(out.signal.map(|s| format!("signal {s}")))
                        .unwrap_or_else(|| "no exit status".into()),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
        }
        let init_ms = crate::ms_since(t);
        let t = Instant::now();
        self.vms.snapshot(&vm.id, snapshot, &SnapshotHow { publish: req.publish, ..Default::default() }).await?;
        let rec = TemplateRecord {
            name: req.name.clone(),
            image: vm.image.clone().unwrap_or_default(),
            init: req.init.clone(),
            snapshot: snapshot.to_string(),
            created_unix_ms: flint_vmm_api::now_unix_ms(),
            boot_ms,
            init_ms,
            snapshot_ms: crate::ms_since(t),
            pool_size: req.pool_size,
        };
        self.put(&rec)?;
        Ok(rec)
    }
}
