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
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::builder::VmmHandle;
use crate::vstate::vcpu::ExitReason;

const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_BODY_BYTES: usize = 1 << 20;

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
    Snapshot(crate::snapshot::SnapshotRequest),
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
    let want = if path == "/vm" { "GET" } else { "PUT" };
    let known = matches!(path, "/vm" | "/vm/pause" | "/vm/resume" | "/vm/shutdown" | "/snapshot/create");
    if !known {
        return Err(err(404, format!("no such resource: {path}")));
    }
    if method != want {
        return Err(err(405, format!("{path} takes {want}, not {method}")));
    }
    let action = match path {
        "/vm" => Action::Describe,
        "/vm/pause" => Action::Pause,
        "/vm/resume" => Action::Resume,
        "/vm/shutdown" => Action::Shutdown,
        _ => {
            Action::Snapshot(serde_json::from_slice(body).map_err(|e| err(400, format!("bad snapshot request: {e}")))?)
        }
    };
    Ok(action)
}

/// Applies an action to the VM.
pub fn apply(vm: &VmmHandle, action: Action) -> Result<serde_json::Value, ApiError> {
    match action {
        Action::Describe => return Ok(vm.describe()),
        Action::Pause => vm.control.pause(),
        Action::Resume => vm.control.resume(),
        Action::Shutdown => vm.exit.set(ExitReason::Requested),
        Action::Snapshot(req) => {
            return match vm.snapshot(&req) {
                Ok(report) => Ok(serde_json::json!({ "snapshot": report })),
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
    Ok(serde_json::json!({ "state": vm.describe()["state"] }))
}

/// An error and all its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Binds `path` (0600, replacing a stale socket) and serves requests on a thread.
pub fn serve(path: &Path, vm: VmmHandle) -> Result<(), ApiServerError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| ApiServerError::Bind(path.to_path_buf(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ApiServerError::Bind(path.to_path_buf(), e))?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let vm = vm.clone();
                let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || handle_conn(stream, &vm));
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
        let (status, body, keep_alive) = match read_request(&mut reader) {
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
        let body = body.to_string();
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            409 => "Conflict",
            500 => "Internal Server Error",
            413 => "Payload Too Large",
            _ => "Error",
        };
        let resp = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if keep_alive { "" } else { "Connection: close\r\n" }
        );
        if out.write_all(resp.as_bytes()).is_err() || !keep_alive {
            return;
        }
    }
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
    keep_alive: bool,
}

fn read_request(r: &mut impl BufRead) -> Result<Option<Request>, ApiError> {
    let mut line = String::new();
    let mut total = 0;
    if r.read_line(&mut line).map_err(|e| err(400, e.to_string()))? == 0 {
        return Ok(None);
    }
    let mut it = line.split_whitespace();
    let (Some(method), Some(path), Some(version)) = (it.next(), it.next(), it.next()) else {
        return Err(err(400, "malformed request line"));
    };
    let (method, path) = (method.to_string(), path.to_string());
    let mut keep_alive = version == "HTTP/1.1";
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        let n = r.read_line(&mut h).map_err(|e| err(400, e.to_string()))?;
        total += n;
        if n == 0 || total > MAX_HEADER_BYTES {
            return Err(err(400, "headers too long or truncated"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => content_length = v.parse().map_err(|_| err(400, "bad Content-Length"))?,
                "connection" => keep_alive = !v.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
    }
    if content_length > MAX_BODY_BYTES {
        return Err(err(413, "request body too large"));
    }
    let mut body = vec![0u8; content_length];
    r.read_exact(&mut body).map_err(|e| err(400, e.to_string()))?;
    Ok(Some(Request { method, path, body, keep_alive }))
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
        assert!(matches!(ok, Action::Snapshot(r) if r.kind == crate::snapshot::SnapshotKind::Diff && r.resume));
    }

    #[test]
    fn parses_requests_and_rejects_junk() {
        let mut r = std::io::Cursor::new(b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec());
        let req = read_request(&mut r).unwrap().unwrap();
        assert_eq!((req.method.as_str(), req.path.as_str(), req.keep_alive), ("PUT", "/vm/pause", true));
        let mut r = std::io::Cursor::new(b"garbage\r\n\r\n".to_vec());
        assert_eq!(read_request(&mut r).err().unwrap().status, 400);
        let mut r = std::io::Cursor::new(b"GET /vm HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec());
        assert_eq!(read_request(&mut r).err().unwrap().status, 413);
    }
}
