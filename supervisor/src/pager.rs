//! The page server: serves a lazily restored VM's memory from the snapshot store. The VMM creates the
//! userfaultfd and hands it over a Unix socket in its directory (`pager.sock`, SCM_RIGHTS, see
//! `flint_vmm_api::pager`); flintd, which owns the store (credentials, L1 cache, S3 connection), installs pages
//! with UFFDIO_COPY. The VMM never sees the store.
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flint_snapshot_store::{ImageReader, Store};
use flint_uffd::{PageSource, ServeConfig, UffdStats, Userfault};
use flint_vmm_api::describe::UffdReport;
use flint_vmm_api::pager::{PagerHello, MAX_HELLO_BYTES, PAGER_PROTOCOL};

/// Why a lazily restored VM's memory cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    #[error(transparent)]
    Store(#[from] flint_snapshot_store::StoreError),
    #[error("page server: {what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The VMM did not hand its memory over, or handed something that does not match the snapshot.
    #[error("page server: {0}")]
    Vmm(String),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
}

impl crate::error::Classify for PagerError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            PagerError::Store(e) => e.kind(),
            PagerError::Io { .. } | PagerError::Jail(_) => crate::error::Kind::Internal,
            PagerError::Vmm(_) => crate::error::Kind::Guest,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PagerError {
    let what = what.into();
    move |source| PagerError::Io { what, source }
}

/// Fetch threads per VM.
/// A chunk that does not arrive within this stops the VM.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("pager.sock")
}

/// Guest memory from a snapshot image in the store, a chunk per unit.
pub struct StoreSource {
    rt: tokio::runtime::Handle,
    store: Store,
    reader: ImageReader,
    snapshot: String,
}

impl StoreSource {
    pub async fn open(store: &Store, snapshot: &str) -> Result<StoreSource, PagerError> {
        let reader = store.reader(snapshot, "memory").await?;
        Ok(StoreSource {
            rt: tokio::runtime::Handle::current(),
            store: store.clone(),
            reader,
            snapshot: snapshot.into(),
        })
    }
}

impl PageSource for StoreSource {
    fn unit(&self) -> u64 {
        self.reader.chunk_size()
    }
    fn size(&self) -> u64 {
        self.reader.size()
    }
    fn read_unit(&self, index: u64, buf: &mut [u8]) -> std::io::Result<bool> {
        // Called from the page server's own threads (never the runtime's), so blocking on the runtime is fine.
        let fetched =
            self.rt.block_on(async { tokio::time::timeout(FETCH_TIMEOUT, self.reader.chunk(index as usize)).await });
        match fetched {
            Err(_) => Err(std::io::Error::other(format!(
                "chunk {index} of snapshot `{}` did not arrive within {FETCH_TIMEOUT:?}",
                self.snapshot
            ))),
            Ok(Err(e)) => Err(std::io::Error::other(flint_snapshot_store::error_chain(&e))),
            Ok(Ok(None)) => Ok(false),
            Ok(Ok(Some(plain))) => {
                if plain.len() != buf.len() {
                    return Err(std::io::Error::other(format!(
                        "chunk {index} is {} bytes, expected {}",
                        plain.len(),
                        buf.len()
                    )));
                }
                buf.copy_from_slice(&plain);
                Ok(true)
            }
        }
    }
    /// This VM's share of the store's counters.
    fn stats(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.reader.counters;
        let stats = StoreReads {
            snapshot: self.snapshot.clone(),
            chunk_bytes: self.reader.chunk_size(),
            chunks_read: self.reader.chunks_read.load(Relaxed),
            l1_hits: c.l1_hits.load(Relaxed),
            l1_misses: c.l1_misses.load(Relaxed),
            remote_fetches: c.remote_fetches.load(Relaxed),
            remote_bytes: c.remote_bytes.load(Relaxed),
            corrupt_in_store: self.store.stats().corrupt,
        };
        serde_json::to_value(stats).unwrap_or_default()
    }
}

/// What a lazily restored VM read from the store (the `source` of its page server's report).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoreReads {
    pub snapshot: String,
    pub chunk_bytes: u64,
    pub chunks_read: u64,
    pub l1_hits: u64,
    pub l1_misses: u64,
    pub remote_fetches: u64,
    pub remote_bytes: u64,
    pub corrupt_in_store: u64,
}

