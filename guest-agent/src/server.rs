//! The agent service: accepts connections and runs requests, many at once per connection.
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::lock;
use crate::protocol::*;
use crate::reaper::Reaper;
use crate::runner::{ImageConfig, Runners};

/// Service settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Every path a request names is resolved below this directory ("/" in a guest).
    pub root: PathBuf,
    /// Largest file a write may produce.
    pub max_file_bytes: u64,
    /// Directory holding `after-restore.d/` and `before-checkpoint.d/` hook executables.
    pub hooks_dir: PathBuf,
    /// The agent is the guest's init: it may set the clock and hostname, credit entropy and
    /// reboot the machine. Off in host mode, where those would change the host.
    pub is_init: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            root: PathBuf::from("/"),
            max_file_bytes: 4 << 30,
            hooks_dir: PathBuf::from("/etc/flint/hooks"),
            is_init: false,
        }
    }
}

/// State shared by every connection.
pub struct Agent {
    settings: Settings,
    started: Instant,
    /// Environment set by the last refresh, applied to every exec.
    refresh_env: Mutex<BTreeMap<String, String>>,
    pub reaper: Arc<Reaper>,
    /// The image's own settings (`/etc/flint/image.json`; empty for the default image).
    image: ImageConfig,
    pub runners: Runners,
    /// User and group names for stat answers.
    names: Names,
}

impl Agent {
    pub fn new(settings: Settings) -> Arc<Self> {
        let image = ImageConfig::load(&settings.root).unwrap_or_else(|e| {
            eprintln!("flint-agent: ignoring the image's settings: {e}");
            ImageConfig::default()
        });
        let runners = Runners::new(image.runners.clone());
        Arc::new(Agent {
            names: Names::new(&settings.root),
            settings,
            started: Instant::now(),
            refresh_env: Mutex::new(BTreeMap::new()),
            reaper: Reaper::new(),
            image,
            runners,
        })
    }

    /// The environment every process the agent starts gets: a base PATH and HOME, the inherited variables, the
    /// image's, then the last refresh's.
    pub fn base_env(&self) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        env.insert("HOME".into(), "/root".into());
        for k in INHERITED_ENV {
            if let Ok(v) = std::env::var(k) {
                env.insert(k.into(), v);
            }
        }
        env.extend(self.image.env.clone());
        env.extend(lock(&self.refresh_env).clone());
        env.into_iter().collect()
    }

    /// Starts the image's runners and waits until they are ready.
    pub async fn warm_runners(&self) -> Result<(), String> {
        self.runners.warm(&self.reaper, &self.base_env()).await
    }

    fn resolve(&self, path: &str) -> Result<PathBuf, (ErrorCode, String)> {
        resolve_path(&self.settings.root, path)
    }
}

/// Resolves an absolute request path below `root`, refusing `..`, relative paths and NULs.
pub fn resolve_path(root: &Path, path: &str) -> Result<PathBuf, (ErrorCode, String)> {
    if !path.starts_with('/') {
        return Err((ErrorCode::BadPath, format!("path {path:?} is not absolute")));
    }
    if path.contains('\0') {
        return Err((ErrorCode::BadPath, "path contains a NUL byte".into()));
    }
    let mut out = root.to_path_buf();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => out.push(p),
            Component::ParentDir => return Err((ErrorCode::BadPath, format!("path {path:?} contains '..'"))),
            Component::Prefix(_) => return Err((ErrorCode::BadPath, format!("path {path:?} is not a Unix path"))),
        }
    }
    Ok(out)
}

type Tx = mpsc::Sender<Frame>;

/// What a running request receives after its first frame.
enum Inbound {
    Data(u8, Vec<u8>),
    Json(Request),
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error { code, message: message.into() }
}

fn io_error(what: &str, e: &std::io::Error) -> Response {
    error(ErrorCode::from_io(e), format!("{what}: {e}"))
}

