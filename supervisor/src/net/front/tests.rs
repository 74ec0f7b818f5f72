//! The front end against real TCP connections: a fake resolver (sandbox id → a local "guest" HTTP server and its
//! token) and guests that echo what reached them.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A guest: answers every request with its name and the request head it received (one request per connection
/// unless the client keeps it), or switches to an echo pipe on `Upgrade`.
async fn guest(name: &'static str, extra_header: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while http1::head_end(&buf).ok().flatten().is_none() {
                        let Ok(n) = s.read(&mut chunk).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let n = http1::head_end(&buf).unwrap().unwrap();
                    let head = http1::parse(&buf[..n]).unwrap();
                    let body_len: usize = head.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                    while buf.len() < n + body_len {
                        let m = s.read(&mut chunk).await.unwrap();
                        buf.extend_from_slice(&chunk[..m]);
                    }
                    let seen = String::from_utf8_lossy(&buf[..n + body_len]).replace("\r\n", "|");
                    buf.drain(..n + body_len);
                    if head.get("upgrade").is_some() {
                        s.write_all(
                            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n",
                        )
                        .await
                        .unwrap();
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        return;
                    }
                    let body = format!("{name}:{seen}");
                    let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{extra_header}\r\n{body}", body.len());
                    if s.write_all(resp.as_bytes()).await.is_err() || extra_header.contains("Connection: close") {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sandbox id → (guest, token).
struct Fake(Mutex<HashMap<String, (SocketAddr, Option<String>)>>, Mutex<Vec<String>>);

impl Resolve for Fake {
    fn resolve(&self, id: String, _port: u16, token: Option<String>) -> BoxFut<'_, Result<Target, Refusal>> {
        Box::pin(async move {
            let Some((addr, want)) = lock(&self.0).get(&id).cloned() else {
                return Err(Refusal::new(Kind::NotFound, format!("no VM or session `{id}`")));
            };
            if let Some(w) = want {
                if !token.as_deref().is_some_and(|t| same(t, &w)) {
                    return Err(Refusal::new(Kind::Unauthorized, format!("wrong token for `{id}`")));
                }
            }
            lock(&self.1).push(id); // resolved (and so woken), only once authorised
            Ok(Target { addr, guard: Box::new(()), name: None })
        })
    }
}

async fn front(limits: Limits) -> (SocketAddr, Arc<Fake>) {
    front_as(limits, Role::Edge).await
}

async fn front_as(limits: Limits, role: Role) -> (SocketAddr, Arc<Fake>) {
    let (a, b) = (guest("guest-a", "X-A: 1\r\n").await, guest("guest-b", "Set-Cookie: flint-route=evil.1\r\n").await);
    let c = guest("guest-c", "Connection: close\r\n").await;
    let fake = Arc::new(Fake(
        Mutex::new(HashMap::from([
            ("a".to_string(), (a, None)),
            ("b".to_string(), (b, Some("token-of-b-1234".to_string()))),
            ("c".to_string(), (c, None)),
        ])),
        Mutex::new(Vec::new()),
    ));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve_as(l, "flint.test".into(), fake.clone(), limits, role, None));
    (addr, fake)
}

