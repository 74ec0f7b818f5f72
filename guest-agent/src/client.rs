//! Host-side client of the agent: over a Unix socket (host mode) or through a VMM's vsock
//! socket with the `CONNECT <port>` handshake. One connection carries many concurrent calls.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::lock;
use crate::protocol::*;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The agent's own Unix socket (host mode).
    Unix(PathBuf),
    /// A VMM's vsock Unix socket and the guest port behind it.
    Vsock { uds: PathBuf, port: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("vsock handshake with {0} failed: {1}")]
    Handshake(String, String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the connection to the agent closed")]
    Closed,
    #[error("agent error ({code}): {message}")]
    Agent { code: ErrorCode, message: String },
    #[error("unexpected reply from the agent: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The agent's error code, when the agent refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Agent { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Frames buffered per stream before the connection's reader waits for the stream's consumer. Waiting stops
/// reading the connection, so a guest that produces faster than the host consumes is held back by vsock credit
/// instead of growing the host's memory (one slow consumer holds back the other calls of that connection: they
/// have deadlines).
pub const STREAM_QUEUE_FRAMES: usize = 32;
/// Most bytes `read_file` accepts unless a smaller limit is asked for.
pub const DEFAULT_MAX_READ_BYTES: u64 = 1 << 30;
/// Most bytes of stdout and of stderr `exec_output` keeps (the rest is counted, not stored).
pub const MAX_CAPTURE_BYTES: usize = 1 << 20;

type Streams = Arc<Mutex<HashMap<u32, mpsc::Sender<Frame>>>>;

/// Sets the flag when dropped (the end of a connection task, however it ends).
struct MarkOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for MarkOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A connection to one agent.
pub struct AgentClient {
    tx: mpsc::Sender<Frame>,
    streams: Streams,
    next_id: AtomicU32,
    /// Limit for calls that are not streams (health, stat, ...), for the wait between two frames of a transfer,
    /// and for the start of an exec.
    pub call_timeout: Duration,
    /// Limit for a whole file transfer (a guest that trickles a frame just inside `call_timeout` cannot hold a
    /// transfer open for longer).
    pub transfer_timeout: Duration,
    /// Set when the connection ended (either direction).
    closed: Arc<std::sync::atomic::AtomicBool>,
}

/// Output of a finished exec.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Bytes of output beyond [`MAX_CAPTURE_BYTES`] per stream that were dropped.
    pub dropped_bytes: u64,
    /// The agent's own time for the exec, µs.
    pub guest_us: Option<u64>,
}

/// One event of a running exec.
#[derive(Clone, Debug, PartialEq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// `guest_us`: the agent's own time for the exec (see [`Response::Exit`]).
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        guest_us: Option<u64>,
    },
}

async fn dial(ep: &Endpoint) -> Result<UnixStream, ClientError> {
    match ep {
        Endpoint::Unix(p) => UnixStream::connect(p).await.map_err(|e| ClientError::Connect(p.display().to_string(), e)),
        Endpoint::Vsock { uds, port } => {
            let name = format!("{} port {port}", uds.display());
            let mut s = UnixStream::connect(uds).await.map_err(|e| ClientError::Connect(name.clone(), e))?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())
                .await
                .map_err(|e| ClientError::Connect(name.clone(), e))?;
            // Read the reply a byte at a time: whatever follows the newline is the agent's.
            let mut line = Vec::new();
            loop {
                let mut b = [0u8; 1];
                match s.read(&mut b).await {
                    Ok(0) => {
                        return Err(ClientError::Handshake(
                            name,
                            "the VMM closed the connection (is the agent listening yet?)".into(),
                        ))
                    }
                    Ok(_) if b[0] == b'\n' => break,
                    Ok(_) if line.len() < 64 => line.push(b[0]),
                    Ok(_) => return Err(ClientError::Handshake(name, "reply line too long".into())),
                    Err(e) => return Err(ClientError::Connect(name, e)),
                }
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if !line.starts_with("OK ") {
                return Err(ClientError::Handshake(name, line));
            }
            Ok(s)
        }
    }
}