/// Serves one connection until it closes. Malformed frames end the connection with an error
/// frame; they never end the agent.
pub async fn serve_connection<S>(agent: Arc<Agent>, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let debug = std::env::var_os("FLINT_AGENT_DEBUG").is_some();
    if debug {
        eprintln!("flint-agent: connection accepted");
    }
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Frame>(64);
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::new(wr);
        while let Some(f) = rx.recv().await {
            if debug {
                eprintln!("flint-agent: writing frame kind {} stream {} ({} bytes)", f.kind, f.stream, f.payload.len());
            }
            if let Err(e) = write_frame(&mut w, &f).await {
                if debug {
                    eprintln!("flint-agent: write failed: {e}");
                }
                return;
            }
            // Coalesce what is already queued, then flush.
            while let Ok(f) = rx.try_recv() {
                if write_frame(&mut w, &f).await.is_err() {
                    return;
                }
            }
            if let Err(e) = w.flush().await {
                if debug {
                    eprintln!("flint-agent: flush failed: {e}");
                }
                return;
            }
            if debug {
                eprintln!("flint-agent: flushed");
            }
        }
    });

    let mut said_hello = false;
    let mut streams: HashMap<u32, mpsc::Sender<Inbound>> = HashMap::new();
    loop {
        let f = match read_frame(&mut rd).await {
            Ok(f) => {
                if debug {
                    eprintln!(
                        "flint-agent: read frame kind {} stream {} ({} bytes)",
                        f.kind,
                        f.stream,
                        f.payload.len()
                    );
                }
                f
            }
            Err(FrameError::Closed) => break,
            Err(e) => {
                let _ = tx.send(Frame::json(0, &error(ErrorCode::Invalid, format!("bad frame: {e}")))).await;
                break;
            }
        };
        streams.retain(|_, s| !s.is_closed());
        if f.kind != kind::JSON {
            if let Some(s) = streams.get(&f.stream) {
                let _ = s.send(Inbound::Data(f.kind, f.payload)).await;
            }
            continue;
        }
        let req: Request = match serde_json::from_slice(&f.payload) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Frame::json(f.stream, &error(ErrorCode::Invalid, format!("bad request: {e}")))).await;
                continue;
            }
        };
        if let Request::Hello { version } = req {
            if version != PROTOCOL_VERSION {
                let msg = format!("protocol version {version} is not supported (this agent speaks {PROTOCOL_VERSION})");
                let _ = tx.send(Frame::json(f.stream, &error(ErrorCode::UnsupportedVersion, msg))).await;
                break;
            }
            said_hello = true;
            let _ = tx
                .send(Frame::json(
                    f.stream,
                    &Response::Hello { version: PROTOCOL_VERSION, agent: env!("CARGO_PKG_VERSION").into() },
                ))
                .await;
            continue;
        }
        if !said_hello {
            let _ = tx.send(Frame::json(f.stream, &error(ErrorCode::Invalid, "say hello first"))).await;
            break;
        }
        if let Some(s) = streams.get(&f.stream) {
            // A follow-up message (e.g. a signal) for a running request.
            let _ = s.send(Inbound::Json(req)).await;
            continue;
        }
        let (in_tx, in_rx) = mpsc::channel(16);
        streams.insert(f.stream, in_tx);
        let agent = agent.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let id = f.stream;
            if let Some(resp) = handle(agent, id, req, in_rx, &tx).await {
                let _ = tx.send(Frame::json(id, &resp)).await;
            }
        });
    }
    drop(tx);
    let _ = writer.await;
}

/// Serves a `watch`: `watching`, then a `fs_events` frame per batch of changes, until the host signals on the
/// stream, the connection ends or the directory itself goes (then `ok`).
async fn watch(
    agent: &Agent,
    id: u32,
    path: &str,
    recursive: bool,
    mut inbound: mpsc::Receiver<Inbound>,
    tx: &Tx,
) -> Option<Response> {
    let root = match agent.resolve(path) {
        Ok(p) => p,
        Err((c, m)) => return Some(error(c, m)),
    };
    let mut w = match crate::watch::Watcher::new(&root, recursive) {
        Ok(w) => w,
        Err((c, m)) => return Some(error(c, m)),
    };
    if tx.send(Frame::json(id, &Response::Watching)).await.is_err() {
        return None;
    }
    loop {
        tokio::select! {
            m = inbound.recv() => match m {
                None | Some(Inbound::Json(Request::Signal { .. })) => return Some(Response::Ok { bytes: None }),
                Some(_) => {}
            },
            ev = w.next() => match ev {
                Ok(Some(events)) if events.is_empty() => {}
                Ok(Some(events)) => {
                    // Frames stay under MAX_PAYLOAD (64 names of at most PATH_MAX each): a burst goes in slices.
                    for part in events.chunks(64) {
                        let f = Frame::json(id, &Response::FsEvents { events: part.to_vec() });
                        if tx.send(f).await.is_err() {
                            return None;
                        }
                    }
                }
                Ok(None) => return Some(Response::Ok { bytes: None }),
                Err(e) => return Some(io_error(path, &e)),
            },
        }
    }
}