/// A VM's memory being served.
pub struct Served {
    pub stats: Arc<UffdStats>,
    pub source: Arc<StoreSource>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Served({})", self.source.snapshot)
    }
}

impl Served {
    pub fn report(&self) -> UffdReport {
        self.stats.report(self.source.as_ref())
    }
}

/// Binds `pager.sock` in the VM's directory (0600, a stale one replaced) before the VMM starts.
pub fn bind(dir: &Path) -> Result<UnixListener, PagerError> {
    let path = socket_path(dir);
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).map_err(io(format!("bind {}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod {}", path.display())))?;
    // A jailed VMM connects as its own uid.
    crate::jail::give_to_dir_owner(dir, &path)?;
    Ok(l)
}

/// Waits (up to `wait`) for the VMM with pid `pid` to hand its userfaultfd over `listener`, then serves its faults
/// from `source`, prefetching `prefetch` units. `on_fatal` gets the message when memory cannot be provided (the
/// caller stops the VM). Blocking: run on a blocking thread.
pub fn accept_and_serve(
    listener: UnixListener,
    pid: u32,
    source: Arc<StoreSource>,
    prefetch: Vec<u32>,
    workers: usize,
    wait: Duration,
    on_fatal: flint_uffd::OnFatal,
) -> Result<Served, PagerError> {
    let deadline = Instant::now() + wait;
    listener.set_nonblocking(true).map_err(io("listen"))?;
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => {
                // Only the VMM we started may hand memory over.
                match flint_uffd::peer_pid(&c) {
                    Ok(p) if p == pid => break c,
                    _ => continue,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(PagerError::Vmm(format!(
                        "the VMM did not hand its memory to the page server within {wait:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(io("accept")(e)),
        }
    };
    let _ = std::fs::remove_file(
        listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf)).unwrap_or_default(),
    );
    conn.set_nonblocking(false).map_err(io("the VMM's connection"))?;
    let refuse = |conn: &UnixStream, why: String| {
        let _ = (&*conn).write_all(format!("{why}\n").as_bytes());
        PagerError::Vmm(why)
    };
    conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(io("the VMM's connection"))?;
    let (bytes, fd) = flint_uffd::recv_fd(&conn, MAX_HELLO_BYTES)
        .map_err(|e| PagerError::Vmm(format!("receiving the VMM's hello: {e}")))?;
    let hello: PagerHello = match serde_json::from_slice(&bytes) {
        Ok(h) => h,
        Err(e) => return Err(refuse(&conn, format!("malformed hello: {e}"))),
    };
    let Some(fd) = fd else { return Err(refuse(&conn, "no userfaultfd attached to the hello".into())) };
    if hello.protocol != PAGER_PROTOCOL {
        return Err(refuse(&conn, format!("pager protocol {} (this flintd speaks {PAGER_PROTOCOL})", hello.protocol)));
    }
    // The peer's pid was checked through the socket's credentials (SO_PEERCRED, in flintd's pid namespace) when
    // it connected; the pid the hello states is the VMM's own view (1 in a jail's pid namespace).
    let sum: u64 = hello.ranges.iter().map(|r| r.len).sum();
    if sum != hello.image_bytes || hello.image_bytes != source.size() {
        return Err(refuse(
            &conn,
            format!(
                "guest memory of {} bytes does not match the snapshot's {} bytes",
                hello.image_bytes,
                source.size()
            ),
        ));
    }
    let stats = Arc::new(UffdStats::default());
    let cfg = ServeConfig {
        ranges: hello.ranges,
        source: source.clone(),
        workers,
        prefetch,
        stats: stats.clone(),
        on_fatal,
        hangup: Some(conn.try_clone().map_err(io("the VMM's connection"))?),
        thread_start: None,
    };
    flint_uffd::serve(Userfault::from_fd(fd), cfg).map_err(|e| refuse(&conn, flint_vmm_api::error_chain(&e)))?;
    conn.set_read_timeout(None).map_err(io("the VMM's connection"))?;
    (&conn).write_all(b"ok\n").map_err(|e| PagerError::Vmm(format!("answering the VMM: {e}")))?;
    Ok(Served { stats, source })
}
