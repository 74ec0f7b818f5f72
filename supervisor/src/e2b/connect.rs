//! The Connect protocol (v1, JSON codec) as E2B's envd speaks it: unary calls are a bare JSON body; streams are
//! envelopes `[flags u8][length u32 BE][JSON]`, a stream's last envelope has flag 0x02 and carries `{}` or an
//! error. Pure: no I/O, so that it is unit-tested and fuzzed (its input is any API caller's bytes).
use serde::Serialize;

/// The flag of a stream's last envelope.
pub const END_STREAM: u8 = 0x02;
/// The flag of a compressed envelope (refused: the SDK never compresses).
pub const COMPRESSED: u8 = 0x01;
/// Longest message flintd takes in one envelope.
pub const MAX_MESSAGE: usize = 16 << 20;

/// A Connect error code (the string the client maps to an exception) with its HTTP status for unary calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unauthenticated,
    Unavailable,
    DeadlineExceeded,
    Unimplemented,
    Internal,
}

impl Code {
    pub fn name(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid_argument",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unauthenticated => "unauthenticated",
            Code::Unavailable => "unavailable",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
        }
    }

    /// The HTTP status of a unary error (Connect's mapping).
    pub fn status(self) -> u16 {
        match self {
            Code::InvalidArgument | Code::FailedPrecondition => 400,
            Code::Unauthenticated => 401,
            Code::PermissionDenied => 403,
            Code::NotFound => 404,
            Code::AlreadyExists => 409,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::DeadlineExceeded => 504,
            Code::Internal => 500,
        }
    }
}

/// A Connect error: what a unary call answers with its status, and what ends a stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub struct ConnectError {
    pub code: Code,
    pub message: String,
}

impl ConnectError {
    pub fn new(code: Code, message: impl Into<String>) -> ConnectError {
        ConnectError { code, message: message.into() }
    }

    /// The error's JSON: `{"code": "...", "message": "..."}`.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"code": self.code.name(), "message": self.message})).unwrap_or_default()
    }
}

/// One envelope around `json`.
pub fn envelope(flags: u8, json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + json.len());
    out.push(flags);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json);
    out
}

/// A message envelope of `msg`.
pub fn message<T: Serialize>(msg: &T) -> Vec<u8> {
    envelope(0, &serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec()))
}

/// The end of a stream: `{}`, or the error.
pub fn end(error: Option<&ConnectError>) -> Vec<u8> {
    match error {
        None => envelope(END_STREAM, b"{}"),
        Some(e) => envelope(
            END_STREAM,
            &serde_json::to_vec(&serde_json::json!({"error": {"code": e.code.name(), "message": e.message}}))
                .unwrap_or_default(),
        ),
    }
}

/// The messages of a whole request body of envelopes (a server stream's one request, a client stream's many):
/// `(flags, JSON)` each. Compressed envelopes, oversized ones and trailing bytes are errors.
pub fn decode_all(body: &[u8]) -> Result<Vec<(u8, &[u8])>, ConnectError> {
    let bad = |m: String| ConnectError::new(Code::InvalidArgument, m);
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        if rest.len() < 5 {
            return Err(bad(format!("a truncated envelope header ({} bytes)", rest.len())));
        }
        let flags = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if flags & COMPRESSED != 0 {
            return Err(bad("a compressed envelope (compression is not accepted)".into()));
        }
        if len > MAX_MESSAGE {
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!("a {len}-byte message: at most {MAX_MESSAGE}"),
            ));
        }
        let msg = rest.get(5..5 + len).ok_or_else(|| bad(format!("an envelope of {len} bytes cut short")))?;
        out.push((flags, msg));
        rest = &rest[5 + len..];
    }
    Ok(out)
}

/// The one message of a server-stream request body.
pub fn single(body: &[u8]) -> Result<&[u8], ConnectError> {
    let msgs = decode_all(body)?;
    match msgs.as_slice() {
        [(f, m)] if f & END_STREAM == 0 => Ok(m),
        _ => Err(ConnectError::new(
            Code::InvalidArgument,
            format!("a server-stream request carries exactly one message (got {})", msgs.len()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_bad_ones_are_refused() {
        let mut body = message(&serde_json::json!({"a": 1}));
        assert_eq!(single(&body).unwrap(), br#"{"a":1}"#);
        body.extend(message(&serde_json::json!({"b": 2})));
        let all = decode_all(&body).unwrap();
        assert_eq!(all.len(), 2);
        assert!(single(&body).is_err(), "two messages for a server stream");
        assert_eq!(single(&body[..7]).unwrap_err().code, Code::InvalidArgument);
        assert_eq!(decode_all(&[0, 0, 0]).unwrap_err().code, Code::InvalidArgument);
        assert_eq!(decode_all(&envelope(COMPRESSED, b"x")).unwrap_err().code, Code::InvalidArgument);
        let huge = [0u8, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(decode_all(&huge).unwrap_err().code, Code::ResourceExhausted);
        assert!(single(&end(None)).is_err(), "an end-stream envelope is no request");
        let e = ConnectError::new(Code::NotFound, "no such process");
        let tail = end(Some(&e));
        assert_eq!(tail[0], END_STREAM);
        let v: serde_json::Value = serde_json::from_slice(&tail[5..]).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(Code::AlreadyExists.status(), 409);
    }
}
