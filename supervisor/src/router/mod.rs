//! `flint-router` (docs/cluster.md): the fleet's API at one address. Stateless — several may run — it keeps a
//! view of etcd (host registrations and session owner keys, listed then watched) and, per request:
//! - a call naming a session goes to the host whose owner key holds it; a session nobody holds (hibernated, or
//!   its host died) is placed — on the host that hibernated it when it fits (its cache is warm), else best of two
//!   random hosts by free memory — and that host wakes it on the call;
//! - `POST /v1/sessions` is placed the same way; `GET /v1/sessions` and `GET /v1/vms` ask every host and merge;
//! - a host answering 409 "held by host X" (the view was behind) is retried at X;
//! - no host fits: 503 with `Retry-After`;
//! - an upgraded call naming a session (an interactive exec, `Upgrade: flint-exec`) is sent to the holder with the
//!   same upgrade; once the host switches protocols, the caller's connection and the host's are spliced.
//!
//! Hosts are reached at their registration's `advertise` URL with mutual TLS (the router's certificate); callers
//! reach the router with mutual TLS too (`flint --url https://router …`).
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use serde::Serialize;
use tracing::{info, warn};

use crate::cluster::etcd::{Etcd, WatchEvent};
use crate::cluster::HostInfo;

mod e2b;
mod front;
pub use e2b::{E2bFront, KeyFile, KeyFileError};
pub use front::FrontRelay;

/// Request bodies up to this size are kept so the request can be sent again to another host.
const REPLAYABLE_BODY: usize = 1 << 20;

/// What the router knows of the fleet, kept from etcd.
#[derive(Debug, Default)]
pub struct View {
    pub hosts: HashMap<String, HostInfo>,
    /// Session id → the host holding it.
    pub owners: HashMap<String, String>,
    /// The view reflects etcd (listed at least once, watch running).
    pub synced: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct RouterMetrics {
    pub requests: AtomicU64,
    pub forwarded: AtomicU64,
    pub placed: AtomicU64,
    pub retried_at_holder: AtomicU64,
    pub no_host: AtomicU64,
    pub host_errors: AtomicU64,
}

pub struct Router {
    pub etcd: Etcd,
    pub prefix: String,
    pub view: RwLock<View>,
    /// Reaches hosts' cluster listeners (mutual TLS).
    http: reqwest::Client,
    /// The router's TLS towards hosts (certificate and CA), for upgraded calls.
    host_tls: Arc<rustls::ClientConfig>,
    /// Hosts with less free memory are not placed on.
    pub min_free_mib: u64,
    pub metrics: RouterMetrics,
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Health,
    Hosts,
    Metrics,
    /// A new session: placed.
    Create,
    /// A list every host answers part of.
    FanOut,
    /// A call naming a session or VM by id.
    Named(String),
    /// A call for one host (drain, undrain).
    Host(String),
    Unserved,
}

fn classify(method: &Method, path: &str) -> Route {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        (&Method::GET, ["v1", "health"]) => Route::Health,
        (&Method::GET, ["v1", "hosts"]) => Route::Hosts,
        (&Method::POST, ["v1", "hosts", id, "drain" | "undrain"]) => Route::Host(id.to_string()),
        (&Method::GET, ["metrics"]) => Route::Metrics,
        (&Method::POST, ["v1", "sessions"]) => Route::Create,
        (&Method::GET, ["v1", "sessions" | "vms"]) => Route::FanOut,
        (_, ["v1", "sessions" | "vms", id, ..]) if !id.is_empty() => Route::Named(id.to_string()),
        _ => Route::Unserved,
    }
}

/// The body to send on: kept whole when small (the call can be sent again to the holder a 409 names), streamed
/// otherwise (an upload).
async fn body_to_send(
    method: &Method,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Option<axum::body::Bytes>, Option<Body>), axum::Error> {
    let small = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n <= REPLAYABLE_BODY);
    if small || method == Method::GET || method == Method::DELETE {
        Ok((Some(axum::body::to_bytes(body, REPLAYABLE_BODY).await?), None))
    } else {
        Ok((None, Some(body)))
    }
}

/// The `limit` of a list call's query, if it pages.
fn page_limit(path_q: &str) -> Option<usize> {
    let q = path_q.split_once('?')?.1;
    q.split('&').find_map(|kv| kv.strip_prefix("limit=")?.parse().ok())
}