/// Runs one request; returns its final response (streams send theirs themselves).
async fn handle(
    agent: Arc<Agent>,
    id: u32,
    req: Request,
    inbound: mpsc::Receiver<Inbound>,
    tx: &Tx,
) -> Option<Response> {
    Some(match req {
        Request::Hello { .. } => return None,
        Request::Health => Response::Health(health(&agent)),
        Request::Exec(e) => return exec(agent, id, e, inbound, tx).await,
        Request::Signal { .. } => error(ErrorCode::Invalid, "signal names no running exec on this stream"),
        Request::Resize { .. } => error(ErrorCode::Invalid, "resize names no running exec on this stream"),
        Request::WriteFile { path, mode, append, owner } => {
            let owner = match owner.as_deref().map(|o| lookup_user(&agent.settings.root, o)) {
                None => None,
                Some(Some((uid, gid, _))) => Some((uid, gid)),
                Some(None) => {
                    return Some(error(ErrorCode::Invalid, format!("no user {:?}", owner.unwrap_or_default())))
                }
            };
            write_file(&agent, &path, (mode, owner), append, inbound).await
        }
        Request::ReadFile { path, limit } => return read_file(&agent, id, &path, limit, tx).await,
        Request::Stat { path } => match agent.resolve(&path) {
            Ok(p) => match tokio::fs::symlink_metadata(&p).await {
                Ok(m) => Response::Stat(stat_info(&agent.names, &p, &m)),
                Err(e) => io_error(&path, &e),
            },
            Err((c, m)) => error(c, m),
        },
        Request::List { path } => list(&agent, &path).await,
        Request::Mkdir { path, mode, owner, exclusive } => match agent.resolve(&path) {
            Ok(p) => {
                let owner = match owner.as_deref().map(|o| lookup_user(&agent.settings.root, o)) {
                    None => None,
                    Some(Some((uid, gid, _))) => Some((uid, gid)),
                    Some(None) => {
                        return Some(error(ErrorCode::Invalid, format!("no user {:?}", owner.unwrap_or_default())))
                    }
                };
                if exclusive && p.exists() {
                    return Some(error(ErrorCode::AlreadyExists, format!("{path}: already exists")));
                }
                match make_dirs(&p, mode, owner) {
                    Ok(()) => Response::Ok { bytes: None },
                    Err(e) => io_error(&path, &e),
                }
            }
            Err((c, m)) => error(c, m),
        },
        Request::Remove { path, recursive } => remove(&agent, &path, recursive).await,
        Request::Rename { from, to } => match (agent.resolve(&from), agent.resolve(&to)) {
            (Ok(a), Ok(b)) => match tokio::fs::rename(&a, &b).await {
                Ok(()) => Response::Ok { bytes: None },
                Err(e) => io_error(&format!("{from} -> {to}"), &e),
            },
            (Err((c, m)), _) | (_, Err((c, m))) => error(c, m),
        },
        Request::Watch { path, recursive } => return watch(&agent, id, &path, recursive, inbound, tx).await,
        Request::Refresh(r) => refresh(&agent, r).await,
        Request::Run(r) => {
            if r.code.len() > MAX_RUN_CODE {
                return Some(error(
                    ErrorCode::TooLarge,
                    format!("code of {} bytes: at most {MAX_RUN_CODE}", r.code.len()),
                ));
            }
            let env = agent.base_env();
            // A `signal` on the run's stream (the host's caller went away) interrupts it as a timeout would.
            let cancel = Arc::new(tokio::sync::Notify::new());
            let watcher = {
                let cancel = cancel.clone();
                let mut inbound = inbound;
                tokio::spawn(async move {
                    while let Some(m) = inbound.recv().await {
                        if let Inbound::Json(Request::Signal { .. }) = m {
                            cancel.notify_one();
                        }
                    }
                })
            };
            let ran = agent.runners.run(&agent.reaper, &env, &r, id, tx, &cancel).await;
            watcher.abort();
            match ran {
                Ok(resp) => resp,
                Err(m) if m.starts_with("no runner") => error(ErrorCode::NotFound, m),
                Err(m) => error(ErrorCode::Io, m),
            }
        }
        Request::Mount { device, path, read_only } => in_guest_path(&agent, &path, |p| {
            crate::init::mount_volume(&device, p, read_only).map_err(|m| {
                let code = if m.contains("not a virtio block device") {
                    ErrorCode::Invalid
                } else if m.contains("already mounted") {
                    ErrorCode::Busy
                } else {
                    ErrorCode::Io
                };
                (code, m)
            })
        }),
        Request::Unmount { path } => {
            in_guest_path(&agent, &path, |p| crate::init::unmount_volume(p).map_err(|m| (ErrorCode::Io, m)))
        }
        Request::BeforeCheckpoint => {
            // The snapshot must hold warm runners: start any that is not running and wait until it is ready.
            if let Err(m) = agent.warm_runners().await {
                return Some(error(ErrorCode::Io, m));
            }
            // SAFETY: sync(2) has no preconditions.
            unsafe { libc::sync() };
            match run_hooks(&agent.reaper, &agent.settings.hooks_dir.join("before-checkpoint.d")).await {
                Ok(_) => Response::Ok { bytes: None },
                Err(m) => error(ErrorCode::Io, m),
            }
        }
        Request::Shutdown { reboot: _ } => {
            if !agent.settings.is_init {
                return Some(error(
                    ErrorCode::Invalid,
                    "this agent does not run as the guest's init; it will not shut the machine down",
                ));
            }
            let _ = tx.send(Frame::json(id, &Response::Ok { bytes: None })).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            // SAFETY: sync(2) and reboot(2) have no memory-safety preconditions. Flint VMs
            // exit on the i8042 reset that RB_AUTOBOOT triggers (reboot=k).
            unsafe {
                libc::sync();
                libc::reboot(libc::RB_AUTOBOOT);
            }
            return None;
        }
    })
}