impl AgentClient {
    /// Connects and says hello, within `timeout`.
    pub async fn connect(ep: &Endpoint, timeout: Duration) -> Result<Self, ClientError> {
        let stream = tokio::time::timeout(timeout, dial(ep)).await.map_err(|_| ClientError::Timeout(timeout))??;
        let client = Self::from_stream(stream);
        let hello = tokio::time::timeout(timeout, client.call(&Request::Hello { version: PROTOCOL_VERSION }))
            .await
            .map_err(|_| ClientError::Timeout(timeout))??;
        match hello {
            Response::Hello { .. } => Ok(client),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Connects, retrying while the agent is not up yet, until `deadline` passes.
    pub async fn connect_retry(ep: &Endpoint, deadline: Duration) -> Result<Self, ClientError> {
        let start = tokio::time::Instant::now();
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            match Self::connect(ep, left.min(Duration::from_secs(10)).max(Duration::from_millis(1))).await {
                Ok(c) => return Ok(c),
                Err(e) if start.elapsed() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Wraps an already connected stream (no hello).
    pub fn from_stream(stream: UnixStream) -> Self {
        let (mut rd, wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Frame>(64);
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closed_w = closed.clone();
        tokio::spawn(async move {
            let _mark = MarkOnDrop(closed_w);
            let mut w = BufWriter::new(wr);
            while let Some(f) = rx.recv().await {
                if write_frame(&mut w, &f).await.is_err() {
                    return;
                }
                while let Ok(f) = rx.try_recv() {
                    if write_frame(&mut w, &f).await.is_err() {
                        return;
                    }
                }
                if w.flush().await.is_err() {
                    return;
                }
            }
        });
        let streams: Streams = Arc::new(Mutex::new(HashMap::new()));
        let s2 = streams.clone();
        let closed_r = closed.clone();
        tokio::spawn(async move {
            let _mark = MarkOnDrop(closed_r);
            while let Ok(f) = read_frame(&mut rd).await {
                let target = lock(&s2).get(&f.stream).cloned();
                match target {
                    Some(t) => {
                        // Waits while the stream's consumer is behind (see STREAM_QUEUE_FRAMES); a consumer that
                        // went away makes this fail at once.
                        let _ = t.send(f).await;
                    }
                    None if f.stream == 0 => {
                        // A connection-level error: deliver to everyone waiting (never blocking on one of them).
                        let targets: Vec<_> = lock(&s2).values().cloned().collect();
                        for t in targets {
                            let _ = t.try_send(f.clone());
                        }
                    }
                    None => {}
                }
            }
            lock(&s2).clear();
        });
        AgentClient {
            tx,
            streams,
            next_id: AtomicU32::new(1),
            call_timeout: Duration::from_secs(30),
            transfer_timeout: Duration::from_secs(600),
            closed,
        }
    }

    /// True once the connection has ended; a new client must be connected.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn open(&self) -> (u32, mpsc::Receiver<Frame>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (t, r) = mpsc::channel(STREAM_QUEUE_FRAMES);
        lock(&self.streams).insert(id, t);
        (id, r)
    }

    fn close(&self, id: u32) {
        lock(&self.streams).remove(&id);
    }

    async fn send(&self, f: Frame) -> Result<(), ClientError> {
        self.tx.send(f).await.map_err(|_| ClientError::Closed)
    }

    async fn next_json(rx: &mut mpsc::Receiver<Frame>) -> Result<Response, ClientError> {
        loop {
            let f = rx.recv().await.ok_or(ClientError::Closed)?;
            if f.kind == kind::JSON {
                let r: Response =
                    serde_json::from_slice(&f.payload).map_err(|e| ClientError::Protocol(e.to_string()))?;
                if let Response::Error { code, message } = r {
                    return Err(ClientError::Agent { code, message });
                }
                return Ok(r);
            }
        }
    }

    /// One request, one reply; the deadline covers sending too.
    pub async fn call(&self, req: &Request) -> Result<Response, ClientError> {
        let (id, mut rx) = self.open();
        let r = tokio::time::timeout(self.call_timeout, async {
            self.send(Frame::json(id, req)).await?;
            Self::next_json(&mut rx).await
        })
        .await
        .map_err(|_| ClientError::Timeout(self.call_timeout))
        .and_then(|r| r);
        self.close(id);
        r
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        match self.call(&Request::Health).await? {
            Response::Health(h) => Ok(h),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Opens a stream with `req` and waits (within `call_timeout`) for its first answer, which `first` takes or
    /// hands back as unexpected. On any failure the stream is closed again.
    async fn start_stream<T>(
        &self,
        req: &Request,
        first: impl FnOnce(Response) -> Result<T, Response>,
    ) -> Result<(u32, mpsc::Receiver<Frame>, T), ClientError> {
        let (id, mut rx) = self.open();
        let started = tokio::time::timeout(self.call_timeout, async {
            self.send(Frame::json(id, req)).await?;
            Self::next_json(&mut rx).await
        })
        .await
        .map_err(|_| ClientError::Timeout(self.call_timeout))
        .and_then(|r| r)
        .and_then(|r| first(r).map_err(|other| ClientError::Protocol(format!("{other:?}"))));
        match started {
            Ok(t) => Ok((id, rx, t)),
            Err(e) => {
                self.close(id);
                Err(e)
            }
        }
    }

    /// Starts a process; events arrive on the returned stream.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecStream<'_>, ClientError> {
        let (id, rx, pid) = self
            .start_stream(&Request::Exec(req), |r| match r {
                Response::Started { pid } => Ok(pid),
                other => Err(other),
            })
            .await?;
        Ok(ExecStream { client: self, id, rx, pid, done: false })
    }

    /// Runs a process to completion and collects its output (at most [`MAX_CAPTURE_BYTES`] of each stream; the
    /// rest is counted in `dropped_bytes`).
    pub async fn exec_output(&self, req: ExecRequest) -> Result<ExecOutput, ClientError> {
        let mut s = self.exec(req).await?;
        let mut out = ExecOutput::default();
        let keep = |buf: &mut Vec<u8>, b: Vec<u8>, dropped: &mut u64| {
            let room = MAX_CAPTURE_BYTES.saturating_sub(buf.len()).min(b.len());
            buf.extend_from_slice(&b[..room]);
            *dropped += (b.len() - room) as u64;
        };
        while let Some(ev) = s.next().await? {
            match ev {
                ExecEvent::Stdout(b) => keep(&mut out.stdout, b, &mut out.dropped_bytes),
                ExecEvent::Stderr(b) => keep(&mut out.stderr, b, &mut out.dropped_bytes),
                ExecEvent::Exit { code, signal, timed_out, guest_us } => {
                    out.code = code;
                    out.signal = signal;
                    out.timed_out = timed_out;
                    out.guest_us = guest_us;
                }
            }
        }
        Ok(out)
    }

    /// Starts code in one of the image's runners (`python`); the stream gives its output, then its outcome.
    pub async fn run_code_stream(&self, req: RunRequest) -> Result<RunStream<'_>, ClientError> {
        let (id, rx) = self.open();
        if let Err(e) = self.send(Frame::json(id, &Request::Run(req))).await {
            self.close(id);
            return Err(e);
        }
        Ok(RunStream { client: self, id, rx, done: false })
    }

    /// Runs code to its end and collects its output (at most [`MAX_CAPTURE_BYTES`] of each stream).
    pub async fn run_code(&self, req: RunRequest) -> Result<RunOutput, ClientError> {
        let mut s = self.run_code_stream(req).await?;
        let mut out = RunOutput::default();
        let keep = |buf: &mut Vec<u8>, b: Vec<u8>, dropped: &mut u64| {
            let room = MAX_CAPTURE_BYTES.saturating_sub(buf.len()).min(b.len());
            buf.extend_from_slice(&b[..room]);
            *dropped += (b.len() - room) as u64;
        };
        while let Some(ev) = s.next().await? {
            match ev {
                RunEvent::Stdout(b) => keep(&mut out.stdout, b, &mut out.dropped_bytes),
                RunEvent::Stderr(b) => keep(&mut out.stderr, b, &mut out.dropped_bytes),
                RunEvent::Done(d) => out.done = Some(d),
            }
        }
        Ok(out)
    }

    /// Shorthand: runs `argv` with no stdin.
    pub async fn run(&self, argv: &[&str]) -> Result<ExecOutput, ClientError> {
        self.exec_output(ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() }).await
    }

    /// Uploads `data` from a reader to `path` (created with `mode`, replaced atomically).
    pub async fn write_file_from<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        mode: u32,
        data: R,
    ) -> Result<u64, ClientError> {
        self.write_file_as(path, mode, None, data).await
    }

    /// [`Self::write_file_from`], the file (and any parent directory it makes) owned by `owner` (a user name or
    /// uid).
    pub async fn write_file_as<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        mode: u32,
        owner: Option<&str>,
        mut data: R,
    ) -> Result<u64, ClientError> {
        let (id, mut rx) = self.open();
        let r = async {
            let req = Request::WriteFile { path: path.into(), mode, append: false, owner: owner.map(String::from) };
            self.send(Frame::json(id, &req)).await?;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = data.read(&mut buf).await.map_err(|e| ClientError::Connect("upload source".into(), e))?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                // An early error (bad path, too large) ends the upload at once.
                if let Ok(f) = rx.try_recv() {
                    if f.kind == kind::JSON {
                        if let Ok(Response::Error { code, message }) = serde_json::from_slice(&f.payload) {
                            return Err(ClientError::Agent { code, message });
                        }
                    }
                }
                self.send(Frame::data(kind::DATA, id, buf)).await?;
            }
            self.send(Frame::data(kind::EOF, id, Vec::new())).await?;
            match tokio::time::timeout(self.call_timeout, Self::next_json(&mut rx))
                .await
                .map_err(|_| ClientError::Timeout(self.call_timeout))??
            {
                Response::Ok { bytes } => Ok(bytes.unwrap_or(0)),
                other => Err(ClientError::Protocol(format!("{other:?}"))),
            }
        }
        .await;
        self.close(id);
        r
    }