/// Merges hosts' answers to one list call into the fleet's order (oldest first, then by id, as each host orders
/// its own) and, for a page of `limit`, keeps its first `limit`. Each host answered its own first `limit` after
/// the same cursor, so these are the fleet's. Returns the next page's cursor if any item is left: a host said it
/// had more (`more`), or the merge cut some.
fn merge_page(all: &mut Vec<serde_json::Value>, limit: Option<usize>, more: bool) -> Option<String> {
    let key = |v: &serde_json::Value| crate::services::sessions::Cursor {
        created_unix_ms: v["created_unix_ms"].as_u64().unwrap_or(0),
        id: v["id"].as_str().unwrap_or("").to_string(),
    };
    all.sort_by_cached_key(key);
    let limit = limit?;
    if !more && all.len() <= limit {
        return None;
    }
    all.truncate(limit);
    all.last().map(|v| key(v).to_string())
}

fn answer(status: StatusCode, body: impl Serialize) -> Response<Body> {
    let mut r = Response::new(Body::from(serde_json::to_vec(&body).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    answer(status, serde_json::json!({ "error": msg.into() }))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the client sets itself.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// The host a 409 names as the session's holder (`is held by host `X``).
fn holder_named(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let rest = text.split("is held by host `").nth(1)?;
    Some(rest.split('`').next()?.to_string())
}

/// Picks two hosts at random and keeps the one with more free memory (best of two choices).
fn best_of_two<'a>(fits: &[&'a HostInfo]) -> Option<&'a HostInfo> {
    let mut r = [0u8; 8];
    let _ = getrandom::getrandom(&mut r);
    let n = fits.len();
    match n {
        0 => None,
        1 => Some(fits[0]),
        _ => {
            let a = u32::from_le_bytes([r[0], r[1], r[2], r[3]]) as usize % n;
            let b = (a + 1 + u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as usize % (n - 1)) % n;
            Some(if fits[a].mem_free_mib >= fits[b].mem_free_mib { fits[a] } else { fits[b] })
        }
    }
}

/// Longest a host may leave the router's bytes unacknowledged (or not answer keep-alive probes) before the
/// connection counts as dead.
pub const HOST_SILENT_LIMIT: Duration = Duration::from_secs(8);

