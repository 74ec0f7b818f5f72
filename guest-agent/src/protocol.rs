//! The agent wire protocol, version 1 (docs/agent-protocol.md).
//!
//! A connection carries frames: `len: u32 BE` (bytes after this field), `kind: u8`,
//! `stream: u32 BE`, then `len - 5` payload bytes. Control frames carry one JSON object;
//! data frames carry raw bytes of one stream (stdin, stdout, stderr, file contents).
//! Many requests run at once on one connection, each on its own stream id chosen by the host.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const PROTOCOL_VERSION: u32 = 1;
/// Default vsock port the agent listens on.
pub const DEFAULT_PORT: u32 = 52;
/// Largest frame payload either side sends or accepts.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Data chunk size used for streaming.
pub const CHUNK: usize = 64 * 1024;
const HEADER: usize = 9;

/// Frame kinds.
pub mod kind {
    pub const JSON: u8 = 1;
    pub const STDIN: u8 = 0x10;
    pub const STDOUT: u8 = 0x11;
    pub const STDERR: u8 = 0x12;
    /// File contents, in either direction.
    pub const DATA: u8 = 0x13;
    /// End of the data (stdin closed, upload finished, download finished).
    pub const EOF: u8 = 0x14;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn json<T: Serialize>(stream: u32, msg: &T) -> Frame {
        Frame { kind: kind::JSON, stream, payload: serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec()) }
    }

    pub fn data(kind: u8, stream: u32, payload: Vec<u8>) -> Frame {
        Frame { kind, stream, payload }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is larger than the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("frame length {0} is shorter than a frame header")]
    Short(u32),
    #[error("i/o error")]
    Io(#[from] std::io::Error),
}

/// Reads one frame. A clean EOF between frames is `Closed`.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len);
    if (len as usize) < HEADER - 4 {
        return Err(FrameError::Short(len));
    }
    let payload_len = len as usize - (HEADER - 4);
    if payload_len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(payload_len));
    }
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await?;
    let mut payload = vec![0u8; payload_len];
    r.read_exact(&mut payload).await?;
    Ok(Frame { kind: head[0], stream: u32::from_be_bytes([head[1], head[2], head[3], head[4]]), payload })
}

/// Writes one frame (no flush).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> std::io::Result<()> {
    if f.payload.len() > MAX_PAYLOAD {
        return Err(std::io::Error::other(format!("frame payload of {} bytes is too large", f.payload.len())));
    }
    let mut buf = Vec::with_capacity(HEADER + f.payload.len());
    buf.extend_from_slice(&((f.payload.len() + HEADER - 4) as u32).to_be_bytes());
    buf.push(f.kind);
    buf.extend_from_slice(&f.stream.to_be_bytes());
    buf.extend_from_slice(&f.payload);
    w.write_all(&buf).await
}

/// Host → agent control messages.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Hello {
        version: u32,
    },
    Health,
    Exec(ExecRequest),
    /// Signal a running exec (same stream as the exec).
    Signal {
        signal: i32,
    },
    /// Set the terminal size of a running exec with a tty (same stream as the exec); its process group gets
    /// SIGWINCH.
    Resize {
        rows: u16,
        cols: u16,
    },
    WriteFile {
        path: String,
        #[serde(default = "default_mode")]
        mode: u32,
        #[serde(default)]
        append: bool,
        /// Owner of the file written (a user name or uid, its group its primary one); default root. Missing
        /// parent directories are made, owned likewise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    ReadFile {
        path: String,
        /// Read at most this many bytes (e.g. from /dev/urandom).
        #[serde(default)]
        limit: Option<u64>,
    },
    Stat {
        path: String,
    },
    List {
        path: String,
    },
    Mkdir {
        path: String,
        #[serde(default = "default_dir_mode")]
        mode: u32,
        /// Owner of the directories made (a user name or uid); default root.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        /// Fail with `already_exists` if the directory is there (otherwise that is success).
        #[serde(default)]
        exclusive: bool,
    },
    Remove {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
    Rename {
        from: String,
        to: String,
    },
    /// Watch a directory (inotify): `watching`, then `fs_events` batches as things change in it, until the host
    /// sends `signal` on the stream (or the directory itself goes): then `ok`.
    Watch {
        path: String,
        /// Its subdirectories too, those made later included.
        #[serde(default)]
        recursive: bool,
    },
    Refresh(RefreshRequest),
    /// Run code in one of the image's warm runners (a long-lived interpreter; state kept between runs). The
    /// code's stdout and stderr stream as STDOUT/STDERR frames, then `ran`.
    Run(RunRequest),
    /// Mount a block device's ext4 filesystem at `path` (made if missing), after dropping the device's cached
    /// blocks: the host has just written the device's backing file (a dynamic mount, docs/images.md).
    Mount {
        /// A virtio block device name (`vdc`).
        device: String,
        path: String,
        #[serde(default)]
        read_only: bool,
    },
    /// Unmount what is mounted at `path`.
    Unmount {
        path: String,
    },
    BeforeCheckpoint,
    Shutdown {
        #[serde(default)]
        reboot: bool,
    },
}

