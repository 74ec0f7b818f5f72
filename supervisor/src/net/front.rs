//! The front end for exposed guest ports (docs/networking.md): an HTTP/1.1 reverse proxy that routes **every
//! request** of a connection on its own to guest port P of VM or session S, named by `Host: P-S.<domain>`, by
//! the headers `flint-session: S` and `flint-port: P`, or by the `flint-route` cookie it sets. Each request is
//! parsed strictly ([`super::http1`]: its end found by Content-Length or chunked framing, smuggling shapes
//! refused), authorised before anything wakes (a session is woken only for a request that presents the port's
//! token, if it has one), stripped of Flint's token and routing headers, query parameter and cookies, and
//! forwarded; the guest's answer loses any `Set-Cookie` for Flint's cookies. Only after a `101 Switching
//! Protocols` does the connection become a byte pipe (WebSocket). Behind a pooling proxy, requests for different
//! sandboxes on one connection reach their own guests, and a request without a token never rides an authorised
//! connection.
//!
//! Limits: connections in all and per source address, time to send a head, idle time between requests and on a
//! pipe, and wrong tokens per source (past the limit its requests are refused for a while). Refusals tell an
//! anonymous client only the kind of failure; the log has the detail.
//!
//! In a fleet ([`Role`], docs/cluster.md) `flint-router` serves the same front end for every host: it parses and
//! routes each request the same way, but sends it as it came to the front end of the host holding its session
//! (over mutual TLS), adding the client's address; that host authorises, wakes and strips, counting limits and
//! wrong tokens against the client's address rather than the router's.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flint_vmm_api::lock;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::http1::{self, Body, Chunked, Head};
use crate::error::Kind;
pub use crate::error::Refusal;
use crate::launcher::BoxFut;

/// Where a route leads, and what keeps its VM there while the request (or pipe) lasts.
pub struct Target {
    pub addr: SocketAddr,
    /// Held until the request's answer (or the pipe) ends (a session's activity).
    pub guard: Box<dyn Send>,
    /// The name a TLS upstream's certificate must carry (a router's host); `None` for a guest.
    pub name: Option<String>,
}

/// A byte stream either way: a client's or an upstream's connection, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Finds the guest behind (id, port) for a request that presents `token`: the implementation authorises first
/// (the port exposed, the token right) and only then wakes anything.
pub trait Resolve: Send + Sync + 'static {
    fn resolve(&self, id: String, port: u16, token: Option<String>) -> BoxFut<'_, Result<Target, Refusal>>;

    /// Opens the connection a request to a target (its `addr` and `name`) goes on: by default flintd's marked
    /// TCP connection to a guest.
    fn connect(&self, addr: SocketAddr, _name: Option<String>) -> BoxFut<'_, Result<Box<dyn Io>, Refusal>> {
        Box::pin(async move { connect(addr).await.map(|s| Box::new(s) as Box<dyn Io>) })
    }
}

/// Who a front end serves, and so what it trusts and rewrites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Clients on the network, guests behind: each request is authorised, stripped of Flint's token and routing,
    /// and sent to its guest.
    Edge,
    /// A host's front end behind `flint-router` (flintd's `cluster.front_listen`, mutual TLS: only the fleet's
    /// routers connect): as [`Role::Edge`], with each request's client address taken from the router's
    /// [`FORWARDED_HEADER`] (required), so limits and wrong tokens count against the client, not the router.
    BehindRouter,
    /// `flint-router`'s front end: each request is routed as [`Role::Edge`] routes it, then sent as it came (its
    /// [`FORWARDED_HEADER`] replaced by the client's address) to the front end of the host holding its session,
    /// which authorises it; the host's answer comes back as it is.
    Router,
}

/// The client's address, as a router tells a host behind it.
pub const FORWARDED_HEADER: &str = "flint-forwarded-for";

pub const ROUTE_COOKIE: &str = "flint-route";
pub const TOKEN_COOKIE: &str = "flint-token";
const TOKEN_HEADER: &str = "flint-token";
const TOKEN_QUERY: &str = "flint_token";

