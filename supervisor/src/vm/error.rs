//! The VM layer's errors, one type per kind of operation: a start (boot or restore), a snapshot, and the rest
//! (pause, resume, delete, agent calls, mounts, network changes). Each says what kind of failure it is
//! ([`Classify`]); the edges map that to a status.
use flint_snapshot_store::StoreError;

use super::model::VmStatus;
use crate::error::{Classify, Kind};
use crate::owner::CommitError;

/// Why a VM could not be started (booted or restored). Nothing of it is left behind: no process, network,
/// cgroup, disk or record.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A bad request: nothing was started.
    #[error("{0}")]
    Invalid(String),
    #[error("VM `{0}` already exists")]
    Exists(String),
    #[error("quota: {0}")]
    Quota(String),
    #[error("{0}")]
    Image(#[from] crate::image::ImageError),
    /// The snapshot needs an image this host does not have.
    #[error("{0}")]
    MissingImage(String),
    #[error(transparent)]
    Meta(#[from] super::meta::MetaError),
    #[error("{}", crate::error::store_message(.0))]
    Store(#[from] StoreError),
    #[error("network: {0}")]
    Network(#[from] crate::net::NetError),
    #[error("network: {0}")]
    Policy(#[from] crate::net::PolicyError),
    #[error(transparent)]
    Forward(#[from] crate::net::forward::ForwardError),
    #[error(transparent)]
    Vmm(#[from] crate::launcher::VmmError),
    #[error(transparent)]
    Pager(#[from] crate::pager::PagerError),
    /// The VMM exited while the VM was starting.
    #[error("VM `{id}` failed while starting: {why}")]
    Died { id: String, why: String },
    #[error("VM `{id}`: the agent did not answer within {secs}s: {why}")]
    AgentSilent { id: String, secs: u64, why: String },
    #[error("VM `{id}`: {what}: {why}")]
    Agent { id: String, what: &'static str, why: String },
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] flint_vmm_api::config::ConfigError),
}

impl Classify for StartError {
    fn kind(&self) -> Kind {
        use StartError as E;
        match self {
            E::Invalid(_) | E::Policy(_) | E::Config(_) => Kind::Invalid,
            E::Exists(_) | E::MissingImage(_) => Kind::Conflict,
            E::Quota(_) => Kind::Quota,
            E::Image(e) => e.kind(),
            E::Meta(e) => e.kind(),
            E::Store(e) => e.kind(),
            E::Network(e) => e.kind(),
            E::Forward(e) => e.kind(),
            E::Vmm(e) => e.kind(),
            E::Pager(e) => e.kind(),
            E::Died { .. } | E::AgentSilent { .. } | E::Agent { .. } => Kind::Guest,
            E::Commit(e) => e.kind(),
            E::Db(_) | E::Io { .. } => Kind::Internal,
        }
    }
}

/// Why a snapshot could not be taken. The VM keeps running (or stays paused when it was to stop anyway).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("VM `{id}`: before-checkpoint hook: {why}")]
    Hook { id: String, why: String },
    #[error(transparent)]
    Vmm(#[from] crate::launcher::VmmError),
    #[error("{}", crate::error::store_message(.0))]
    Store(#[from] StoreError),
    /// The VMM's files for the snapshot are not what flintd asked for (a link, a FIFO, a wrong drive count).
    #[error("VM `{id}`: {why}")]
    Files { id: String, why: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

impl Classify for SnapshotError {
    fn kind(&self) -> Kind {
        match self {
            SnapshotError::Invalid(_) => Kind::Invalid,
            SnapshotError::Vm(e) => e.kind(),
            SnapshotError::Hook { .. } | SnapshotError::Files { .. } => Kind::Guest,
            SnapshotError::Vmm(e) => e.kind(),
            SnapshotError::Store(e) => e.kind(),
            SnapshotError::Io { .. } => Kind::Internal,
        }
    }
}

/// Why an operation on an existing VM (pause, resume, delete, an agent call, a mount, a network change) failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no VM `{0}`")]
    NotFound(String),
    /// Something of the VM the call names is not there (a mount, an exposed port).
    #[error("{0}")]
    Missing(String),
    #[error("VM `{id}` is {}, not {want}", status.name())]
    WrongStatus { id: String, status: VmStatus, want: &'static str },
    #[error("{0}")]
    Invalid(String),
    /// The VM belongs to a service (a session, a pool): the caller must go through it.
    #[error("{0}")]
    Owned(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Vmm(#[from] crate::launcher::VmmError),
    /// The guest's agent failed the call (or could not be reached).
    #[error("VM `{id}`: {what}: {why}")]
    Agent { id: String, what: String, why: String, code: Option<flint_agent::protocol::ErrorCode> },
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error("network: {0}")]
    Network(#[from] crate::net::NetError),
    #[error("network: {0}")]
    Policy(#[from] crate::net::PolicyError),
    #[error(transparent)]
    Forward(#[from] crate::net::forward::ForwardError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

impl Classify for VmError {
    fn kind(&self) -> Kind {
        use flint_agent::protocol::ErrorCode as C;
        match self {
            VmError::NotFound(_) | VmError::Missing(_) => Kind::NotFound,
            VmError::WrongStatus { .. } | VmError::Owned(_) | VmError::Conflict(_) => Kind::Conflict,
            VmError::Invalid(_) | VmError::Policy(_) => Kind::Invalid,
            VmError::Vmm(e) => e.kind(),
            VmError::Agent { code: Some(C::NotFound), .. } => Kind::NotFound,
            VmError::Agent { code: Some(C::TooLarge), .. } => Kind::TooLarge,
            VmError::Agent { code: Some(C::Invalid | C::BadPath | C::NotADirectory | C::IsADirectory), .. } => {
                Kind::Invalid
            }
            VmError::Agent { code: Some(_), .. } => Kind::Conflict,
            VmError::Agent { code: None, .. } => Kind::Guest,
            VmError::Commit(e) => e.kind(),
            VmError::Network(e) => e.kind(),
            VmError::Forward(e) => e.kind(),
            VmError::Image(e) => e.kind(),
            VmError::Io { .. } => Kind::Internal,
        }
    }
}

impl VmError {
    /// An agent call's failure, with the agent's error code when it answered with one.
    pub fn agent(id: &str, what: impl Into<String>, e: &flint_agent::client::ClientError) -> VmError {
        VmError::Agent { id: id.to_string(), what: what.into(), why: e.to_string(), code: e.code() }
    }
}
