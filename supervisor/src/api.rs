//! The flintd HTTP/JSON API over its Unix socket (docs/api/flintd.yaml).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::daemon::Daemon;
use crate::session::{CreateSession, ForkSession};
use crate::vm::model::{CreateClones, CreateSnapshot, CreateTemplate, CreateVm, OpError};

/// Every route: (method, path). The OpenAPI test checks docs/api/flintd.yaml against this and the live server.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/health"),
    ("get", "/v1/images"),
    ("post", "/v1/images"),
    ("get", "/v1/vms"),
    ("post", "/v1/vms"),
    ("get", "/v1/vms/{id}"),
    ("delete", "/v1/vms/{id}"),
    ("post", "/v1/vms/{id}/pause"),
    ("post", "/v1/vms/{id}/resume"),
    ("post", "/v1/vms/{id}/exec"),
    ("post", "/v1/vms/{id}/run"),
    ("post", "/v1/vms/{id}/mounts"),
    ("delete", "/v1/vms/{id}/mounts"),
    ("get", "/v1/vms/{id}/files"),
    ("put", "/v1/vms/{id}/files"),
    ("post", "/v1/vms/{id}/snapshots"),
    ("get", "/v1/vms/{id}/network"),
    ("put", "/v1/vms/{id}/network/egress"),
    ("put", "/v1/vms/{id}/ports/{port}"),
    ("delete", "/v1/vms/{id}/ports/{port}"),
    ("get", "/v1/snapshots"),
    ("delete", "/v1/snapshots/{id}"),
    ("post", "/v1/snapshots/{id}/push"),
    ("post", "/v1/snapshots/{id}/pull"),
    ("get", "/v1/templates"),
    ("post", "/v1/templates"),
    ("delete", "/v1/templates/{name}"),
    ("post", "/v1/templates/{name}/pool"),
    ("post", "/v1/clones"),
    ("get", "/v1/sessions"),
    ("post", "/v1/sessions"),
    ("get", "/v1/sessions/{id}"),
    ("delete", "/v1/sessions/{id}"),
    ("post", "/v1/sessions/{id}/hibernate"),
    ("post", "/v1/sessions/{id}/wake"),
    ("post", "/v1/sessions/{id}/fork"),
    ("delete", "/v1/store/cache"),
    ("get", "/metrics"),
];

pub struct ApiError(StatusCode, String);

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        let status = match &e {
            OpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            OpError::NotFound(_) => StatusCode::NOT_FOUND,
            OpError::Conflict(_) => StatusCode::CONFLICT,
            OpError::VmFailed(_) => StatusCode::BAD_GATEWAY,
            OpError::QuotaExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
            OpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            OpError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({"error": self.1}))).into_response()
    }
}

type R<T> = Result<T, ApiError>;
type D = State<Arc<Daemon>>;

/// Parses a JSON body with a message that says what is wrong (axum's own rejection is terse).
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { bytes };
    serde_json::from_slice(bytes).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")))
}

