//! The front end for exposed guest ports (docs/networking.md): an HTTP listener that routes a connection to
//! guest port P of VM or session S, named by `Host: P-S.<domain>`, by the headers `flint-session: S` and
//! `flint-port: P`, or by the `flint-route` cookie it sets on first contact. After the request head the
//! connection is a byte pipe to the guest (through the VM's tap): keep-alive requests, request bodies,
//! server-sent events and WebSocket upgrades pass through as they are. A connection keeps a session awake; a
//! request for a hibernated session wakes it.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::launcher::BoxFut;

/// Where a route leads, and what keeps its VM there while the connection lasts.
pub struct Target {
    pub addr: SocketAddr,
    /// The port's access token, if it has one.
    pub token: Option<String>,
    /// Held until the connection ends (a session's activity).
    pub guard: Box<dyn Send>,
}

use crate::error::Kind;
pub use crate::error::Refusal;

/// Finds the guest behind (id, port).
pub trait Resolve: Send + Sync + 'static {
    fn resolve(&self, id: String, port: u16) -> BoxFut<'_, Result<Target, Refusal>>;
}

const MAX_HEAD: usize = 16 * 1024;
pub const ROUTE_COOKIE: &str = "flint-route";
pub const TOKEN_COOKIE: &str = "flint-token";

/// A parsed request head: what routing needs.
#[derive(Debug, Default, PartialEq)]
pub struct Head {
    pub target: String,
    pub host: Option<String>,
    pub session: Option<String>,
    pub port: Option<String>,
    pub token: Option<String>,
    pub cookies: Vec<(String, String)>,
}

/// Parses the head (everything before the blank line) of an HTTP/1 request.
pub fn parse_head(head: &str) -> Result<Head, String> {
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split(' ');
    let (Some(_method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("malformed request line".into());
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol {version:?} (HTTP/1.x only)"));
    }
    let mut h = Head { target: target.to_string(), ..Head::default() };
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else { return Err(format!("malformed header {line:?}")) };
        let value = value.trim().to_string();
        match name.trim().to_ascii_lowercase().as_str() {
            "host" => h.host = Some(value),
            "flint-session" => h.session = Some(value),
            "flint-port" => h.port = Some(value),
            "flint-token" => h.token = Some(value),
            "cookie" => {
                for c in value.split(';') {
                    if let Some((k, v)) = c.trim().split_once('=') {
                        h.cookies.push((k.trim().to_string(), v.trim().to_string()));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(h)
}

/// How a request names its guest port.
#[derive(Debug, PartialEq, Eq)]
pub enum RouteBy {
    Host,
    Headers,
    Cookie,
}

/// The (id, port) a request names, and how; the Host form first, then the headers, then the cookie.
pub fn route(h: &Head, domain: &str) -> Result<(String, u16, RouteBy), String> {
    let parse_port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("bad port {p:?}"));
    if let Some(host) = &h.host {
        let name = host
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host.as_str(), |(n, _)| n);
        let suffix = format!(".{domain}");
        if let Some(label) = name.to_ascii_lowercase().strip_suffix(&suffix) {
            if let Some((port, id)) = label.split_once('-') {
                return Ok((id.to_string(), parse_port(port)?, RouteBy::Host));
            }
        }
    }
    if let (Some(s), Some(p)) = (&h.session, &h.port) {
        return Ok((s.clone(), parse_port(p)?, RouteBy::Headers));
    }
    if let Some((_, v)) = h.cookies.iter().find(|(k, _)| k == ROUTE_COOKIE) {
        if let Some((id, port)) = v.rsplit_once('.') {
            return Ok((id.to_string(), parse_port(port)?, RouteBy::Cookie));
        }
    }
    Err(format!(
        "no route: name a guest port by `Host: <port>-<id>.{domain}`, by the headers `flint-session: <id>` and \
         `flint-port: <port>`, or by the `{ROUTE_COOKIE}` cookie set by an earlier response"
    ))
}

/// The token a request carries: `flint-token` header, `flint_token` query parameter, or cookie.
fn presented_token(h: &Head) -> Option<String> {
    if let Some(t) = &h.token {
        return Some(t.clone());
    }
    if let Some((_, q)) = h.target.split_once('?') {
        if let Some(v) = q.split('&').find_map(|kv| kv.strip_prefix("flint_token=")) {
            return Some(v.to_string());
        }
    }
    h.cookies.iter().find(|(k, _)| k == TOKEN_COOKIE).map(|(_, v)| v.clone())
}

/// Compares without an early exit on the first differing byte.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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

/// Connections the front end holds at once; past it a new one is closed at once (each holds a task and two sockets,
/// and a routed one may last as long as its client wants).
pub const MAX_CONNECTIONS: usize = 4096;

/// Serves the front end on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, domain: String, resolver: Arc<dyn Resolve>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((conn, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%peer, "front end: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        };
        let (domain, resolver) = (domain.clone(), resolver.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection(conn, &domain, resolver).await {
                debug!(%peer, error = %e, "front end connection");
            }
        });
    }
}

