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
    let malformed = || HttpError::Malformed(name.clone());
    let (status, chunked, start) = loop {
        let n = s.read(&mut tmp).await.map_err(io)?;
        if n == 0 {
            return Err(malformed());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(head) = split_head(&buf).map_err(|_| malformed())? {
            break head;
        }
        if buf.len() > 64 << 10 {
            return Err(malformed());
        }
    };
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

/// A response head, once all of it is in `buf`: (status, chunked body?, offset of the body). `Ok(None)` while the
/// head is incomplete, `Err` when it is not HTTP.
fn split_head(buf: &[u8]) -> Result<Option<(u16, bool, usize)>, ()> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { return Ok(None) };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or(())?;
    let chunked = head.lines().any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    Ok(Some((status, chunked, end + 4)))
}

/// Decodes a chunked body as it arrives: `feed` emits every complete chunk and says whether the last one was seen.
#[derive(Default)]
struct Dechunker {
    rest: Vec<u8>,
}

impl Dechunker {
    fn feed(&mut self, data: &[u8], mut out: impl FnMut(&[u8])) -> Result<bool, ()> {
        self.rest.extend_from_slice(data);
        while let Some(line_end) = self.rest.windows(2).position(|w| w == b"\r\n") {
            let size_text =
                String::from_utf8_lossy(&self.rest[..line_end]).split(';').next().unwrap_or("").trim().to_string();
            let size = usize::from_str_radix(&size_text, 16).map_err(|_| ())?;
            if size == 0 {
                return Ok(true);
            }
            if self.rest.len() < line_end + 2 + size + 2 {
                break;
            }
            out(&self.rest[line_end + 2..line_end + 2 + size]);
            self.rest.drain(..line_end + 2 + size + 2);
        }
        Ok(false)
    }
}

/// Parses a whole response (Content-Length or read-to-close; chunked bodies are de-chunked).
pub fn parse_response(buf: &[u8]) -> Option<(u16, Vec<u8>)> {
    let (status, chunked, start) = split_head(buf).ok()??;
    if !chunked {
        return Some((status, buf[start..].to_vec()));
    }
    let mut body = Vec::new();
    Dechunker::default().feed(&buf[start..], |c| body.extend_from_slice(c)).ok()?.then_some((status, body))
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
        // Streamed: a chunk split across reads comes out whole, and the last chunk ends the body.
        let mut d = super::Dechunker::default();
        let mut got = Vec::new();
        assert_eq!(d.feed(b"3\r\nab", |c| got.extend_from_slice(c)), Ok(false));
        assert!(got.is_empty());
        assert_eq!(d.feed(b"c\r\n0\r\n\r\n", |c| got.extend_from_slice(c)), Ok(true));
        assert_eq!(got, b"abc");
        assert_eq!(super::Dechunker::default().feed(b"zz\r\n", |_| ()), Err(()));
    }
}