fn default_mode() -> u32 {
    0o644
}
fn default_dir_mode() -> u32 {
    0o755
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// User name or numeric uid.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The host will stream stdin (STDIN frames, then EOF); otherwise stdin is /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size (stdin, stdout and stderr are its slave; the output is one stream,
    /// STDOUT; the process leads a new session with the terminal as its controlling tty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
}

/// Most bytes of code one run takes.
pub const MAX_RUN_CODE: usize = 256 * 1024;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The runner's name in the image (`python`).
    pub language: String,
    pub code: String,
    /// Past this, the run is interrupted (the runner survives, its state too) and its status is `timeout`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The runner's context (a namespace of its own in the one interpreter: E2B's code-interpreter contexts);
    /// none: the default one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Environment variables set for this run only (restored after it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// The code ran to its end.
    Ok,
    /// It raised: `error` says what.
    Error,
    /// It ran past its timeout and was interrupted.
    Timeout,
}

/// An exception a run raised.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RunError {
    pub name: String,
    pub message: String,
    pub traceback: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// Host wall clock, nanoseconds since the Unix epoch.
    #[serde(default)]
    pub wall_clock_ns: Option<u64>,
    /// Fresh entropy for the guest's pool, hex-encoded.
    #[serde(default)]
    pub entropy_hex: Option<String>,
    /// Environment for later execs (replaces the previous refresh's).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub hostname: Option<String>,
    /// The guest's network: set after a boot with one and after every restore (a clone's own address and MAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<GuestNetwork>,
}

/// An address for the guest's network card, as flintd allocated it (docs/networking.md).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GuestNetwork {
    /// The card (`eth0`).
    pub interface: String,
    /// aa:bb:cc:dd:ee:ff.
    pub mac: String,
    pub address: std::net::Ipv4Addr,
    pub prefix_len: u8,
    /// The default route.
    pub gateway: std::net::Ipv4Addr,
    /// Name servers written to /etc/resolv.conf.
    #[serde(default)]
    pub dns: Vec<std::net::Ipv4Addr>,
}