impl Router {
    pub fn new(etcd: Etcd, prefix: String, host_tls: Arc<rustls::ClientConfig>, min_free_mib: u64) -> Router {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*host_tls).clone())
            .connect_timeout(Duration::from_secs(5))
            // A host cut off the network mid-call (or while a pooled connection idles) is noticed within
            // HOST_SILENT_LIMIT rather than after TCP's own retransmission limits (tens of seconds to minutes):
            // the caller gets its 502 and its retry is routed by the fleet's state by then.
            .tcp_user_timeout(HOST_SILENT_LIMIT)
            .tcp_keepalive(HOST_SILENT_LIMIT / 4)
            .tcp_keepalive_interval(HOST_SILENT_LIMIT / 4)
            .tcp_keepalive_retries(3)
            .no_proxy()
            .build()
            .expect("an HTTP client over a rustls configuration");
        Router {
            etcd,
            prefix,
            view: RwLock::new(View::default()),
            http,
            host_tls,
            min_free_mib,
            metrics: Default::default(),
        }
    }

    fn apply(&self, view: &mut View, key: &str, value: Option<&[u8]>) {
        let Some(rest) = key.strip_prefix(&self.prefix) else { return };
        if let Some(host) = rest.strip_prefix("hosts/") {
            match value.and_then(|v| serde_json::from_slice::<HostInfo>(v).ok()) {
                Some(info) => {
                    view.hosts.insert(host.to_string(), info);
                }
                None => {
                    view.hosts.remove(host);
                }
            }
        } else if let Some(id) = rest.strip_prefix("owners/") {
            match value {
                Some(v) => {
                    view.owners.insert(id.to_string(), String::from_utf8_lossy(v).into_owned());
                }
                None => {
                    view.owners.remove(id);
                }
            }
        }
    }

    /// Keeps the view: lists hosts and owners, then watches the prefix from there; lists again after any
    /// interruption (etcd restarted, compacted, unreachable).
    pub async fn keep_view(self: Arc<Self>) {
        loop {
            let listed = async {
                let (hosts, r1) = self.etcd.get_prefix(&format!("{}hosts/", self.prefix)).await?;
                let (owners, r2) = self.etcd.get_prefix(&format!("{}owners/", self.prefix)).await?;
                Ok::<_, crate::cluster::etcd::EtcdError>((hosts, owners, r1.min(r2)))
            }
            .await;
            let from = match listed {
                Ok((hosts, owners, rev)) => {
                    let mut v = View::default();
                    for kv in hosts.iter().chain(owners.iter()) {
                        self.apply(&mut v, &kv.key, Some(&kv.value));
                    }
                    v.synced = true;
                    info!(hosts = v.hosts.len(), sessions_held = v.owners.len(), revision = rev, "fleet view listed");
                    *self.view.write().unwrap_or_else(|p| p.into_inner()) = v;
                    rev + 1
                }
                Err(e) => {
                    warn!(error = %e, "could not list the fleet from etcd");
                    self.view.write().unwrap_or_else(|p| p.into_inner()).synced = false;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let e = self
                .etcd
                .watch_prefix(&self.prefix, from, |ev| {
                    let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
                    match ev {
                        WatchEvent::Put(kv) => self.apply(&mut v, &kv.key, Some(&kv.value)),
                        WatchEvent::Delete(k) => self.apply(&mut v, &k, None),
                    }
                })
                .await;
            warn!(error = %e, "the etcd watch stopped; listing again");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A host to place a session on: `prefer` (the one that hibernated it) when it fits, else best of two.
    fn place(&self, prefer: Option<&str>) -> Option<HostInfo> {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        let fits = |h: &&HostInfo| !h.draining && h.advertise.is_some() && h.mem_free_mib >= self.min_free_mib;
        if let Some(h) = prefer.and_then(|p| v.hosts.get(p)).filter(fits) {
            return Some(h.clone());
        }
        let candidates: Vec<&HostInfo> = v.hosts.values().filter(fits).collect();
        best_of_two(&candidates).cloned()
    }

    fn url_of(&self, host: &str) -> Option<String> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).hosts.get(host).and_then(|h| h.advertise.clone())
    }

    /// The host holding session `id`, else where to wake it (`None`: no such session in the fleet, or no host fits).
    async fn host_for(&self, id: &str) -> Result<String, Response<Body>> {
        if let Some(h) = self.view.read().unwrap_or_else(|p| p.into_inner()).owners.get(id).cloned() {
            return Ok(h);
        }
        let unavailable = |e: crate::cluster::etcd::EtcdError| {
            error(StatusCode::SERVICE_UNAVAILABLE, format!("the router cannot read the fleet's state: {e}"))
        };
        // The view may be behind a claim made a moment ago (a wake through another router): etcd's owner key says.
        if let Some(owner) = self.etcd.get(&format!("{}owners/{id}", self.prefix)).await.map_err(&unavailable)? {
            return Ok(String::from_utf8_lossy(&owner.value).into_owned());
        }
        let entry = self.etcd.get(&format!("{}sessions/{id}", self.prefix)).await.map_err(&unavailable)?;
        let Some(entry) = entry else {
            return Err(error(StatusCode::NOT_FOUND, format!("no session `{id}` in the fleet")));
        };
        let last = serde_json::from_slice::<serde_json::Value>(&entry.value)
            .ok()
            .and_then(|v| v.get("last_holder").and_then(|h| h.as_str()).map(str::to_string));
        match self.place(last.as_deref()) {
            Some(h) => {
                self.metrics.placed.fetch_add(1, Ordering::Relaxed);
                Ok(h.host)
            }
            None => Err(self.no_host()),
        }
    }

    fn no_host(&self) -> Response<Body> {
        self.metrics.no_host.fetch_add(1, Ordering::Relaxed);
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no host fits: none registered with at least {} MiB free that is not draining", self.min_free_mib),
        );
        r.headers_mut().insert("retry-after", HeaderValue::from_static("2"));
        r
    }

    /// Sends the request to `host`; a 409 naming another holder is sent there instead (twice at most).
    async fn forward(
        &self,
        mut host: String,
        method: &Method,
        path_q: &str,
        headers: &HeaderMap,
        body: Option<axum::body::Bytes>,
        stream: Option<Body>,
    ) -> Response<Body> {
        let mut stream = stream;
        for attempt in 0..3 {
            let Some(base) = self.url_of(&host) else {
                return error(StatusCode::SERVICE_UNAVAILABLE, format!("host `{host}` is not registered (gone?)"));
            };
            let mut req = self.http.request(method.clone(), format!("{}{path_q}", base.trim_end_matches('/')));
            for (k, v) in headers {
                if !hop_by_hop(k.as_str()) {
                    req = req.header(k, v);
                }
            }
            req = match (&body, stream.take()) {
                (Some(b), _) => req.body(b.clone()),
                (None, Some(s)) => req.body(reqwest::Body::wrap_stream(s.into_data_stream())),
                (None, None) => req,
            };
            self.metrics.forwarded.fetch_add(1, Ordering::Relaxed);
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    self.metrics.host_errors.fetch_add(1, Ordering::Relaxed);
                    return error(StatusCode::BAD_GATEWAY, format!("host `{host}` ({base}): {e}"));
                }
            };
            let status = resp.status();
            if status == StatusCode::CONFLICT && body.is_some() && attempt < 2 {
                let h = resp.headers().clone();
                let bytes = resp.bytes().await.unwrap_or_default();
                match holder_named(&bytes) {
                    Some(holder) if holder != host && self.url_of(&holder).is_some() => {
                        self.metrics.retried_at_holder.fetch_add(1, Ordering::Relaxed);
                        host = holder;
                        continue;
                    }
                    _ => return rebuild(status, &h, Body::from(bytes), &host),
                }
            }
            let h = resp.headers().clone();
            return rebuild(status, &h, Body::from_stream(resp.bytes_stream()), &host);
        }
        error(StatusCode::CONFLICT, "the session moved between hosts three times during this call; retry")
    }

    /// Asks every registered host and merges their JSON arrays; hosts that failed are named in
    /// `X-Flint-Partial`.
    async fn fan_out(&self, path_q: &str) -> Response<Body> {
        let hosts: Vec<(String, String)> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.hosts.values().filter_map(|h| Some((h.host.clone(), h.advertise.clone()?))).collect()
        };
        let calls = hosts.iter().map(|(host, base)| async move {
            let r = self.http.get(format!("{}{path_q}", base.trim_end_matches('/'))).send().await;
            let r = match r {
                Ok(r) if r.status().is_success() => {
                    let more = r.headers().contains_key(crate::services::sessions::NEXT_AFTER);
                    let items =
                        r.bytes().await.ok().and_then(|b| serde_json::from_slice::<Vec<serde_json::Value>>(&b).ok());
                    items.map(|i| (i, more))
                }
                _ => None,
            };
            (host.clone(), r)
        });
        let mut all = Vec::new();
        let mut failed = Vec::new();
        let mut more = false;
        for (host, r) in futures_util::future::join_all(calls).await {
            match r {
                Some((items, m)) => {
                    all.extend(items);
                    more |= m;
                }
                None => failed.push(host),
            }
        }
        let next = merge_page(&mut all, page_limit(path_q), more);
        let mut resp = answer(StatusCode::OK, all);
        if let Some(v) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
            resp.headers_mut().insert(crate::services::sessions::NEXT_AFTER, v);
        }
        if !failed.is_empty() {
            self.metrics.host_errors.fetch_add(failed.len() as u64, Ordering::Relaxed);
            if let Ok(v) = HeaderValue::from_str(&failed.join(",")) {
                resp.headers_mut().insert("x-flint-partial", v);
            }
        }
        resp
    }

    /// An upgraded call naming a session (an interactive exec): sent to the session's holder asking the same
    /// upgrade; once the host answers `101 Switching Protocols`, so does the router, and the two connections are
    /// spliced until either ends. Any other answer is passed back as it is.
    async fn relay_upgrade(
        &self,
        route: Route,
        mut parts: axum::http::request::Parts,
        body: Body,
        path_q: &str,
        protocol: &str,
    ) -> Response<Body> {
        let Route::Named(id) = route else {
            return error(StatusCode::BAD_REQUEST, "only a call naming a session can be upgraded (interactive exec)");
        };
        let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return error(StatusCode::BAD_REQUEST, "this connection cannot be upgraded (HTTP/1.1 only)");
        };
        let host = match self.host_for(&id).await {
            Ok(h) => h,
            Err(r) => return r,
        };
        let Some(base) = self.url_of(&host) else {
            return error(StatusCode::SERVICE_UNAVAILABLE, format!("host `{host}` is not registered (gone?)"));
        };
        let bytes = match axum::body::to_bytes(body, REPLAYABLE_BODY).await {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("request body: {e}")),
        };
        let target = match crate::http::Target::url(&base, Some(self.host_tls.clone())) {
            Ok(t) => t,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("host `{host}`: {e}")),
        };
        self.metrics.forwarded.fetch_add(1, Ordering::Relaxed);
        let (mut to_host, early) = match crate::http::upgrade(&target, path_q, &bytes, protocol).await {
            Ok(crate::http::Upgrade::Switched { stream, early }) => (stream, early),
            Ok(crate::http::Upgrade::Refused { status, body }) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                let mut h = HeaderMap::new();
                h.insert("content-type", HeaderValue::from_static("application/json"));
                return rebuild(status, &h, Body::from(body), &host);
            }
            Err(e) => {
                self.metrics.host_errors.fetch_add(1, Ordering::Relaxed);
                return error(StatusCode::BAD_GATEWAY, format!("host `{host}` ({base}): {e}"));
            }
        };
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let Ok(up) = on_upgrade.await else { return };
            let mut caller = hyper_util::rt::TokioIo::new(up);
            if !early.is_empty() && caller.write_all(&early).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut caller, &mut to_host).await;
        });
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert("connection", HeaderValue::from_static("upgrade"));
        if let Ok(v) = HeaderValue::from_str(protocol) {
            r.headers_mut().insert("upgrade", v);
        }
        if let Ok(v) = HeaderValue::from_str(&host) {
            r.headers_mut().insert("x-flint-host", v);
        }
        r
    }

    pub async fn handle(self: Arc<Self>, req: Request<Body>) -> Response<Body> {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let (parts, body) = req.into_parts();
        let path_q = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let route = classify(&parts.method, parts.uri.path());
        if let Some(protocol) = parts.headers.get("upgrade").and_then(|v| v.to_str().ok()).map(str::to_string) {
            return self.relay_upgrade(route, parts, body, &path_q, &protocol).await;
        }
        match route {
            Route::Health => {
                let v = self.view.read().unwrap_or_else(|p| p.into_inner());
                let status = if v.synced { "ok" } else { "no view of etcd" };
                let code = if v.synced { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                answer(
                    code,
                    serde_json::json!({ "status": status, "role": "router", "hosts": v.hosts.len(),
                                        "sessions_held": v.owners.len(), "version": env!("CARGO_PKG_VERSION") }),
                )
            }
            Route::Hosts => {
                let v = self.view.read().unwrap_or_else(|p| p.into_inner());
                let mut hosts: Vec<&HostInfo> = v.hosts.values().collect();
                hosts.sort_by(|a, b| a.host.cmp(&b.host));
                answer(StatusCode::OK, hosts)
            }
            Route::Metrics => {
                let m = &self.metrics;
                let v = self.view.read().unwrap_or_else(|p| p.into_inner());
                let text = format!(
                    "flint_router_requests_total {}\nflint_router_forwarded_total {}\nflint_router_placed_total {}\n\
                     flint_router_retried_at_holder_total {}\nflint_router_no_host_total {}\n\
                     flint_router_host_errors_total {}\nflint_router_hosts {}\nflint_router_sessions_held {}\n",
                    m.requests.load(Ordering::Relaxed),
                    m.forwarded.load(Ordering::Relaxed),
                    m.placed.load(Ordering::Relaxed),
                    m.retried_at_holder.load(Ordering::Relaxed),
                    m.no_host.load(Ordering::Relaxed),
                    m.host_errors.load(Ordering::Relaxed),
                    v.hosts.len(),
                    v.owners.len(),
                );
                Response::new(Body::from(text))
            }
            Route::FanOut => self.fan_out(&path_q).await,
            Route::Host(h) => {
                if self.url_of(&h).is_none() {
                    return error(StatusCode::NOT_FOUND, format!("no host `{h}` is registered"));
                }
                self.forward(h, &parts.method, &path_q, &parts.headers, Some(Default::default()), None).await
            }
            Route::Unserved => error(
                StatusCode::NOT_FOUND,
                format!(
                    "the router serves sessions (/v1/sessions…), calls naming a session (/v1/vms/ID…) and /v1/hosts; \
                     call a host for {} {}",
                    parts.method,
                    parts.uri.path()
                ),
            ),
            Route::Create | Route::Named(_) => {
                let host = match &route {
                    Route::Named(id) => match self.host_for(id).await {
                        Ok(h) => h,
                        Err(r) => return r,
                    },
                    _ => match self.place(None) {
                        Some(h) => {
                            self.metrics.placed.fetch_add(1, Ordering::Relaxed);
                            h.host
                        }
                        None => return self.no_host(),
                    },
                };
                let (bytes, stream) = match body_to_send(&parts.method, &parts.headers, body).await {
                    Ok(b) => b,
                    Err(e) => return error(StatusCode::BAD_REQUEST, format!("request body: {e}")),
                };
                self.forward(host, &parts.method, &path_q, &parts.headers, bytes, stream).await
            }
        }
    }
}

