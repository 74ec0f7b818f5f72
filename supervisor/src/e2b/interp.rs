//! The code interpreter (guest port 49999) on the warm Python runner: `POST /execute` streams one JSON object per
//! line (stdout, stderr, the main result, an error, the execution count, the end), contexts are namespaces of
//! their own in the runner.
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use flint_agent::client::RunEvent;
use flint_agent::protocol::{RunRequest, RunStatus};
use flint_vmm_api::{lock, now_unix_ms};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::envd::{plain_error, Target};
use super::{rfc3339, E2b, Sandbox};

/// The default context's id (E2B's default Python context).
pub const DEFAULT_CONTEXT: &str = "python";

#[derive(Deserialize)]
struct Execute {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NewContext {
    language: Option<String>,
    cwd: Option<String>,
}

/// A language Flint's code interpreter does not run (it runs Python).
#[derive(Debug, thiserror::Error)]
#[error("language `{0}` is not served: Flint's code interpreter runs Python (docs/e2b.md)")]
struct NotPython(String);

fn python(language: Option<&str>) -> Result<(), NotPython> {
    match language {
        None | Some("python") | Some("python3") => Ok(()),
        Some(other) => Err(NotPython(other.to_string())),
    }
}

fn context_json(id: &str) -> Value {
    json!({"id": id, "language": "python", "cwd": "/home/user"})
}

pub async fn serve(e: Arc<E2b>, sbx: Arc<Sandbox>, t: Target, req: axum::extract::Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if let Some(want) = lock(&sbx.rec).access_token.clone() {
        let got = parts.headers.get("x-access-token").and_then(|v| v.to_str().ok()).unwrap_or("");
        if path != "/health" && !crate::net::front::same(got, &want) {
            return plain_error(401, "this sandbox needs its access token (X-Access-Token)");
        }
    }
    let body = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(b) => b,
        Err(err) => return plain_error(413, format!("request body: {err}")),
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&parts.method, segments.as_slice()) {
        (&Method::GET, ["health"]) => (StatusCode::OK, axum::Json("OK")).into_response(),
        (&Method::GET, ["contexts"]) => {
            let rec = lock(&sbx.rec).clone();
            let mut ids: Vec<&String> = rec.executions.keys().collect();
            ids.retain(|k| k.as_str() != DEFAULT_CONTEXT);
            let mut out = vec![context_json(DEFAULT_CONTEXT)];
            out.extend(ids.into_iter().map(|id| context_json(id)));
            axum::Json(out).into_response()
        }
        (&Method::POST, ["contexts"]) => {
            let req: NewContext =
                serde_json::from_slice(if body.is_empty() { b"{}" } else { &body }).unwrap_or_default();
            if let Err(m) = python(req.language.as_deref()) {
                return plain_error(400, m.to_string());
            }
            let _ = req.cwd;
            let id = format!("ctx{}", &super::new_id()[1..13]);
            match e.update(&sbx, |r| {
                r.executions.insert(id.clone(), 0);
            }) {
                Ok(_) => axum::Json(context_json(&id)).into_response(),
                Err(err) => plain_error(err.status, err.message),
            }
        }
        (&Method::DELETE, ["contexts", id]) | (&Method::POST, ["contexts", id, "restart"]) => {
            let known = lock(&sbx.rec).executions.contains_key(*id) || *id == DEFAULT_CONTEXT;
            if !known {
                return plain_error(404, format!("context {id} not found"));
            }
            if parts.method == Method::DELETE {
                let id = id.to_string();
                let _ = e.update(&sbx, |r| {
                    r.executions.remove(&id);
                });
            }
            StatusCode::OK.into_response()
        }
        (&Method::POST, ["execute"]) => {
            let req: Execute = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(err) => return plain_error(400, format!("request body: {err}")),
            };
            if req.context_id.is_some() && req.language.is_some() {
                return plain_error(400, "give a context_id or a language, not both");
            }
            if let Err(m) = python(req.language.as_deref()) {
                return plain_error(400, m.to_string());
            }
            let ctx = req.context_id.clone().unwrap_or_else(|| DEFAULT_CONTEXT.into());
            if ctx != DEFAULT_CONTEXT && !lock(&sbx.rec).executions.contains_key(&ctx) {
                return plain_error(404, format!("context {ctx} not found"));
            }
            execute(e, sbx, t, req, ctx).await
        }
        _ => plain_error(404, format!("the code interpreter has no {} {path}", parts.method)),
    }
}

/// The value as E2B's server gives a `text/plain` result: a repr in quotes loses them.
fn result_text(repr: &str) -> String {
    let q = |c: char| repr.len() >= 2 && repr.starts_with(c) && repr.ends_with(c);
    if q('\'') || q('"') {
        repr[1..repr.len() - 1].to_string()
    } else {
        repr.to_string()
    }
}