/// A JSON answer. Access tokens of exposed ports in records (`"token": "<secret>"`) are shown as `"(set)"`: a
/// listing is not a way to read another caller's token.
fn json<T: serde::Serialize>(v: T) -> Response {
    fn redact(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    if k == "token" && x.is_string() {
                        *x = serde_json::Value::String("(set)".into());
                    } else {
                        redact(x);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(redact),
            _ => {}
        }
    }
    match serde_json::to_value(v) {
        Ok(mut v) => {
            redact(&mut v);
            Json(v).into_response()
        }
        Err(e) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn created<T: serde::Serialize>(v: T) -> Response {
    let mut r = json(v);
    *r.status_mut() = StatusCode::CREATED;
    r
}

pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/images", get(images).post(import_image))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{id}/pause", post(pause_vm))
        .route("/v1/vms/{id}/resume", post(resume_vm))
        .route("/v1/vms/{id}/exec", post(exec))
        .route("/v1/vms/{id}/run", post(run_code))
        .route("/v1/vms/{id}/mounts", post(mount).delete(unmount))
        .route("/v1/vms/{id}/files", get(get_file).put(put_file))
        .route("/v1/vms/{id}/snapshots", post(snapshot_vm))
        .route("/v1/vms/{id}/network", get(get_network))
        .route("/v1/vms/{id}/network/egress", axum::routing::put(set_egress))
        .route("/v1/vms/{id}/ports/{port}", axum::routing::put(expose_port).delete(hide_port))
        .route("/v1/snapshots", get(list_snapshots))
        .route("/v1/snapshots/{id}", axum::routing::delete(delete_snapshot))
        .route("/v1/snapshots/{id}/push", post(push_snapshot))
        .route("/v1/snapshots/{id}/pull", post(pull_snapshot))
        .route("/v1/templates", get(list_templates).post(create_template))
        .route("/v1/templates/{name}", axum::routing::delete(delete_template))
        .route("/v1/templates/{name}/pool", post(set_pool))
        .route("/v1/clones", post(clones))
        .route("/v1/sessions", get(list_sessions).post(create_session))
        .route("/v1/sessions/{id}", get(get_session).delete(delete_session))
        .route("/v1/sessions/{id}/hibernate", post(hibernate_session))
        .route("/v1/sessions/{id}/wake", post(wake_session))
        .route("/v1/sessions/{id}/fork", post(fork_session))
        .route("/v1/store/cache", axum::routing::delete(clear_cache))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route (see docs/api/flintd.yaml)".into()) })
        .layer(axum::middleware::from_fn_with_state(d.clone(), count_requests))
        .with_state(d)
}

async fn count_requests(State(d): D, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    d.metrics.requests.fetch_add(1, Ordering::Relaxed);
    next.run(req).await
}

async fn health(State(d): D) -> Response {
    json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "vms": d.list().len(),
        "sessions": d.sessions.records().len(),
        "s3": d.store.has_remote(),
        "host": d.sessions.host,
    }))
}

async fn images(State(d): D) -> Response {
    json(
        d.images()
            .into_iter()
            .map(|(k, v)| match crate::image::Image::load(&k, &v) {
                Ok(img) => {
                    let (root, disk_mib) = match &img.root {
                        crate::image::Root::Initramfs => ("initramfs", None),
                        crate::image::Root::Disk { disk_mib, .. } => ("disk", Some(*disk_mib)),
                    };
                    serde_json::json!({"name": k, "dir": v, "root": root, "disk_mib": disk_mib, "runners": img.runners})
                }
                Err(e) => serde_json::json!({"name": k, "dir": v, "error": e}),
            })
            .collect::<Vec<_>>(),
    )
}

/// `POST /v1/vms/{id}/mounts`: a host directory into a running VM or session (woken first).
async fn mount(State(d): D, Path(id): Path<String>, b: Bytes) -> R<Response> {
    let m: crate::vm::model::VolumeMount = body(&b)?;
    let (vm, _activity) = d.awake_vm(&id).await?;
    Ok(created(d.mount(&vm, m).await?))
}

#[derive(Deserialize)]
struct MountQuery {
    #[serde(default)]
    path: Option<String>,
}

/// `DELETE /v1/vms/{id}/mounts?path=/mnt/x`.
async fn unmount(State(d): D, Path(id): Path<String>, Query(q): Query<MountQuery>) -> R<Response> {
    let path =
        q.path.ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "give the mount's guest path: ?path=/mnt/x".into()))?;
    let (vm, _activity) = d.awake_vm(&id).await?;
    Ok(json(d.unmount(&vm, &path).await?))
}

async fn import_image(State(d): D, b: Bytes) -> R<Response> {
    let req: crate::vm::model::ImportImage = body(&b)?;
    Ok(created(d.import_image(req).await?))
}

/// `POST /v1/vms/{id}/run`: code for one of the image's warm runners.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    #[serde(default = "python")]
    language: String,
    code: String,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

