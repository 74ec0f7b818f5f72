//! The flintd HTTP/JSON API over its Unix socket (docs/api/flintd.yaml): the edge that parses requests into the
//! layers' and services' typed requests, calls them, and maps their errors to statuses (one mapping, in
//! [`crate::error::Kind::status`]). Handlers by area: `vms.rs` (VMs, exec, files, run, mounts, snapshots of a
//! VM), `services.rs` (templates, clones, sessions, snapshots, images, networks, metrics).
mod services;
pub mod types;
mod vms;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use crate::daemon::Daemon;
use crate::error::{Classify, Kind};
pub use vms::EXEC_UPGRADE;

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
    ("post", "/v1/hosts/{id}/drain"),
    ("post", "/v1/hosts/{id}/undrain"),
    ("delete", "/v1/store/cache"),
    ("get", "/v1/e2b/keys"),
    ("post", "/v1/e2b/keys"),
    ("delete", "/v1/e2b/keys/{id}"),
    ("get", "/v1/e2b/fleet/{rest}"),
    ("post", "/v1/e2b/fleet/{rest}"),
    ("delete", "/v1/e2b/fleet/{rest}"),
    ("get", "/metrics"),
];

/// An error answer: a status (from the error's kind) and `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    pub kind: Kind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: Kind, message: impl Into<String>) -> ApiError {
        ApiError { kind, message: message.into() }
    }
}

impl<E: Classify> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError { kind: e.kind(), message: e.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(types::ErrorBody { error: self.message })).into_response()
    }
}

type R<T> = Result<T, ApiError>;
type D = State<Arc<Daemon>>;

/// Parses a JSON body with a message that says what is wrong (axum's own rejection is terse).
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { bytes };
    serde_json::from_slice(bytes).map_err(|e| ApiError::new(Kind::Invalid, format!("invalid request body: {e}")))
}

/// A JSON answer. Access tokens of exposed ports in records (`"token": "<secret>"`) are shown as `"(set)"`: a
/// listing is not a way to read another caller's token.
fn json<T: serde::Serialize>(v: T) -> Response {
    answer(v, true)
}

/// The answer of the call that made a VM, session or exposed port: its tokens in clear (the caller set them, or
/// asked flintd to make them with `auto`, and this is the one answer that shows them).
fn revealed<T: serde::Serialize>(v: T) -> Response {
    answer(v, false)
}