    pub async fn write_file(&self, path: &str, mode: u32, data: &[u8]) -> Result<u64, ClientError> {
        self.write_file_from(path, mode, data).await
    }

    /// Downloads a file.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        self.read_file_limit(path, None).await
    }

    /// Downloads at most `limit` bytes of a file (devices such as /dev/urandom never end); without a limit, at most
    /// [`DEFAULT_MAX_READ_BYTES`]: a larger file is an error, not a larger allocation. Memory grows with what
    /// arrives, never with the size the guest reports.
    pub async fn read_file_limit(&self, path: &str, limit: Option<u64>) -> Result<Vec<u8>, ClientError> {
        let max = limit.unwrap_or(DEFAULT_MAX_READ_BYTES).min(DEFAULT_MAX_READ_BYTES);
        let mut f = self.read_file_stream(path, max, limit.is_none()).await?;
        let mut data = Vec::with_capacity(f.size.min(max).min(1 << 20) as usize);
        while let Some(chunk) = f.next().await? {
            data.extend_from_slice(&chunk);
        }
        Ok(data)
    }

    /// Starts a download of at most `max` bytes. With `whole`, a file the guest says is larger than `max`, or that
    /// turns out to be, is an error ([`ErrorCode::TooLarge`]); without, the first `max` bytes are the answer.
    pub async fn read_file_stream(&self, path: &str, max: u64, whole: bool) -> Result<FileStream<'_>, ClientError> {
        // Ask for one byte more than allowed: it tells a file that is exactly `max` bytes from a longer one.
        let ask = if whole { max.saturating_add(1) } else { max };
        let req = Request::ReadFile { path: path.into(), limit: Some(ask) };
        let (id, rx, size) = self
            .start_stream(&req, |r| match r {
                Response::File { size, .. } => Ok(size),
                other => Err(other),
            })
            .await?;
        if whole && size > max {
            self.close(id);
            return Err(too_large(path, size, max));
        }
        let deadline = tokio::time::Instant::now() + self.transfer_timeout;
        Ok(FileStream { client: self, id, rx, size, max, whole, got: 0, done: false, deadline, path: path.into() })
    }

    /// Watches a directory (and, with `recursive`, everything below it); answers once the watch is in place.
    pub async fn watch(&self, path: &str, recursive: bool) -> Result<WatchStream<'_>, ClientError> {
        let req = Request::Watch { path: path.to_string(), recursive };
        let (id, rx, ()) = self
            .start_stream(&req, |r| match r {
                Response::Watching => Ok(()),
                other => Err(other),
            })
            .await?;
        Ok(WatchStream { client: self, id, rx, done: false })
    }

    pub async fn stat(&self, path: &str) -> Result<StatInfo, ClientError> {
        match self.call(&Request::Stat { path: path.into() }).await? {
            Response::Stat(s) => Ok(s),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn list(&self, path: &str) -> Result<Vec<DirEntry>, ClientError> {
        match self.call(&Request::List { path: path.into() }).await? {
            Response::List { entries } => Ok(entries),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    async fn ok(&self, req: Request) -> Result<(), ClientError> {
        match self.call(&req).await? {
            Response::Ok { .. } => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Mounts block device `device` (`vdc`) at `path` in the guest (a dynamic mount).
    pub async fn mount(&self, device: &str, path: &str, read_only: bool) -> Result<(), ClientError> {
        self.ok(Request::Mount { device: device.into(), path: path.into(), read_only }).await
    }

    pub async fn unmount(&self, path: &str) -> Result<(), ClientError> {
        self.ok(Request::Unmount { path: path.into() }).await
    }

    pub async fn mkdir(&self, path: &str) -> Result<(), ClientError> {
        self.ok(Request::Mkdir { path: path.into(), mode: 0o755, owner: None, exclusive: false }).await
    }

    /// Makes `path` and its missing parents, owned by `owner`; `exclusive`: `already_exists` if it is there.
    pub async fn mkdir_as(&self, path: &str, owner: Option<&str>, exclusive: bool) -> Result<(), ClientError> {
        self.ok(Request::Mkdir { path: path.into(), mode: 0o755, owner: owner.map(String::from), exclusive }).await
    }

    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), ClientError> {
        self.ok(Request::Remove { path: path.into(), recursive }).await
    }

    pub async fn rename(&self, from: &str, to: &str) -> Result<(), ClientError> {
        self.ok(Request::Rename { from: from.into(), to: to.into() }).await
    }

    /// Before-checkpoint hooks, after the image's runners are warm: a runner still starting (an interpreter in a
    /// slow guest) may take minutes, so this call waits up to [`BEFORE_CHECKPOINT_TIMEOUT`].
    pub async fn before_checkpoint(&self) -> Result<(), ClientError> {
        let (id, mut rx) = self.open();
        let t = BEFORE_CHECKPOINT_TIMEOUT.max(self.call_timeout);
        let r = tokio::time::timeout(t, async {
            self.send(Frame::json(id, &Request::BeforeCheckpoint)).await?;
            Self::next_json(&mut rx).await
        })
        .await
        .map_err(|_| ClientError::Timeout(t))
        .and_then(|r| r);
        self.close(id);
        match r? {
            Response::Ok { .. } => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.ok(Request::Shutdown { reboot: false }).await
    }

    /// After a restore: sets the guest clock to the host's, adds fresh host entropy, replaces
    /// the exec environment and runs after-restore hooks.
    pub async fn refresh(
        &self,
        env: std::collections::BTreeMap<String, String>,
        hostname: Option<String>,
    ) -> Result<Response, ClientError> {
        self.refresh_with(env, hostname, None).await
    }

    /// `refresh`, also (re)addressing the guest's network card.
    pub async fn refresh_with(
        &self,
        env: std::collections::BTreeMap<String, String>,
        hostname: Option<String>,
        network: Option<crate::protocol::GuestNetwork>,
    ) -> Result<Response, ClientError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut entropy = [0u8; 64];
        getrandom::getrandom(&mut entropy).map_err(|e| ClientError::Protocol(format!("host entropy: {e}")))?;
        self.call(&Request::Refresh(RefreshRequest {
            wall_clock_ns: Some(now),
            entropy_hex: Some(hex_encode(&entropy)),
            env,
            hostname,
            network,
        }))
        .await
    }
}

fn too_large(path: &str, size: u64, max: u64) -> ClientError {
    ClientError::Agent {
        code: ErrorCode::TooLarge,
        message: format!(
            "{path} is {size} bytes or more, over the {max}-byte limit of this read (ask for less with a limit)"
        ),
    }
}

/// A download in progress.
pub struct FileStream<'a> {
    client: &'a AgentClient,
    id: u32,
    rx: mpsc::Receiver<Frame>,
    /// The size the guest reported (a device may report 0): informational, never trusted for allocation.
    pub size: u64,
    max: u64,
    whole: bool,
    got: u64,
    done: bool,
    deadline: tokio::time::Instant,
    path: String,
}

impl FileStream<'_> {
    /// The next chunk; `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        while !self.done {
            let idle = self.client.call_timeout;
            let wait = idle.min(self.deadline.saturating_duration_since(tokio::time::Instant::now()));
            let f = tokio::time::timeout(wait, self.rx.recv())
                .await
                .map_err(|_| ClientError::Timeout(wait))?
                .ok_or(ClientError::Closed)?;
            match f.kind {
                kind::DATA => {
                    self.got += f.payload.len() as u64;
                    if self.got > self.max {
                        self.done = true;
                        if self.whole {
                            return Err(too_large(&self.path, self.got, self.max));
                        }
                        return Err(ClientError::Protocol(format!(
                            "the agent sent {} bytes of {}, more than the {} asked for",
                            self.got, self.path, self.max
                        )));
                    }
                    return Ok(Some(f.payload));
                }
                kind::EOF => {
                    self.done = true;
                    // The final status reply.
                    let wait = idle.min(self.deadline.saturating_duration_since(tokio::time::Instant::now()));
                    tokio::time::timeout(wait, AgentClient::next_json(&mut self.rx))
                        .await
                        .map_err(|_| ClientError::Timeout(wait))??;
                }
                kind::JSON => {
                    if let Ok(Response::Error { code, message }) = serde_json::from_slice(&f.payload) {
                        self.done = true;
                        return Err(ClientError::Agent { code, message });
                    }
                }
                _ => {}
            }
        }
        Ok(None)
    }
}

