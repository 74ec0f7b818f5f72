//! The VMM's control API: HTTP/1.1 with JSON bodies on a Unix socket (`--api-sock`).
//!
//! | method | path          | effect                                        |
//! |--------|---------------|-----------------------------------------------|
//! | GET    | /vm           | describe: state, config, timings, devices     |
//! | PUT    | /vm/pause     | pause all vCPUs (idempotent)                  |
//! | PUT    | /vm/resume    | resume (idempotent)                           |
//! | PUT    | /vm/shutdown  | stop the VM; the process exits with code 0    |
//! | PUT    | /snapshot/create | write a snapshot (body: SnapshotRequest)   |
//!
//! Errors are `{"error": "..."}` with a 4xx status.
use std::io::{BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use flint_vmm_api::error_chain;
use flint_vmm_api::http::{self, MAX_REQUEST_BODY_BYTES};
use flint_vmm_api::{describe::StateResponse, paths, snapshot::SnapshotResponse};

use crate::builder::VmmHandle;
use crate::vstate::vcpu::ExitReason;

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("cannot bind the API socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
}

/// A parsed request, before it is applied.
#[derive(Debug)]
pub enum Action {
    Describe,
    Pause,
    Resume,
    Shutdown,
    Snapshot(flint_vmm_api::snapshot::SnapshotRequest),
}

#[derive(Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

fn err(status: u16, message: impl Into<String>) -> ApiError {
    ApiError { status, message: message.into() }
}

/// Maps a method, path and body to an action.
pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<Action, ApiError> {
    let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
    let routes = [paths::DESCRIBE, paths::PAUSE, paths::RESUME, paths::SHUTDOWN, paths::SNAPSHOT];
    let Some(&(want, _)) = routes.iter().find(|(_, p)| *p == path) else {
        return Err(err(404, format!("no such resource: {path}")));
    };
    if method != want {
        return Err(err(405, format!("{path} takes {want}, not {method}")));
    }
    let action = match path {
        p if p == paths::DESCRIBE.1 => Action::Describe,
        p if p == paths::PAUSE.1 => Action::Pause,
        p if p == paths::RESUME.1 => Action::Resume,
        p if p == paths::SHUTDOWN.1 => Action::Shutdown,
        _ => {
            Action::Snapshot(serde_json::from_slice(body).map_err(|e| err(400, format!("bad snapshot request: {e}")))?)
        }
    };
    Ok(action)
}

/// Applies an action to the VM; the answer's JSON.
pub fn apply(vm: &VmmHandle, action: Action) -> Result<serde_json::Value, ApiError> {
    let json = |v: Result<serde_json::Value, serde_json::Error>| v.map_err(|e| err(500, e.to_string()));
    match action {
        Action::Describe => return json(serde_json::to_value(vm.describe())),
        Action::Pause => vm.control.pause(),
        Action::Resume => vm.control.resume(),
        Action::Shutdown => vm.exit.set(ExitReason::Requested),
        Action::Snapshot(req) => {
            return match vm.snapshot(&req) {
                Ok(report) => json(serde_json::to_value(SnapshotResponse { snapshot: report })),
                Err(e) => Err(err(
                    if matches!(
                        e,
                        crate::snapshot::SnapshotError::NotRunning | crate::snapshot::SnapshotError::NoDirtyTracking
                    ) {
                        409
                    } else {
                        500
                    },
                    error_chain(&e),
                )),
            };
        }
    }
    json(serde_json::to_value(StateResponse { state: vm.run_state() }))
}

/// Binds `path` (0600, replacing a stale socket) and serves requests on a thread.
pub fn serve(path: &Path, vm: VmmHandle) -> Result<(), ApiServerError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| ApiServerError::Bind(path.to_path_buf(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ApiServerError::Bind(path.to_path_buf(), e))?;
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // Before the first request; connection threads inherit it.
            crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Api);
            for stream in listener.incoming().flatten() {
                // Bounded: at most MAX_CONNECTIONS threads; past that a connection is answered 503 and closed.
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    let body = br#"{"error":"too many connections"}"#;
                    let _ = (&stream).write_all(&http::encode_response(503, body, false));
                    continue;
                }
                let vm = vm.clone();
                let busy2 = busy.clone();
                let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
                    handle_conn(stream, &vm);
                    busy2.fetch_sub(1, Ordering::AcqRel);
                });
                if spawned.is_err() {
                    busy.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
        .map_err(|e| ApiServerError::Bind(path.to_path_buf(), e))?;
    Ok(())
}

fn handle_conn(stream: UnixStream, vm: &VmmHandle) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut out = write_half;
    loop {
        let (status, body, keep_alive) = match http::read_request(&mut reader, MAX_REQUEST_BODY_BYTES) {
            Ok(None) => return,
            Ok(Some(req)) => {
                let (status, body) = match parse(&req.method, &req.path, &req.body).and_then(|a| apply(vm, a)) {
                    Ok(v) => (200, v),
                    Err(e) => (e.status, serde_json::json!({ "error": e.message })),
                };
                (status, body, req.keep_alive)
            }
            Err(e) => (e.status, serde_json::json!({ "error": e.message }), false),
        };
        let resp = http::encode_response(status, body.to_string().as_bytes(), keep_alive);
        if out.write_all(&resp).is_err() || !keep_alive {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(matches!(parse("GET", "/vm", b""), Ok(Action::Describe)));
        assert!(matches!(parse("PUT", "/vm/pause/", b""), Ok(Action::Pause)));
        assert_eq!(parse("GET", "/vm/pause", b"").unwrap_err().status, 405);
        assert_eq!(parse("GET", "/nope", b"").unwrap_err().status, 404);
        assert_eq!(parse("GET", "/snapshot/create", b"").unwrap_err().status, 405);
        let e = parse("PUT", "/snapshot/create", br#"{"state_path":"/s"}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("mem_path"), "{}", e.message);
        let ok = parse("PUT", "/snapshot/create", br#"{"state_path":"/s","mem_path":"/m","kind":"diff"}"#).unwrap();
        assert!(matches!(ok, Action::Snapshot(r) if r.kind == flint_vmm_api::snapshot::SnapshotKind::Diff && r.resume));
    }
}