fn python() -> String {
    "python".into()
}

/// Streams NDJSON like an exec: `{"stdout": ...}` / `{"stderr": ...}` as the code prints, then
/// `{"result": {"status", "value", "error", "restarted", "guest_ms", "agent_ms"}}` (or `{"error": ...}`).
async fn run_code(State(d): D, Path(id): Path<String>, b: Bytes) -> R<Response> {
    let rb: RunBody = body(&b)?;
    if rb.code.len() > flint_agent::protocol::MAX_RUN_CODE {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("code of {} bytes: at most {}", rb.code.len(), flint_agent::protocol::MAX_RUN_CODE),
        ));
    }
    if rb.timeout_ms == Some(0) {
        return Err(ApiError(StatusCode::BAD_REQUEST, "timeout_ms must be at least 1".into()));
    }
    let (agent, activity) = d.call_agent(&id).await?;
    Ok(ndjson(move |out| async move {
        let _activity = activity; // the session is not idle while the code runs
        let req = flint_agent::protocol::RunRequest { language: rb.language, code: rb.code, timeout_ms: rb.timeout_ms };
        // agent_ms: sent → last answer read (the VMM's vsock device, the guest kernel, the agent).
        let sent = std::time::Instant::now();
        let mut stream = match agent.run_code_stream(req).await {
            Ok(s) => s,
            Err(e) => return out.error(&e).await,
        };
        loop {
            let v = match stream.next().await {
                Ok(Some(flint_agent::client::RunEvent::Stdout(b))) => {
                    serde_json::json!({"stdout": String::from_utf8_lossy(&b)})
                }
                Ok(Some(flint_agent::client::RunEvent::Stderr(b))) => {
                    serde_json::json!({"stderr": String::from_utf8_lossy(&b)})
                }
                Ok(Some(flint_agent::client::RunEvent::Done(r))) => serde_json::json!({"result": {
                    "status": r.status, "value": r.value, "error": r.error, "restarted": r.restarted,
                    "guest_ms": r.guest_us.map(|us| us as f64 / 1000.0),
                    "agent_ms": crate::ms_since(sent),
                }}),
                Ok(None) => return,
                Err(e) => return out.error(&e).await,
            };
            if !out.send(v).await {
                return;
            }
        }
    }))
}

/// An NDJSON answer (`application/x-ndjson`) whose lines `produce` sends from a task of its own: the body streams
/// as the lines come, through a bounded queue (a slow reader holds the producer back, not flintd's memory).
fn ndjson<F, Fut>(produce: F) -> Response
where
    F: FnOnce(Lines) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(produce(Lines(tx)));
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response()
}

/// The sending end of an [`ndjson`] answer.
struct Lines(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>);

impl Lines {
    /// Sends one line; false once the caller has gone away (the producer stops).
    async fn send(&self, v: serde_json::Value) -> bool {
        self.0.send(Ok(Bytes::from(format!("{v}\n")))).await.is_ok()
    }

    /// Ends the answer with `{"error": ...}` (the status line is long gone: an error is the last line).
    async fn error(&self, e: &impl std::fmt::Display) {
        self.send(serde_json::json!({"error": e.to_string()})).await;
    }
}

async fn list_vms(State(d): D) -> Response {
    json(d.list())
}

async fn create_vm(State(d): D, b: Bytes) -> R<Response> {
    let req: CreateVm = body(&b)?;
    Ok(created(d.create(req).await?))
}

/// The record, plus `vmm`: the VMM's own description (timings, restore breakdown, fault counters) while it runs.
async fn get_vm(State(d): D, Path(id): Path<String>) -> R<Response> {
    let rec = d.get(&id)?;
    let mut v = serde_json::to_value(&rec).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Some(vmm) = d.vmm_describe(&id).await {
        v["vmm"] = vmm;
    }
    Ok(json(v))
}

