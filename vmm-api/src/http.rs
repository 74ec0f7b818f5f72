//! The one small HTTP/1.1 codec Flint's processes share: the VMM's control server parses requests with it, flintd
//! and the tests encode requests and decode (possibly chunked, possibly streamed) responses with it. Sans-I/O apart
//! from [`read_request`], which reads from any `BufRead` with hard limits.
use std::io::{BufRead, Read};

/// Most bytes of a request line plus headers.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most bytes of a request body the VMM accepts.
pub const MAX_REQUEST_BODY_BYTES: usize = 1 << 20;

/// A request as the server sees it.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    pub keep_alive: bool,
}

/// A request the server refuses before parsing it into an action.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

fn err(status: u16, message: impl Into<String>) -> HttpError {
    HttpError { status, message: message.into() }
}

/// Reads one line of at most `left` bytes (CRLF or LF ended); `Ok(None)` at a clean end of stream.
fn read_line_limited(r: &mut impl BufRead, left: &mut usize) -> Result<Option<String>, HttpError> {
    let mut line = Vec::new();
    let n =
        r.by_ref().take(*left as u64 + 1).read_until(b'\n', &mut line).map_err(|e| err(400, format!("read: {e}")))?;
    if n == 0 {
        return Ok(None);
    }
    if n > *left || !line.ends_with(b"\n") {
        return Err(err(431, "request head too long or truncated"));
    }
    *left -= n;
    String::from_utf8(line).map(|s| Some(s.trim_end().to_string())).map_err(|_| err(400, "request head is not UTF-8"))
}

/// Reads one request (head at most [`MAX_HEAD_BYTES`], body at most `max_body`); `Ok(None)` when the peer closed
/// between requests.
pub fn read_request(r: &mut impl BufRead, max_body: usize) -> Result<Option<Request>, HttpError> {
    let mut left = MAX_HEAD_BYTES;
    let Some(line) = read_line_limited(r, &mut left)? else { return Ok(None) };
    let mut it = line.split_whitespace();
    let (Some(method), Some(path), Some(version), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(err(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(err(400, format!("unsupported protocol {version:?}")));
    }
    let (method, path) = (method.to_string(), path.to_string());
    let mut keep_alive = version == "HTTP/1.1";
    let mut content_length = 0usize;
    loop {
        let h = read_line_limited(r, &mut left)?.ok_or_else(|| err(400, "request head truncated"))?;
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => content_length = v.parse().map_err(|_| err(400, "bad Content-Length"))?,
                "connection" => keep_alive = !v.eq_ignore_ascii_case("close"),
                "transfer-encoding" => return Err(err(501, "chunked request bodies are not supported")),
                _ => {}
            }
        }
    }
    if content_length > max_body {
        return Err(err(413, format!("request body of {content_length} bytes exceeds {max_body}")));
    }
    let mut body = vec![0u8; content_length];
    r.read_exact(&mut body).map_err(|e| err(400, format!("request body: {e}")))?;
    Ok(Some(Request { method, path, body, keep_alive }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Error",
    }
}

/// A whole JSON response.
pub fn encode_response(status: u16, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
        reason(status),
        body.len(),
        if keep_alive { "" } else { "Connection: close\r\n" }
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// One request, head and body in one buffer (one write); `Connection: close`.
pub fn encode_request(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// A response head, once all of it is in `buf`: (status, chunked body?, offset of the body). `Ok(None)` while the
/// head is incomplete, `Err` when it is not HTTP or longer than [`MAX_HEAD_BYTES`].
#[allow(clippy::result_unit_err)]
pub fn split_head(buf: &[u8]) -> Result<Option<(u16, bool, usize)>, ()> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD_BYTES { Err(()) } else { Ok(None) };
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    if !head.starts_with("http/1.") {
        return Err(());
    }
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or(())?;
    let chunked = head.lines().any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    Ok(Some((status, chunked, end + 4)))
}

/// Decodes a chunked body as it arrives: `feed` emits every complete chunk and says whether the last one was seen.
#[derive(Default)]
pub struct Dechunker {
    rest: Vec<u8>,
}

impl Dechunker {
    #[allow(clippy::result_unit_err)]
    pub fn feed(&mut self, data: &[u8], mut out: impl FnMut(&[u8])) -> Result<bool, ()> {
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
        if self.rest.len() > MAX_HEAD_BYTES && !self.rest.windows(2).any(|w| w == b"\r\n") {
            return Err(()); // a chunk-size line that never ends
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
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi").unwrap();
        assert_eq!((s, b.as_slice()), (200, b"hi".as_slice()));
        let (s, b) =
            parse_response(b"HTTP/1.1 404 NF\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n")
                .unwrap();
        assert_eq!((s, b.as_slice()), (404, b"abcd".as_slice()));
        assert!(parse_response(b"garbage\r\n\r\n").is_none());
        // Streamed: a chunk split across reads comes out whole, and the last chunk ends the body.
        let mut d = Dechunker::default();
        let mut got = Vec::new();
        assert_eq!(d.feed(b"3\r\nab", |c| got.extend_from_slice(c)), Ok(false));
        assert!(got.is_empty());
        assert_eq!(d.feed(b"c\r\n0\r\n\r\n", |c| got.extend_from_slice(c)), Ok(true));
        assert_eq!(got, b"abc");
        assert_eq!(Dechunker::default().feed(b"zz\r\n", |_| ()), Err(()));
        assert_eq!(split_head(&vec![b'a'; MAX_HEAD_BYTES + 1]), Err(()));
    }

    #[test]
    fn parses_requests_and_rejects_junk_within_limits() {
        let mut r = std::io::Cursor::new(b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec());
        let req = read_request(&mut r, 100).unwrap().unwrap();
        assert_eq!((req.method.as_str(), req.path.as_str(), req.keep_alive), ("PUT", "/vm/pause", true));
        assert_eq!(req.body, b"{}");
        assert_eq!(read_request(&mut r, 100).unwrap(), None);
        let mut r = std::io::Cursor::new(b"garbage\r\n\r\n".to_vec());
        assert_eq!(read_request(&mut r, 100).unwrap_err().status, 400);
        let mut r = std::io::Cursor::new(b"GET /vm HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec());
        assert_eq!(read_request(&mut r, 100).unwrap_err().status, 413);
        // A request line that never ends is cut off at the head limit, not read into memory.
        let mut endless = b"GET /".to_vec();
        endless.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES * 4));
        let mut r = std::io::Cursor::new(endless);
        assert_eq!(read_request(&mut r, 100).unwrap_err().status, 431);
        let mut r = std::io::Cursor::new(b"GET /vm HTTP/1.1\r\nHost: x".to_vec());
        assert_eq!(read_request(&mut r, 100).unwrap_err().status, 431);
        let resp = encode_response(409, b"{}", false);
        assert_eq!(parse_response(&resp), Some((409, b"{}".to_vec())));
    }
}
