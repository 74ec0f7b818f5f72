//! A strict HTTP/1.1 message-head parser and body framing for the front end, which faces whoever reaches its
//! address and forwards to guests: it must find exactly where each request ends to route and authorise every
//! request of a kept-alive connection on its own, and it refuses anything two parsers could read differently
//! (request smuggling): a bare LF, obs-fold, a header name with spaces or odd bytes, Content-Length with
//! Transfer-Encoding, two Content-Lengths, a Transfer-Encoding other than `chunked`, a duplicate Host or Flint
//! header, a Content-Length that is not digits. Fuzzed (`fuzz/fuzz_targets/front_request.rs`).

/// Most bytes of a request or response head.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header lines of a head.
pub const MAX_HEADERS: usize = 100;

/// Why a head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

fn bad(m: impl Into<String>) -> Malformed {
    Malformed(m.into())
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (a response without length).
    UntilClose,
}

/// A parsed head: the start line's parts and the header lines as they were (names as sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Request: method, target, version. Response: version, status, reason.
    pub start: (String, String, String),
    pub headers: Vec<(String, String)>,
}

/// Headers that must not appear twice in a request (routing and authorisation read them).
const SINGLE: &[&str] = &["host", "content-length", "transfer-encoding", "flint-session", "flint-port", "flint-token"];

fn token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Where the head in `buf` ends (just past its blank line), if it is complete. A bare LF is refused as soon as it
/// is seen.
pub fn head_end(buf: &[u8]) -> Result<Option<usize>, Malformed> {
    for i in 0..buf.len() {
        if buf[i] == b'\n' && (i == 0 || buf[i - 1] != b'\r') {
            return Err(bad("a bare LF in the head (lines end with CRLF)"));
        }
        if i >= 3 && &buf[i - 3..=i] == b"\r\n\r\n" {
            return Ok(Some(i + 1));
        }
    }
    if buf.len() > MAX_HEAD {
        return Err(bad(format!("head over {MAX_HEAD} bytes")));
    }
    Ok(None)
}

/// Where a response head from a guest ends: as [`head_end`], but a line may end with a bare LF (RFC 9112 §2.2
/// lets a recipient accept it; CGI scripts behind busybox httpd write them). Only requests, where a bare LF is a
/// smuggling shape, are held to CRLF; a response head is re-written with CRLF before it goes on.
pub fn response_head_end(buf: &[u8]) -> Result<Option<usize>, Malformed> {
    for i in 0..buf.len() {
        if buf[i] == b'\n' {
            let prev = if i >= 1 && buf[i - 1] == b'\r' { i - 1 } else { i };
            if prev >= 1 && buf[prev - 1] == b'\n' {
                return Ok(Some(i + 1));
            }
        }
    }
    if buf.len() > MAX_HEAD {
        return Err(bad(format!("head over {MAX_HEAD} bytes")));
    }
    Ok(None)
}

/// Parses a complete response head whose lines end with CRLF or a bare LF.
pub fn parse_response(head: &[u8]) -> Result<Head, Malformed> {
    let text = std::str::from_utf8(head).map_err(|_| bad("the head is not UTF-8"))?;
    let lines: Vec<&str> = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).collect();
    parse(lines.join("\r\n").as_bytes())
}

/// Parses a complete head (through its blank line).
pub fn parse(head: &[u8]) -> Result<Head, Malformed> {
    let text = std::str::from_utf8(head).map_err(|_| bad("the head is not UTF-8"))?;
    let body = text.strip_suffix("\r\n\r\n").ok_or_else(|| bad("the head does not end with a blank line"))?;
    let mut lines = body.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.splitn(3, ' ');
    let (Some(a), Some(b), Some(c)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad(format!("malformed start line {first:?}")));
    };
    if a.is_empty() || b.is_empty() || first.bytes().any(|x| x.is_ascii_control()) {
        return Err(bad(format!("malformed start line {first:?}")));
    }
    let mut headers = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(bad("obs-fold (a header continued on the next line) is not accepted"));
        }
        let (name, value) = line.split_once(':').ok_or_else(|| bad(format!("malformed header {line:?}")))?;
        if name.is_empty() || !name.bytes().all(token_char) {
            return Err(bad(format!("malformed header name {name:?}")));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(bad(format!("a control character in header {name}")));
        }
        headers.push((name.to_string(), value.to_string()));
        if headers.len() > MAX_HEADERS {
            return Err(bad(format!("more than {MAX_HEADERS} headers")));
        }
    }
    Ok(Head { start: (a.to_string(), b.to_string(), c.to_string()), headers })
}

