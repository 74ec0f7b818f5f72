//! E2B's control plane (REST + JSON, `X-API-KEY`): sandboxes created, listed, inspected, paused, resumed
//! (`connect`), given a new deadline and killed, translated to Flint sessions.
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use flint_vmm_api::{lock, now_unix_ms};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::info;

use super::envd::percent_decode;
use super::{new_id, rfc3339, E2b, E2bError, OnTimeout, SandboxRecord, ENVD_VERSION};
use crate::services::sessions::{CreateSession, OnIdle, SessionState};

/// E2B's error body.
pub fn error(status: u16, message: impl Into<String>) -> Response {
    let st = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (st, axum::Json(json!({"code": status, "message": message.into()}))).into_response()
}

fn from(e: E2bError) -> Response {
    error(e.status, e.message)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<u64>,
    auto_pause: Option<bool>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
    secure: Option<bool>,
    lifecycle: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Timeout {
    timeout: Option<u64>,
}

/// A control-plane path's segments after its API version (`/v2/sandboxes/x` and `/sandboxes/x`: `sandboxes`, `x`).
pub fn control_segments(path: &str) -> Vec<&str> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["v2", rest @ ..] | ["v1", rest @ ..] => rest.to_vec(),
        s => s.to_vec(),
    }
}

/// Serves a control-plane request (the API key already checked).
pub async fn serve(e: Arc<E2b>, method: &Method, path: &str, query: &str, body: &[u8]) -> Response {
    let segs = control_segments(path);
    match (method, segs.as_slice()) {
        (&Method::POST, ["sandboxes"]) => create(&e, body).await,
        (&Method::GET, ["sandboxes"]) => list(&e, query),
        (&Method::GET, ["sandboxes", id]) => match e.sandbox(id).await {
            Some(s) => axum::Json(detail(&lock(&s.rec), true)).into_response(),
            None => error(404, format!("sandbox {id} not found")),
        },
        (&Method::DELETE, ["sandboxes", id]) => match e.kill_anywhere(id).await {
            Ok(true) => StatusCode::NO_CONTENT.into_response(),
            Ok(false) => error(404, format!("sandbox {id} not found")),
            Err(err) => from(err),
        },
        (&Method::POST, ["sandboxes", id, "pause"]) => match e.pause(id).await {
            Ok(true) => StatusCode::NO_CONTENT.into_response(),
            Ok(false) => error(409, format!("sandbox {id} is already paused")),
            Err(err) => from(err),
        },
        (&Method::POST, ["sandboxes", id, "connect"]) | (&Method::POST, ["sandboxes", id, "resume"]) => {
            connect(&e, id, body).await
        }
        (&Method::POST, ["sandboxes", id, "timeout"]) => {
            let t: Timeout = serde_json::from_slice(body).unwrap_or_default();
            let Some(secs) = t.timeout else { return error(400, "`timeout` (seconds) is needed") };
            let Some(s) = e.sandbox(id).await else { return error(404, format!("sandbox {id} not found")) };
            let secs = secs.min(e.cfg.e2b.max_timeout_s);
            match e.update(&s, |r| r.end_unix_ms = now_unix_ms() + secs * 1000) {
                Ok(_) => StatusCode::NO_CONTENT.into_response(),
                Err(err) => from(err),
            }
        }
        (&Method::POST, ["sandboxes", id, "refreshes"]) => match e.sandbox(id).await {
            Some(_) => StatusCode::NO_CONTENT.into_response(),
            None => error(404, format!("sandbox {id} not found")),
        },
        (&Method::GET, ["sandboxes", id, "metrics"]) => metrics(&e, id).await,
        _ => error(404, format!("no such E2B API route: {method} {path} (docs/e2b.md lists what flintd serves)")),
    }
}

/// A template id as Flint knows it: a template of that name, else a snapshot of that id.
async fn origin(e: &E2b, template_id: &str) -> Result<(Option<String>, Option<String>), E2bError> {
    if e.templates.get(template_id).is_ok() {
        return Ok((Some(template_id.to_string()), None));
    }
    if let Some(t) = e.cfg.e2b.aliases.get(template_id).filter(|t| e.templates.get(t).is_ok()) {
        return Ok((Some(t.clone()), None));
    }
    if e.vms.store.manifest(template_id).await.is_ok() {
        return Ok((None, Some(template_id.to_string())));
    }
    Err(E2bError::new(
        404,
        format!(
            "template {template_id} not found: create it on this host (`flint template create {template_id} --image e2b`)"
        ),
    ))
}