/// Agent → host control messages.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        version: u32,
        agent: String,
    },
    Health(Health),
    Started {
        pid: u32,
    },
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        /// Time inside the agent from the request's arrival to this answer (µs): what the guest spent; the rest of
        /// a caller's wait is the host's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        guest_us: Option<u64>,
    },
    Ok {
        #[serde(default)]
        bytes: Option<u64>,
    },
    File {
        size: u64,
        mode: u32,
    },
    Stat(StatInfo),
    List {
        entries: Vec<DirEntry>,
    },
    /// A watch is in place: what changes from now on is reported.
    Watching,
    /// What changed in a watched directory, in order.
    FsEvents {
        events: Vec<FsEvent>,
    },
    Refreshed {
        clock_step_ns: Option<i64>,
        entropy_bytes: usize,
        hooks_run: usize,
        /// Time inside the agent for the whole refresh (µs), and per step (clock, entropy, hostname, network,
        /// hooks): the guest's side of a restore after its agent answers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        guest_us: Option<u64>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        steps_us: BTreeMap<String, u64>,
    },
    /// The end of a run.
    Ran {
        status: RunStatus,
        /// `repr()` of the value of the code's last line, if it is an expression with a value.
        #[serde(default)]
        value: Option<String>,
        #[serde(default)]
        error: Option<RunError>,
        /// The runner did not survive (it ignored the interrupt, or died): a new one starts, and the old one's
        /// state is gone.
        #[serde(default)]
        restarted: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        guest_us: Option<u64>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Health {
    pub version: String,
    pub protocol: u32,
    pub uptime_s: f64,
    pub mem_total_kb: u64,
    pub mem_available_kb: u64,
    pub load: [f64; 3],
    pub pid: u32,
    pub running_execs: usize,
    /// The guest's wall clock, nanoseconds since the Unix epoch.
    #[serde(default)]
    pub time_unix_ns: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatInfo {
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub mtime_s: i64,
    /// Owner and group names (their ids when /etc/passwd or /etc/group has no name).
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub group: String,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DirEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    #[serde(default)]
    pub mtime_s: i64,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub group: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// One change in a watched directory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FsEvent {
    /// The entry's path relative to the watched directory (`sub/a.txt`).
    pub name: String,
    pub op: FsOp,
}

/// What happened to an entry (inotify's events, as fsnotify names them).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FsOp {
    /// Made, or moved in.
    Create,
    /// Its contents changed.
    Write,
    Remove,
    /// Moved away (its new name, if in the watch, comes as a `create`).
    Rename,
    /// Its mode, owner or times changed.
    Chmod,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be parsed or is not valid here.
    Invalid,
    UnsupportedVersion,
    NotFound,
    NotADirectory,
    IsADirectory,
    AlreadyExists,
    PermissionDenied,
    TooLarge,
    /// A path that escapes the agent's root or is not absolute.
    BadPath,
    Io,
    Busy,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        f.write_str(&s)
    }
}

impl ErrorCode {
    pub fn from_io(e: &std::io::Error) -> ErrorCode {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::NotFound => ErrorCode::NotFound,
            K::PermissionDenied => ErrorCode::PermissionDenied,
            K::AlreadyExists => ErrorCode::AlreadyExists,
            _ => match e.raw_os_error() {
                Some(libc::ENOTDIR) => ErrorCode::NotADirectory,
                Some(libc::EISDIR) => ErrorCode::IsADirectory,
                Some(libc::EFBIG) | Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorCode::TooLarge,
                _ => ErrorCode::Io,
            },
        }
    }
}

pub fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let mut buf = Vec::new();
        let f = Frame::json(7, &Request::Health);
        write_frame(&mut buf, &f).await.unwrap();
        write_frame(&mut buf, &Frame::data(kind::STDOUT, 7, b"hi".to_vec())).await.unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).await.unwrap(), f);
        assert_eq!(read_frame(&mut r).await.unwrap().payload, b"hi");
        assert!(matches!(read_frame(&mut r).await, Err(FrameError::Closed)));
        let huge = ((MAX_PAYLOAD + 100) as u32).to_be_bytes();
        assert!(matches!(read_frame(&mut &huge[..]).await, Err(FrameError::TooLarge(_))));
        let short = 2u32.to_be_bytes();
        assert!(matches!(read_frame(&mut &short[..]).await, Err(FrameError::Short(2))));
    }

    #[test]
    fn requests_parse_strictly() {
        let r: Request = serde_json::from_str(r#"{"type":"exec","argv":["echo","hi"]}"#).unwrap();
        assert!(matches!(r, Request::Exec(ExecRequest { ref argv, .. }) if argv.len() == 2));
        assert!(serde_json::from_str::<Request>(r#"{"type":"exec","argv":[],"bogus":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"type":"nope"}"#).is_err());
        assert_eq!(hex_decode(&hex_encode(&[0, 255, 16])), Some(vec![0, 255, 16]));
        assert_eq!(hex_decode("zz"), None);
    }
}