impl Head {
    /// Every value of header `name` (any case).
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Removes every header `name`.
    pub fn remove(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    /// Whether a `Connection` header lists `token`.
    pub fn connection_has(&self, token: &str) -> bool {
        self.all("connection").flat_map(|v| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The head as bytes, CRLF-terminated.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} {}\r\n", self.start.0, self.start.1, self.start.2);
        for (n, v) in &self.headers {
            out.push_str(n);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    /// The body framing shared by requests and responses: refuses CL+TE, several lengths, a TE other than chunked.
    fn framing(&self) -> Result<Option<Body>, Malformed> {
        let te: Vec<&str> = self.all("transfer-encoding").collect();
        let cl: Vec<&str> = self.all("content-length").collect();
        if !te.is_empty() && !cl.is_empty() {
            return Err(bad("both Content-Length and Transfer-Encoding"));
        }
        if cl.len() > 1 {
            return Err(bad("more than one Content-Length"));
        }
        if te.len() > 1 || te.first().is_some_and(|t| !t.eq_ignore_ascii_case("chunked")) {
            return Err(bad("only `Transfer-Encoding: chunked` is accepted"));
        }
        if !te.is_empty() {
            return Ok(Some(Body::Chunked));
        }
        match cl.first() {
            Some(v) => {
                if v.is_empty() || v.len() > 18 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad(format!("Content-Length {v:?} is not a length")));
                }
                Ok(Some(Body::Length(v.parse().map_err(|_| bad("Content-Length"))?)))
            }
            None => Ok(None),
        }
    }

    /// A request's checks (version, single headers) and body framing.
    pub fn request_body(&self) -> Result<Body, Malformed> {
        if self.start.2 != "HTTP/1.1" && self.start.2 != "HTTP/1.0" {
            return Err(bad(format!("unsupported protocol {:?} (HTTP/1.x only)", self.start.2)));
        }
        for s in SINGLE {
            if self.all(s).count() > 1 {
                return Err(bad(format!("more than one `{s}` header")));
            }
        }
        if self.start.2 == "HTTP/1.1" && self.get("host").is_none() {
            return Err(bad("an HTTP/1.1 request without Host"));
        }
        Ok(self.framing()?.unwrap_or(Body::None))
    }

    /// Whether the client wants the connection kept after this request.
    pub fn keep_alive(&self) -> bool {
        match self.start.2.as_str() {
            "HTTP/1.1" => !self.connection_has("close"),
            _ => self.connection_has("keep-alive"),
        }
    }

    /// A response's status.
    pub fn status(&self) -> Result<u16, Malformed> {
        if !self.start.0.starts_with("HTTP/1.") {
            return Err(bad(format!("not an HTTP/1 response: {:?}", self.start.0)));
        }
        self.start.1.parse().ok().filter(|s| (100..600).contains(s)).ok_or_else(|| bad("a bad status code"))
    }

    /// A response's body framing, given the request's method.
    pub fn response_body(&self, request_method: &str) -> Result<Body, Malformed> {
        let status = self.status()?;
        if request_method.eq_ignore_ascii_case("HEAD") || (100..200).contains(&status) || status == 204 || status == 304
        {
            return Ok(Body::None);
        }
        Ok(self.framing()?.unwrap_or(Body::UntilClose))
    }
}

/// A chunked body's state, fed bytes as they pass: says where the body ends (its last chunk and trailers).
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailer,
    Done,
}