fn rebuild(status: StatusCode, headers: &HeaderMap, body: Body, host: &str) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    for (k, v) in headers {
        if !hop_by_hop(k.as_str()) {
            r.headers_mut().append(k, v.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(host) {
        r.headers_mut().insert("x-flint-host", v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_classified() {
        assert_eq!(classify(&Method::POST, "/v1/sessions"), Route::Create);
        assert_eq!(classify(&Method::GET, "/v1/sessions"), Route::FanOut);
        assert_eq!(classify(&Method::GET, "/v1/vms"), Route::FanOut);
        assert_eq!(classify(&Method::POST, "/v1/sessions/s1/hibernate"), Route::Named("s1".into()));
        assert_eq!(classify(&Method::POST, "/v1/vms/s1/exec"), Route::Named("s1".into()));
        assert_eq!(classify(&Method::DELETE, "/v1/sessions/s1"), Route::Named("s1".into()));
        assert_eq!(classify(&Method::GET, "/v1/templates"), Route::Unserved);
        assert_eq!(classify(&Method::GET, "/v1/health"), Route::Health);
        assert_eq!(classify(&Method::POST, "/v1/hosts/h1/drain"), Route::Host("h1".into()));
    }

    #[test]
    fn pages_merged_from_hosts_are_the_fleets_first() {
        let item = |ms: u64, id: &str| serde_json::json!({"created_unix_ms": ms, "id": id});
        assert_eq!(page_limit("/v1/sessions?metadata.a=b&limit=3"), Some(3));
        assert_eq!(page_limit("/v1/sessions"), None);
        // Host A answered its first 3 (and has more), host B its only 2.
        let mut all = vec![item(1, "a1"), item(4, "a2"), item(6, "a3"), item(2, "b1"), item(5, "b2")];
        assert_eq!(merge_page(&mut all, Some(3), true).as_deref(), Some("4.a2"));
        let ids: Vec<&str> = all.iter().map(|v| v["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["a1", "b1", "a2"]);
        // The last page: nothing cut, no host has more.
        let mut all = vec![item(7, "b"), item(7, "a")];
        assert_eq!(merge_page(&mut all, Some(3), false), None);
        assert_eq!(all[0]["id"], "a", "ties in time are ordered by id, as on a host");
        // No limit: everything, ordered, no cursor.
        let mut all = vec![item(9, "x"), item(1, "y")];
        assert_eq!(merge_page(&mut all, None, false), None);
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn a_conflict_names_the_holder() {
        let body = br#"{"error":"session `s` is held by host `b-1` (its lease runs ...)"}"#;
        assert_eq!(holder_named(body).as_deref(), Some("b-1"));
        assert_eq!(holder_named(b"{\"error\":\"already exists\"}"), None);
    }

    #[test]
    fn best_of_two_takes_the_freer_host() {
        let h = |name: &str, free| HostInfo {
            host: name.into(),
            nonce: String::new(),
            advertise: Some("https://x:1".into()),
            front: None,
            labels: Default::default(),
            mem_total_mib: 1000,
            mem_free_mib: free,
            sessions: 0,
            vms: 0,
            cpu_model: String::new(),
            draining: false,
            version: String::new(),
            updated_unix_ms: 0,
        };
        let (a, b) = (h("a", 10), h("b", 900));
        for _ in 0..20 {
            assert_eq!(best_of_two(&[&a, &b]).unwrap().host, "b", "of two, the freer always wins");
        }
        assert_eq!(best_of_two(&[&a]).unwrap().host, "a");
        assert!(best_of_two(&[]).is_none());
    }
}
