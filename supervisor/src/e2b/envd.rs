//! envd's data plane (guest port 49983), served by flintd over the vsock agent: `Process` and `Filesystem`
//! Connect RPCs (JSON codec; streams as envelopes), `GET|POST /files`, `GET /health`, `GET /envs`.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use flint_agent::client::{AgentClient, ClientError};
use flint_agent::protocol::{ErrorCode, ExecRequest, FileKind, TtySize};
use flint_vmm_api::{lock, now_unix_ms};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::connect::{self, Code, ConnectError};
use super::procs::{Ctl, Proc, ProcEvent};
use super::{b64, multipart, rfc3339, E2b, Sandbox};
use crate::services::sessions::Activity;

/// The sandbox and port a data-plane request names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub id: String,
    pub port: u16,
}

pub const ENVD_PORT: u16 = 49983;
pub const INTERPRETER_PORT: u16 = 49999;

/// What the SDK's `is_running()` and every data-plane call get for a sandbox that is gone, unknown or paused:
/// 502 with "was not found" (E2B's proxy answer; a 404 would make the SDK raise instead of answering False).
pub fn not_found(id: &str) -> Response {
    let body = json!({"sandboxId": id, "message": "The sandbox was not found", "code": 502});
    (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response()
}

/// A plain (non-Connect) JSON error: envd's `{"code", "message"}`.
pub fn plain_error(status: u16, message: impl Into<String>) -> Response {
    let st = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (st, axum::Json(json!({"code": status, "message": message.into()}))).into_response()
}

fn unary_error(e: &ConnectError) -> Response {
    let st = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (st, [("content-type", "application/json")], e.body()).into_response()
}

fn unary(r: Result<Value, ConnectError>) -> Response {
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => unary_error(&e),
    }
}

/// An agent error as the SDK expects it.
pub(super) fn agent_error(e: ClientError) -> ConnectError {
    let code = match e.code() {
        Some(ErrorCode::NotFound) => Code::NotFound,
        Some(ErrorCode::AlreadyExists) => Code::AlreadyExists,
        Some(ErrorCode::PermissionDenied) => Code::PermissionDenied,
        Some(ErrorCode::TooLarge) => Code::ResourceExhausted,
        Some(ErrorCode::Invalid | ErrorCode::BadPath | ErrorCode::NotADirectory | ErrorCode::IsADirectory) => {
            Code::InvalidArgument
        }
        Some(_) => Code::Internal,
        None => Code::Unavailable,
    };
    ConnectError::new(code, e.to_string())
}

/// The user a request runs as: `Authorization: Basic base64("<user>:")`, else the configured default.
fn user_of(e: &E2b, headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic ")))
        .and_then(|b| b64::decode(b.trim()))
        .and_then(|d| String::from_utf8(d).ok())
        .map(|s| s.split(':').next().unwrap_or_default().to_string())
        .filter(|u| !u.is_empty() && u.len() <= 64 && !u.contains('/'))
        .unwrap_or_else(|| e.cfg.e2b.user.clone())
}

fn home_of(user: &str) -> String {
    if user == "root" {
        "/root".into()
    } else {
        format!("/home/{user}")
    }
}

/// A path as envd resolves it: absolute as given, `~`/relative against the user's home.
fn resolve(path: &str, user: &str) -> String {
    let home = home_of(user);
    if path.starts_with('/') {
        path.to_string()
    } else if path == "~" || path.is_empty() {
        home
    } else if let Some(rest) = path.strip_prefix("~/") {
        format!("{home}/{rest}")
    } else {
        format!("{home}/{path}")
    }
}

/// The running sandbox's agent (woken if it sleeps) and its session's activity.
pub(super) async fn agent(e: &E2b, id: &str) -> Result<(Arc<AgentClient>, Option<Activity>), ConnectError> {
    let unavailable = |m: String| ConnectError::new(Code::Unavailable, m);
    let (vm, activity) = e
        .sessions
        .awake(id)
        .await
        .map_err(|err| unavailable(err.to_string()))?
        .ok_or_else(|| unavailable(format!("sandbox {id} was not found")))?;
    let a = e.vms.agent(&vm).await.map_err(|err| unavailable(err.to_string()))?;
    Ok((a, Some(activity)))
}