impl Drop for FileStream<'_> {
    fn drop(&mut self) {
        self.client.close(self.id);
    }
}

/// A directory watch in progress ([`AgentClient::watch`]). Dropping it ends the watch in the guest.
pub struct WatchStream<'a> {
    client: &'a AgentClient,
    id: u32,
    rx: mpsc::Receiver<Frame>,
    done: bool,
}

impl WatchStream<'_> {
    /// The next batch of changes; `None` once the watch is over (stopped, or the directory itself went).
    pub async fn next(&mut self) -> Result<Option<Vec<FsEvent>>, ClientError> {
        while !self.done {
            let f = self.rx.recv().await.ok_or(ClientError::Closed)?;
            if f.kind != kind::JSON {
                return Err(ClientError::Protocol(format!("frame kind {:#x} on a watch stream", f.kind)));
            }
            match serde_json::from_slice::<Response>(&f.payload).map_err(|e| ClientError::Protocol(e.to_string()))? {
                Response::FsEvents { events } => return Ok(Some(events)),
                Response::Ok { .. } => self.done = true,
                Response::Error { code, message } => {
                    self.done = true;
                    return Err(ClientError::Agent { code, message });
                }
                other => return Err(ClientError::Protocol(format!("{other:?}"))),
            }
        }
        Ok(None)
    }

    /// Ends the watch; [`WatchStream::next`] then gives what was still queued, then `None`.
    pub async fn stop(&self) -> Result<(), ClientError> {
        self.client.send(Frame::json(self.id, &Request::Signal { signal: libc::SIGTERM })).await
    }
}