async fn create(e: &Arc<E2b>, body: &[u8]) -> Response {
    let req: NewSandbox = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(err) => return error(400, format!("request body: {err}")),
    };
    if req.template_id.is_empty() {
        return error(400, "templateID is needed");
    }
    let (template, snapshot) = match origin(e, &req.template_id).await {
        Ok(o) => o,
        Err(err) => return from(err),
    };
    let timeout = req.timeout.unwrap_or(e.cfg.e2b.default_timeout_s).clamp(1, e.cfg.e2b.max_timeout_s);
    let on_timeout = match req.lifecycle.as_ref().and_then(|l| l["onTimeout"].as_str()) {
        Some("pause") => OnTimeout::Pause,
        Some(_) => OnTimeout::Kill,
        None if req.auto_pause == Some(true) => OnTimeout::Pause,
        None => OnTimeout::Kill,
    };
    let id = new_id();
    let t0 = std::time::Instant::now();
    let token = req.secure.unwrap_or(false).then(crate::net::policy::new_token);
    let mut rec = SandboxRecord {
        id: id.clone(),
        template_id: req.template_id.clone(),
        started_unix_ms: now_unix_ms(),
        end_unix_ms: now_unix_ms() + timeout * 1000,
        on_timeout,
        paused: false,
        access_token: token,
        metadata: req.metadata.clone().unwrap_or_default(),
        cpu_count: 1,
        memory_mb: 0,
        disk_mb: 0,
        executions: BTreeMap::new(),
    };
    let s = CreateSession {
        template,
        snapshot,
        id: Some(id.clone()),
        env: req.env_vars.clone().unwrap_or_default(),
        metadata: req.metadata.clone().unwrap_or_default(),
        on_idle: OnIdle::Hibernate,
        // The session's claim carries the sandbox from the start (in a fleet, another host may wake it).
        annotations: [(super::ANNOTATION.to_string(), serde_json::to_string(&rec).unwrap_or_default())].into(),
        ..Default::default()
    };
    // Create answers once the guest's agent has answered: the SDK does not wait for envd itself.
    let session = match e.sessions.create(s).await {
        Ok(s) => s,
        Err(err) => return from(err.into()),
    };
    let vm = session.vm.as_deref().and_then(|v| e.vms.get(v).ok());
    rec.cpu_count = vm.as_ref().map_or(1, |v| u32::from(v.vcpus.max(1)));
    rec.memory_mb = vm.as_ref().map_or(0, |v| v.mem_mib);
    rec.disk_mb = vm.as_ref().and_then(|v| v.disk_mib).unwrap_or(0);
    if let Err(err) = e.insert(rec.clone()) {
        let _ = e.sessions.delete(&id).await;
        return from(err);
    }
    info!(sandbox = %id, template = %req.template_id, ms = t0.elapsed().as_millis() as u64, "E2B sandbox created");
    (StatusCode::CREATED, axum::Json(sandbox_json(&rec))).into_response()
}

/// The `Sandbox` answer of create and connect.
fn sandbox_json(r: &SandboxRecord) -> Value {
    let mut v = json!({
        "templateID": r.template_id,
        "sandboxID": r.id,
        "clientID": "flint",
        "envdVersion": ENVD_VERSION,
        "alias": r.template_id,
        "domain": null,
    });
    if let Some(t) = &r.access_token {
        v["envdAccessToken"] = json!(t);
    }
    v
}

/// A `SandboxDetail` (`with_token`: the detail of `get`, which carries the access token) or a `ListedSandbox`.
pub fn detail(r: &SandboxRecord, with_token: bool) -> Value {
    let mut v = json!({
        "templateID": r.template_id,
        "alias": r.template_id,
        "sandboxID": r.id,
        "clientID": "flint",
        "startedAt": rfc3339(r.started_unix_ms),
        "endAt": rfc3339(r.end_unix_ms),
        "envdVersion": ENVD_VERSION,
        "cpuCount": r.cpu_count,
        "memoryMB": r.memory_mb,
        "diskSizeMB": r.disk_mb,
        "state": if r.paused { "paused" } else { "running" },
        "metadata": r.metadata,
        "lifecycle": {"autoResume": false, "onTimeout": if r.on_timeout == OnTimeout::Pause { "pause" } else { "kill" }},
    });
    if with_token {
        if let Some(t) = &r.access_token {
            v["envdAccessToken"] = json!(t);
        }
    }
    v
}

fn list(e: &E2b, query: &str) -> Response {
    list_page(e.sandboxes().iter().map(|s| lock(&s.rec).clone()).collect(), query)
}