/// Serves a request for port 49983 of `sbx`.
pub async fn serve(e: Arc<E2b>, sbx: Arc<Sandbox>, t: Target, req: axum::extract::Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let token_ok = match lock(&sbx.rec).access_token.clone() {
        None => true,
        Some(want) => parts
            .headers
            .get("x-access-token")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|got| crate::net::front::same(got, &want)),
    };
    match (&parts.method, path.as_str()) {
        (&Method::GET, "/health") => StatusCode::NO_CONTENT.into_response(),
        (&Method::GET, "/files") | (&Method::POST, "/files") => {
            let user = query_param(&query, "username").unwrap_or_else(|| user_of(&e, &parts.headers));
            let write = parts.method == Method::POST;
            if !token_ok && !signature_ok(&sbx, &query, &user, write) {
                return plain_error(401, "this sandbox needs its access token (X-Access-Token) or a signed URL");
            }
            let Some(file) = query_param(&query, "path") else {
                if write {
                    return upload(&e, &t, &parts.headers, None, &user, body).await;
                }
                return plain_error(400, "a `path` query parameter is needed");
            };
            let file = resolve(&file, &user);
            if write {
                upload(&e, &t, &parts.headers, Some(file), &user, body).await
            } else {
                download(&e, &t, &file).await
            }
        }
        _ if !token_ok => unary_error(&ConnectError::new(Code::Unauthenticated, "this sandbox needs its access token")),
        (&Method::GET, "/envs") => match e.sessions.get(&t.id).await {
            Ok(s) => axum::Json(s.env).into_response(),
            Err(err) => plain_error(404, err.to_string()),
        },
        (&Method::POST, rpc) if rpc.starts_with("/process.Process/") || rpc.starts_with("/filesystem.Filesystem/") => {
            let limit = connect::MAX_MESSAGE + 5;
            let bytes = match axum::body::to_bytes(body, limit).await {
                Ok(b) => b,
                Err(err) => return unary_error(&ConnectError::new(Code::ResourceExhausted, err.to_string())),
            };
            rpc_call(e, sbx, t, &parts.headers, &rpc[1..], bytes).await
        }
        _ => plain_error(404, format!("envd has no {} {path}", parts.method)),
    }
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// E2B's signed file URLs: `signature = v1_` + base64(sha256("path:op:user:token[:expiration]")), unpadded.
fn signature_ok(sbx: &Sandbox, query: &str, user: &str, write: bool) -> bool {
    use sha2::{Digest, Sha256};
    let Some(token) = lock(&sbx.rec).access_token.clone() else { return true };
    let (Some(sig), Some(path)) = (query_param(query, "signature"), query_param(query, "path")) else { return false };
    let exp = query_param(query, "signature_expiration");
    if let Some(x) = exp.as_deref().and_then(|x| x.parse::<u64>().ok()) {
        if x * 1000 < now_unix_ms() {
            return false;
        }
    }
    let op = if write { "write" } else { "read" };
    let raw = match &exp {
        Some(x) => format!("{path}:{op}:{user}:{token}:{x}"),
        None => format!("{path}:{op}:{user}:{token}"),
    };
    let want = format!("v1_{}", b64::encode_with(&Sha256::digest(raw.as_bytes()), false));
    crate::net::front::same(&sig, &want)
}