async fn execute(e: Arc<E2b>, sbx: Arc<Sandbox>, t: Target, req: Execute, ctx: String) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(32);
    let line = |v: Value| Ok(Bytes::from(format!("{v}\n")));
    tokio::spawn(async move {
        let now = || rfc3339(now_unix_ms());
        let (agent, activity) = match super::envd::agent(&e, &t.id).await {
            Ok(a) => a,
            Err(err) => {
                let v = json!({"type": "error", "name": "SandboxError", "value": err.message, "traceback": ""});
                let _ = tx.send(line(v)).await;
                return;
            }
        };
        let _activity = activity;
        // The sandbox's environment (create's envVars), then the call's.
        let mut env = e.sessions.get(&t.id).await.map(|s| s.env).unwrap_or_default();
        env.extend(req.env_vars.unwrap_or_default());
        let run = RunRequest {
            language: "python".into(),
            code: req.code,
            timeout_ms: None,
            context: (ctx != DEFAULT_CONTEXT).then(|| ctx.clone()),
            env,
        };
        let mut s = match agent.run_code_stream(run).await {
            Ok(s) => s,
            Err(err) => {
                let _ = tx
                    .send(line(
                        json!({"type": "error", "name": "RunnerError", "value": err.to_string(), "traceback": ""}),
                    ))
                    .await;
                return;
            }
        };
        // Output goes out a line at a time (as Jupyter's stream messages do): `print('a')` is one "a\n".
        let mut pending = [Vec::new(), Vec::new()];
        loop {
            // A client that hangs up (the SDK's own timeout) interrupts the cell, as E2B's kernel server does.
            let next = tokio::select! {
                n = s.next() => n,
                _ = tx.closed() => {
                    let _ = s.interrupt().await;
                    while let Ok(Some(ev)) = s.next().await {
                        if matches!(ev, RunEvent::Done(_)) {
                            break;
                        }
                    }
                    return;
                }
            };
            let mut lines = Vec::new();
            match next {
                Ok(Some(RunEvent::Stdout(b))) => lines.extend(complete_lines(&mut pending[0], &b, "stdout", now())),
                Ok(Some(RunEvent::Stderr(b))) => lines.extend(complete_lines(&mut pending[1], &b, "stderr", now())),
                Ok(Some(RunEvent::Done(d))) => {
                    for (i, kind) in [(0, "stdout"), (1, "stderr")] {
                        if !pending[i].is_empty() {
                            let text = String::from_utf8_lossy(&std::mem::take(&mut pending[i])).into_owned();
                            lines.push(json!({"type": kind, "text": text, "timestamp": now()}));
                        }
                    }
                    if let Some(v) = &d.value {
                        lines.push(json!({"type": "result", "text": result_text(v), "is_main_result": true}));
                    }
                    if let Some(err) = &d.error {
                        lines.push(json!({"type": "error", "name": err.name, "value": err.message, "traceback": err.traceback}));
                    } else if d.status == RunStatus::Timeout {
                        lines.push(json!({"type": "error", "name": "TimeoutError", "value": "the cell timed out", "traceback": ""}));
                    }
                    let count = e
                        .update(&sbx, |r| *r.executions.entry(ctx.clone()).or_insert(0) += 1)
                        .map(|r| r.executions.get(&ctx).copied().unwrap_or(0))
                        .unwrap_or(0);
                    lines.push(json!({"type": "number_of_executions", "execution_count": count}));
                    lines.push(json!({"type": "end_of_execution"}));
                    for l in lines {
                        if tx.send(line(l)).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                Ok(None) => return,
                Err(err) => lines
                    .push(json!({"type": "error", "name": "RunnerError", "value": err.to_string(), "traceback": ""})),
            }
            for l in lines {
                if tx.send(line(l)).await.is_err() {
                    break;
                }
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    ([("content-type", "application/x-ndjson")], body).into_response()
}

/// The complete lines of `pending` + `chunk` as stream events (the rest stays pending; a line over 64 KiB goes
/// out as it is).
fn complete_lines(pending: &mut Vec<u8>, chunk: &[u8], kind: &str, at: String) -> Vec<Value> {
    pending.extend_from_slice(chunk);
    let mut out = Vec::new();
    while let Some(i) = pending.iter().position(|b| *b == b'\n').or((pending.len() > 65536).then_some(65535)) {
        let rest = pending.split_off(i + 1);
        let text = String::from_utf8_lossy(&std::mem::replace(pending, rest)).into_owned();
        out.push(json!({"type": kind, "text": text, "timestamp": at}));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_goes_out_a_line_at_a_time() {
        let mut p = Vec::new();
        assert!(complete_lines(&mut p, b"a", "stdout", String::new()).is_empty());
        let l = complete_lines(&mut p, b"\nb\nc", "stdout", String::new());
        assert_eq!(l.iter().map(|v| v["text"].as_str().unwrap()).collect::<Vec<_>>(), ["a\n", "b\n"]);
        assert_eq!(p, b"c");
    }

    #[test]
    fn results_lose_their_quotes_as_in_e2b() {
        assert_eq!(result_text("'supertest'"), "supertest");
        assert_eq!(result_text("\"x\""), "x");
        assert_eq!(result_text("42"), "42");
        assert_eq!(result_text("'"), "'");
    }
}