/// Reads up to the end of an HTTP head; returns the head's length (through the blank line) and what was read.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(i + 4);
        }
        if buf.len() > MAX_HEAD {
            return Err(format!("head over {MAX_HEAD} bytes"));
        }
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before the end of the head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn connection(mut client: TcpStream, domain: &str, resolver: Arc<dyn Resolve>) -> Result<(), String> {
    let _ = client.set_nodelay(true);
    let mut buf = Vec::new();
    let head_len = match tokio::time::timeout(Duration::from_secs(30), read_head(&mut client, &mut buf)).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            let _ = client.write_all(&reply(&Refusal::new(Kind::Invalid, e.clone()))).await;
            return Err(e);
        }
        Err(_) => return Err("no request head within 30 s".into()),
    };
    let refuse = |kind: Kind, msg: String| Refusal::new(kind, msg);
    let routed = async {
        let head =
            std::str::from_utf8(&buf[..head_len]).map_err(|_| refuse(Kind::Invalid, "head is not UTF-8".into()))?;
        let h = parse_head(head).map_err(|e| refuse(Kind::Invalid, e))?;
        let (id, port, by) = route(&h, domain).map_err(|e| refuse(Kind::Invalid, e))?;
        let target = resolver.resolve(id.clone(), port).await?;
        let presented = presented_token(&h);
        if let Some(want) = &target.token {
            match &presented {
                Some(t) if same(t, want) => {}
                Some(_) => {
                    return Err(refuse(Kind::Unauthorized, format!("wrong access token for port {port} of `{id}`")))
                }
                None => {
                    return Err(refuse(
                        Kind::Unauthorized,
                        format!(
                            "port {port} of `{id}` needs its access token (`flint-token` header, `flint_token` query \
                             parameter or `{TOKEN_COOKIE}` cookie)"
                        ),
                    ))
                }
            }
        }
        let mut cookies = Vec::new();
        if by != RouteBy::Cookie {
            cookies.push(format!("{ROUTE_COOKIE}={id}.{port}; Path=/; HttpOnly; SameSite=Lax"));
        }
        if target.token.is_some() && h.cookies.iter().all(|(k, _)| k != TOKEN_COOKIE) {
            if let Some(t) = presented {
                cookies.push(format!("{TOKEN_COOKIE}={t}; Path=/; HttpOnly; SameSite=Strict"));
            }
        }
        Ok((target, cookies))
    }
    .await;
    let (target, cookies) = match routed {
        Ok(t) => t,
        Err(r) => {
            let _ = client.write_all(&reply(&r)).await;
            return Err(r.message);
        }
    };
    let mut guest = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let msg = format!("the guest does not accept connections on {}: {e}", target.addr.port());
            let _ = client.write_all(&reply(&Refusal::new(Kind::Guest, msg.clone()))).await;
            return Err(msg);
        }
        Err(_) => {
            let msg = format!("no answer from the guest's port {} within 5 s", target.addr.port());
            let _ = client.write_all(&reply(&Refusal::new(Kind::Guest, msg.clone()))).await;
            return Err(msg);
        }
    };
    let _ = guest.set_nodelay(true);
    guest.write_all(&buf).await.map_err(|e| e.to_string())?;
    let _guard = target.guard;
    let (mut cr, mut cw) = client.into_split();
    let (mut gr, mut gw) = guest.into_split();
    let up = async move {
        let _ = tokio::io::copy(&mut cr, &mut gw).await;
        let _ = gw.shutdown().await;
    };
    let down = async move {
        if !cookies.is_empty() {
            // The first response's head gets the cookies, after its status line.
            let mut head = Vec::new();
            let mut one = [0u8; 4096];
            let n = loop {
                if let Some(i) = head.windows(2).position(|w| w == b"\r\n") {
                    break i + 2;
                }
                match gr.read(&mut one).await {
                    Ok(0) | Err(_) => {
                        let _ = cw.write_all(&head).await;
                        return;
                    }
                    Ok(n) => head.extend_from_slice(&one[..n]),
                }
                if head.len() > MAX_HEAD {
                    break head.len();
                }
            };
            let mut out = head[..n].to_vec();
            for c in &cookies {
                out.extend_from_slice(format!("set-cookie: {c}\r\n").as_bytes());
            }
            out.extend_from_slice(&head[n..]);
            if cw.write_all(&out).await.is_err() {
                return;
            }
        }
        let _ = tokio::io::copy(&mut gr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
    Ok(())
}

/// Binds the front end's listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.inspect_err(|e| warn!(%addr, error = %e, "front end"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(lines: &[&str]) -> Head {
        parse_head(&format!("GET /x?flint_token=abc HTTP/1.1\r\n{}\r\n\r\n", lines.join("\r\n"))).unwrap()
    }

    #[test]
    fn requests_are_routed_by_host_then_headers_then_cookie() {
        let d = "flint.localhost";
        assert_eq!(
            route(&head(&["Host: 8080-sess1.flint.localhost:8480"]), d).unwrap(),
            ("sess1".into(), 8080, RouteBy::Host)
        );
        assert_eq!(
            route(&head(&["Host: 127.0.0.1:8480", "Flint-Session: vm-1", "flint-port: 80"]), d).unwrap(),
            ("vm-1".into(), 80, RouteBy::Headers)
        );
        assert_eq!(
            route(&head(&["Host: x", "Cookie: a=b; flint-route=vm-2.81"]), d).unwrap(),
            ("vm-2".into(), 81, RouteBy::Cookie)
        );
        assert!(route(&head(&["Host: other.example"]), d).unwrap_err().contains("no route"));
        assert!(route(&head(&["Host: 0-a.flint.localhost"]), d).unwrap_err().contains("bad port"));
        assert!(route(&head(&["flint-session: a", "flint-port: 99999"]), d).is_err());
        assert_eq!(presented_token(&head(&[])).as_deref(), Some("abc"));
        assert!(parse_head("GET / SPDY/3\r\n\r\n").is_err() && parse_head("GET /\r\n\r\n").is_err());
        assert!(same("token123", "token123") && !same("token123", "token124") && !same("a", "ab"));
    }
}