/// Sends `req` on `s` and reads one answer (head and Content-Length body).
async fn ask(s: &mut TcpStream, req: &str) -> (u16, String, String) {
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let n = loop {
        if let Some(n) = http1::head_end(&buf).unwrap() {
            break n;
        }
        let m = s.read(&mut chunk).await.unwrap();
        assert!(m > 0, "closed before an answer: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..m]);
    };
    let head = http1::parse(&buf[..n]).unwrap();
    let len: usize = head.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while buf.len() < n + len {
        let m = s.read(&mut chunk).await.unwrap();
        assert!(m > 0);
        buf.extend_from_slice(&chunk[..m]);
    }
    let heads = String::from_utf8_lossy(&buf[..n]).into_owned();
    (head.status().unwrap(), heads, String::from_utf8_lossy(&buf[n..n + len]).into_owned())
}

/// Two requests for different sandboxes on one kept-alive connection (a pooling proxy) reach their own guests;
/// a token-less request after an authorised one on the same connection is refused, and nothing wakes for it.
#[tokio::test]
async fn every_request_is_routed_and_authorised_on_its_own() {
    let (addr, fake) = front(Limits::default()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (st, _, body) = ask(&mut s, "GET /one HTTP/1.1\r\nHost: 80-a.flint.test\r\n\r\n").await;
    assert_eq!((st, body.starts_with("guest-a:GET /one")), (200, true), "{body}");
    let req = "GET /two HTTP/1.1\r\nHost: 80-b.flint.test\r\nflint-token: token-of-b-1234\r\n\r\n";
    let (st, heads, body) = ask(&mut s, req).await;
    assert_eq!((st, body.starts_with("guest-b:GET /two")), (200, true), "{body}");
    assert!(!body.contains("flint-token"), "the token reached the guest: {body}");
    assert!(!heads.contains("evil"), "the guest set Flint's route cookie: {heads}");
    let (st, _, _) = ask(&mut s, "GET /three HTTP/1.1\r\nHost: 80-b.flint.test\r\n\r\n").await;
    assert_eq!(st, 401, "a token-less request rode an authorised connection");
    assert_eq!(*lock(&fake.1), ["a", "b"], "only authorised requests resolved");
}

/// A guest that closes its connection after each answer (busybox httpd does) does not close the client's: its
/// `Connection: close` is its own hop's.
#[tokio::test]
async fn a_guest_closing_its_connection_keeps_the_clients() {
    let (addr, _) = front(Limits::default()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    for (host, want) in [("80-c", "guest-c:GET /"), ("80-c", "guest-c:GET /"), ("80-a", "guest-a:GET /")] {
        let (st, heads, body) = ask(&mut s, &format!("GET / HTTP/1.1\r\nHost: {host}.flint.test\r\n\r\n")).await;
        assert_eq!((st, body.starts_with(want)), (200, true), "{body}");
        assert!(!heads.to_ascii_lowercase().contains("connection: close"), "{heads}");
    }
    // A client that asks to close gets it, and said so.
    let (st, heads, _) = ask(&mut s, "GET / HTTP/1.1\r\nHost: 80-a.flint.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(st, 200);
    assert!(heads.contains("Connection: close"), "{heads}");
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).await.unwrap(), 0, "closed after the answer");
}

/// busybox httpd's CGI answers: an HTTP/1.1 head whose CGI part ends its lines with a bare LF, no length, the
/// body streamed until the guest closes; the client gets it normalised, as it comes, then the close.
#[tokio::test]
async fn a_cgi_stream_without_length_passes_as_it_comes() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let g = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\n\ndata: 1\n\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(b"data: 2\n\n").await.unwrap();
    });
    let fake = Arc::new(Fake(Mutex::new(HashMap::from([("s".to_string(), (g, None))])), Mutex::new(Vec::new())));
    let fl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = fl.local_addr().unwrap();
    tokio::spawn(serve(fl, "flint.test".into(), fake, Limits::default()));
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /cgi-bin/events?flint_token=x HTTP/1.1\r\nHost: 80-s.flint.test\r\n\r\n").await.unwrap();
    let mut all = Vec::new();
    c.read_to_end(&mut all).await.unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"), "{text}");
    assert!(text.contains("Connection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\ndata: 1\n\ndata: 2\n\n"), "{text}");
}

/// What the guest gets is free of Flint's token and routing: header, query parameter, cookies; its own cookies
/// and query stay.
#[tokio::test]
async fn flints_token_and_route_never_reach_the_guest() {
    let (addr, _) = front(Limits::default()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req =
        "GET /p?x=1&flint_token=token-of-b-1234&y=2 HTTP/1.1\r\nHost: x\r\nflint-session: b\r\nflint-port: 80\r\n\
               Cookie: app=1; flint-route=b.80; flint-token=token-of-b-1234\r\n\r\n";
    let (st, heads, body) = ask(&mut s, req).await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("GET /p?x=1&y=2 HTTP/1.1") && body.contains("Cookie: app=1|"), "{body}");
    for leak in ["token-of-b", "flint-session", "flint-port", "flint-route"] {
        assert!(!body.contains(leak), "{leak} reached the guest: {body}");
    }
    assert!(heads.contains("Set-Cookie: flint-route=b.80"), "{heads}");
    assert!(!heads.contains("Set-Cookie: flint-token="), "the client has the token cookie already: {heads}");
}