async fn download(e: &E2b, t: &Target, file: &str) -> Response {
    let (agent, activity) = match agent(e, &t.id).await {
        Ok(a) => a,
        Err(err) => return plain_error(502, err.message),
    };
    match agent.stat(file).await {
        Ok(st) if st.kind == FileKind::Dir => return plain_error(400, format!("{file} is a directory")),
        Ok(_) => {}
        Err(err) if err.code() == Some(ErrorCode::NotFound) => return plain_error(404, format!("{file}: not found")),
        Err(err) => return plain_error(400, err.to_string()),
    }
    let max = e.cfg.e2b.max_upload_bytes.max(1 << 30);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let path = file.to_string();
    tokio::spawn(async move {
        let _activity = activity;
        let mut s = match agent.read_file_stream(&path, max, true).await {
            Ok(s) => s,
            Err(err) => return drop(tx.send(Err(std::io::Error::other(err.to_string()))).await),
        };
        loop {
            match s.next().await {
                Ok(Some(chunk)) => {
                    if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(err) => return drop(tx.send(Err(std::io::Error::other(err.to_string()))).await),
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    ([("content-type", "application/octet-stream")], body).into_response()
}

async fn upload(e: &E2b, t: &Target, headers: &HeaderMap, path: Option<String>, user: &str, body: Body) -> Response {
    let max = e.cfg.e2b.max_upload_bytes as usize;
    let bytes = match axum::body::to_bytes(body, max).await {
        Ok(b) => b,
        Err(_) => return plain_error(413, format!("uploads are at most {max} bytes ([e2b] max_upload_bytes)")),
    };
    let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let files: Vec<(String, &[u8])> = match multipart::boundary(ct) {
        Some(b) => match multipart::parse(&bytes, &b) {
            Ok(parts) => {
                let mut out = Vec::new();
                for p in parts.into_iter().filter(|p| p.name == "file") {
                    let Some(name) = path.clone().or_else(|| p.filename.map(|f| resolve(&f, user))) else {
                        return plain_error(400, "a file part without a file name, and no `path`");
                    };
                    out.push((name, p.data));
                }
                out
            }
            Err(err) => return plain_error(400, format!("multipart body: {err}")),
        },
        None => match &path {
            Some(p) => vec![(p.clone(), &bytes[..])],
            None => return plain_error(400, "an octet-stream upload needs a `path` query parameter"),
        },
    };
    if headers.get("content-encoding").is_some_and(|v| v.as_bytes() != b"identity") {
        return plain_error(400, "compressed uploads are not accepted (send Content-Encoding: identity)");
    }
    let (agent, _activity) = match agent(e, &t.id).await {
        Ok(a) => a,
        Err(err) => return plain_error(502, err.message),
    };
    let mut written = Vec::new();
    for (file, data) in files {
        if let Err(err) = agent.write_file_as(&file, 0o644, Some(user), data).await {
            let status = match err.code() {
                Some(ErrorCode::TooLarge) => 507,
                Some(ErrorCode::PermissionDenied) => 403,
                Some(ErrorCode::NotFound | ErrorCode::BadPath | ErrorCode::NotADirectory | ErrorCode::IsADirectory) => {
                    400
                }
                Some(ErrorCode::Invalid) => 401, // an unknown user
                _ => 500,
            };
            return plain_error(status, format!("{file}: {err}"));
        }
        let name = file.rsplit('/').next().unwrap_or_default().to_string();
        written.push(json!({"name": name, "type": "file", "path": file}));
    }
    axum::Json(written).into_response()
}

/// One file system entry as envd's `EntryInfo` (ProtoJSON: int64 as a string, enums by name).
fn entry_info(
    path: &str,
    kind: FileKind,
    size: u64,
    mode: u32,
    mtime_s: i64,
    who: (&str, &str),
    target: Option<&str>,
) -> Value {
    let (t, c) = match kind {
        FileKind::File => ("FILE_TYPE_FILE", '-'),
        FileKind::Dir => ("FILE_TYPE_DIRECTORY", 'd'),
        FileKind::Symlink => ("FILE_TYPE_SYMLINK", 'l'),
        FileKind::Other => ("FILE_TYPE_UNSPECIFIED", '?'),
    };
    let perms: String = std::iter::once(c)
        .chain((0..9).map(|i| if mode & (1 << (8 - i)) != 0 { ['r', 'w', 'x'][i % 3] } else { '-' }))
        .collect();
    let name = path.rsplit('/').next().unwrap_or(path);
    let mut v = json!({
        "name": if name.is_empty() { "/" } else { name },
        "type": t,
        "path": path,
        "size": size.to_string(),
        "mode": mode & 0o777,
        "permissions": perms,
        "owner": who.0,
        "group": who.1,
        "modifiedTime": rfc3339(mtime_s.max(0) as u64 * 1000),
    });
    if let Some(target) = target {
        v["symlinkTarget"] = json!(target);
        v["isSymlink"] = json!(true);
    }
    v
}

async fn stat_entry(agent: &AgentClient, path: &str) -> Result<Value, ConnectError> {
    let st = agent.stat(path).await.map_err(agent_error)?;
    Ok(entry_info(path, st.kind, st.size, st.mode, st.mtime_s, (&st.owner, &st.group), st.target.as_deref()))
}

fn parse<'a, T: Deserialize<'a>>(msg: &'a [u8]) -> Result<T, ConnectError> {
    serde_json::from_slice(msg).map_err(|err| ConnectError::new(Code::InvalidArgument, format!("request: {err}")))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ProcessRef {
    process: Selector,
}

fn find(sbx: &Sandbox, s: &Selector) -> Result<Arc<Proc>, ConnectError> {
    let p = match (s.pid, &s.tag) {
        (Some(pid), _) => sbx.procs.get(pid),
        (None, Some(tag)) => sbx.procs.by_tag(tag),
        (None, None) => {
            return Err(ConnectError::new(Code::InvalidArgument, "a process selector needs a pid or a tag"))
        }
    };
    p.ok_or_else(|| {
        ConnectError::new(
            Code::NotFound,
            format!("process {:?} not found", s.pid.map(|p| p.to_string()).or(s.tag.clone()).unwrap_or_default()),
        )
    })
}

/// A signal as ProtoJSON gives it: a name (`SIGNAL_SIGKILL`) or a number.
fn signal_of(v: &Value) -> Option<i32> {
    match v {
        Value::String(s) => match s.as_str() {
            "SIGNAL_SIGKILL" => Some(9),
            "SIGNAL_SIGTERM" => Some(15),
            "SIGNAL_SIGINT" => Some(2),
            "SIGNAL_SIGHUP" => Some(1),
            _ => None,
        },
        Value::Number(n) => n.as_i64().filter(|n| (1..=64).contains(n)).map(|n| n as i32),
        _ => None,
    }
}

/// The period of `keepalive` messages a stream's caller asks for (`Keepalive-Ping-Interval`, seconds).
fn keepalive_of(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s.min(3600)))
}

/// `WatchDirRequest` / `CreateWatcherRequest` (`include_entry` and `allow_network_mounts` need an envd newer than
/// the one flintd reports, so the SDK never sends them).
#[derive(Deserialize)]
struct WatchRequest {
    #[serde(default)]
    path: String,
    #[serde(default)]
    recursive: bool,
}

async fn rpc_call(e: Arc<E2b>, sbx: Arc<Sandbox>, t: Target, headers: &HeaderMap, rpc: &str, body: Bytes) -> Response {
    let streaming = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/connect+json"));
    let user = user_of(&e, headers);
    match rpc {
        "process.Process/Start" | "process.Process/Connect" | "filesystem.Filesystem/WatchDir" if !streaming => {
            unary_error(&ConnectError::new(Code::InvalidArgument, "a server stream (application/connect+json)"))
        }
        "process.Process/Start" | "process.Process/Connect" => {
            let keepalive = keepalive_of(headers);
            let timeout_ms =
                headers.get("connect-timeout-ms").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
            let started = match connect::single(&body) {
                Err(err) => Err(err),
                Ok(msg) if rpc.ends_with("Start") => start(&e, &sbx, &t, &user, msg, timeout_ms).await,
                Ok(msg) => parse::<ProcessRef>(msg)
                    .and_then(|r| find(&sbx, &r.process))
                    .map(|p| (p.pid, Events::Attached(p.subscribe()))),
            };
            stream_response(started, keepalive)
        }
        "filesystem.Filesystem/WatchDir" => {
            let keepalive = keepalive_of(headers);
            let req = connect::single(&body).and_then(parse::<WatchRequest>);
            let watched = match req {
                Ok(r) => agent(&e, &t.id).await.map(|(a, activity)| (a, activity, r)),
                Err(err) => Err(err),
            };
            match watched {
                Ok((a, activity, r)) => {
                    super::watch::stream(a, activity, resolve(&r.path, &user), r.recursive, keepalive).await
                }
                Err(err) => ([("content-type", "application/connect+json")], connect::end(Some(&err))).into_response(),
            }
        }
        "process.Process/StreamInput" => {
            let res = async {
                let msgs = connect::decode_all(&body)?;
                let mut proc = None;
                for (flags, m) in msgs {
                    if flags & connect::END_STREAM != 0 {
                        break;
                    }
                    let v: Value = parse(m)?;
                    if let Some(start) = v.get("start") {
                        let sel: Selector = serde_json::from_value(start["process"].clone()).unwrap_or_default();
                        proc = Some(find(&sbx, &sel)?);
                    } else if let Some(data) = v.get("data") {
                        let p = proc
                            .as_ref()
                            .ok_or_else(|| ConnectError::new(Code::InvalidArgument, "data before start"))?;
                        let bytes = input_bytes(&data["input"])?;
                        p.send(Ctl::Stdin(bytes)).await;
                    }
                }
                Ok::<_, ConnectError>(())
            }
            .await;
            let mut out = Vec::new();
            if res.is_ok() {
                out.extend(connect::message(&json!({})));
            }
            out.extend(connect::end(res.err().as_ref()));
            ([("content-type", "application/connect+json")], out).into_response()
        }
        _ if streaming => {
            unary_error(&ConnectError::new(Code::Unimplemented, format!("{rpc} is not a stream flintd serves")))
        }
        _ => unary(unary_rpc(&e, &sbx, &t, &user, rpc, &body).await),
    }
}

fn input_bytes(input: &Value) -> Result<Vec<u8>, ConnectError> {
    let s = input.get("stdin").or_else(|| input.get("pty")).and_then(|v| v.as_str()).unwrap_or("");
    b64::decode(s).ok_or_else(|| ConnectError::new(Code::InvalidArgument, "input is not base64"))
}

async fn unary_rpc(
    e: &E2b,
    sbx: &Sandbox,
    t: &Target,
    user: &str,
    rpc: &str,
    body: &[u8],
) -> Result<Value, ConnectError> {
    let body = if body.is_empty() { &b"{}"[..] } else { body };
    match rpc {
        "process.Process/List" => Ok(json!({
            "processes": sbx.procs.list().iter().map(|p| {
                let mut v = json!({"config": p.config, "pid": p.pid});
                if let Some(tag) = &p.tag {
                    v["tag"] = json!(tag);
                }
                v
            }).collect::<Vec<_>>()
        })),
        "process.Process/SendInput" => {
            let v: Value = parse(body)?;
            let sel: Selector = serde_json::from_value(v["process"].clone()).unwrap_or_default();
            let p = find(sbx, &sel)?;
            if !p.stdin {
                return Err(ConnectError::new(
                    Code::FailedPrecondition,
                    format!("process {} was started without stdin", p.pid),
                ));
            }
            p.send(Ctl::Stdin(input_bytes(&v["input"])?)).await;
            Ok(json!({}))
        }
        "process.Process/SendSignal" => {
            let v: Value = parse(body)?;
            let sel: Selector = serde_json::from_value(v["process"].clone()).unwrap_or_default();
            let sig = signal_of(&v["signal"])
                .ok_or_else(|| ConnectError::new(Code::InvalidArgument, format!("signal {}", v["signal"])))?;
            find(sbx, &sel)?.send(Ctl::Signal(sig)).await;
            Ok(json!({}))
        }
        "process.Process/CloseStdin" => {
            let r: ProcessRef = parse(body)?;
            find(sbx, &r.process)?.send(Ctl::CloseStdin).await;
            Ok(json!({}))
        }
        "process.Process/Update" => {
            let v: Value = parse(body)?;
            let sel: Selector = serde_json::from_value(v["process"].clone()).unwrap_or_default();
            let size = &v["pty"]["size"];
            let (cols, rows) = (size["cols"].as_u64().unwrap_or(0), size["rows"].as_u64().unwrap_or(0));
            if cols == 0 || rows == 0 || cols > 10_000 || rows > 10_000 {
                return Err(ConnectError::new(Code::InvalidArgument, "pty.size needs cols and rows"));
            }
            find(sbx, &sel)?.send(Ctl::Resize(rows as u16, cols as u16)).await;
            Ok(json!({}))
        }
        "filesystem.Filesystem/Stat" => {
            let v: Value = parse(body)?;
            let (a, _activity) = agent(e, &t.id).await?;
            Ok(json!({"entry": stat_entry(&a, &resolve(v["path"].as_str().unwrap_or(""), user)).await?}))
        }
        "filesystem.Filesystem/ListDir" => {
            let v: Value = parse(body)?;
            let depth = v["depth"].as_u64().unwrap_or(1).clamp(1, 32);
            let root = resolve(v["path"].as_str().unwrap_or(""), user);
            let (a, _activity) = agent(e, &t.id).await?;
            let st = a.stat(&root).await.map_err(agent_error)?;
            if st.kind != FileKind::Dir {
                return Err(ConnectError::new(Code::InvalidArgument, format!("{root} is not a directory")));
            }
            let mut entries = Vec::new();
            let mut level = vec![root.trim_end_matches('/').to_string()];
            for _ in 0..depth {
                let mut next = Vec::new();
                for dir in level {
                    for d in a.list(if dir.is_empty() { "/" } else { &dir }).await.map_err(agent_error)? {
                        let p = format!("{dir}/{}", d.name);
                        if d.kind == FileKind::Dir {
                            next.push(p.clone());
                        }
                        entries.push(entry_info(
                            &p,
                            d.kind,
                            d.size,
                            d.mode,
                            d.mtime_s,
                            (&d.owner, &d.group),
                            d.target.as_deref(),
                        ));
                        if entries.len() > 100_000 {
                            return Err(ConnectError::new(Code::ResourceExhausted, "more than 100000 entries"));
                        }
                    }
                }
                level = next;
            }
            Ok(json!({"entries": entries}))
        }
        "filesystem.Filesystem/MakeDir" => {
            let v: Value = parse(body)?;
            let p = resolve(v["path"].as_str().unwrap_or(""), user);
            let (a, _activity) = agent(e, &t.id).await?;
            a.mkdir_as(&p, Some(user), true).await.map_err(agent_error)?;
            Ok(json!({"entry": stat_entry(&a, &p).await?}))
        }
        "filesystem.Filesystem/Move" => {
            let v: Value = parse(body)?;
            let (from, to) = (
                resolve(v["source"].as_str().unwrap_or(""), user),
                resolve(v["destination"].as_str().unwrap_or(""), user),
            );
            let (a, _activity) = agent(e, &t.id).await?;
            a.rename(&from, &to).await.map_err(agent_error)?;
            Ok(json!({"entry": stat_entry(&a, &to).await?}))
        }
        "filesystem.Filesystem/CreateWatcher" => {
            let r: WatchRequest = parse(body)?;
            let (a, activity) = agent(e, &t.id).await?;
            let id = sbx.watchers.create(a, activity, resolve(&r.path, user), r.recursive).await?;
            Ok(json!({"watcherId": id}))
        }
        "filesystem.Filesystem/GetWatcherEvents" => {
            let v: Value = parse(body)?;
            let events = sbx.watchers.events(v["watcherId"].as_str().unwrap_or(""))?;
            Ok(json!({"events": events.iter().map(super::watch::event_json).collect::<Vec<_>>()}))
        }
        "filesystem.Filesystem/RemoveWatcher" => {
            let v: Value = parse(body)?;
            let id = v["watcherId"].as_str().unwrap_or("");
            if !sbx.watchers.remove(id) {
                return Err(ConnectError::new(Code::NotFound, format!("watcher {id} not found")));
            }
            Ok(json!({}))
        }
        "filesystem.Filesystem/Remove" => {
            let v: Value = parse(body)?;
            let (a, _activity) = agent(e, &t.id).await?;
            a.remove(&resolve(v["path"].as_str().unwrap_or(""), user), true).await.map_err(agent_error)?;
            Ok(json!({}))
        }
        _ => Err(ConnectError::new(Code::Unimplemented, format!("{rpc} is not served by flintd (docs/e2b.md)"))),
    }
}

/// Where a process stream's events come from: the one that started it, or a re-attach.
enum Events {
    Started(mpsc::Receiver<ProcEvent>),
    Attached(tokio::sync::broadcast::Receiver<ProcEvent>),
}

impl Events {
    async fn next(&mut self) -> Option<ProcEvent> {
        match self {
            Events::Started(rx) => rx.recv().await,
            Events::Attached(rx) => loop {
                match rx.recv().await {
                    Ok(ev) => return Some(ev),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return None,
                }
            },
        }
    }
}

async fn start(
    e: &E2b,
    sbx: &Sandbox,
    t: &Target,
    user: &str,
    msg: &[u8],
    timeout_ms: Option<u64>,
) -> Result<(u32, Events), ConnectError> {
    let v: Value = parse(msg)?;
    let process = &v["process"];
    let cmd = process["cmd"]
        .as_str()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ConnectError::new(Code::InvalidArgument, "process.cmd is needed"))?;
    let mut argv = vec![cmd.to_string()];
    argv.extend(process["args"].as_array().into_iter().flatten().filter_map(|a| a.as_str().map(String::from)));
    let env = process["envs"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect();
    let cwd = process["cwd"].as_str().map(|c| resolve(c, user)).unwrap_or_else(|| home_of(user));
    let tty = v["pty"]["size"].as_object().map(|s| TtySize {
        rows: s.get("rows").and_then(|r| r.as_u64()).unwrap_or(24).clamp(1, 10_000) as u16,
        cols: s.get("cols").and_then(|c| c.as_u64()).unwrap_or(80).clamp(1, 10_000) as u16,
    });
    let req = ExecRequest {
        argv,
        env,
        cwd: Some(cwd),
        user: Some(user.to_string()),
        timeout_ms: timeout_ms.filter(|t| *t > 0),
        stdin: v["stdin"].as_bool().unwrap_or(false) || tty.is_some(),
        tty,
    };
    let (a, activity) = agent(e, &t.id).await?;
    let tag = v["tag"].as_str().map(String::from);
    let (p, rx) = sbx.procs.start(a, activity, req, tag, process.clone()).await.map_err(agent_error)?;
    Ok((p.pid, Events::Started(rx)))
}

/// The signal names Go's ProcessState gives (`signal: killed`).
fn signal_name(n: i32) -> String {
    match n {
        9 => "killed".into(),
        15 => "terminated".into(),
        2 => "interrupt".into(),
        1 => "hangup".into(),
        n => format!("signal {n}"),
    }
}

fn event_message(ev: &ProcEvent) -> Value {
    match ev {
        ProcEvent::Stdout(b) => json!({"event": {"data": {"stdout": b64::encode(b)}}}),
        ProcEvent::Stderr(b) => json!({"event": {"data": {"stderr": b64::encode(b)}}}),
        ProcEvent::Pty(b) => json!({"event": {"data": {"pty": b64::encode(b)}}}),
        ProcEvent::End { code, signal, error } => {
            let (exit, exited, status) = match (code, signal) {
                (Some(c), _) => (*c, true, format!("exit status {c}")),
                (None, Some(s)) => (-1, false, format!("signal: {}", signal_name(*s))),
                (None, None) => (-1, false, error.clone().unwrap_or_else(|| "lost".into())),
            };
            let mut end = json!({"exitCode": exit, "exited": exited, "status": status});
            if let Some(err) = error {
                end["error"] = json!(err);
            }
            json!({"event": {"end": end}})
        }
    }
}

/// A 200 `application/connect+json` stream: `start{pid}`, the process's events as they come (a `keepalive`
/// every `keepalive` without one), the end, then the end-stream envelope (an error goes inside it).
fn stream_response(started: Result<(u32, Events), ConnectError>, keepalive: Option<Duration>) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        let (pid, mut events) = match started {
            Ok(s) => s,
            Err(err) => return drop(tx.send(Ok(Bytes::from(connect::end(Some(&err))))).await),
        };
        if tx.send(Ok(Bytes::from(connect::message(&json!({"event": {"start": {"pid": pid}}}))))).await.is_err() {
            return;
        }
        let period = keepalive.unwrap_or(Duration::from_secs(3600));
        loop {
            let ev = tokio::select! {
                ev = events.next() => ev,
                _ = tokio::time::sleep(period), if keepalive.is_some() => {
                    let ka = connect::message(&json!({"event": {"keepalive": {}}}));
                    if tx.send(Ok(Bytes::from(ka))).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Some(ev) = ev else {
                let err = ConnectError::new(Code::Unavailable, "the process's stream ended without its exit");
                return drop(tx.send(Ok(Bytes::from(connect::end(Some(&err))))).await);
            };
            let last = matches!(ev, ProcEvent::End { .. });
            if tx.send(Ok(Bytes::from(connect::message(&event_message(&ev))))).await.is_err() {
                return;
            }
            if last {
                let _ = tx.send(Ok(Bytes::from(connect::end(None)))).await;
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    ([("content-type", "application/connect+json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_entries_and_events_are_what_the_sdk_reads() {
        assert_eq!(resolve("a/b", "user"), "/home/user/a/b");
        assert_eq!(resolve("~/x", "root"), "/root/x");
        assert_eq!(resolve("/etc", "user"), "/etc");
        assert_eq!(resolve("", "user"), "/home/user");
        let v = entry_info("/home/user/f.txt", FileKind::File, 5, 0o644, 0, ("user", "user"), None);
        assert_eq!(
            (v["name"].as_str(), v["type"].as_str(), v["size"].as_str(), v["permissions"].as_str()),
            (Some("f.txt"), Some("FILE_TYPE_FILE"), Some("5"), Some("-rw-r--r--"))
        );
        assert_eq!(entry_info("/d", FileKind::Dir, 0, 0o755, 0, ("root", "root"), None)["permissions"], "drwxr-xr-x");
        let end = event_message(&ProcEvent::End { code: Some(3), signal: None, error: None });
        assert_eq!(end["event"]["end"], json!({"exitCode": 3, "exited": true, "status": "exit status 3"}));
        let killed = event_message(&ProcEvent::End { code: None, signal: Some(9), error: None });
        assert_eq!(killed["event"]["end"]["status"], "signal: killed");
        assert_eq!(event_message(&ProcEvent::Stdout(b"hi\n".to_vec()))["event"]["data"]["stdout"], "aGkK");
        assert_eq!(signal_of(&json!("SIGNAL_SIGKILL")), Some(9));
        assert_eq!(signal_of(&json!(15)), Some(15));
        assert_eq!(signal_of(&json!(0)), None);
        assert_eq!(percent_decode("%2Fhome%2Fuser%2Fa+b.txt"), "/home/user/a b.txt");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