async fn delete_vm(State(d): D, Path(id): Path<String>) -> R<Response> {
    if let Some(s) = d.get(&id)?.session {
        return Err(OpError::Conflict(format!("VM `{id}` runs session `{s}`: delete or hibernate the session")).into());
    }
    d.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn pause_vm(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.pause(&id, true).await?))
}

async fn resume_vm(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.pause(&id, false).await?))
}

/// The `Upgrade` token of an interactive exec (docs/api/flintd.yaml): after `101 Switching Protocols` the
/// connection carries agent-protocol frames both ways.
pub const EXEC_UPGRADE: &str = "flint-exec";

/// Most bytes of an exec request body.
const MAX_EXEC_BODY: usize = 1 << 20;

/// Streams NDJSON: `{"stdout": "..."}` / `{"stderr": "..."}` chunks as they come, then `{"exit": {...}}`. With
/// `Upgrade: flint-exec`, an interactive exec instead (stdin, signals, a tty with resize) over the upgraded
/// connection.
async fn exec(State(d): D, Path(id): Path<String>, req: axum::extract::Request) -> R<Response> {
    let (mut parts, raw) = req.into_parts();
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(EXEC_UPGRADE));
    let b = axum::body::to_bytes(raw, MAX_EXEC_BODY)
        .await
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("request body (at most {MAX_EXEC_BODY} bytes): {e}")))?;
    // The body is the agent's own exec request (one type for both hops).
    let mut er: flint_agent::protocol::ExecRequest = body(&b)?;
    if er.argv.is_empty() {
        return Err(ApiError(StatusCode::BAD_REQUEST, "argv must not be empty".into()));
    }
    if let Some(t) = er.tty {
        if t.rows == 0 || t.cols == 0 {
            return Err(ApiError(StatusCode::BAD_REQUEST, "tty rows and cols must be at least 1".into()));
        }
    }
    if upgrade {
        let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>().ok_or_else(|| {
            ApiError(StatusCode::BAD_REQUEST, "this connection cannot be upgraded (HTTP/1.1 only)".into())
        })?;
        // A terminal is interactive by nature: its input is the caller's.
        er.stdin |= er.tty.is_some();
        let (agent, activity) = d.call_agent(&id).await?;
        tokio::spawn(async move {
            let _activity = activity; // the session is not idle while the exec runs
            match on_upgrade.await {
                Ok(up) => interactive_exec(agent, er, hyper_util::rt::TokioIo::new(up)).await,
                Err(e) => tracing::warn!(error = %e, "interactive exec: the upgrade failed"),
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, EXEC_UPGRADE)
            .body(Body::empty())
            .unwrap_or_default());
    }
    if er.stdin || er.tty.is_some() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("stdin and tty need an interactive exec: send `Connection: Upgrade` and `Upgrade: {EXEC_UPGRADE}`"),
        ));
    }
    // A session id wakes the session; its activity lasts as long as the exec's stream (not idle meanwhile).
    let (agent, activity) = d.call_agent(&id).await?;
    Ok(ndjson(move |out| async move {
        let _activity = activity;
        // agent_ms: sent → last answer read (the VMM's vsock device, the guest kernel, the agent).
        let sent = std::time::Instant::now();
        let mut stream = match agent.exec(er).await {
            Ok(s) => s,
            Err(e) => return out.error(&e).await,
        };
        loop {
            let v = match stream.next().await {
                Ok(Some(flint_agent::client::ExecEvent::Stdout(b))) => {
                    serde_json::json!({"stdout": String::from_utf8_lossy(&b)})
                }
                Ok(Some(flint_agent::client::ExecEvent::Stderr(b))) => {
                    serde_json::json!({"stderr": String::from_utf8_lossy(&b)})
                }
                Ok(Some(flint_agent::client::ExecEvent::Exit { code, signal, timed_out, guest_us })) => {
                    serde_json::json!({"exit": {
                        "code": code, "signal": signal, "timed_out": timed_out,
                        "guest_ms": guest_us.map(|us| us as f64 / 1000.0), "agent_ms": crate::ms_since(sent),
                    }})
                }
                Ok(None) => return,
                Err(e) => return out.error(&e).await,
            };
            if !out.send(v).await {
                return;
            }
        }
    }))
}