/// The front end's limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections open at once, in all.
    pub connections: usize,
    /// Connections open at once from one source address.
    pub per_source: usize,
    /// Time to send a whole request head once its first byte came (slowloris).
    pub head_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// A request's answer, or a pipe, with no byte either way for this long ends the connection.
    pub transfer_idle: Duration,
    /// Wrong tokens one source may present per `wrong_token_window` before its requests are refused (429) for
    /// the rest of that window.
    pub wrong_tokens: u32,
    pub wrong_token_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 4096,
            per_source: 256,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            transfer_idle: Duration::from_secs(600),
            wrong_tokens: 20,
            wrong_token_window: Duration::from_secs(60),
        }
    }
}

/// The front end's shared state: connections per source, wrong tokens per source.
struct Gate {
    limits: Limits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Gate {
    /// A place for a new connection from `ip`, within the limits (`per_source`: that source's too).
    fn enter(self: &Arc<Self>, ip: IpAddr, per_source: bool) -> Option<Entry> {
        let mut g = lock(&self.open);
        let (all, per) = &mut *g;
        let mine = per.entry(ip).or_default();
        if *all >= self.limits.connections || (per_source && *mine >= self.limits.per_source) {
            return None;
        }
        *all += 1;
        *mine += 1;
        Some(Entry { gate: self.clone(), ip })
    }

    /// Whether `ip` is refused for its wrong tokens.
    fn throttled(&self, ip: IpAddr) -> bool {
        let f = lock(&self.failures);
        f.get(&ip).is_some_and(|(since, n)| {
            since.elapsed() < self.limits.wrong_token_window && *n >= self.limits.wrong_tokens
        })
    }

    fn wrong_token(&self, ip: IpAddr) {
        let mut f = lock(&self.failures);
        if f.len() > 100_000 {
            f.retain(|_, (since, _)| since.elapsed() < self.limits.wrong_token_window);
        }
        let e = f.entry(ip).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= self.limits.wrong_token_window {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
    }
}

/// A connection's place in the gate, given back when it ends.
struct Entry {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut g = lock(&self.gate.open);
        g.0 -= 1;
        if let Some(n) = g.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.ip);
            }
        }
    }
}

/// How a request names its guest port.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum RouteBy {
    Host,
    Headers,
    Cookie,
}

/// The cookies of a request's `Cookie` header.
fn cookies(h: &Head) -> Vec<(String, String)> {
    h.all("cookie")
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect()
}

/// The (id, port) a request names, and how: the Host form first, then the headers, then the cookie. In the Host
/// form the id is as the client sent it (DNS names reach flintd lower-cased; ids are unique whatever their case,
/// and the resolver matches them so).
pub fn route(h: &Head, domain: &str) -> Result<(String, u16, RouteBy), RouteError> {
    let parse_port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| RouteError::BadPort(p.into()));
    if let Some(host) = h.get("host") {
        let name =
            host.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(n, _)| n);
        let suffix = format!(".{}", domain.to_ascii_lowercase());
        let lower = name.to_ascii_lowercase();
        if let Some(label) = lower.strip_suffix(&suffix) {
            if let Some((port, _)) = label.split_once('-') {
                let id = &name[port.len() + 1..label.len()];
                return Ok((id.to_string(), parse_port(port)?, RouteBy::Host));
            }
        }
    }
    if let (Some(s), Some(p)) = (h.get("flint-session"), h.get("flint-port")) {
        return Ok((s.to_string(), parse_port(p)?, RouteBy::Headers));
    }
    if let Some((_, v)) = cookies(h).into_iter().find(|(k, _)| k == ROUTE_COOKIE) {
        if let Some((id, port)) = v.rsplit_once('.') {
            return Ok((id.to_string(), parse_port(port)?, RouteBy::Cookie));
        }
    }
    Err(RouteError::NoRoute { domain: domain.to_string() })
}

/// Why a request names no guest port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("bad port {0:?}")]
    BadPort(String),
    #[error(
        "no route: name a guest port by `Host: <port>-<id>.{domain}`, by the headers `flint-session: <id>` and \
         `flint-port: <port>`, or by the `{ROUTE_COOKIE}` cookie set by an earlier response"
    )]
    NoRoute { domain: String },
}