impl Drop for WatchStream<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: a full queue leaves the watch to end with the connection.
            let _ = self.client.tx.try_send(Frame::json(self.id, &Request::Signal { signal: libc::SIGTERM }));
        }
        self.client.close(self.id);
    }
}

/// Longest wait for a before-checkpoint (runners starting, then hooks).
pub const BEFORE_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(300);

/// A running exec.
pub struct ExecStream<'a> {
    client: &'a AgentClient,
    id: u32,
    rx: mpsc::Receiver<Frame>,
    pub pid: u32,
    done: bool,
}

impl ExecStream<'_> {
    /// The next output chunk or the exit; `None` after the exit.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let f = self.rx.recv().await.ok_or(ClientError::Closed)?;
        Ok(Some(match f.kind {
            kind::STDOUT => ExecEvent::Stdout(f.payload),
            kind::STDERR => ExecEvent::Stderr(f.payload),
            kind::JSON => match serde_json::from_slice::<Response>(&f.payload)
                .map_err(|e| ClientError::Protocol(e.to_string()))?
            {
                Response::Exit { code, signal, timed_out, guest_us } => {
                    self.done = true;
                    ExecEvent::Exit { code, signal, timed_out, guest_us }
                }
                Response::Error { code, message } => {
                    self.done = true;
                    return Err(ClientError::Agent { code, message });
                }
                other => return Err(ClientError::Protocol(format!("{other:?}"))),
            },
            k => return Err(ClientError::Protocol(format!("frame kind {k:#x} on an exec stream"))),
        }))
    }

    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), ClientError> {
        for c in data.chunks(CHUNK) {
            self.client.send(Frame::data(kind::STDIN, self.id, c.to_vec())).await?;
        }
        Ok(())
    }

    pub async fn close_stdin(&self) -> Result<(), ClientError> {
        self.client.send(Frame::data(kind::EOF, self.id, Vec::new())).await
    }

    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.client.send(Frame::json(self.id, &Request::Signal { signal })).await
    }

    /// New terminal size for an exec with a tty.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.client.send(Frame::json(self.id, &Request::Resize { rows, cols })).await
    }
}

