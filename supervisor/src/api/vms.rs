//! `/v1/vms/...`: VMs, and the calls into a VM or session (exec, run, files, mounts), which wake a hibernated
//! session first.
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::types::{ExecExit, ExecLine, FileWritten, RunCode, RunLine, RunResult};
use super::{body, created, created_revealed, json, ndjson, no_content, ApiError, D, R};
use crate::error::Kind;
use crate::vm::{CreateSnapshot, CreateVm, VmError, VolumeMount};

pub(super) async fn list(State(d): D) -> Response {
    json(d.vms.list())
}

pub(super) async fn create(State(d): D, b: Bytes) -> R<Response> {
    let req: CreateVm = body(&b)?;
    Ok(created_revealed(d.create_vm(req).await?))
}

/// The record, plus `vmm`: the VMM's own description (timings, restore breakdown, fault counters) while it runs.
pub(super) async fn get_one(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.vms.detail(&id).await?))
}

pub(super) async fn delete(State(d): D, Path(id): Path<String>) -> R<Response> {
    d.delete_vm(&id).await?;
    Ok(no_content())
}

pub(super) async fn pause(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.vms.pause(&id).await?))
}

pub(super) async fn resume(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.vms.resume(&id).await?))
}

pub(super) async fn snapshot(State(d): D, Path(id): Path<String>, b: Bytes) -> R<Response> {
    let req: CreateSnapshot = body(&b)?;
    Ok(created(d.snapshot_vm(&id, req).await?))
}

/// `POST /v1/vms/{id}/mounts`: a host directory into a running VM or session (woken first).
pub(super) async fn mount(State(d): D, Path(id): Path<String>, b: Bytes) -> R<Response> {
    let m: VolumeMount = body(&b)?;
    let (vm, _activity) = d.target(&id).await?;
    Ok(created(d.vms.mount(&vm, m).await?))
}

#[derive(Deserialize)]
pub(super) struct MountQuery {
    #[serde(default)]
    path: Option<String>,
}

/// `DELETE /v1/vms/{id}/mounts?path=/mnt/x`.
pub(super) async fn unmount(State(d): D, Path(id): Path<String>, Query(q): Query<MountQuery>) -> R<Response> {
    let path = q.path.ok_or_else(|| ApiError::new(Kind::Invalid, "give the mount's guest path: ?path=/mnt/x"))?;
    let (vm, _activity) = d.target(&id).await?;
    Ok(json(d.vms.unmount(&vm, &path).await?))
}

/// Streams NDJSON like an exec: `{"stdout": ...}` / `{"stderr": ...}` as the code prints, then
/// `{"result": {...}}` (or `{"error": ...}`).
pub(super) async fn run_code(State(d): D, Path(id): Path<String>, b: Bytes) -> R<Response> {
    let rb: RunCode = body(&b)?;
    if rb.code.len() > flint_agent::protocol::MAX_RUN_CODE {
        return Err(ApiError::new(
            Kind::TooLarge,
            format!("code of {} bytes: at most {}", rb.code.len(), flint_agent::protocol::MAX_RUN_CODE),
        ));
    }
    if rb.timeout_ms == Some(0) {
        return Err(ApiError::new(Kind::Invalid, "timeout_ms must be at least 1"));
    }
    let (agent, activity) = d.agent(&id).await?;
    Ok(ndjson(&d, move |out| async move {
        use flint_agent::client::RunEvent;
        let _activity = activity; // the session is not idle while the code runs
        let req = flint_agent::protocol::RunRequest {
            language: rb.language,
            code: rb.code,
            timeout_ms: rb.timeout_ms,
            ..Default::default()
        };
        // agent_ms: sent → last answer read (the VMM's vsock device, the guest kernel, the agent).
        let sent = std::time::Instant::now();
        let mut stream = match agent.run_code_stream(req).await {
            Ok(s) => s,
            Err(e) => {
                out.send(&RunLine::Error(e.to_string())).await;
                return;
            }
        };
        loop {
            let line = match stream.next().await {
                Ok(Some(RunEvent::Stdout(b))) => RunLine::Stdout(String::from_utf8_lossy(&b).into_owned()),
                Ok(Some(RunEvent::Stderr(b))) => RunLine::Stderr(String::from_utf8_lossy(&b).into_owned()),
                Ok(Some(RunEvent::Done(r))) => RunLine::Result(RunResult {
                    status: r.status,
                    value: r.value,
                    error: r.error,
                    restarted: r.restarted,
                    guest_ms: r.guest_us.map(|us| us as f64 / 1000.0),
                    agent_ms: Some(crate::ms_since(sent)),
                }),
                Ok(None) => return,
                Err(e) => RunLine::Error(e.to_string()),
            };
            let last = matches!(line, RunLine::Error(_));
            if !out.send(&line).await || last {
                return;
            }
        }
    }))
}