fn answer<T: serde::Serialize>(v: T, redact_tokens: bool) -> Response {
    match answer_bytes(&v, redact_tokens) {
        Ok(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(e) => ApiError::new(Kind::Internal, e.to_string()).into_response(),
    }
}

/// The JSON of an answer, its tokens redacted if asked. serde_json's compact output writes an object key `token`
/// as the bytes `"token":`, so an answer without them (nearly every one) goes out as serialized; only one with
/// them is parsed into values to redact. (Building and walking the values for every answer made a list of 1,000
/// sessions several times slower to write.)
fn answer_bytes<T: serde::Serialize>(v: &T, redact_tokens: bool) -> serde_json::Result<Vec<u8>> {
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
    let bytes = serde_json::to_vec(v)?;
    if !redact_tokens || memchr::memmem::find(&bytes, b"\"token\":").is_none() {
        return Ok(bytes);
    }
    let mut v: serde_json::Value = serde_json::from_slice(&bytes)?;
    redact(&mut v);
    serde_json::to_vec(&v)
}

fn created<T: serde::Serialize>(v: T) -> Response {
    let mut r = json(v);
    *r.status_mut() = StatusCode::CREATED;
    r
}

/// `created` with its tokens in clear (see `revealed`).
fn created_revealed<T: serde::Serialize>(v: T) -> Response {
    let mut r = revealed(v);
    *r.status_mut() = StatusCode::CREATED;
    r
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// An NDJSON answer (`application/x-ndjson`) whose lines `produce` sends from a task of its own: the body streams
/// as the lines come, through a bounded queue (a slow reader holds the producer back, not flintd's memory).
fn ndjson<F, Fut>(d: &Daemon, produce: F) -> Response
where
    F: FnOnce(Lines) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    d.tasks.spawn(produce(Lines(tx)));
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response()
}

/// The sending end of an [`ndjson`] answer.
struct Lines(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>);

impl Lines {
    /// Sends one line; false once the caller has gone away (the producer stops).
    async fn send<T: serde::Serialize>(&self, v: &T) -> bool {
        let Ok(mut line) = serde_json::to_vec(v) else { return false };
        line.push(b'\n');
        self.0.send(Ok(Bytes::from(line))).await.is_ok()
    }

    /// Resolves once the caller has gone away (its connection closed), even while nothing is being sent.
    async fn closed(&self) {
        self.0.closed().await
    }
}

pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/health", get(services::health))
        .route("/v1/images", get(services::images).post(services::import_image))
        .route("/v1/vms", get(vms::list).post(vms::create))
        .route("/v1/vms/{id}", get(vms::get_one).delete(vms::delete))
        .route("/v1/vms/{id}/pause", post(vms::pause))
        .route("/v1/vms/{id}/resume", post(vms::resume))
        .route("/v1/vms/{id}/exec", post(vms::exec))
        .route("/v1/vms/{id}/run", post(vms::run_code))
        .route("/v1/vms/{id}/mounts", post(vms::mount).delete(vms::unmount))
        .route("/v1/vms/{id}/files", get(vms::get_file).put(vms::put_file))
        .route("/v1/vms/{id}/snapshots", post(vms::snapshot))
        .route("/v1/vms/{id}/network", get(services::get_network))
        .route("/v1/vms/{id}/network/egress", put(services::set_egress))
        .route("/v1/vms/{id}/ports/{port}", put(services::expose_port).delete(services::hide_port))
        .route("/v1/snapshots", get(services::list_snapshots))
        .route("/v1/snapshots/{id}", axum::routing::delete(services::delete_snapshot))
        .route("/v1/snapshots/{id}/push", post(services::push_snapshot))
        .route("/v1/snapshots/{id}/pull", post(services::pull_snapshot))
        .route("/v1/templates", get(services::list_templates).post(services::create_template))
        .route("/v1/templates/{name}", axum::routing::delete(services::delete_template))
        .route("/v1/templates/{name}/pool", post(services::set_pool))
        .route("/v1/clones", post(services::clones))
        .route("/v1/sessions", get(services::list_sessions).post(services::create_session))
        .route("/v1/sessions/{id}", get(services::get_session).delete(services::delete_session))
        .route("/v1/sessions/{id}/hibernate", post(services::hibernate_session))
        .route("/v1/sessions/{id}/wake", post(services::wake_session))
        .route("/v1/sessions/{id}/fork", post(services::fork_session))
        .route("/v1/hosts/{id}/drain", post(services::drain_host))
        .route("/v1/hosts/{id}/undrain", post(services::undrain_host))
        .route("/v1/store/cache", axum::routing::delete(services::clear_cache))
        .route("/v1/e2b/keys", get(services::list_e2b_keys).post(services::create_e2b_key))
        .route("/v1/e2b/keys/{id}", axum::routing::delete(services::delete_e2b_key))
        .route(
            "/v1/e2b/fleet/{*rest}",
            get(services::e2b_from_router).post(services::e2b_from_router).delete(services::e2b_from_router),
        )
        .route("/metrics", get(services::metrics))
        .fallback(|| async { ApiError::new(Kind::NotFound, "no such route (see docs/api/flintd.yaml)") })
        .layer(axum::middleware::from_fn_with_state(d.clone(), trace_requests))
        .with_state(d)
}

/// Counts every request and runs it in a span of its own (method, path, a request number).
async fn trace_requests(State(d): D, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument;
    let n = d.requests.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("request", n, method = %req.method(), path = %req.uri().path());
    next.run(req).instrument(span).await
}

#[cfg(test)]
mod tests;