/// How a run ended (the agent's `ran` answer).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RunDone {
    pub status: RunStatus,
    pub value: Option<String>,
    pub error: Option<RunError>,
    pub restarted: bool,
    pub guest_us: Option<u64>,
}

pub enum RunEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Done(RunDone),
}

/// A run's collected output and outcome.
#[derive(Clone, Debug, Default)]
pub struct RunOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub dropped_bytes: u64,
    pub done: Option<RunDone>,
}

/// A run in progress.
pub struct RunStream<'a> {
    client: &'a AgentClient,
    id: u32,
    rx: mpsc::Receiver<Frame>,
    done: bool,
}

impl RunStream<'_> {
    /// Interrupts the run (as its timeout would): it answers `timeout`, the runner and its state live on.
    pub async fn interrupt(&self) -> Result<(), ClientError> {
        self.client.send(Frame::json(self.id, &Request::Signal { signal: libc::SIGINT })).await
    }

    /// The next output chunk or the outcome; `None` after the outcome.
    pub async fn next(&mut self) -> Result<Option<RunEvent>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let f = self.rx.recv().await.ok_or(ClientError::Closed)?;
        Ok(Some(match f.kind {
            kind::STDOUT => RunEvent::Stdout(f.payload),
            kind::STDERR => RunEvent::Stderr(f.payload),
            kind::JSON => {
                self.done = true;
                match serde_json::from_slice::<Response>(&f.payload)
                    .map_err(|e| ClientError::Protocol(e.to_string()))?
                {
                    Response::Ran { status, value, error, restarted, guest_us } => {
                        RunEvent::Done(RunDone { status, value, error, restarted, guest_us })
                    }
                    Response::Error { code, message } => return Err(ClientError::Agent { code, message }),
                    other => return Err(ClientError::Protocol(format!("{other:?}"))),
                }
            }
            k => return Err(ClientError::Protocol(format!("frame kind {k:#x} on a run stream"))),
        }))
    }
}

impl Drop for RunStream<'_> {
    fn drop(&mut self) {
        self.client.close(self.id);
    }
}

impl Drop for ExecStream<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Dropped before its exit, so nobody reads its output any more: the process group is killed, as the
            // agent kills it when its connection goes. Best effort: a full queue leaves it to the connection's end.
            let _ = self.client.tx.try_send(Frame::json(self.id, &Request::Signal { signal: libc::SIGKILL }));
        }
        self.client.close(self.id);
    }
}
