//! An HTTP/1.1 client over a Unix socket (`Connection: close`) for the VMM's API, the flint CLI and the tests,
//! on the codec of `flint_vmm_api::http`.

use std::path::Path;
use std::time::Duration;

use flint_vmm_api::http::{encode_request, parse_response, split_head, Dechunker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

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
    sock: &Path,
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
    sock: &Path,
    (method, path): (&str, &str),
    body: Option<&[u8]>,
    timeout: Duration,
    max: u64,
) -> Result<(u16, Vec<u8>), HttpError> {
    let name = sock.display().to_string();
    let fut = async {
        let mut s = UnixStream::connect(sock).await.map_err(|e| HttpError::Connect(name.clone(), e))?;
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
    tokio::time::timeout(timeout, fut).await.map_err(|_| HttpError::Timeout(sock.display().to_string(), timeout))?
}

/// Sends one request and hands the response body to `on_data` as it arrives (for streamed NDJSON such as exec
/// output); returns the status. Chunked transfer encoding is decoded on the fly.
pub async fn request_stream(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    mut on_data: impl FnMut(&[u8]),
) -> Result<u16, HttpError> {
    let name = sock.display().to_string();
    let io = |e| HttpError::Io(name.clone(), e);
    let mut s = UnixStream::connect(sock).await.map_err(|e| HttpError::Connect(name.clone(), e))?;
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
async fn read_head(s: &mut UnixStream, buf: &mut Vec<u8>, name: &str) -> Result<(u16, bool, usize), HttpError> {
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
    Switched { stream: UnixStream, early: Vec<u8> },
    /// Any other answer: its status and body (an API error).
    Refused { status: u16, body: Vec<u8> },
}

/// Sends a POST asking to switch the connection to `protocol` (`Connection: Upgrade`), e.g. an interactive exec.
pub async fn upgrade(sock: &Path, path: &str, body: &[u8], protocol: &str) -> Result<Upgrade, HttpError> {
    let name = sock.display().to_string();
    let io = |e| HttpError::Io(name.clone(), e);
    let malformed = || HttpError::Malformed(name.clone());
    let mut s = UnixStream::connect(sock).await.map_err(|e| HttpError::Connect(name.clone(), e))?;
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
