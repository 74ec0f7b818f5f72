//! An HTTP/1.1 client (`Connection: close`) over a Unix socket — the VMM's API, flintd's local API — or TCP with
//! TLS — a router, a host's cluster listener (`flint --url`) — for the flint CLI, the tests and the benches, on the
//! codec of `flint_vmm_api::http`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flint_vmm_api::http::{encode_request, parse_response, split_head, Dechunker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// Where an API answers.
#[derive(Clone)]
pub enum Target {
    Unix(PathBuf),
    /// `http://host:port` or `https://host:port` (then with the client's TLS: the CA and maybe a certificate).
    Url {
        url: String,
        addr: String,
        server_name: String,
        tls: Option<Arc<rustls::ClientConfig>>,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Target {
    /// A URL target; `https://` needs `tls`.
    pub fn url(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Target, UrlError> {
        let bad = |why| UrlError { url: url.to_string(), why };
        let (secure, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(r), _) => (true, r),
            (None, Some(r)) => (false, r),
            _ => return Err(bad("give an http:// or https:// URL")),
        };
        let hostport = rest.trim_end_matches('/');
        if hostport.is_empty() || hostport.contains('/') {
            return Err(bad("give scheme://host:port, without a path"));
        }
        let with_port = hostport.rsplit_once(':').filter(|(h, p)| p.parse::<u16>().is_ok() && !h.is_empty());
        let (host, addr) = match with_port {
            Some((h, _)) => (h.trim_start_matches('[').trim_end_matches(']').to_string(), hostport.to_string()),
            None => (hostport.to_string(), format!("{hostport}:{}", if secure { 443 } else { 80 })),
        };
        if secure && tls.is_none() {
            return Err(bad("https needs the fleet's CA (--ca)"));
        }
        Ok(Target::Url { url: url.to_string(), addr, server_name: host, tls: if secure { tls } else { None } })
    }

    /// The scheme and authority (for messages).
    pub fn name(&self) -> String {
        match self {
            Target::Unix(p) => p.display().to_string(),
            Target::Url { url, .. } => url.clone(),
        }
    }
}

/// Why a URL is not an API address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{url}`: {why}")]
pub struct UrlError {
    pub url: String,
    pub why: &'static str,
}

/// What a request can be sent to: a socket path or a [`Target`].
pub trait Dial {
    fn target(&self) -> Target;
}

impl Dial for Path {
    fn target(&self) -> Target {
        Target::Unix(self.to_path_buf())
    }
}

impl Dial for PathBuf {
    fn target(&self) -> Target {
        Target::Unix(self.clone())
    }
}

impl Dial for Target {
    fn target(&self) -> Target {
        self.clone()
    }
}

/// A connection to a target.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn dial(to: &Target) -> Result<Box<dyn Io>, HttpError> {
    let connect = |e| HttpError::Connect(to.name(), e);
    match to {
        Target::Unix(p) => Ok(Box::new(UnixStream::connect(p).await.map_err(connect)?)),
        Target::Url { addr, server_name, tls, .. } => {
            let tcp = tokio::net::TcpStream::connect(addr.as_str()).await.map_err(connect)?;
            let _ = tcp.set_nodelay(true);
            let Some(tls) = tls else { return Ok(Box::new(tcp)) };
            let name = rustls::pki_types::ServerName::try_from(server_name.clone())
                .map_err(|e| connect(std::io::Error::other(format!("server name `{server_name}`: {e}"))))?;
            let s = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await.map_err(connect)?;
            Ok(Box::new(s))
        }
    }
}

/// Largest whole response `request` reads (streamed responses have no limit: their consumer decides).
pub const MAX_RESPONSE_BYTES: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}: no answer within {1:?}")]
    Timeout(String, Duration),
    #[error("{0}: malformed HTTP response")]
    Malformed(String),
}

/// Sends one request and returns (status, body); the whole exchange is bounded by `timeout`.
pub async fn request(
    sock: &(impl Dial + ?Sized),
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    request_limited(sock, (method, path), body, timeout, MAX_RESPONSE_BYTES).await
}

