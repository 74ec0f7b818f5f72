//! The typed client of flintd's API: request and response types are the server's own (`vm`, `services`,
//! `api::types`), NDJSON answers arrive as [`ExecLine`]/[`RunLine`] events, errors as [`ClientError`]. The `flint`
//! CLI, the end-to-end tests, `flint-bench` and `flint-demo` all use it.
pub mod progress;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use flint_snapshot_store::{PublishReport, SnapshotInfo};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use crate::api::types::*;
use crate::net::{EgressPolicy, ExposedPort};
use crate::services::images::{ImageInfo, ImportImage, ImportReport};
use crate::services::network::NetworkView;
use crate::services::pools::CreateClones;
use crate::services::sessions::{CreateSession, ForkSession, SessionRecord};
use crate::services::templates::{CreateTemplate, TemplateRecord};
use crate::vm::{CreateSnapshot, CreateVm, VmDetail, VmRecord, VolumeMount};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0} (is flintd running? set FLINT_SOCKET or --socket)")]
    Connect(#[from] crate::http::HttpError),
    /// flintd answered with an error status.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("flintd sent invalid JSON: {0}")]
    Decode(String),
    /// A streamed answer ended with an error line.
    #[error("{0}")]
    Stream(String),
}

impl ClientError {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Percent-encodes a path segment or query value.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The message of an error answer's body (`{"error": ...}`), else the body as text.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body).map(|e| e.error).unwrap_or_else(|_| String::from_utf8_lossy(body).into())
}