/// The `Upgrade` token of an interactive exec (docs/api/flintd.yaml): after `101 Switching Protocols` the
/// connection carries agent-protocol frames both ways.
pub const EXEC_UPGRADE: &str = "flint-exec";

/// Most bytes of an exec request body.
const MAX_EXEC_BODY: usize = 1 << 20;

/// Streams NDJSON: `{"stdout": "..."}` / `{"stderr": "..."}` chunks as they come, then `{"exit": {...}}`. With
/// `Upgrade: flint-exec`, an interactive exec instead (stdin, signals, a tty with resize) over the upgraded
/// connection.
pub(super) async fn exec(State(d): D, Path(id): Path<String>, req: axum::extract::Request) -> R<Response> {
    let (mut parts, raw) = req.into_parts();
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(EXEC_UPGRADE));
    let b = axum::body::to_bytes(raw, MAX_EXEC_BODY)
        .await
        .map_err(|e| ApiError::new(Kind::Invalid, format!("request body (at most {MAX_EXEC_BODY} bytes): {e}")))?;
    // The body is the agent's own exec request (one type for both hops).
    let mut er: flint_agent::protocol::ExecRequest = body(&b)?;
    if er.argv.is_empty() {
        return Err(ApiError::new(Kind::Invalid, "argv must not be empty"));
    }
    if er.tty.is_some_and(|t| t.rows == 0 || t.cols == 0) {
        return Err(ApiError::new(Kind::Invalid, "tty rows and cols must be at least 1"));
    }
    if upgrade {
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or_else(|| ApiError::new(Kind::Invalid, "this connection cannot be upgraded (HTTP/1.1 only)"))?;
        // A terminal is interactive by nature: its input is the caller's.
        er.stdin |= er.tty.is_some();
        let (agent, activity) = d.agent(&id).await?;
        d.tasks.spawn(async move {
            let _activity = activity; // the session is not idle while the exec runs
            match on_upgrade.await {
                Ok(up) => interactive::run(agent, er, hyper_util::rt::TokioIo::new(up)).await,
                Err(e) => tracing::warn!(error = %e, "interactive exec: the upgrade failed"),
            }
        });
        return axum::http::Response::builder()
            .status(axum::http::StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, EXEC_UPGRADE)
            .body(Body::empty())
            .map_err(|e| ApiError::new(Kind::Internal, e.to_string()));
    }
    if er.stdin || er.tty.is_some() {
        return Err(ApiError::new(
            Kind::Invalid,
            format!("stdin and tty need an interactive exec: send `Connection: Upgrade` and `Upgrade: {EXEC_UPGRADE}`"),
        ));
    }
    let (agent, activity) = d.agent(&id).await?;
    Ok(ndjson(&d, move |out| async move {
        use flint_agent::client::ExecEvent;
        let _activity = activity;
        // agent_ms: sent → last answer read (the VMM's vsock device, the guest kernel, the agent).
        let sent = std::time::Instant::now();
        let mut stream = match agent.exec(er).await {
            Ok(s) => s,
            Err(e) => {
                out.send(&ExecLine::Error(e.to_string())).await;
                return;
            }
        };
        loop {
            // A caller that goes away ends the exec: the stream dropped kills the guest process (a silent one too,
            // which would never find out by a failed send).
            let ev = tokio::select! {
                ev = stream.next() => ev,
                () = out.closed() => return,
            };
            let line = match ev {
                Ok(Some(ExecEvent::Stdout(b))) => ExecLine::Stdout(String::from_utf8_lossy(&b).into_owned()),
                Ok(Some(ExecEvent::Stderr(b))) => ExecLine::Stderr(String::from_utf8_lossy(&b).into_owned()),
                Ok(Some(ExecEvent::Exit { code, signal, timed_out, guest_us })) => ExecLine::Exit(ExecExit {
                    code,
                    signal,
                    timed_out,
                    guest_ms: guest_us.map(|us| us as f64 / 1000.0),
                    agent_ms: Some(crate::ms_since(sent)),
                }),
                Ok(None) => return,
                Err(e) => ExecLine::Error(e.to_string()),
            };
            let last = matches!(line, ExecLine::Error(_));
            if !out.send(&line).await || last {
                return;
            }
        }
    }))
}

