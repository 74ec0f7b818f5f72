//! A minimal HTTP/1.1 client over a Unix socket (`Connection: close`), for the VMM's API and the flint CLI.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

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

/// One request, head and body in one buffer (one write).
fn encode_request(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// Sends one request and returns (status, body).
pub async fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    let name = sock.display().to_string();
    let fut = async {
        let mut s = UnixStream::connect(sock).await.map_err(|e| HttpError::Connect(name.clone(), e))?;
        let body = body.unwrap_or_default();
        let request = encode_request(method, path, body);
        // A server may answer (an error, say) and close before reading the whole body: then the write fails but
        // the response is there to read, and it is the answer that matters.
        let write_err = s.write_all(&request).await.err();
        let mut buf = Vec::new();
        let read = s.read_to_end(&mut buf).await;
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
    let body = body.unwrap_or_default();
    let request = encode_request(method, path, body);
    // As in `request`: an early answer (and close) still gets read.
    let _ = s.write_all(&request).await;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    // Headers.
    let (status, chunked, mut rest) = loop {
        let n = s.read(&mut tmp).await.map_err(io)?;
        if n == 0 {
            return Err(HttpError::Malformed(name.clone()));
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or(HttpError::Malformed(name.clone()))?;
            let chunked = head.lines().any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
            break (status, chunked, buf[end + 4..].to_vec());
        }
        if buf.len() > 64 << 10 {
            return Err(HttpError::Malformed(name.clone()));
        }
    };
    loop {
        if chunked {
            // Emit every complete chunk in `rest`.
            while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
                let size_text =
                    String::from_utf8_lossy(&rest[..line_end]).split(';').next().unwrap_or("").trim().to_string();
                let size = usize::from_str_radix(&size_text, 16).map_err(|_| HttpError::Malformed(name.clone()))?;
                if size == 0 {
                    return Ok(status);
                }
                if rest.len() < line_end + 2 + size + 2 {
                    break;
                }
                on_data(&rest[line_end + 2..line_end + 2 + size]);
                rest.drain(..line_end + 2 + size + 2);
            }
        } else if !rest.is_empty() {
            on_data(&rest);
            rest.clear();
        }
        let n = s.read(&mut tmp).await.map_err(io)?;
        if n == 0 {
            return Ok(status);
        }
        rest.extend_from_slice(&tmp[..n]);
    }
}

/// Parses a whole response (Content-Length or read-to-close; chunked bodies are de-chunked).
pub fn parse_response(buf: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = buf[end + 4..].to_vec();
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Some((status, body))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..line_end]).ok()?.split(';').next()?.trim(), 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_plain_and_chunked() {
        let (s, b) = super::parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi").unwrap();
        assert_eq!((s, b.as_slice()), (200, b"hi".as_slice()));
        let (s, b) = super::parse_response(
            b"HTTP/1.1 404 NF\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (404, b"abcd".as_slice()));
        assert!(super::parse_response(b"garbage").is_none());
    }
}