/// A mount or unmount at `path`: only as the guest's init, on a path resolved below the agent's root.
fn in_guest_path(agent: &Agent, path: &str, op: impl FnOnce(&str) -> Result<(), (ErrorCode, String)>) -> Response {
    if !agent.settings.is_init {
        return error(ErrorCode::Invalid, "this agent does not run as the guest's init; it mounts nothing");
    }
    match agent.resolve(path).and_then(|p| op(&p.to_string_lossy())) {
        Ok(()) => Response::Ok { bytes: None },
        Err((c, m)) => error(c, m),
    }
}

fn read_meminfo() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

fn health(agent: &Agent) -> Health {
    let (total, avail) = read_meminfo();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let l: Vec<f64> = load.split_whitespace().take(3).filter_map(|v| v.parse().ok()).collect();
    Health {
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL_VERSION,
        uptime_s: agent.started.elapsed().as_secs_f64(),
        mem_total_kb: total,
        mem_available_kb: avail,
        load: [l.first().copied().unwrap_or(0.0), l.get(1).copied().unwrap_or(0.0), l.get(2).copied().unwrap_or(0.0)],
        pid: std::process::id(),
        running_execs: agent.reaper.running(),
        time_unix_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    }
}

fn stat_info(names: &Names, p: &Path, m: &std::fs::Metadata) -> StatInfo {
    StatInfo {
        kind: file_kind(&m.file_type()),
        size: m.len(),
        mode: m.mode() & 0o7777,
        mtime_s: m.mtime(),
        owner: names.user(m.uid()),
        group: names.group(m.gid()),
        target: m
            .file_type()
            .is_symlink()
            .then(|| std::fs::read_link(p).ok())
            .flatten()
            .map(|t| t.display().to_string()),
    }
}