#[derive(Deserialize)]
pub(super) struct FileQuery {
    path: String,
    #[serde(default)]
    mode: Option<String>,
    /// Read at most this many bytes (devices such as /dev/urandom never end).
    #[serde(default)]
    limit: Option<u64>,
}

/// Streams a guest file: at most the request's `limit`, never more than the server's `max_file_read_bytes`.
/// Without a limit, a larger file is a 413 (before any byte is sent, when the guest reports the size; else the
/// body ends early). Memory is bounded by the stream's queues, whatever the guest sends.
pub(super) async fn get_file(State(d): D, Path(id): Path<String>, Query(q): Query<FileQuery>) -> R<Response> {
    let (agent, activity) = d.agent(&id).await?;
    let server_max = d.cfg.max_file_read_bytes;
    let (max, whole) = match q.limit {
        Some(l) => (l.min(server_max), l > server_max),
        None => (server_max, true),
    };
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let vm = id.clone();
    d.tasks.spawn(async move {
        let _activity = activity;
        let mut f = match agent.read_file_stream(&q.path, max, whole).await {
            Ok(f) => {
                let _ = started_tx.send(Ok(()));
                f
            }
            Err(e) => {
                let _ = started_tx.send(Err(VmError::agent(&vm, format!("read {}", q.path), &e)));
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
    started_rx.await.map_err(|_| ApiError::new(Kind::Guest, "agent: the read ended"))??;
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], Body::from_stream(stream)).into_response())
}

/// `PUT /v1/vms/{id}/files`: the body streamed into the guest as it arrives (any size up to the agent's limit;
/// flintd holds one chunk at a time), written atomically there.
pub(super) async fn put_file(
    State(d): D,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    req: axum::extract::Request,
) -> R<Response> {
    use tokio_stream::StreamExt;
    let mode = match &q.mode {
        Some(m) => u32::from_str_radix(m, 8)
            .map_err(|_| ApiError::new(Kind::Invalid, format!("mode `{m}` is not octal (e.g. 644)")))?,
        None => 0o644,
    };
    let (agent, _activity) = d.agent(&id).await?;
    let body = req.into_body().into_data_stream().map(|r| r.map_err(std::io::Error::other));
    let reader = tokio_util::io::StreamReader::new(body);
    let n = agent
        .write_file_from(&q.path, mode, reader)
        .await
        .map_err(|e| VmError::agent(&id, format!("write {}", q.path), &e))?;
    Ok(json(FileWritten { path: q.path, bytes: n }))
}

pub(super) mod interactive {
    use super::*;

    /// An interactive exec over an upgraded connection: the caller sends STDIN and EOF frames and JSON `signal` /
    /// `resize` requests; flintd sends STDOUT and STDERR frames, then one JSON `exit` (or `error`). The caller
    /// hanging up sends the process SIGHUP, as a terminal's hangup would.
    pub async fn run<S>(agent: Arc<flint_agent::client::AgentClient>, er: flint_agent::protocol::ExecRequest, io: S)
    where
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
}
