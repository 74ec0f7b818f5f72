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
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.map_err(|e| HttpError::Io(name.clone(), e))?;
        s.write_all(body).await.map_err(|e| HttpError::Io(name.clone(), e))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| HttpError::Io(name.clone(), e))?;
        parse_response(&buf).ok_or_else(|| HttpError::Malformed(name.clone()))
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| HttpError::Timeout(sock.display().to_string(), timeout))?
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