/// E2B's `GET /sandboxes` over `recs` (this host's sandboxes, or a fleet's): `metadata`, `state`, `limit`,
/// `nextToken` and `order` as the SDK sends them; `X-Next-Token` when a page is left.
pub fn list_page(recs: Vec<SandboxRecord>, query: &str) -> Response {
    let param = |k: &str| {
        query.split('&').find_map(|kv| kv.split_once('=').filter(|(key, _)| *key == k).map(|(_, v)| percent_decode(v)))
    };
    // metadata=<urlencoded "k=v&k2=v2">
    let want: BTreeMap<String, String> = param("metadata")
        .map(|m| {
            m.split('&')
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (percent_decode(k), percent_decode(v))))
                .collect()
        })
        .unwrap_or_default();
    let states: Vec<String> = param("state").map(|s| s.split(',').map(String::from).collect()).unwrap_or_default();
    let limit = param("limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(100).clamp(1, 1000);
    let offset = param("nextToken").and_then(|t| t.parse::<usize>().ok()).unwrap_or(0);
    let ascending = param("order").as_deref() == Some("asc");
    let mut recs: Vec<SandboxRecord> = recs
        .into_iter()
        .filter(|r| want.iter().all(|(k, v)| r.metadata.get(k) == Some(v)))
        .filter(|r| states.is_empty() || states.iter().any(|s| s == if r.paused { "paused" } else { "running" }))
        .collect();
    recs.sort_by_key(|r| (r.started_unix_ms, r.id.clone()));
    if !ascending {
        recs.reverse();
    }
    let page: Vec<Value> = recs.iter().skip(offset).take(limit).map(|r| detail(r, false)).collect();
    let mut resp = axum::Json(page).into_response();
    if offset + limit < recs.len() {
        if let Ok(h) = HeaderValue::from_str(&(offset + limit).to_string()) {
            resp.headers_mut().insert("x-next-token", h);
        }
    }
    resp
}

async fn connect(e: &Arc<E2b>, id: &str, body: &[u8]) -> Response {
    let Some(s) = e.sandbox(id).await else { return error(404, format!("Paused sandbox {id} not found")) };
    let t: Timeout = serde_json::from_slice(body).unwrap_or_default();
    let was_paused = lock(&s.rec).paused;
    if was_paused {
        match e.sessions.wake(id).await {
            Ok(_) => {}
            Err(err) => return from(err.into()),
        }
    }
    // A deadline only moves up on connect.
    let secs = t.timeout.unwrap_or(e.cfg.e2b.default_timeout_s).min(e.cfg.e2b.max_timeout_s);
    let rec = match e.update(&s, |r| {
        r.paused = false;
        r.end_unix_ms = r.end_unix_ms.max(now_unix_ms() + secs * 1000);
    }) {
        Ok(r) => r,
        Err(err) => return from(err),
    };
    let status = if was_paused { StatusCode::CREATED } else { StatusCode::OK };
    (status, axum::Json(sandbox_json(&rec))).into_response()
}

async fn metrics(e: &E2b, id: &str) -> Response {
    let Some(s) = e.sandbox(id).await else { return error(404, format!("sandbox {id} not found")) };
    let rec = lock(&s.rec).clone();
    // A sleeping sandbox has no fresh sample (and is not woken for one).
    let running = e.sessions.get(id).await.is_ok_and(|r| r.state == SessionState::Running);
    if rec.paused || !running {
        return axum::Json(Vec::<Value>::new()).into_response();
    }
    let Ok((agent, _activity)) = super::envd::agent(e, id).await else {
        return axum::Json(Vec::<Value>::new()).into_response();
    };
    let Ok(h) = agent.health().await else { return axum::Json(Vec::<Value>::new()).into_response() };
    let now = now_unix_ms();
    let total = h.mem_total_kb * 1024;
    let used = total.saturating_sub(h.mem_available_kb * 1024);
    let cpu = (h.load[0] / f64::from(rec.cpu_count.max(1)) * 100.0).min(100.0);
    axum::Json(vec![json!({
        "timestamp": rfc3339(now),
        "timestampUnix": now / 1000,
        "cpuCount": rec.cpu_count,
        "cpuUsedPct": cpu,
        "memUsed": used,
        "memTotal": total,
        "memCache": 0,
        "diskUsed": 0,
        "diskTotal": rec.disk_mb << 20,
    })])
    .into_response()
}

/// Whether the request carries a valid API key.
pub fn authorised(e: &E2b, headers: &HeaderMap) -> bool {
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).is_some_and(|k| e.keys.check(k))
}