/// A client of one flintd's Unix-socket API, or of a router or a host's cluster listener by URL.
#[derive(Clone, Debug)]
pub struct Client {
    pub target: crate::http::Target,
    /// Whole-call deadline (templates boot a VM, clones restore many: minutes on a slow host).
    pub timeout: Duration,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client { target: crate::http::Target::Unix(socket.into()), timeout: Duration::from_secs(3600) }
    }

    /// A client of the API at `target` (`flint --url`).
    pub fn with_target(target: crate::http::Target) -> Client {
        Client { target, timeout: Duration::from_secs(3600) }
    }

    /// One call; the raw body of a success.
    pub async fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Vec<u8>, ClientError> {
        let (status, out) = crate::http::request(&self.target, method, path, body, self.timeout).await?;
        if status >= 300 {
            return Err(ClientError::Api { status, message: error_message(&out) });
        }
        Ok(out)
    }

    /// One call with a JSON body (or none) and a JSON answer.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let body = body.map(serde_json::to_vec).transpose().map_err(|e| ClientError::Decode(e.to_string()))?;
        let out = self.raw(method, path, body.as_deref()).await?;
        serde_json::from_slice(&out).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// One call answered with no body (204).
    async fn call_empty(&self, method: &str, path: &str) -> Result<(), ClientError> {
        self.raw(method, path, None).await.map(drop)
    }

    /// The fleet's hosts (a router's `GET /v1/hosts`).
    pub async fn hosts(&self) -> Result<Vec<crate::cluster::HostInfo>, ClientError> {
        self.call("GET", "/v1/hosts", None::<&()>).await
    }

    /// Drains a host (`on`) or takes it back into placement.
    pub async fn drain_host(
        &self,
        host: &str,
        on: bool,
    ) -> Result<crate::services::sessions::DrainReport, ClientError> {
        let verb = if on { "drain" } else { "undrain" };
        self.call("POST", &format!("/v1/hosts/{}/{verb}", enc(host)), None::<&()>).await
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.call("GET", "/v1/health", None::<&()>).await
    }

    pub async fn images(&self) -> Result<Vec<ImageInfo>, ClientError> {
        self.call("GET", "/v1/images", None::<&()>).await
    }

    pub async fn import_image(&self, req: &ImportImage) -> Result<ImportReport, ClientError> {
        self.call("POST", "/v1/images", Some(req)).await
    }

    pub async fn vms(&self) -> Result<Vec<VmRecord>, ClientError> {
        self.call("GET", "/v1/vms", None::<&()>).await
    }

    pub async fn create_vm(&self, req: &CreateVm) -> Result<VmRecord, ClientError> {
        self.call("POST", "/v1/vms", Some(req)).await
    }

    pub async fn vm(&self, id: &str) -> Result<VmDetail, ClientError> {
        self.call("GET", &format!("/v1/vms/{}", enc(id)), None::<&()>).await
    }

    pub async fn delete_vm(&self, id: &str) -> Result<(), ClientError> {
        self.call_empty("DELETE", &format!("/v1/vms/{}", enc(id))).await
    }

    pub async fn pause_vm(&self, id: &str) -> Result<VmRecord, ClientError> {
        self.call("POST", &format!("/v1/vms/{}/pause", enc(id)), None::<&()>).await
    }

    pub async fn resume_vm(&self, id: &str) -> Result<VmRecord, ClientError> {
        self.call("POST", &format!("/v1/vms/{}/resume", enc(id)), None::<&()>).await
    }

    /// A POST answered with NDJSON lines, each handed to `on_line` as it arrives; an HTTP error is the `Err`.
    async fn ndjson<L: DeserializeOwned>(
        &self,
        path: &str,
        body: &[u8],
        mut on_line: impl FnMut(L),
    ) -> Result<(), ClientError> {
        let mut pending: Vec<u8> = Vec::new();
        let mut undecodable = Vec::new();
        let status = crate::http::request_stream(&self.target, "POST", path, Some(body), |data| {
            pending.extend_from_slice(data);
            while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                match serde_json::from_slice::<L>(&line) {
                    Ok(l) => on_line(l),
                    Err(_) => undecodable.extend_from_slice(&line),
                }
            }
            if pending.len() > 1 << 20 {
                undecodable.append(&mut pending);
            }
        })
        .await?;
        undecodable.extend_from_slice(&pending);
        if status >= 300 {
            return Err(ClientError::Api { status, message: error_message(&undecodable) });
        }
        Ok(())
    }

    /// Runs a command; every output line goes to `on_line` as it comes. The exit, or the stream's error.
    pub async fn exec(
        &self,
        id: &str,
        req: &flint_agent::protocol::ExecRequest,
        mut on_line: impl FnMut(&ExecLine),
    ) -> Result<ExecExit, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        let mut end: Option<Result<ExecExit, ClientError>> = None;
        self.ndjson(&format!("/v1/vms/{}/exec", enc(id)), &body, |l: ExecLine| {
            on_line(&l);
            match l {
                ExecLine::Exit(e) => end = Some(Ok(e)),
                ExecLine::Error(e) => end = Some(Err(ClientError::Stream(e))),
                _ => {}
            }
        })
        .await?;
        end.unwrap_or_else(|| Err(ClientError::Stream("the exec's answer ended before its exit status".into())))
    }

    /// A command's whole output and exit.
    pub async fn exec_output(&self, id: &str, argv: &[&str]) -> Result<(ExecExit, String, String), ClientError> {
        let req = flint_agent::protocol::ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let (mut out, mut err) = (String::new(), String::new());
        let exit = self
            .exec(id, &req, |l| match l {
                ExecLine::Stdout(s) => out.push_str(s),
                ExecLine::Stderr(s) => err.push_str(s),
                _ => {}
            })
            .await?;
        Ok((exit, out, err))
    }

    /// Runs code in a warm runner; every output line goes to `on_line`. The result, or the stream's error.
    pub async fn run(
        &self,
        id: &str,
        req: &RunCode,
        mut on_line: impl FnMut(&RunLine),
    ) -> Result<RunResult, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        let mut end: Option<Result<RunResult, ClientError>> = None;
        self.ndjson(&format!("/v1/vms/{}/run", enc(id)), &body, |l: RunLine| {
            on_line(&l);
            match l {
                RunLine::Result(r) => end = Some(Ok(r)),
                RunLine::Error(e) => end = Some(Err(ClientError::Stream(e))),
                _ => {}
            }
        })
        .await?;
        end.unwrap_or_else(|| Err(ClientError::Stream("the run's answer ended before its result".into())))
    }

    pub async fn mount(&self, id: &str, m: &VolumeMount) -> Result<VmRecord, ClientError> {
        self.call("POST", &format!("/v1/vms/{}/mounts", enc(id)), Some(m)).await
    }

    pub async fn unmount(&self, id: &str, path: &str) -> Result<VmRecord, ClientError> {
        self.call("DELETE", &format!("/v1/vms/{}/mounts?path={}", enc(id), enc(path)), None::<&()>).await
    }

    pub async fn read_file(&self, id: &str, path: &str, limit: Option<u64>) -> Result<Vec<u8>, ClientError> {
        let limit = limit.map(|l| format!("&limit={l}")).unwrap_or_default();
        self.raw("GET", &format!("/v1/vms/{}/files?path={}{limit}", enc(id), enc(path)), None).await
    }

    pub async fn write_file(&self, id: &str, path: &str, mode: u32, data: &[u8]) -> Result<FileWritten, ClientError> {
        let out =
            self.raw("PUT", &format!("/v1/vms/{}/files?path={}&mode={mode:o}", enc(id), enc(path)), Some(data)).await?;
        serde_json::from_slice(&out).map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn snapshot_vm(&self, id: &str, req: &CreateSnapshot) -> Result<SnapshotInfo, ClientError> {
        self.call("POST", &format!("/v1/vms/{}/snapshots", enc(id)), Some(req)).await
    }

    pub async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, ClientError> {
        self.call("GET", "/v1/snapshots", None::<&()>).await
    }

    pub async fn delete_snapshot(&self, id: &str, remote: bool) -> Result<(), ClientError> {
        self.call_empty("DELETE", &format!("/v1/snapshots/{}?remote={remote}", enc(id))).await
    }

    pub async fn push_snapshot(&self, id: &str) -> Result<PublishReport, ClientError> {
        self.call("POST", &format!("/v1/snapshots/{}/push", enc(id)), None::<&()>).await
    }

    pub async fn pull_snapshot(&self, id: &str) -> Result<flint_snapshot_store::FetchReport, ClientError> {
        self.call("POST", &format!("/v1/snapshots/{}/pull", enc(id)), None::<&()>).await
    }

    pub async fn templates(&self) -> Result<Vec<TemplateRecord>, ClientError> {
        self.call("GET", "/v1/templates", None::<&()>).await
    }

    pub async fn create_template(&self, req: &CreateTemplate) -> Result<TemplateRecord, ClientError> {
        self.call("POST", "/v1/templates", Some(req)).await
    }

    pub async fn delete_template(&self, name: &str) -> Result<(), ClientError> {
        self.call_empty("DELETE", &format!("/v1/templates/{}", enc(name))).await
    }

    pub async fn set_pool(&self, name: &str, size: u32) -> Result<TemplateRecord, ClientError> {
        self.call("POST", &format!("/v1/templates/{}/pool", enc(name)), Some(&PoolSize { size })).await
    }

    pub async fn clones(&self, req: &CreateClones) -> Result<Vec<VmRecord>, ClientError> {
        self.call("POST", "/v1/clones", Some(req)).await
    }

    pub async fn sessions(&self, metadata: &BTreeMap<String, String>) -> Result<Vec<SessionRecord>, ClientError> {
        let q: Vec<String> = metadata.iter().map(|(k, v)| format!("metadata.{}={}", enc(k), enc(v))).collect();
        let path = if q.is_empty() { "/v1/sessions".to_string() } else { format!("/v1/sessions?{}", q.join("&")) };
        self.call("GET", &path, None::<&()>).await
    }

    pub async fn create_session(&self, req: &CreateSession) -> Result<SessionRecord, ClientError> {
        self.call("POST", "/v1/sessions", Some(req)).await
    }

    pub async fn session(&self, id: &str) -> Result<SessionRecord, ClientError> {
        self.call("GET", &format!("/v1/sessions/{}", enc(id)), None::<&()>).await
    }

    pub async fn delete_session(&self, id: &str) -> Result<(), ClientError> {
        self.call_empty("DELETE", &format!("/v1/sessions/{}", enc(id))).await
    }

    pub async fn hibernate(&self, id: &str) -> Result<SessionRecord, ClientError> {
        self.call("POST", &format!("/v1/sessions/{}/hibernate", enc(id)), None::<&()>).await
    }

    pub async fn wake(&self, id: &str) -> Result<SessionRecord, ClientError> {
        self.call("POST", &format!("/v1/sessions/{}/wake", enc(id)), None::<&()>).await
    }

    pub async fn fork(&self, id: &str, req: &ForkSession) -> Result<Vec<SessionRecord>, ClientError> {
        self.call("POST", &format!("/v1/sessions/{}/fork", enc(id)), Some(req)).await
    }

    pub async fn network(&self, id: &str) -> Result<NetworkView, ClientError> {
        self.call("GET", &format!("/v1/vms/{}/network", enc(id)), None::<&()>).await
    }

    pub async fn set_egress(&self, id: &str, policy: &EgressPolicy) -> Result<NetworkView, ClientError> {
        self.call("PUT", &format!("/v1/vms/{}/network/egress", enc(id)), Some(policy)).await
    }

    pub async fn expose_port(&self, id: &str, port: u16, e: &ExposedPort) -> Result<NetworkView, ClientError> {
        self.call("PUT", &format!("/v1/vms/{}/ports/{port}", enc(id)), Some(e)).await
    }

    pub async fn hide_port(&self, id: &str, port: u16) -> Result<NetworkView, ClientError> {
        self.call("DELETE", &format!("/v1/vms/{}/ports/{port}", enc(id)), None::<&()>).await
    }

    /// A new E2B API key (shown once).
    pub async fn create_e2b_key(&self, name: &str) -> Result<crate::e2b::keys::NewKey, ClientError> {
        self.call("POST", "/v1/e2b/keys", Some(&serde_json::json!({"name": name}))).await
    }

    pub async fn e2b_keys(&self) -> Result<Vec<crate::e2b::keys::KeyInfo>, ClientError> {
        self.call("GET", "/v1/e2b/keys", None::<&()>).await
    }

    pub async fn delete_e2b_key(&self, id: &str) -> Result<(), ClientError> {
        self.call_empty("DELETE", &format!("/v1/e2b/keys/{}", enc(id))).await
    }

    pub async fn clear_cache(&self) -> Result<CacheCleared, ClientError> {
        self.call("DELETE", "/v1/store/cache", None::<&()>).await
    }

    pub async fn metrics(&self) -> Result<String, ClientError> {
        Ok(String::from_utf8_lossy(&self.raw("GET", "/metrics", None).await?).into_owned())
    }

    /// Where the API answers.
    pub fn target(&self) -> &crate::http::Target {
        &self.target
    }
}
