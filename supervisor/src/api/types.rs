//! What flintd's API answers, beyond the records of the layers and services (`vm::VmRecord`,
//! `sessions::SessionRecord`, ...): typed here once, for the server, the client library, the CLI, the tests and
//! the benches alike (docs/api/flintd.yaml describes the same shapes).
use serde::{Deserialize, Serialize};

/// Every error answer: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub vms: usize,
    pub sessions: usize,
    pub s3: bool,
    pub host: String,
    /// Whether sessions move between the hosts of the bucket: `on`, `off` (see `cross_host_refused`), or
    /// `unknown` until the bucket is first probed.
    pub cross_host: String,
    /// Why they do not, when the bucket refused (it ignores conditional writes, or this host's id is another's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_host_refused: Option<String>,
    /// Idle standby VMMs per guest memory size (MiB, as a string key); empty when standbys are off.
    #[serde(default)]
    pub standby: std::collections::BTreeMap<String, usize>,
}

/// `PUT /v1/vms/{id}/files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWritten {
    pub path: String,
    pub bytes: u64,
}

/// `DELETE /v1/store/cache`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheCleared {
    pub deleted_chunks: u64,
}

/// `POST /v1/templates/{name}/pool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSize {
    pub size: u32,
}

/// `POST /v1/vms/{id}/run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunCode {
    #[serde(default = "python")]
    pub language: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

fn python() -> String {
    "python".into()
}

/// How an exec ended (the last line of an exec's answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// The agent's own time for the exec.
    #[serde(default)]
    pub guest_ms: Option<f64>,
    /// flintd's wait for the agent: sent → exit read.
    #[serde(default)]
    pub agent_ms: Option<f64>,
}

impl ExecExit {
    /// The exit code a shell would show (128 + signal for a signal).
    pub fn shell_code(&self) -> i32 {
        self.code.unwrap_or(128 + self.signal.unwrap_or(0))
    }
}

/// One line of an exec's NDJSON answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecLine {
    Stdout(String),
    Stderr(String),
    Exit(ExecExit),
    /// The exec failed after the answer began: the last line.
    Error(String),
}

/// How a run of code ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub status: flint_agent::protocol::RunStatus,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub error: Option<flint_agent::protocol::RunError>,
    #[serde(default)]
    pub restarted: bool,
    #[serde(default)]
    pub guest_ms: Option<f64>,
    #[serde(default)]
    pub agent_ms: Option<f64>,
}

impl RunResult {
    /// `flint run`'s exit code: 0 ok, 1 an exception, 124 a timeout.
    pub fn exit_code(&self) -> i32 {
        match self.status {
            flint_agent::protocol::RunStatus::Ok => 0,
            flint_agent::protocol::RunStatus::Timeout => 124,
            flint_agent::protocol::RunStatus::Error => 1,
        }
    }
}

/// One line of a run's NDJSON answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunLine {
    Stdout(String),
    Stderr(String),
    Result(RunResult),
    Error(String),
}