#[derive(Deserialize)]
struct FileQuery {
    path: String,
    #[serde(default)]
    mode: Option<String>,
    /// Read at most this many bytes (devices such as /dev/urandom never end).
    #[serde(default)]
    limit: Option<u64>,
}

/// An interactive exec over an upgraded connection: the caller sends STDIN and EOF frames and JSON `signal` /
/// `resize` requests; flintd sends STDOUT and STDERR frames, then one JSON `exit` (or `error`). The caller
/// hanging up sends the process SIGHUP, as a terminal's hangup would.
async fn interactive_exec<S>(
    agent: Arc<flint_agent::client::AgentClient>,
    er: flint_agent::protocol::ExecRequest,
    io: S,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use flint_agent::client::ExecEvent;
    use flint_agent::protocol::{kind, read_frame, write_frame, ErrorCode, Frame, Request, Response};
    use tokio::io::AsyncWriteExt;
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut stream = match agent.exec(er).await {
        Ok(s) => s,
        Err(e) => {
            let msg = Response::Error { code: e.code().unwrap_or(ErrorCode::Io), message: format!("agent: {e}") };
            let _ = write_frame(&mut wr, &Frame::json(0, &msg)).await;
            let _ = wr.shutdown().await;
            return;
        }
    };
    // Frames from the caller, read by their own task (a frame read is not cancel-safe).
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Frame>(16);
    let reader = tokio::spawn(async move {
        while let Ok(f) = read_frame(&mut rd).await {
            if in_tx.send(f).await.is_err() {
                break;
            }
        }
    });
    let mut caller_open = true;
    loop {
        tokio::select! {
            ev = stream.next() => {
                let (frame, last) = match ev {
                    Ok(Some(ExecEvent::Stdout(b))) => (Frame::data(kind::STDOUT, 0, b), false),
                    Ok(Some(ExecEvent::Stderr(b))) => (Frame::data(kind::STDERR, 0, b), false),
                    Ok(Some(ExecEvent::Exit { code, signal, timed_out, guest_us })) => {
                        (Frame::json(0, &Response::Exit { code, signal, timed_out, guest_us }), true)
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let code = e.code().unwrap_or(ErrorCode::Io);
                        (Frame::json(0, &Response::Error { code, message: format!("agent: {e}") }), true)
                    }
                };
                let sent = async {
                    write_frame(&mut wr, &frame).await?;
                    wr.flush().await
                }
                .await;
                if last {
                    break;
                }
                if sent.is_err() && caller_open {
                    caller_open = false;
                    let _ = stream.signal(libc::SIGHUP).await;
                }
            }
            f = in_rx.recv(), if caller_open => {
                let r = match f {
                    Some(f) if f.kind == kind::STDIN => stream.write_stdin(&f.payload).await,
                    Some(f) if f.kind == kind::EOF => stream.close_stdin().await,
                    Some(f) if f.kind == kind::JSON => match serde_json::from_slice::<Request>(&f.payload) {
                        Ok(Request::Signal { signal }) => stream.signal(signal).await,
                        Ok(Request::Resize { rows, cols }) if rows > 0 && cols > 0 => stream.resize(rows, cols).await,
                        _ => Ok(()), // anything else has no meaning here
                    },
                    Some(_) => Ok(()),
                    None => {
                        // The caller hung up.
                        caller_open = false;
                        stream.signal(libc::SIGHUP).await
                    }
                };
                if r.is_err() {
                    break;
                }
            }
        }
    }
    reader.abort();
    let _ = wr.shutdown().await;
}