impl Chunked {
    /// Consumes from `data` up to the end of the body; returns how many bytes belong to it and whether it ended.
    pub fn feed(&mut self, data: &[u8]) -> Result<(usize, bool), Malformed> {
        let mut i = 0;
        while i < data.len() && self.state != ChunkState::Done {
            match self.state {
                ChunkState::Data(n) => {
                    let take = (n as usize).min(data.len() - i);
                    i += take;
                    self.state =
                        if n as usize == take { ChunkState::DataEnd } else { ChunkState::Data(n - take as u64) };
                }
                _ => {
                    let b = data[i];
                    i += 1;
                    self.line.push(b);
                    if self.line.len() > 4096 {
                        return Err(bad("a chunk line over 4 KiB"));
                    }
                    if b != b'\n' {
                        continue;
                    }
                    if self.line.len() < 2 || self.line[self.line.len() - 2] != b'\r' {
                        return Err(bad("a bare LF in a chunked body"));
                    }
                    let line = std::mem::take(&mut self.line);
                    let text = &line[..line.len() - 2];
                    self.state = match self.state {
                        ChunkState::Size => {
                            let hex = text.split(|c| *c == b';').next().unwrap_or_default();
                            let hex = std::str::from_utf8(hex).map_err(|_| bad("a bad chunk size"))?;
                            if hex.is_empty() || hex.len() > 15 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                                return Err(bad(format!("a bad chunk size {hex:?}")));
                            }
                            match u64::from_str_radix(hex, 16).map_err(|_| bad("a bad chunk size"))? {
                                0 => ChunkState::Trailer,
                                n => ChunkState::Data(n),
                            }
                        }
                        ChunkState::DataEnd if text.is_empty() => ChunkState::Size,
                        ChunkState::DataEnd => return Err(bad("a chunk longer than its size")),
                        ChunkState::Trailer if text.is_empty() => ChunkState::Done,
                        ChunkState::Trailer => ChunkState::Trailer,
                        _ => unreachable!("data states are handled above"),
                    };
                }
            }
        }
        Ok((i, self.state == ChunkState::Done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<(Head, Body), Malformed> {
        let h = parse(text.as_bytes())?;
        let b = h.request_body()?;
        Ok((h, b))
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for (text, why) in [
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "more than one"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n", "more than one"),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "only `Transfer-Encoding"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", "not a length"),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "`host`"),
            ("GET / HTTP/1.1\r\nHost: a\r\nflint-token: x\r\nFlint-Token: y\r\n\r\n", "`flint-token`"),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n", "obs-fold"),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", "header name"),
            ("GET / HTTP/1.1\r\n\r\n", "without Host"),
            ("GET / SPDY/3\r\nHost: a\r\n\r\n", "HTTP/1.x only"),
            ("GET /\r\nHost: a\r\n\r\n", "start line"),
        ] {
            let e = req(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        assert!(head_end(b"GET / HTTP/1.1\nHost: a\r\n\r\n").unwrap_err().0.contains("bare LF"));
        let (h, b) = req("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert_eq!((b, h.keep_alive()), (Body::Length(12), true));
        let (h, b) = req("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!((b, h.keep_alive()), (Body::None, false));
    }

    #[test]
    fn chunked_bodies_end_where_they_end() {
        let body = b"5\r\nhello\r\n4;x=y\r\n abc\r\n0\r\nT: v\r\n\r\nNEXT";
        // Fed one byte at a time or whole: the same end.
        let mut c = Chunked::default();
        let (n, done) = c.feed(body).unwrap();
        assert!(done && &body[n..] == b"NEXT", "{n}");
        let mut c = Chunked::default();
        let mut at = 0;
        for (i, b) in body.iter().enumerate() {
            let (k, done) = c.feed(std::slice::from_ref(b)).unwrap();
            at += k;
            if done {
                assert_eq!(i + 1, at);
                break;
            }
        }
        assert_eq!(&body[at..], b"NEXT");
        assert!(Chunked::default().feed(b"zz\r\n").is_err());
        assert!(Chunked::default().feed(b"2\r\nabc\r\n").is_err(), "a chunk longer than its size");
        assert!(Chunked::default().feed(b"2\nab").is_err());
    }

    #[test]
    fn a_response_head_may_end_its_lines_with_a_bare_lf() {
        let raw = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\n\ndata: 1\n";
        let n = response_head_end(raw).unwrap().unwrap();
        assert_eq!(&raw[n..], b"data: 1\n");
        let h = parse_response(&raw[..n]).unwrap();
        assert_eq!((h.status().unwrap(), h.get("content-type")), (200, Some("text/event-stream")));
        assert_eq!(h.to_bytes(), b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n");
        assert_eq!(response_head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody").unwrap(), Some(25));
        assert!(head_end(raw).is_err(), "requests stay strict");
    }

    #[test]
    fn responses_are_framed_by_status_and_method() {
        let r = parse(b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n").unwrap();
        assert_eq!(r.response_body("GET").unwrap(), Body::None);
        let r = parse(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert_eq!((r.status().unwrap(), r.response_body("GET").unwrap()), (200, Body::UntilClose));
        assert_eq!(r.response_body("HEAD").unwrap(), Body::None);
        let r = parse(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert_eq!(r.status().unwrap(), 101);
        assert!(parse(b"HTTP/1.1 999 X\r\n\r\n").unwrap().status().is_err());
    }
}