/// Bodies are framed exactly (the next request is parsed where the body ends); smuggling shapes are refused.
#[tokio::test]
async fn bodies_are_framed_and_smuggling_is_refused() {
    let (addr, _) = front(Limits::default()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (st, _, body) =
        ask(&mut s, "POST /up HTTP/1.1\r\nHost: 80-a.flint.test\r\nContent-Length: 5\r\n\r\nhello").await;
    assert!(st == 200 && body.ends_with("hello"), "{body}");
    let (st, _, body) = ask(&mut s, "GET /after HTTP/1.1\r\nHost: 80-a.flint.test\r\n\r\n").await;
    assert!(st == 200 && body.contains("GET /after"), "{body}");
    let smuggle =
        "POST / HTTP/1.1\r\nHost: 80-a.flint.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let (st, _, body) = ask(&mut s, smuggle).await;
    assert_eq!(st, 400, "{body}");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (st, _, _) = ask(&mut s, "GET / HTTP/1.1\r\nHost: 80-a.flint.test\r\nHost: 80-b.flint.test\r\n\r\n").await;
    assert_eq!(st, 400);
}

/// Only a 101 makes the connection a pipe.
#[tokio::test]
async fn an_upgrade_becomes_a_pipe() {
    let (addr, _) = front(Limits::default()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (st, _, _) =
        ask(&mut s, "GET /ws HTTP/1.1\r\nHost: 80-a.flint.test\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n").await;
    assert_eq!(st, 101);
    s.write_all(b"raw bytes, not HTTP").await.unwrap();
    let mut back = [0u8; 19];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"raw bytes, not HTTP");
}

/// Wrong tokens from one address are throttled; connections per address are capped; an anonymous client learns
/// only the kind of refusal.
#[tokio::test]
async fn wrong_tokens_are_throttled_and_connections_capped() {
    let limits = Limits { wrong_tokens: 3, per_source: 2, ..Limits::default() };
    let (addr, _) = front(limits).await;
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (st, _, body) =
            ask(&mut s, "GET / HTTP/1.1\r\nHost: 80-b.flint.test\r\nflint-token: guess-guess\r\n\r\n").await;
        assert_eq!(st, 401);
        assert!(!body.contains("`b`"), "the refusal named the sandbox to an anonymous client: {body}");
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    let ok = "GET / HTTP/1.1\r\nHost: 80-b.flint.test\r\nflint-token: token-of-b-1234\r\n\r\n";
    assert_eq!(ask(&mut s, ok).await.0, 429, "even the right token waits out the window");
    let (_keep1, _keep2) = (TcpStream::connect(addr).await.unwrap(), TcpStream::connect(addr).await.unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(b"GET / HTTP/1.1\r\nHost: 80-a.flint.test\r\n\r\n").await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut b)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "a third connection from one address was served");
}

/// A router's resolver: every sandbox is on the one host behind it.
struct OneHost(SocketAddr);

impl Resolve for OneHost {
    fn resolve(&self, _id: String, _port: u16, _token: Option<String>) -> BoxFut<'_, Result<Target, Refusal>> {
        Box::pin(async move { Ok(Target { addr: self.0, guard: Box::new(()), name: None }) })
    }
}