/// Streams a guest file: at most the request's `limit`, never more than the server's `max_file_read_bytes`.
/// Without a limit, a larger file is a 413 (before any byte is sent, when the guest reports the size; else the
/// body ends early). Memory is bounded by the stream's queues, whatever the guest sends.
async fn get_file(State(d): D, Path(id): Path<String>, Query(q): Query<FileQuery>) -> R<Response> {
    let (agent, activity) = d.call_agent(&id).await?;
    let server_max = d.cfg.max_file_read_bytes;
    let (max, whole) = match q.limit {
        Some(l) => (l.min(server_max), l > server_max),
        None => (server_max, true),
    };
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::spawn(async move {
        let _activity = activity;
        let mut f = match agent.read_file_stream(&q.path, max, whole).await {
            Ok(f) => {
                let _ = started_tx.send(Ok(()));
                f
            }
            Err(e) => {
                let _ = started_tx.send(Err(agent_err(&e)));
                return;
            }
        };
        loop {
            match f.next().await {
                Ok(Some(chunk)) => {
                    if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                        return; // the caller went away
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    // Mid-body: the only way to say so is to end the body early (the client sees a broken transfer).
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            }
        }
    });
    started_rx.await.map_err(|_| ApiError(StatusCode::BAD_GATEWAY, "agent: the read ended".into()))??;
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], Body::from_stream(stream)).into_response())
}

async fn put_file(State(d): D, Path(id): Path<String>, Query(q): Query<FileQuery>, b: Bytes) -> R<Response> {
    let mode = match &q.mode {
        Some(m) => u32::from_str_radix(m, 8)
            .map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("mode `{m}` is not octal (e.g. 644)")))?,
        None => 0o644,
    };
    let (agent, _activity) = d.call_agent(&id).await?;
    let n = agent.write_file(&q.path, mode, &b).await.map_err(|e| agent_err(&e))?;
    Ok(json(serde_json::json!({"path": q.path, "bytes": n})))
}

fn agent_err(e: &flint_agent::client::ClientError) -> ApiError {
    use flint_agent::protocol::ErrorCode;
    let status = match e.code() {
        Some(ErrorCode::NotFound) => StatusCode::NOT_FOUND,
        Some(ErrorCode::TooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
        Some(ErrorCode::Invalid | ErrorCode::BadPath | ErrorCode::NotADirectory | ErrorCode::IsADirectory) => {
            StatusCode::BAD_REQUEST
        }
        Some(_) => StatusCode::CONFLICT,
        None => StatusCode::BAD_GATEWAY,
    };
    ApiError(status, format!("agent: {e}"))
}

async fn snapshot_vm(State(d): D, Path(id): Path<String>, b: Bytes) -> R<Response> {
    let req: CreateSnapshot = body(&b)?;
    // A snapshot restarts the VM's dirty-page log: the session's next hibernation (a diff on its base) would miss
    // what was dirtied before it.
    if let Some(s) = d.get(&id)?.session {
        return Err(OpError::Conflict(format!(
            "VM `{id}` runs session `{s}`: snapshot it with POST /v1/sessions/{s}/fork or /hibernate"
        ))
        .into());
    }
    Ok(created(d.snapshot(&id, req).await?))
}

async fn list_snapshots(State(d): D) -> R<Response> {
    Ok(json(d.store.list().await.map_err(OpError::from)?))
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    remote: bool,
}

async fn delete_snapshot(State(d): D, Path(id): Path<String>, Query(q): Query<DeleteQuery>) -> R<Response> {
    d.delete_snapshot(&id, q.remote).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn push_snapshot(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.store.publish(&id).await.map_err(OpError::from)?))
}

async fn pull_snapshot(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.store.pull(&id).await.map_err(OpError::from)?))
}

async fn list_templates(State(d): D) -> R<Response> {
    Ok(json(d.templates()?))
}