/// [`request`] reading at most `max` bytes of response (head included): a server that sends more is not read
/// further, and its answer is malformed.
pub async fn request_limited(
    sock: &(impl Dial + ?Sized),
    (method, path): (&str, &str),
    body: Option<&[u8]>,
    timeout: Duration,
    max: u64,
) -> Result<(u16, Vec<u8>), HttpError> {
    let to = sock.target();
    let name = to.name();
    let fut = async {
        let mut s = dial(&to).await?;
        let request = encode_request(method, path, body.unwrap_or_default());
        // A server may answer (an error, say) and close before reading the whole body: then the write fails but
        // the response is there to read, and it is the answer that matters.
        let write_err = s.write_all(&request).await.err();
        let mut buf = Vec::new();
        let read = (&mut s).take(max).read_to_end(&mut buf).await;
        match (parse_response(&buf), write_err, read) {
            (Some(r), _, _) => Ok(r),
            (None, Some(e), _) | (None, None, Err(e)) => Err(HttpError::Io(name.clone(), e)),
            (None, None, Ok(_)) => Err(HttpError::Malformed(name.clone())),
        }
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| HttpError::Timeout(to.name(), timeout))?
}

/// Sends one request and hands the response body to `on_data` as it arrives (for streamed NDJSON such as exec
/// output); returns the status. Chunked transfer encoding is decoded on the fly.
pub async fn request_stream(
    sock: &(impl Dial + ?Sized),
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    mut on_data: impl FnMut(&[u8]),
) -> Result<u16, HttpError> {
    let to = sock.target();
    let name = to.name();
    let io = |e| HttpError::Io(name.clone(), e);
    let mut s = dial(&to).await?;
    let request = encode_request(method, path, body.unwrap_or_default());
    // As in `request`: an early answer (and close) still gets read.
    let _ = s.write_all(&request).await;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    let malformed = || HttpError::Malformed(name.clone());
    let (status, chunked, start) = read_head(&mut s, &mut buf, &name).await?;
    let mut dechunker = Dechunker::default();
    let mut data = buf.split_off(start);
    loop {
        if chunked {
            if dechunker.feed(&data, &mut on_data).map_err(|_| malformed())? {
                return Ok(status);
            }
        } else if !data.is_empty() {
            on_data(&data);
        }
        let n = s.read(&mut tmp).await.map_err(io)?;
        if n == 0 {
            return Ok(status);
        }
        data.clear();
        data.extend_from_slice(&tmp[..n]);
    }
}

/// Reads until a whole response head is in `buf`: (status, chunked body?, offset of the body in `buf`).
async fn read_head(s: &mut Box<dyn Io>, buf: &mut Vec<u8>, name: &str) -> Result<(u16, bool, usize), HttpError> {
    let mut tmp = [0u8; 16384];
    loop {
        let n = s.read(&mut tmp).await.map_err(|e| HttpError::Io(name.to_string(), e))?;
        if n == 0 {
            return Err(HttpError::Malformed(name.to_string()));
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(head) = split_head(buf).map_err(|_| HttpError::Malformed(name.to_string()))? {
            return Ok(head);
        }
    }
}

/// The answer to an upgrade request.
pub enum Upgrade {
    /// `101 Switching Protocols`: the connection now speaks the new protocol; `early` holds bytes of it that
    /// arrived with the response head.
    Switched { stream: Box<dyn Io>, early: Vec<u8> },
    /// Any other answer: its status and body (an API error).
    Refused { status: u16, body: Vec<u8> },
}

/// Sends a POST asking to switch the connection to `protocol` (`Connection: Upgrade`), e.g. an interactive exec.
pub async fn upgrade(
    sock: &(impl Dial + ?Sized),
    path: &str,
    body: &[u8],
    protocol: &str,
) -> Result<Upgrade, HttpError> {
    let to = sock.target();
    let name = to.name();
    let io = |e| HttpError::Io(name.clone(), e);
    let malformed = || HttpError::Malformed(name.clone());
    let mut s = dial(&to).await?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let _ = s.write_all(&request).await;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    let (status, chunked, start) = read_head(&mut s, &mut buf, &name).await?;
    let rest = buf.split_off(start);
    if status == 101 {
        return Ok(Upgrade::Switched { stream: s, early: rest });
    }
    // An error: its body is bounded by Content-Length (or chunked); the connection may stay open.
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let length = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok());
    let mut body = Vec::new();
    let mut data = rest;
    let mut dechunker = Dechunker::default();
    loop {
        if chunked {
            if dechunker.feed(&data, |c| body.extend_from_slice(c)).map_err(|_| malformed())? {
                break;
            }
        } else {
            body.extend_from_slice(&data);
            if length.is_some_and(|l: usize| body.len() >= l) {
                break;
            }
        }
        if body.len() as u64 > MAX_RESPONSE_BYTES {
            return Err(malformed());
        }
        let n = s.read(&mut tmp).await.map_err(io)?;
        if n == 0 {
            break;
        }
        data = tmp[..n].to_vec();
    }
    Ok(Upgrade::Refused { status, body })
}