/// Why a client connection ended before its client closed it (logged; the client has been answered or is gone).
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Malformed(#[from] http1::Malformed),
    /// The guest's answer could not be framed.
    #[error("the guest's answer: {0}")]
    Answer(http1::Malformed),
    #[error("{0}")]
    Timeout(&'static str),
    #[error("{0}")]
    Closed(&'static str),
    #[error("refused with {}: {}", .0.status(), .0.message)]
    Refused(Refusal),
}

/// The token a request carries: `flint-token` header, `flint_token` query parameter, or cookie.
pub fn presented_token(h: &Head) -> Option<String> {
    if let Some(t) = h.get(TOKEN_HEADER) {
        return Some(t.to_string());
    }
    if let Some((_, q)) = h.start.1.split_once('?') {
        if let Some(v) = q.split('&').find_map(|kv| kv.strip_prefix("flint_token=")) {
            return Some(v.to_string());
        }
    }
    cookies(h).into_iter().find(|(k, _)| k == TOKEN_COOKIE).map(|(_, v)| v)
}

/// Compares without an early exit on the first differing byte.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The request as a host behind the router gets it: as it came, with the client's address (any the client sent
/// itself replaced).
fn for_host(h: &Head, client: IpAddr) -> Head {
    let mut out = h.clone();
    out.remove(FORWARDED_HEADER);
    out.headers.push((FORWARDED_HEADER.into(), client.to_string()));
    out
}

/// The request as the guest gets it: Flint's routing and token headers, query parameter and cookies removed,
/// `Expect` answered by the front end.
fn for_guest(h: &Head) -> Head {
    let mut out = h.clone();
    for name in [TOKEN_HEADER, "flint-session", "flint-port", "expect", FORWARDED_HEADER] {
        out.remove(name);
    }
    if let Some((path, q)) = out.start.1.split_once('?') {
        let kept: Vec<&str> = q.split('&').filter(|kv| !kv.starts_with(&format!("{TOKEN_QUERY}="))).collect();
        out.start.1 = if kept.is_empty() { path.to_string() } else { format!("{path}?{}", kept.join("&")) };
    }
    let kept: Vec<String> = cookies(h)
        .into_iter()
        .filter(|(k, _)| k != ROUTE_COOKIE && k != TOKEN_COOKIE)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    out.remove("cookie");
    if !kept.is_empty() {
        out.headers.push(("Cookie".into(), kept.join("; ")));
    }
    out
}

/// The guest's answer as the client gets it: no `Set-Cookie` of Flint's cookies, and Flint's own added (a
/// router passes a host's cookies on: `from_host`). Unless it switches protocols, the guest's hop-by-hop
/// `Connection`/`Keep-Alive` headers are its own connection's: the client's connection is kept (`keep`) or closed
/// by the front end, which says so.
fn for_client(h: &Head, set: &[String], keep: Option<bool>, from_host: bool) -> Head {
    let mut out = h.clone();
    out.headers.retain(|(n, v)| {
        from_host
            || !(n.eq_ignore_ascii_case("set-cookie") && {
                let name = v.split('=').next().unwrap_or("").trim();
                name == ROUTE_COOKIE || name == TOKEN_COOKIE
            })
    });
    if let Some(keep) = keep {
        out.remove("connection");
        out.remove("keep-alive");
        if !keep {
            out.headers.push(("Connection".into(), "close".into()));
        }
    }
    for c in set {
        out.headers.push(("Set-Cookie".into(), c.clone()));
    }
    out
}

/// The error body every edge sends.
#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

pub(crate) fn reply(r: &Refusal) -> Vec<u8> {
    let body = serde_json::to_string(&ErrorBody { error: &r.message }).unwrap_or_default();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        r.status(),
        r.kind.reason(),
        body.len()
    )
    .into_bytes()
}

/// What an anonymous client is told of a refusal: its kind only (the detail goes to the log).
fn generic(r: &Refusal) -> Refusal {
    let m = match r.kind {
        Kind::Invalid => return r.clone(), // about the request itself: the client's own bytes
        Kind::Unauthorized => "this port needs its access token",
        Kind::NotFound => "no such sandbox port",
        Kind::Quota => "too many failed attempts: try later",
        Kind::Guest => "the sandbox did not answer",
        Kind::Conflict | Kind::Unavailable | Kind::Internal | Kind::TooLarge => "the sandbox is not available",
    };
    Refusal::new(r.kind, m)
}

/// Serves the front end on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, domain: String, resolver: Arc<dyn Resolve>, limits: Limits) {
    serve_as(listener, domain, resolver, limits, Role::Edge, None).await
}