async fn create_template(State(d): D, b: Bytes) -> R<Response> {
    let req: CreateTemplate = body(&b)?;
    Ok(created(d.create_template(req).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSize {
    size: u32,
}

async fn set_pool(State(d): D, Path(name): Path<String>, b: Bytes) -> R<Response> {
    let req: PoolSize = body(&b)?;
    Ok(json(d.set_pool_size(&name, req.size).await?))
}

async fn delete_template(State(d): D, Path(name): Path<String>) -> R<Response> {
    d.delete_template(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_network(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.network(&id)?))
}

/// Replaces the egress policy of a VM or session (its running VM's at once).
async fn set_egress(State(d): D, Path(id): Path<String>, b: Bytes) -> R<Response> {
    let policy: crate::net::EgressPolicy = body(&b)?;
    Ok(json(
        d.change_network(&id, move |n| {
            n.egress = policy;
            Ok(())
        })
        .await?,
    ))
}

async fn expose_port(State(d): D, Path((id, port)): Path<(String, u16)>, b: Bytes) -> R<Response> {
    let e: crate::net::ExposedPort = body(&b)?;
    Ok(json(d.change_network(&id, move |n| crate::net::ops::set_port(n, port, Some(e))).await?))
}

async fn hide_port(State(d): D, Path((id, port)): Path<(String, u16)>) -> R<Response> {
    Ok(json(d.change_network(&id, move |n| crate::net::ops::set_port(n, port, None)).await?))
}

async fn clones(State(d): D, b: Bytes) -> R<Response> {
    let req: CreateClones = body(&b)?;
    Ok(created(d.clones(req).await?))
}

/// `GET /v1/sessions?metadata.KEY=VALUE...`: sessions whose metadata has every pair.
async fn list_sessions(State(d): D, Query(q): Query<std::collections::BTreeMap<String, String>>) -> R<Response> {
    let mut filter = std::collections::BTreeMap::new();
    for (k, v) in q {
        match k.strip_prefix("metadata.") {
            Some(key) if !key.is_empty() => filter.insert(key.to_string(), v),
            _ => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("unknown query parameter `{k}` (metadata.KEY=VALUE)"),
                ))
            }
        };
    }
    Ok(json(d.list_sessions(&filter)))
}

async fn create_session(State(d): D, b: Bytes) -> R<Response> {
    let req: CreateSession = body(&b)?;
    Ok(created(d.create_session(req).await?))
}

async fn get_session(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.get_session(&id).await?))
}

async fn delete_session(State(d): D, Path(id): Path<String>) -> R<Response> {
    d.delete_session(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn hibernate_session(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.hibernate_session(&id).await?))
}

async fn wake_session(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.wake_session(&id).await?))
}

async fn fork_session(State(d): D, Path(id): Path<String>, b: Bytes) -> R<Response> {
    let req: ForkSession = body(&b)?;
    Ok(created(d.fork_session(&id, req).await?))
}

/// Drops every unpinned chunk from the local cache (manifests stay): the next restore fetches from S3.
async fn clear_cache(State(d): D) -> R<Response> {
    let n = d.store.clear_local_chunks().map_err(OpError::from)?;
    Ok(json(serde_json::json!({"deleted_chunks": n})))
}

async fn metrics(State(d): D) -> Response {
    let mut out = crate::metrics::render(&d.metrics, &d.list(), &d.store.stats());
    crate::metrics::render_sessions(&d.sessions, &mut out);
    crate::metrics::render_pools(&d.pools, &mut out);
    crate::metrics::render_networks(&d.net, &mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[cfg(test)]
mod tests {
    /// docs/api/flintd.yaml documents exactly the routes the router serves (the live check is in tests/flintd.rs).
    #[test]
    fn openapi_lists_every_route() {
        let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api/flintd.yaml")).unwrap();
        let mut documented = Vec::new();
        let mut path = None;
        for line in spec.lines() {
            if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                path = Some(format!("/{p}"));
            } else if !line.starts_with("  ") {
                path = None;
            } else if let Some(p) = &path {
                for m in ["get", "post", "put", "delete"] {
                    if line == format!("    {m}:") {
                        documented.push((m.to_string(), p.clone()));
                    }
                }
            }
        }
        let mut served: Vec<(String, String)> =
            super::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }
}