/// Makes `p` and its missing parents with `mode`, the ones it makes owned by `owner` (uid, gid).
fn make_dirs(p: &Path, mode: u32, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = p;
    while !at.exists() {
        missing.push(at.to_path_buf());
        match at.parent() {
            Some(parent) => at = parent,
            None => break,
        }
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    std::os::unix::fs::DirBuilderExt::mode(&mut b, mode);
    b.create(p)?;
    if let Some((uid, gid)) = owner {
        for d in missing.iter().rev() {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// User and group names by id, read from the image's /etc/passwd and /etc/group when first asked (no NSS).
#[derive(Default)]
pub struct Names {
    users: std::sync::OnceLock<std::collections::HashMap<u32, String>>,
    groups: std::sync::OnceLock<std::collections::HashMap<u32, String>>,
    root: PathBuf,
}

impl Names {
    pub fn new(root: &Path) -> Names {
        Names { root: root.to_path_buf(), ..Default::default() }
    }

    fn table(&self, file: &str) -> std::collections::HashMap<u32, String> {
        std::fs::read_to_string(self.root.join(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                Some((f.get(2)?.parse().ok()?, f.first()?.to_string()))
            })
            .collect()
    }

    pub fn user(&self, uid: u32) -> String {
        self.users.get_or_init(|| self.table("etc/passwd")).get(&uid).cloned().unwrap_or_else(|| uid.to_string())
    }

    pub fn group(&self, gid: u32) -> String {
        self.groups.get_or_init(|| self.table("etc/group")).get(&gid).cloned().unwrap_or_else(|| gid.to_string())
    }
}

fn file_kind(t: &std::fs::FileType) -> FileKind {
    if t.is_symlink() {
        FileKind::Symlink
    } else if t.is_dir() {
        FileKind::Dir
    } else if t.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

async fn list(agent: &Agent, path: &str) -> Response {
    let p = match agent.resolve(path) {
        Ok(p) => p,
        Err((c, m)) => return error(c, m),
    };
    let mut rd = match tokio::fs::read_dir(&p).await {
        Ok(rd) => rd,
        Err(e) => return io_error(path, &e),
    };
    let mut entries = Vec::new();
    loop {
        match rd.next_entry().await {
            Ok(Some(e)) => {
                let Ok(m) = e.metadata().await else { continue };
                let i = stat_info(&agent.names, &e.path(), &m);
                entries.push(DirEntry {
                    name: e.file_name().to_string_lossy().into_owned(),
                    kind: i.kind,
                    size: i.size,
                    mode: i.mode,
                    mtime_s: i.mtime_s,
                    owner: i.owner,
                    group: i.group,
                    target: i.target,
                });
            }
            Ok(None) => break,
            Err(e) => return io_error(path, &e),
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Response::List { entries }
}

async fn remove(agent: &Agent, path: &str, recursive: bool) -> Response {
    let p = match agent.resolve(path) {
        Ok(p) if p == agent.settings.root => return error(ErrorCode::BadPath, "refusing to remove the root"),
        Ok(p) => p,
        Err((c, m)) => return error(c, m),
    };
    let m = match tokio::fs::symlink_metadata(&p).await {
        Ok(m) => m,
        Err(e) => return io_error(path, &e),
    };
    let r = if m.is_dir() {
        if recursive {
            tokio::fs::remove_dir_all(&p).await
        } else {
            tokio::fs::remove_dir(&p).await
        }
    } else {
        tokio::fs::remove_file(&p).await
    };
    match r {
        Ok(()) => Response::Ok { bytes: None },
        Err(e) => io_error(path, &e),
    }
}

async fn write_file(
    agent: &Agent,
    path: &str,
    (mode, owner): (u32, Option<(u32, u32)>),
    append: bool,
    mut inbound: mpsc::Receiver<Inbound>,
) -> Response {
    let p = match agent.resolve(path) {
        Ok(p) => p,
        Err((c, m)) => return error(c, m),
    };
    if let Some(parent) = p.parent().filter(|d| owner.is_some() && !d.exists()) {
        if let Err(e) = make_dirs(parent, 0o755, owner) {
            return io_error(path, &e);
        }
    }
    // Write to a temporary file beside the target and rename at the end, so a failed or
    // interrupted upload never leaves a half-written file under the real name.
    let tmp = p.with_file_name(format!(
        ".{}.flint-upload-{}",
        p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    let target = if append { p.clone() } else { tmp.clone() };
    let mut opts = tokio::fs::OpenOptions::new();
    opts.write(true).create(true).mode(mode);
    if append {
        opts.append(true);
    } else {
        opts.truncate(true);
    }
    let mut f = match opts.open(&target).await {
        Ok(f) => f,
        Err(e) => return io_error(path, &e),
    };
    let mut total: u64 = 0;
    let result = loop {
        match inbound.recv().await {
            Some(Inbound::Data(kind::DATA, chunk)) => {
                total += chunk.len() as u64;
                if total > agent.settings.max_file_bytes {
                    break Err(error(
                        ErrorCode::TooLarge,
                        format!("{path}: larger than the {} byte limit", agent.settings.max_file_bytes),
                    ));
                }
                if let Err(e) = f.write_all(&chunk).await {
                    break Err(io_error(path, &e));
                }
            }
            Some(Inbound::Data(kind::EOF, _)) => break Ok(()),
            Some(_) => break Err(error(ErrorCode::Invalid, "expected file data or end of data")),
            None => break Err(error(ErrorCode::Io, "connection closed during upload")),
        }
    };
    let result = match result {
        Ok(()) => f.sync_all().await.map_err(|e| io_error(path, &e)),
        Err(e) => Err(e),
    };
    drop(f);
    match result {
        Ok(()) => {
            if !append {
                if let Err(e) = tokio::fs::rename(&tmp, &p).await {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return io_error(path, &e);
                }
                let _ = tokio::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).await;
            }
            if let Some((uid, gid)) = owner {
                if let Err(e) = std::os::unix::fs::chown(&p, Some(uid), Some(gid)) {
                    return io_error(path, &e);
                }
            }
            Response::Ok { bytes: Some(total) }
        }
        Err(e) => {
            if !append {
                let _ = tokio::fs::remove_file(&tmp).await;
            }
            e
        }
    }
}

async fn read_file(agent: &Agent, id: u32, path: &str, limit: Option<u64>, tx: &Tx) -> Option<Response> {
    let p = match agent.resolve(path) {
        Ok(p) => p,
        Err((c, m)) => return Some(error(c, m)),
    };
    let mut f = match tokio::fs::File::open(&p).await {
        Ok(f) => f,
        Err(e) => return Some(io_error(path, &e)),
    };
    let m = match f.metadata().await {
        Ok(m) if m.is_dir() => return Some(error(ErrorCode::IsADirectory, format!("{path} is a directory"))),
        Ok(m) => m,
        Err(e) => return Some(io_error(path, &e)),
    };
    if tx.send(Frame::json(id, &Response::File { size: m.len(), mode: m.mode() & 0o7777 })).await.is_err() {
        return None;
    }
    let mut total = 0u64;
    let limit = limit.unwrap_or(u64::MAX);
    while total < limit {
        let mut buf = vec![0u8; CHUNK.min((limit - total).min(CHUNK as u64) as usize)];
        match f.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                buf.truncate(n);
                total += n as u64;
                if tx.send(Frame::data(kind::DATA, id, buf)).await.is_err() {
                    return None;
                }
            }
            Err(e) => return Some(io_error(path, &e)),
        }
    }
    let _ = tx.send(Frame::data(kind::EOF, id, Vec::new())).await;
    Some(Response::Ok { bytes: Some(total) })
}

/// Looks up a user by name or uid in /etc/passwd (no NSS: the agent is static).
fn lookup_user(root: &Path, user: &str) -> Option<(u32, u32, String)> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 6 && (f[0] == user || f[2] == user) {
            return Some((f[2].parse().ok()?, f[3].parse().ok()?, f[5].to_string()));
        }
    }
    let uid: u32 = user.parse().ok()?;
    Some((uid, uid, "/".into()))
}

/// Variables of the agent's own environment that every process it starts gets (before the
/// refresh and request env, which may override them). `GLIBC_TUNABLES` comes from the kernel
/// command line on hosts where guest user mode must not use AVX (flint-vmm's `pvm-native`
/// profile).
const INHERITED_ENV: [&str; 1] = ["GLIBC_TUNABLES"];

async fn exec(
    agent: Arc<Agent>,
    id: u32,
    req: ExecRequest,
    mut inbound: mpsc::Receiver<Inbound>,
    tx: &Tx,
) -> Option<Response> {
    let started = std::time::Instant::now();
    let Some(program) = req.argv.first() else {
        return Some(error(ErrorCode::Invalid, "argv is empty"));
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(&req.argv[1..]);
    cmd.env_clear();
    cmd.envs(agent.base_env());
    cmd.envs(&req.env);
    if let Some(cwd) = &req.cwd {
        match agent.resolve(cwd) {
            Ok(p) => {
                cmd.current_dir(p);
            }
            Err((c, m)) => return Some(error(c, m)),
        }
    } else {
        match agent.image.workdir.as_deref().map(|w| agent.resolve(w)) {
            Some(Ok(p)) if p.is_dir() => cmd.current_dir(p),
            _ => cmd.current_dir(&agent.settings.root),
        };
    }
    if let Some(user) = &req.user {
        let Some((uid, gid, home)) = lookup_user(&agent.settings.root, user) else {
            return Some(error(ErrorCode::NotFound, format!("no such user: {user}")));
        };
        std::os::unix::process::CommandExt::uid(&mut cmd, uid);
        std::os::unix::process::CommandExt::gid(&mut cmd, gid);
        cmd.env("HOME", home);
    }
    let mut tty = None;
    if let Some(size) = req.tty {
        let t = match Pty::open(size) {
            Ok(t) => t,
            Err(e) => return Some(io_error("open a pseudo-terminal", &e)),
        };
        let slave = |t: &Pty| t.slave.try_clone().map(Stdio::from);
        match (slave(&t), slave(&t), slave(&t)) {
            (Ok(i), Ok(o), Ok(e)) => {
                cmd.stdin(i).stdout(o).stderr(e);
            }
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Some(io_error("pseudo-terminal", &e)),
        }
        cmd.env("TERM", req.env.get("TERM").map_or("xterm-256color", String::as_str));
        // SAFETY: between fork and exec only async-signal-safe calls: setsid(2) makes the child lead a new session
        // (and process group, which a kill or timeout reaches whole) and ioctl(TIOCSCTTY) on fd 0, the slave,
        // makes it the session's controlling terminal.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        tty = Some(t);
    } else {
        cmd.stdin(if req.stdin { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        // Own process group, so a kill or timeout reaches the whole pipeline.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    }
    let spawned = agent.reaper.spawn(&mut cmd);
    // The command holds copies of a tty's slave: dropped now, so the master reads EOF once the child's are closed.
    drop(cmd);
    let child = match spawned {
        Ok(c) => c,
        Err(e) => return Some(io_error(&format!("cannot run {program}"), &e)),
    };
    let pid = child.pid;
    let _ = tx.send(Frame::json(id, &Response::Started { pid })).await;
    let (mut stdin, out, err, master) = match tty {
        Some(t) => {
            let master = t.master;
            // The master in non-blocking mode under tokio's reactor (a pty supports epoll like a pipe).
            let async_fd = |m: &std::fs::File| -> Option<std::os::fd::OwnedFd> {
                let fd: std::os::fd::OwnedFd = m.try_clone().ok()?.into();
                crate::reaper::nonblocking(&fd).ok()?;
                Some(fd)
            };
            let reader =
                async_fd(&master).and_then(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(fd).ok());
            let writer =
                async_fd(&master).and_then(|fd| tokio::net::unix::pipe::Sender::from_owned_fd_unchecked(fd).ok());
            (
                writer.map(StdinSink::Tty),
                pump(reader, kind::STDOUT, id, tx.clone()),
                pump(None::<tokio::fs::File>, kind::STDERR, id, tx.clone()),
                Some(master),
            )
        }
        None => (
            child.stdin.map(StdinSink::Pipe),
            pump(child.stdout, kind::STDOUT, id, tx.clone()),
            pump(child.stderr, kind::STDERR, id, tx.clone()),
            None,
        ),
    };
    let mut exit = child.exit;
    let deadline = req.timeout_ms.map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let kill = |sig: i32| {
        // SAFETY: kill(2) on the child's own process group; no memory is involved.
        unsafe { libc::kill(-(pid as i32), sig) };
    };
    let status = loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            st = &mut exit => break st.map_err(|_| std::io::Error::other("the child's exit status was lost")),
            msg = inbound.recv(), if !inbound.is_closed() => match msg {
                Some(Inbound::Data(kind::STDIN, data)) => {
                    if let Some(s) = stdin.as_mut() {
                        if s.write_all(&data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                // On a tty, end of input is the terminal's EOF character (^D), as a person would type it.
                Some(Inbound::Data(kind::EOF, _)) => match stdin.as_mut() {
                    Some(StdinSink::Tty(t)) => {
                        let _ = t.write_all(&[4]).await;
                    }
                    _ => stdin = None,
                },
                Some(Inbound::Json(Request::Signal { signal })) => kill(signal),
                Some(Inbound::Json(Request::Resize { rows, cols })) => {
                    if let Some(m) = &master {
                        set_winsize(m, TtySize { rows, cols });
                    }
                }
                Some(_) => {}
                // The connection went away: nobody can see the output any more.
                None => kill(libc::SIGKILL),
            },
            _ = sleep, if !timed_out => {
                timed_out = true;
                kill(libc::SIGKILL);
            }
        }
    };
    // Output produced before exit is still in the pipes: forward all of it first. A
    // grandchild holding the pipe open must not stall the exit report forever.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = out.await;
        let _ = err.await;
    })
    .await;
    Some(match status {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt;
            let guest_us = Some(started.elapsed().as_micros() as u64);
            Response::Exit { code: st.code(), signal: st.signal(), timed_out, guest_us }
        }
        Err(e) => io_error("wait", &e),
    })
}

/// Where an exec's input goes: its stdin pipe, or its terminal's master.
enum StdinSink {
    Pipe(tokio::net::unix::pipe::Sender),
    Tty(tokio::net::unix::pipe::Sender),
}

impl StdinSink {
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            StdinSink::Pipe(p) | StdinSink::Tty(p) => p.write_all(data).await,
        }
    }
}

/// A pseudo-terminal pair (posix_openpt, so no libutil in the static agent).
struct Pty {
    master: std::fs::File,
    slave: std::fs::File,
}

impl Pty {
    fn open(size: TtySize) -> std::io::Result<Pty> {
        use std::os::fd::FromRawFd;
        // SAFETY: posix_openpt returns a new fd (or -1); nothing else is touched.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh fd this function owns from here.
        let master = unsafe { std::fs::File::from_raw_fd(fd) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: grantpt/unlockpt act on the master fd we own; ptsname_r writes a NUL-terminated name into `name`
        // (its length given).
        let ok = unsafe {
            libc::grantpt(fd) == 0 && libc::unlockpt(fd) == 0 && libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) == 0
        };
        if !ok {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated path.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&path)?;
        set_winsize(&master, size);
        Ok(Pty { master, slave })
    }
}

fn set_winsize(master: &std::fs::File, size: TtySize) {
    use std::os::fd::AsRawFd;
    let ws = libc::winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a `winsize` from the pointer, which is valid for the call.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

fn pump<R: AsyncRead + Unpin + Send + 'static>(r: Option<R>, kind: u8, id: u32, tx: Tx) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(mut r) = r else { return };
        let mut buf = vec![0u8; CHUNK];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(Frame::data(kind, id, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

async fn refresh(agent: &Agent, r: RefreshRequest) -> Response {
    let started = std::time::Instant::now();
    let mut steps_us = BTreeMap::new();
    // A refresh follows a restore: every runner's next run reseeds its interpreter's PRNG.
    agent.runners.refreshed();
    let mut lap = std::time::Instant::now();
    let mut step = |name: &str, steps: &mut BTreeMap<String, u64>| {
        steps.insert(name.to_string(), lap.elapsed().as_micros() as u64);
        lap = std::time::Instant::now();
    };
    let mut clock_step_ns = None;
    if let Some(ns) = r.wall_clock_ns {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let ts = libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `ts` is a valid timespec for the duration of the call.
        if agent.settings.is_init && unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return io_error("set the clock", &std::io::Error::last_os_error());
        }
        clock_step_ns = Some((ns as i128 - before) as i64);
    }
    step("clock", &mut steps_us);
    let mut entropy_bytes = 0;
    if let Some(hex) = &r.entropy_hex {
        let Some(bytes) = hex_decode(hex) else {
            return error(ErrorCode::Invalid, "entropy_hex is not hex");
        };
        if let Err(e) = add_entropy(&bytes, agent.settings.is_init) {
            return io_error("add entropy", &e);
        }
        entropy_bytes = bytes.len();
    }
    step("entropy", &mut steps_us);
    *lock(&agent.refresh_env) = r.env;
    if let Some(h) = &r.hostname {
        // SAFETY: pointer and length describe `h`'s bytes.
        if agent.settings.is_init && unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) } != 0 {
            return io_error("set the hostname", &std::io::Error::last_os_error());
        }
    }
    step("env_hostname", &mut steps_us);
    if let Some(n) = &r.network {
        // Checked in host mode too; applied only as the guest's init (a host agent's network is not its own).
        if let Err(e) = crate::net::validate(n) {
            return error(ErrorCode::Invalid, format!("network: {e}"));
        }
        if agent.settings.is_init {
            if let Err(e) = crate::net::configure(n) {
                return error(ErrorCode::Io, format!("configure the network: {e}"));
            }
        }
    }
    if r.network.is_some() {
        step("network", &mut steps_us);
    }
    let hooks = run_hooks(&agent.reaper, &agent.settings.hooks_dir.join("after-restore.d")).await;
    step("hooks", &mut steps_us);
    let guest_us = Some(started.elapsed().as_micros() as u64);
    match hooks {
        Ok(hooks_run) => Response::Refreshed { clock_step_ns, entropy_bytes, hooks_run, guest_us, steps_us },
        Err(m) => error(ErrorCode::Io, m),
    }
}

/// Credits `bytes` to the kernel's entropy pool and forces a reseed of the CRNG, so two clones
/// of one snapshot diverge at once. In host mode (`credit` false) the bytes are only mixed in.
fn add_entropy(bytes: &[u8], credit: bool) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let f = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    if !credit {
        return std::io::Write::write_all(&mut &f, bytes);
    }
    let mut buf = Vec::with_capacity(8 + bytes.len());
    buf.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    buf.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    buf.extend_from_slice(bytes);
    // SAFETY: RNDADDENTROPY reads a struct rand_pool_info {int entropy_count; int buf_size;
    // u32 buf[]} which `buf` holds in full.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, buf.as_ptr()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(e);
        }
        std::io::Write::write_all(&mut &f, bytes)?;
        return Ok(());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) };
    Ok(())
}

/// Runs every executable in `dir` in name order; fails on the first that fails.
async fn run_hooks(reaper: &Reaper, dir: &Path) -> Result<usize, String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut hooks: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
    hooks.sort();
    for h in &hooks {
        let child = reaper
            .spawn(std::process::Command::new(h).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()))
            .map_err(|e| format!("hook {} could not run: {e}", h.display()))?;
        let st = child.exit.await.map_err(|_| format!("hook {} vanished", h.display()))?;
        if !st.success() {
            return Err(format!("hook {} failed ({st})", h.display()));
        }
    }
    Ok(hooks.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_under_the_root() {
        let root = Path::new("/srv/box");
        assert_eq!(resolve_path(root, "/a/./b").unwrap(), PathBuf::from("/srv/box/a/b"));
        assert_eq!(resolve_path(root, "/").unwrap(), PathBuf::from("/srv/box"));
        assert_eq!(resolve_path(root, "/a/../../etc").unwrap_err().0, ErrorCode::BadPath);
        assert_eq!(resolve_path(root, "rel").unwrap_err().0, ErrorCode::BadPath);
    }
}