/// Serves the front end on `listener` in `role` until the task is dropped; with `tls`, each connection is a TLS
/// one (its handshake bounded by the head timeout).
pub async fn serve_as(
    listener: TcpListener,
    domain: String,
    resolver: Arc<dyn Resolve>,
    limits: Limits,
    role: Role,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let gate = Arc::new(Gate { limits, open: Mutex::new((0, HashMap::new())), failures: Mutex::new(HashMap::new()) });
    loop {
        let Ok((conn, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Behind a router every connection comes from a router: the per-source cap is applied to clients there.
        let Some(entry) = gate.enter(peer.ip(), role != Role::BehindRouter) else {
            debug!(%peer, "front end: connection limit reached; closing a new connection");
            continue;
        };
        let (domain, resolver, gate, tls) = (domain.clone(), resolver.clone(), gate.clone(), tls.clone());
        tokio::spawn(async move {
            let _entry = entry;
            let _ = conn.set_nodelay(true);
            let client: Box<dyn Io> = match tls {
                None => Box::new(conn),
                Some(t) => match tokio::time::timeout(gate.limits.head_timeout, t.accept(conn)).await {
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(e)) => return debug!(%peer, error = %e, "front end: TLS handshake refused"),
                    Err(_) => return debug!(%peer, "front end: TLS handshake timed out"),
                },
            };
            let c = Conn { client, peer, buf: Vec::new(), gate, domain: &domain, resolver, role };
            if let Err(e) = c.run().await {
                debug!(%peer, error = %e, "front end connection");
            }
        });
    }
}

/// One client connection.
struct Conn<'a> {
    client: Box<dyn Io>,
    peer: SocketAddr,
    /// Bytes read from the client and not yet used (the next request's, when pipelined).
    buf: Vec<u8>,
    gate: Arc<Gate>,
    domain: &'a str,
    resolver: Arc<dyn Resolve>,
    role: Role,
}

/// The guest connection of the last request (a host's, behind a router), kept for the next one to the same port.
struct Upstream {
    key: (String, u16),
    stream: Box<dyn Io>,
}