/// A fleet (#29): a router's front end sends each request as it came to the host's front end, with the client's
/// address in place of any the client forged; the host authorises, strips and sets its cookies, which pass back;
/// its wrong-token throttling counts the client behind the router, not the router; a host behind a router
/// refuses a request that names no client.
#[tokio::test]
async fn a_router_passes_requests_on_and_the_host_counts_the_client_behind_it() {
    let limits = Limits { wrong_tokens: 3, ..Limits::default() };
    let (host, _) = front_as(limits, Role::BehindRouter).await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let router = l.local_addr().unwrap();
    tokio::spawn(serve_as(l, "flint.test".into(), Arc::new(OneHost(host)), Limits::default(), Role::Router, None));
    let mut s = TcpStream::connect(router).await.unwrap();
    let req = "GET /r HTTP/1.1\r\nHost: 80-b.flint.test\r\nflint-token: token-of-b-1234\r\n\
               flint-forwarded-for: 203.0.113.9\r\n\r\n";
    let (st, heads, body) = ask(&mut s, req).await;
    assert!(st == 200 && body.starts_with("guest-b:GET /r"), "{st} {body}");
    for leak in ["token-of-b", "flint-forwarded-for", "203.0.113.9"] {
        assert!(!body.contains(leak), "{leak} reached the guest: {body}");
    }
    assert!(heads.contains("Set-Cookie: flint-route=b.80") && heads.contains("Set-Cookie: flint-token="), "{heads}");
    let (st, _, _) = ask(&mut s, "GET /a HTTP/1.1\r\nHost: 80-a.flint.test\r\n\r\n").await;
    assert_eq!(st, 200, "the next request on the connection, for another sandbox");

    let mut direct = TcpStream::connect(host).await.unwrap();
    let (st, _, _) = ask(&mut direct, "GET / HTTP/1.1\r\nHost: 80-a.flint.test\r\n\r\n").await;
    assert_eq!(st, 400, "a request without the client's address reached a host behind a router");

    for forged in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        let mut s = TcpStream::connect(router).await.unwrap();
        let req = format!(
            "GET / HTTP/1.1\r\nHost: 80-b.flint.test\r\nflint-token: guess-guess\r\nflint-forwarded-for: {forged}\r\n\r\n"
        );
        assert_eq!(ask(&mut s, &req).await.0, 401);
    }
    let mut s = TcpStream::connect(router).await.unwrap();
    let ok = "GET / HTTP/1.1\r\nHost: 80-b.flint.test\r\nflint-token: token-of-b-1234\r\n\r\n";
    assert_eq!(ask(&mut s, ok).await.0, 429, "the client's wrong tokens counted, whatever address it forged");
    let mut direct = TcpStream::connect(host).await.unwrap();
    let other = "GET / HTTP/1.1\r\nHost: 80-b.flint.test\r\nflint-token: token-of-b-1234\r\n\
                 flint-forwarded-for: 198.51.100.7\r\n\r\n";
    assert_eq!(ask(&mut direct, other).await.0, 200, "another client behind the same router is served");
}

#[test]
fn requests_are_routed_by_host_then_headers_then_cookie() {
    let head = |lines: &[&str]| {
        http1::parse(format!("GET /x?flint_token=abc HTTP/1.1\r\n{}\r\n\r\n", lines.join("\r\n")).as_bytes()).unwrap()
    };
    let d = "flint.localhost";
    assert_eq!(
        route(&head(&["Host: 8080-Sess1.flint.localhost:8480"]), d).unwrap(),
        ("Sess1".into(), 8080, RouteBy::Host)
    );
    assert_eq!(
        route(&head(&["Host: 127.0.0.1:8480", "Flint-Session: vm-1", "flint-port: 80"]), d).unwrap(),
        ("vm-1".into(), 80, RouteBy::Headers)
    );
    assert_eq!(
        route(&head(&["Host: x", "Cookie: a=b; flint-route=vm-2.81"]), d).unwrap(),
        ("vm-2".into(), 81, RouteBy::Cookie)
    );
    assert!(route(&head(&["Host: other.example"]), d).unwrap_err().to_string().contains("no route"));
    assert!(route(&head(&["Host: 0-a.flint.localhost"]), d).unwrap_err().to_string().contains("bad port"));
    assert_eq!(presented_token(&head(&["Host: x"])).as_deref(), Some("abc"));
    assert!(same("token123", "token123") && !same("token123", "token124") && !same("a", "ab"));
}