impl Conn<'_> {
    async fn refuse(&mut self, r: Refusal) -> Result<(), ConnError> {
        let shown = generic(&r);
        info!(peer = %self.peer, status = r.status(), reason = %r.message, "front end refused a request");
        let _ = self.client.write_all(&reply(&shown)).await;
        Err(ConnError::Refused(r))
    }

    /// Reads the next request head: waits up to the idle timeout for its first byte, then the head timeout.
    async fn read_head(&mut self) -> Result<Option<(Head, usize)>, ConnError> {
        let mut chunk = [0u8; 8192];
        if self.buf.is_empty() {
            match tokio::time::timeout(self.gate.limits.idle_timeout, self.client.read(&mut chunk)).await {
                Err(_) | Ok(Ok(0)) => return Ok(None),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        let deadline = tokio::time::Instant::now() + self.gate.limits.head_timeout;
        loop {
            match http1::head_end(&self.buf) {
                Err(e) => {
                    self.refuse(Refusal::new(Kind::Invalid, e.0)).await?;
                }
                Ok(Some(n)) => {
                    let head = http1::parse(&self.buf[..n]);
                    return match head {
                        Ok(h) => Ok(Some((h, n))),
                        Err(e) => self.refuse(Refusal::new(Kind::Invalid, e.0)).await.map(|_| None),
                    };
                }
                Ok(None) => {}
            }
            let n = tokio::time::timeout_at(deadline, self.client.read(&mut chunk))
                .await
                .map_err(|_| ConnError::Timeout("no complete request head in time"))??;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn run(mut self) -> Result<(), ConnError> {
        let mut upstream: Option<Upstream> = None;
        let mut first = true;
        loop {
            let Some((head, len)) = self.read_head().await? else { return Ok(()) };
            self.buf.drain(..len);
            let body = match head.request_body() {
                Ok(b) => b,
                Err(e) => return self.refuse(Refusal::new(Kind::Invalid, e.0)).await,
            };
            let (id, port, by) = match route(&head, self.domain) {
                Ok(r) => r,
                Err(e) => return self.refuse(Refusal::new(Kind::Invalid, e.to_string())).await,
            };
            let source = match self.role {
                Role::BehindRouter => match head.get(FORWARDED_HEADER).and_then(|v| v.trim().parse::<IpAddr>().ok()) {
                    Some(ip) => ip,
                    None => {
                        let m = format!("a request from a router names no client address ({FORWARDED_HEADER})");
                        return self.refuse(Refusal::new(Kind::Invalid, m)).await;
                    }
                },
                Role::Edge | Role::Router => self.peer.ip(),
            };
            if self.gate.throttled(source) {
                return self.refuse(Refusal::new(Kind::Quota, "too many wrong tokens from this address")).await;
            }
            let token = presented_token(&head);
            let target = match self.resolver.resolve(id.clone(), port, token.clone()).await {
                Ok(t) => t,
                Err(r) => {
                    if r.kind == Kind::Unauthorized && token.is_some() {
                        self.gate.wrong_token(source);
                    }
                    return self.refuse(r).await;
                }
            };
            // Flint's cookies: the route (unless it came by cookie) and the token (when it came another way). A
            // router sets none: the host behind it does.
            let mut set = Vec::new();
            if self.role != Role::Router && first && by != RouteBy::Cookie {
                set.push(format!("{ROUTE_COOKIE}={id}.{port}; Path=/; HttpOnly; SameSite=Lax"));
            }
            if let Some(t) = token
                .as_ref()
                .filter(|_| self.role != Role::Router && !cookies(&head).iter().any(|(k, _)| k == TOKEN_COOKIE))
            {
                set.push(format!("{TOKEN_COOKIE}={t}; Path=/; HttpOnly; SameSite=Strict"));
            }
            first = false;
            let key = (id.clone(), port);
            let reuse = upstream.take().filter(|u| u.key == key);
            let mut up = match reuse {
                Some(u) => u,
                None => match self.resolver.connect(target.addr, target.name.clone()).await {
                    Ok(s) => Upstream { key, stream: s },
                    Err(r) => return self.refuse(r).await,
                },
            };
            let _guard = target.guard;
            // `Expect` is answered here, or (through a router) by the host, whose `100 Continue` passes on.
            let expects = head.get("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue"));
            if expects && self.role != Role::Router {
                self.client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
            }
            match self.exchange(&head, body, &mut up, &set).await? {
                Next::Keep { upstream_too } => upstream = upstream_too.then_some(up),
                Next::Close => return Ok(()),
                Next::Pipe => {
                    let leftover = std::mem::take(&mut self.buf);
                    if !leftover.is_empty() {
                        up.stream.write_all(&leftover).await?;
                    }
                    super::pipe::splice(self.client, up.stream, self.gate.limits.transfer_idle).await;
                    return Ok(());
                }
            }
        }
    }

    /// Sends one request to the guest and its answer to the client.
    async fn exchange(
        &mut self,
        head: &Head,
        body: Body,
        up: &mut Upstream,
        set: &[String],
    ) -> Result<Next, ConnError> {
        let idle = self.gate.limits.transfer_idle;
        let guest_head = match self.role {
            Role::Router => for_host(head, self.peer.ip()),
            Role::Edge | Role::BehindRouter => for_guest(head),
        };
        up.stream.write_all(&guest_head.to_bytes()).await?;
        copy_body(&mut self.client, &mut self.buf, &mut up.stream, body, idle).await?;
        // The answer, through its head (1xx informational answers passed on as they come).
        let mut from_guest = Vec::new();
        let resp = loop {
            let (resp, n) = read_response_head(&mut up.stream, &mut from_guest, idle).await?;
            from_guest.drain(..n);
            let status = resp.status().map_err(ConnError::Answer)?;
            if (100..200).contains(&status) && status != 101 {
                self.client.write_all(&resp.to_bytes()).await?;
                continue;
            }
            break resp;
        };
        let status = resp.status().map_err(ConnError::Answer)?;
        let rbody = resp.response_body(&head.start.0).map_err(ConnError::Answer)?;
        // The client's connection outlives a guest that closes its own, unless the answer ends at the close.
        let client_keeps = head.keep_alive() && rbody != Body::UntilClose;
        let keep = (status != 101).then_some(client_keeps);
        let from_host = self.role == Role::Router;
        self.client.write_all(&for_client(&resp, set, keep, from_host).to_bytes()).await?;
        if status == 101 {
            if !from_guest.is_empty() {
                self.client.write_all(&from_guest).await?;
            }
            return Ok(Next::Pipe);
        }
        copy_body(&mut up.stream, &mut from_guest, &mut self.client, rbody, idle).await?;
        let upstream_too = !resp.connection_has("close") && from_guest.is_empty();
        Ok(if client_keeps { Next::Keep { upstream_too } } else { Next::Close })
    }
}

enum Next {
    /// The client's connection takes another request; the guest's too when `upstream_too`.
    Keep {
        upstream_too: bool,
    },
    Close,
    Pipe,
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, Refusal> {
    // flintd's forwarder marks its connections: the host lets new connections into VM networks out only with
    // this mark (docs/networking.md).
    match tokio::time::timeout(Duration::from_secs(5), super::connect_marked(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => {
            Err(Refusal::new(Kind::Guest, format!("the guest does not accept connections on {}: {e}", addr.port())))
        }
        Err(_) => Err(Refusal::new(Kind::Guest, format!("no answer from the guest's port {} within 5 s", addr.port()))),
    }
}

/// Reads a response head from `from` (into `buf`, which may hold bytes already): the head and its length.
async fn read_response_head<R: AsyncRead + Unpin>(
    from: &mut R,
    buf: &mut Vec<u8>,
    idle: Duration,
) -> Result<(Head, usize), ConnError> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(n) = http1::response_head_end(buf).map_err(ConnError::Answer)? {
            return Ok((http1::parse_response(&buf[..n]).map_err(ConnError::Answer)?, n));
        }
        let n = tokio::time::timeout(idle, from.read(&mut chunk))
            .await
            .map_err(|_| ConnError::Timeout("the guest did not answer in time"))??;
        if n == 0 {
            return Err(ConnError::Closed("the guest closed the connection before answering"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Copies a body of framing `body` from `from` (starting with what `pending` holds; what is left after the body
/// stays in `pending`) to `to`.
async fn copy_body<R, W>(
    from: &mut R,
    pending: &mut Vec<u8>,
    to: &mut W,
    body: Body,
    idle: Duration,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut chunked = Chunked::default();
    let mut left = match body {
        Body::None => return Ok(()),
        Body::Length(n) => n,
        Body::Chunked | Body::UntilClose => u64::MAX,
    };
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        if !pending.is_empty() {
            let take = match body {
                Body::Chunked => {
                    let (n, done) = chunked.feed(pending)?;
                    if done {
                        left = 0;
                    }
                    n
                }
                Body::UntilClose => pending.len(),
                _ => (left.min(pending.len() as u64)) as usize,
            };
            to.write_all(&pending[..take]).await?;
            pending.drain(..take);
            if let Body::Length(_) = body {
                left -= take as u64;
            }
            if left == 0 {
                return Ok(());
            }
        }
        let n = tokio::time::timeout(idle, from.read(&mut chunk))
            .await
            .map_err(|_| ConnError::Timeout("a body stalled"))??;
        if n == 0 {
            return match body {
                Body::UntilClose => Ok(()),
                _ => Err(ConnError::Closed("the connection closed inside a body")),
            };
        }
        pending.extend_from_slice(&chunk[..n]);
    }
}

/// Binds the front end's listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.inspect_err(|e| warn!(%addr, error = %e, "front end"))
}

#[cfg(test)]
mod tests;
