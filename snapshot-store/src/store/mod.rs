//! The tiered store: L1 local cache with a byte budget, then remote tiers (S3).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tracing::{debug, info, warn};

use crate::chunk::{self, ChunkId, DecodeError};
use crate::manifest::{check_name, ChunkRef, Image, Manifest, MANIFEST_FORMAT, MAX_MANIFEST_BYTES};
use crate::manifest::{MAX_MANIFEST_OBJECT, MAX_MARKER_OBJECT, MAX_WORKING_SET_OBJECT};
use crate::tier::{LocalDirTier, ObjectTier, Tier};

mod cache;
mod config;
mod coord;
mod error;
mod gc;
mod lease;
mod publish;
mod reports;
mod working_set;

pub use config::{StoreConfig, DEFAULT_CHUNK_SIZE};
pub use coord::{Versioned, MAX_COORD_OBJECT};
use error::io;
pub use error::StoreError;
pub use reports::*;

use crate::{lock, now_unix_ms};

/// Counters, for `flint-store stats`, `/metrics` and benchmarks.
#[derive(Debug, Default)]
struct Counters {
    l1_hits: AtomicU64,
    l1_misses: AtomicU64,
    remote_fetches: AtomicU64,
    remote_bytes: AtomicU64,
    corrupt: AtomicU64,
    chunks_written: AtomicU64,
    chunks_deduplicated: AtomicU64,
    zero_chunks: AtomicU64,
    uploaded_chunks: AtomicU64,
    uploaded_bytes: AtomicU64,
    upload_skipped: AtomicU64,
    evicted_chunks: AtomicU64,
    evicted_bytes: AtomicU64,
    manifest_scans: AtomicU64,
}

/// LRU index of the chunks in L1.
#[derive(Default)]
struct CacheIndex {
    entries: HashMap<String, (u64, u64)>, // key -> (size, tick)
    order: BTreeMap<u64, String>,         // tick -> key
    tick: u64,
    bytes: u64,
}

impl CacheIndex {
    fn touch(&mut self, key: &str) -> bool {
        let Some(entry) = self.entries.get_mut(key) else { return false };
        self.order.remove(&entry.1);
        self.tick += 1;
        entry.1 = self.tick;
        self.order.insert(self.tick, key.to_string());
        true
    }
    fn insert(&mut self, key: &str, size: u64) {
        if self.touch(key) {
            return;
        }
        self.tick += 1;
        self.entries.insert(key.to_string(), (size, self.tick));
        self.order.insert(self.tick, key.to_string());
        self.bytes += size;
    }
    fn remove(&mut self, key: &str) -> Option<u64> {
        let (size, tick) = self.entries.remove(key)?;
        self.order.remove(&tick);
        self.bytes -= size;
        Some(size)
    }
}

struct Inner {
    cfg: StoreConfig,
    l1: LocalDirTier,
    remotes: Vec<Arc<dyn Tier>>,
    index: Mutex<CacheIndex>,
    /// Chunk keys in use by running VMs or writes in progress: never evicted.
    pins: Mutex<HashMap<String, u64>>,
    /// One remote fetch per chunk at a time; concurrent readers wait for it.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    counters: Counters,
    /// The last scan of the local manifests for eviction (see `local_only_keys`).
    local_only: Mutex<Option<LocalOnlyScan>>,
    /// Manifests read from L1 lately, with the exact bytes each was decoded from: a read whose bytes are equal
    /// reuses the decoded manifest (decoding and checking one is ~0.25 ms at 256 MiB, on every restore's path).
    decoded: Mutex<HashMap<String, Decoded>>,
    /// Whether the first remote tier honours conditional writes (probed at the first publish; unset until then
    /// or while the probe could not reach it).
    conditional: tokio::sync::OnceCell<bool>,
}

/// Chunk keys of the local snapshots that exist nowhere else, and the modification times of the
/// `manifests/` and `published/` directories they were read from. Every change to either
/// directory (a manifest or publish marker written by rename, or deleted, by this process or any
/// other sharing the directory) changes its mtime, which makes the scan stale.
struct LocalOnlyScan {
    stamp: (SystemTime, SystemTime),
    keys: Arc<HashSet<String>>,
}

/// A manifest decoded from L1: the file it was read from (identity and times), its exact bytes, and the result.
struct Decoded {
    stamp: FileStamp,
    bytes: Vec<u8>,
    manifest: Manifest,
}

/// What identifies one version of a file: a manifest is written to a temp file and renamed, so a new version is
/// a new inode with new times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }

    /// Whether the file was last changed long enough ago that a change since would show in its times (the
    /// file system stamps times at a coarse clock's tick: two versions within one tick, on a reused inode of the
    /// same length, would look alike).
    fn settled(&self) -> bool {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
        now - self.mtime_ns.max(self.ctime_ns) > 2_000_000_000
    }
}

/// Chunks L1 must keep: pinned by a running VM or a write in progress, or part of a snapshot that
/// exists only here.
struct Protected {
    pinned: HashSet<String>,
    local_only: Arc<HashSet<String>>,
}

impl Protected {
    fn contains(&self, key: &str) -> bool {
        self.pinned.contains(key) || self.local_only.contains(key)
    }
}

/// A scan is kept only if both directories were last changed at least this long before it
/// started, so a change within the same file-system timestamp tick cannot go unnoticed.
const SCAN_SETTLE: Duration = Duration::from_secs(2);

/// What storing one chunk of an image did.
enum ChunkOutcome {
    /// All zero: not stored.
    Zero,
    /// Written to L1 (the plaintext length).
    New(ChunkRef, u64),
    /// Already in L1.
    Known(ChunkRef),
    /// A layered image's chunk the diff does not touch: the base's entry, as it is.
    Base(Option<ChunkRef>),
}

/// The data extents (`[start, end)`) of a sparse file, by SEEK_DATA / SEEK_HOLE.
fn data_extents(file: &std::fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        // SAFETY: lseek on an fd this function borrows for its whole duration; it only moves the file offset.
        let start = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if start < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `pos`
            }
            return Err(e);
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(std::io::Error::last_os_error());
        }
        out.push((start as u64, (end as u64).min(size)));
        pos = end;
    }
    Ok(out)
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Keeps a snapshot's chunks in L1 while held (a running VM restored from it).
pub struct PinGuard {
    inner: Arc<Inner>,
    keys: Vec<String>,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut pins = lock(&self.inner.pins);
        for key in &self.keys {
            if let Some(n) = pins.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(key);
                }
            }
        }
    }
}

fn chunk_key_path(name: &ChunkId) -> String {
    let hex = name.to_hex();
    format!("chunks/{}/{}", &hex[..2], hex)
}

/// How many decoded manifests L1 reads keep (see `Inner::decoded`).
const DECODED_MANIFESTS: usize = 128;

fn manifest_key(id: &str) -> String {
    format!("manifests/{id}")
}

fn working_set_key(id: &str) -> String {
    format!("workingsets/{id}")
}

fn published_key(id: &str) -> String {
    format!("published/{id}")
}

impl Store {
    /// Opens (creating) the L1 directory and connects the S3 tier if configured. Does not touch the network.
    pub fn open(cfg: StoreConfig) -> Result<Store, StoreError> {
        let mut remotes: Vec<Arc<dyn Tier>> = Vec::new();
        if let Some(s3) = &cfg.s3 {
            remotes.push(Arc::new(ObjectTier::s3(s3)?));
        }
        Store::with_remotes(cfg, remotes)
    }

    /// Opens with explicit remote tiers, read in order (an L2 before the S3 tier).
    pub fn with_remotes(cfg: StoreConfig, remotes: Vec<Arc<dyn Tier>>) -> Result<Store, StoreError> {
        if cfg.chunk_size < 4096
            || cfg.chunk_size as usize > chunk::MAX_CHUNK_SIZE
            || !cfg.chunk_size.is_multiple_of(4096)
        {
            return Err(StoreError::InvalidInput(format!(
                "chunk size {} must be a multiple of 4096 between 4 KiB and 64 MiB",
                cfg.chunk_size
            )));
        }
        let l1 = LocalDirTier::open(&cfg.local_dir).map_err(io(format!("open {}", cfg.local_dir.display())))?;
        let mut listed = l1.list_blocking("chunks")?;
        listed.sort_by_key(|o| o.modified_unix_ms);
        let mut index = CacheIndex::default();
        for o in listed {
            index.insert(&o.key, o.size);
        }
        info!(dir = %cfg.local_dir.display(), chunks = index.entries.len(), bytes = index.bytes, "snapshot store opened");
        Ok(Store {
            inner: Arc::new(Inner {
                cfg,
                l1,
                remotes,
                index: Mutex::new(index),
                pins: Mutex::new(HashMap::new()),
                inflight: Mutex::new(HashMap::new()),
                decoded: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                local_only: Mutex::new(None),
                conditional: tokio::sync::OnceCell::new(),
            }),
        })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
    }

    pub fn has_remote(&self) -> bool {
        !self.inner.remotes.is_empty()
    }

    fn looked_in(&self) -> String {
        let mut names = vec!["local cache".to_string()];
        names.extend(self.inner.remotes.iter().map(|r| r.name().to_string()));
        names.join(", ")
    }

    /// The object key of a chunk in every tier.
    pub fn chunk_key(&self, id: &ChunkId) -> String {
        match &self.inner.cfg.secret {
            None => chunk_key_path(id),
            Some(secret) => chunk_key_path(&secret.chunk_name(id)),
        }
    }

    pub fn stats(&self) -> StoreStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let index = lock(&self.inner.index);
        StoreStats {
            l1_hits: get(&c.l1_hits),
            l1_misses: get(&c.l1_misses),
            remote_fetches: get(&c.remote_fetches),
            remote_bytes: get(&c.remote_bytes),
            corrupt: get(&c.corrupt),
            chunks_written: get(&c.chunks_written),
            chunks_deduplicated: get(&c.chunks_deduplicated),
            zero_chunks: get(&c.zero_chunks),
            uploaded_chunks: get(&c.uploaded_chunks),
            uploaded_bytes: get(&c.uploaded_bytes),
            upload_skipped: get(&c.upload_skipped),
            evicted_chunks: get(&c.evicted_chunks),
            evicted_bytes: get(&c.evicted_bytes),
            l1_chunks: index.entries.len() as u64,
            l1_bytes: index.bytes,
            l1_budget: self.inner.cfg.local_budget,
            manifest_scans: get(&c.manifest_scans),
        }
    }

    fn encode_manifest(&self, m: &Manifest) -> Bytes {
        let json = serde_json::to_vec(m).unwrap_or_default();
        match &self.inner.cfg.secret {
            None => Bytes::from(json),
            Some(s) => Bytes::from(chunk::seal_manifest(&json, s)),
        }
    }

    fn decode_manifest(&self, id: &str, tier: &str, bytes: &[u8]) -> Result<Manifest, StoreError> {
        let bad = |detail: String| StoreError::BadManifest { id: id.to_string(), tier: tier.to_string(), detail };
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(bad(format!("{} bytes is over the {MAX_MANIFEST_BYTES} byte limit", bytes.len())));
        }
        let json = chunk::open_manifest(bytes, self.inner.cfg.secret.as_ref()).map_err(|e| bad(e.to_string()))?;
        let m: Manifest = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
        m.validate().map_err(bad)?;
        if m.id != id {
            return Err(bad(format!("it describes snapshot `{}`", m.id)));
        }
        Ok(m)
    }

    /// Splits, hashes, compresses and stores every image in L1, then writes the manifest (last). With `publish`,
    /// also uploads to the remote tiers (write-through); otherwise call [`Store::publish`] later (write-back).
    pub async fn put(&self, draft: SnapshotDraft, publish: bool) -> Result<(Manifest, PutReport), StoreError> {
        let started = Instant::now();
        check_name("snapshot id", &draft.id)?;
        if let Some(p) = &draft.parent {
            check_name("parent id", p)?;
        }
        let mut names = HashSet::new();
        for (name, _) in &draft.images {
            check_name("image name", name)?;
            if !names.insert(name.clone()) {
                return Err(StoreError::InvalidInput(format!("image `{name}` is given twice")));
            }
        }
        if self.inner.l1.get_blocking(&manifest_key(&draft.id), MAX_MANIFEST_OBJECT)?.is_some() {
            return Err(StoreError::Exists {
                id: draft.id.clone(),
                tier: "the local cache".into(),
                detail: " (to retry an interrupted upload, publish it)".into(),
            });
        }
        // An id another host published is taken even for a snapshot kept local for now: a later push would
        // collide with it. Unreachable remotes do not stop a local snapshot (its publish is a create-only write,
        // so it can never replace the other host's manifest).
        for tier in &self.inner.remotes {
            match tier.head(&manifest_key(&draft.id)).await {
                Ok(Some(_)) => {
                    return Err(StoreError::Exists {
                        id: draft.id.clone(),
                        tier: tier.name().to_string(),
                        detail: String::new(),
                    })
                }
                Ok(None) => {}
                Err(e) if !publish => warn!(id = %draft.id, error = %e, "could not check the remote tier for the id"),
                Err(e) => return Err(e.into()),
            }
        }
        let _lease = self.lease(false, lease::LEASE_WAIT).await?;
        let mut report = PutReport::default();
        let mut images = Vec::new();
        let mut pins = Vec::new();
        for (name, source) in &draft.images {
            let (image, guard) = self.put_image(name, source, &mut report).await?;
            images.push(image);
            pins.push(guard);
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            id: draft.id.clone(),
            parent: draft.parent.clone(),
            created_unix_ms: now_unix_ms(),
            vmm_format: draft.vmm_format,
            cpu_profile: draft.cpu_profile.clone(),
            metadata: draft.metadata.clone(),
            images,
        };
        if !self.inner.l1.put_new_blocking(&manifest_key(&manifest.id), &self.encode_manifest(&manifest))? {
            return Err(StoreError::Exists {
                id: manifest.id.clone(),
                tier: "the local cache".into(),
                detail: " (written by a concurrent snapshot with the same id)".into(),
            });
        }
        drop(pins);
        drop(_lease);
        report.seconds = started.elapsed().as_secs_f64();
        info!(id = %manifest.id, logical = report.logical_bytes, new_stored = report.new_stored_bytes, "snapshot stored locally");
        if publish {
            self.publish(&manifest.id).await?;
        }
        self.evict();
        Ok((manifest, report))
    }

    async fn put_image(
        &self,
        name: &str,
        source: &ImageSource,
        report: &mut PutReport,
    ) -> Result<(Image, PinGuard), StoreError> {
        if let ImageSource::Layered { base, diff } = source {
            return self.put_layered_image(name, base, diff, report).await;
        }
        let size = match source {
            ImageSource::Bytes(b) => b.len() as u64,
            ImageSource::File(p) => std::fs::metadata(p).map_err(io(format!("image `{name}`: {}", p.display())))?.len(),
            ImageSource::Open(f) => f.metadata().map_err(io(format!("image `{name}`")))?.len(),
            ImageSource::Layered { .. } => unreachable!("handled above"),
        };
        let file = match source {
            ImageSource::File(p) => {
                Some(Arc::new(std::fs::File::open(p).map_err(io(format!("image `{name}`: {}", p.display())))?))
            }
            ImageSource::Open(f) => Some(f.clone()),
            _ => None,
        };
        let cs = self.inner.cfg.chunk_size as u64;
        let n = size.div_ceil(cs) as usize;
        let guard = Arc::new(Mutex::new(self.pin_keys(Vec::new())));
        let results: Vec<ChunkOutcome> = futures::stream::iter(0..n)
            .map(|i| {
                let this = self.clone();
                let file = file.clone();
                let source = source.clone();
                let guard = guard.clone();
                let name = name.to_string();
                async move {
                    tokio::task::spawn_blocking(move || -> Result<ChunkOutcome, StoreError> {
                        let off = i as u64 * cs;
                        let len = (size - off).min(cs) as usize;
                        let owned;
                        let data: &[u8] = match (&source, &file) {
                            (ImageSource::Bytes(b), _) => &b[off as usize..off as usize + len],
                            (_, Some(f)) => {
                                use std::os::unix::fs::FileExt;
                                let mut buf = vec![0u8; len];
                                f.read_exact_at(&mut buf, off).map_err(io(format!("read image `{name}`")))?;
                                owned = buf;
                                &owned
                            }
                            _ => unreachable!("file sources are opened above"),
                        };
                        this.store_chunk(data, &guard)
                    })
                    .await
                    .map_err(|e| StoreError::InvalidInput(format!("chunk task failed: {e}")))?
                }
            })
            .buffered(self.inner.cfg.parallelism.max(1))
            .try_collect()
            .await?;
        Ok(self.finish_image(name, size, cs, results, &guard, report))
    }

    /// Stores one chunk's plaintext in L1 (unless it is all zero, or L1 has it already), pinned by `guard`.
    fn store_chunk(&self, data: &[u8], guard: &Mutex<PinGuard>) -> Result<ChunkOutcome, StoreError> {
        if chunk::is_zero(data) {
            return Ok(ChunkOutcome::Zero);
        }
        let id = ChunkId::of(data);
        let key = self.chunk_key(&id);
        // Pin before checking/writing so a concurrent eviction cannot drop it under us.
        self.pin_into(guard, &key);
        let existing = lock(&self.inner.index).entries.get(&key).map(|e| e.0);
        // The index may be stale: another process (`flint-store gc`) may have removed the file.
        if let Some(stored) = existing.filter(|_| self.inner.l1.exists(&key)) {
            return Ok(ChunkOutcome::Known(ChunkRef { id, stored: stored as u32 }));
        }
        let stored = chunk::encode(data, &id, self.inner.cfg.zstd_level, self.inner.cfg.secret.as_ref());
        self.l1_put(&key, &stored)?;
        Ok(ChunkOutcome::New(ChunkRef { id, stored: stored.len() as u32 }, data.len() as u64))
    }

    fn pin_into(&self, guard: &Mutex<PinGuard>, key: &str) {
        let mut g = lock(guard);
        let mut pins = lock(&self.inner.pins);
        *pins.entry(key.to_string()).or_insert(0) += 1;
        g.keys.push(key.to_string());
    }

    /// Counts what a put of one image did and makes its manifest entry.
    fn finish_image(
        &self,
        name: &str,
        size: u64,
        cs: u64,
        results: Vec<ChunkOutcome>,
        guard: &Mutex<PinGuard>,
        report: &mut PutReport,
    ) -> (Image, PinGuard) {
        let mut chunks = Vec::with_capacity(results.len());
        let mut seen_new = HashSet::new();
        for outcome in results {
            report.chunks += 1;
            let c = match outcome {
                ChunkOutcome::Zero => {
                    report.zero_chunks += 1;
                    None
                }
                ChunkOutcome::New(c, plain) if seen_new.insert(c.id) => {
                    report.new_chunks += 1;
                    report.new_stored_bytes += c.stored as u64;
                    report.new_plain_bytes += plain;
                    Some(c)
                }
                ChunkOutcome::New(c, _) | ChunkOutcome::Known(c) => {
                    report.deduplicated_chunks += 1;
                    Some(c)
                }
                ChunkOutcome::Base(c) => {
                    report.base_chunks += 1;
                    c
                }
            };
            chunks.push(c);
        }
        let ctr = &self.inner.counters;
        ctr.zero_chunks.fetch_add(report.zero_chunks, Ordering::Relaxed);
        ctr.chunks_written.fetch_add(report.new_chunks, Ordering::Relaxed);
        ctr.chunks_deduplicated.fetch_add(report.deduplicated_chunks, Ordering::Relaxed);
        report.logical_bytes += size;
        let guard = std::mem::replace(&mut *lock(guard), self.pin_keys(Vec::new()));
        (Image { name: name.to_string(), size, chunk_size: cs as u32, chunks }, guard)
    }

    /// An image made of another snapshot's image with a sparse diff file on top (its data extents replace the
    /// base's bytes; its holes keep them). Only the chunks a diff extent touches are read, merged and stored;
    /// every other chunk is the base's own entry, so the cost follows the bytes the diff holds, not the size.
    async fn put_layered_image(
        &self,
        name: &str,
        base: &(String, String),
        file: &Arc<std::fs::File>,
        report: &mut PutReport,
    ) -> Result<(Image, PinGuard), StoreError> {
        let (base_id, base_image) = base;
        let manifest = self.manifest(base_id).await?;
        let bimg = manifest
            .image(base_image)
            .ok_or_else(|| StoreError::NoImage { id: base_id.clone(), name: base_image.clone() })?
            .clone();
        let size = file.metadata().map_err(io(format!("image `{name}`: the diff")))?.len();
        if size != bimg.size {
            return Err(StoreError::InvalidInput(format!(
                "image `{name}`: the diff is {size} bytes, its base `{base_id}`/{base_image} is {}",
                bimg.size
            )));
        }
        let extents = data_extents(file, size).map_err(io(format!("image `{name}`: extents of the diff")))?;
        let cs = bimg.chunk_size as u64;
        let guard = Arc::new(Mutex::new(self.pin_keys(Vec::new())));
        let results: Vec<ChunkOutcome> = futures::stream::iter(0..bimg.chunks.len())
            .map(|i| {
                let (this, file, guard) = (self.clone(), file.clone(), guard.clone());
                let base_ref = bimg.chunks[i];
                let (off, len) = (i as u64 * cs, bimg.chunk_len(i) as u64);
                let touched: Vec<(u64, u64)> = extents
                    .iter()
                    .filter(|(s, e)| *s < off + len && *e > off)
                    .map(|(s, e)| ((*s).max(off) - off, (*e).min(off + len) - off))
                    .collect();
                let name = name.to_string();
                async move {
                    if touched.is_empty() {
                        if let Some(c) = &base_ref {
                            this.pin_into(&guard, &this.chunk_key(&c.id));
                        }
                        return Ok(ChunkOutcome::Base(base_ref));
                    }
                    let mut data = match &base_ref {
                        Some(c) => this.chunk(&c.id).await?,
                        None => vec![0u8; len as usize],
                    };
                    tokio::task::spawn_blocking(move || -> Result<ChunkOutcome, StoreError> {
                        use std::os::unix::fs::FileExt;
                        for (s, e) in touched {
                            file.read_exact_at(&mut data[s as usize..e as usize], off + s)
                                .map_err(io(format!("read image `{name}`")))?;
                        }
                        this.store_chunk(&data, &guard)
                    })
                    .await
                    .map_err(|e| StoreError::InvalidInput(format!("chunk task failed: {e}")))?
                }
            })
            .buffered(self.inner.cfg.parallelism.max(1))
            .try_collect()
            .await?;
        Ok(self.finish_image(name, size, cs, results, &guard, report))
    }

    /// Whether the local cache holds snapshot `id`'s manifest (it was stored here, or fetched).
    pub fn has_local_manifest(&self, id: &str) -> bool {
        check_name("snapshot id", id).is_ok() && self.inner.l1.exists(&manifest_key(id))
    }

    /// Reads a manifest: L1 first, then the remote tiers (caching it in L1 as published).
    pub async fn manifest(&self, id: &str) -> Result<Manifest, StoreError> {
        check_name("snapshot id", id)?;
        // The file unchanged since it was decoded (a settled one by its stamp, a recent one byte for byte): the
        // decoded manifest is reused.
        let key = manifest_key(id);
        let stamp = FileStamp::of(&self.inner.l1.root().join(&key));
        if let (Some(stamp), Some(d)) = (stamp, lock(&self.inner.decoded).get(id)) {
            if d.stamp == stamp && stamp.settled() {
                return Ok(d.manifest.clone());
            }
        }
        if let Some(bytes) = self.inner.l1.get_blocking(&key, MAX_MANIFEST_OBJECT)? {
            // The stamp describes these bytes only if the file was not replaced between the two reads.
            let stamp = stamp.filter(|s| s.len == bytes.len() as u64);
            if let Some(d) = lock(&self.inner.decoded).get_mut(id) {
                if d.bytes == bytes {
                    if let Some(stamp) = stamp {
                        d.stamp = stamp;
                    }
                    return Ok(d.manifest.clone());
                }
            }
            let manifest = self.decode_manifest(id, "local cache", &bytes)?;
            if let Some(stamp) = stamp {
                let mut decoded = lock(&self.inner.decoded);
                if decoded.len() >= DECODED_MANIFESTS {
                    decoded.clear();
                }
                decoded.insert(id.to_string(), Decoded { stamp, bytes, manifest: manifest.clone() });
            }
            return Ok(manifest);
        }
        let mut last_err = None;
        for tier in &self.inner.remotes {
            match tier.get(&manifest_key(id), MAX_MANIFEST_OBJECT).await {
                Ok(Some(bytes)) => {
                    let m = self.decode_manifest(id, tier.name(), &bytes)?;
                    self.inner.l1.put_blocking(&published_key(id), b"")?;
                    self.inner.l1.put_blocking(&manifest_key(id), &bytes)?;
                    return Ok(m);
                }
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
        }
        match last_err {
            Some(e) => Err(StoreError::Unavailable(e)),
            None => Err(StoreError::NotFound { id: id.to_string(), looked_in: self.looked_in() }),
        }
    }

    /// Fetches one chunk's plaintext: L1, else the remote tiers in order (filling L1). Every copy is verified
    /// against its hash; a corrupt L1 copy is dropped and refetched, a corrupt remote copy tries the next tier.
    pub async fn chunk(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        self.chunk_counted(id, None).await
    }

    /// [`Store::chunk`], also counted in `reader` (one reader's share of the store's counters).
    pub(crate) async fn chunk_counted(
        &self,
        id: &ChunkId,
        reader: Option<&ReadCounters>,
    ) -> Result<Vec<u8>, StoreError> {
        let key = self.chunk_key(id);
        if let Some(plain) = self.chunk_from_l1(&key, id).await {
            self.inner.counters.l1_hits.fetch_add(1, Ordering::Relaxed);
            if let Some(r) = reader {
                r.l1_hits.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(plain);
        }
        let gate = lock(&self.inner.inflight).entry(key.clone()).or_default().clone();
        let _turn = gate.lock().await;
        let result = self.fetch_remote(&key, id, reader).await;
        {
            let mut inflight = lock(&self.inner.inflight);
            if inflight.get(&key).is_some_and(|g| Arc::ptr_eq(g, &gate)) && Arc::strong_count(&gate) <= 2 {
                inflight.remove(&key);
            }
        }
        result
    }

    async fn chunk_from_l1(&self, key: &str, id: &ChunkId) -> Option<Vec<u8>> {
        if !lock(&self.inner.index).touch(key) {
            // Another process sharing this cache (flint-store, another flintd) may have written it.
            let size = std::fs::metadata(self.inner.l1.root().join(key)).ok()?.len();
            lock(&self.inner.index).insert(key, size);
        }
        let this = self.clone();
        let (key2, id2) = (key.to_string(), *id);
        let decoded = tokio::task::spawn_blocking(move || {
            let stored = this.inner.l1.get_blocking(&key2, chunk::MAX_CHUNK_OBJECT).ok().flatten()?;
            Some(chunk::decode(&stored, &id2, this.inner.cfg.secret.as_ref()))
        })
        .await
        .ok()
        .flatten();
        match decoded {
            Some(Ok(plain)) => Some(plain),
            Some(Err(e)) => {
                self.inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                warn!(key, error = %e, "corrupt chunk in the local cache; dropping it and refetching");
                self.l1_remove(key);
                None
            }
            None => {
                lock(&self.inner.index).remove(key);
                None
            }
        }
    }

    async fn fetch_remote(
        &self,
        key: &str,
        id: &ChunkId,
        reader: Option<&ReadCounters>,
    ) -> Result<Vec<u8>, StoreError> {
        // Another reader may have fetched it while we waited for our turn.
        if let Some(plain) = self.chunk_from_l1(key, id).await {
            self.inner.counters.l1_hits.fetch_add(1, Ordering::Relaxed);
            if let Some(r) = reader {
                r.l1_hits.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(plain);
        }
        self.inner.counters.l1_misses.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = reader {
            r.l1_misses.fetch_add(1, Ordering::Relaxed);
        }
        let mut failure: Option<StoreError> = None;
        for tier in &self.inner.remotes {
            let stored = match tier.get(key, chunk::MAX_CHUNK_OBJECT).await {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(e) => {
                    failure = Some(StoreError::Unavailable(e));
                    continue;
                }
            };
            self.inner.counters.remote_fetches.fetch_add(1, Ordering::Relaxed);
            self.inner.counters.remote_bytes.fetch_add(stored.len() as u64, Ordering::Relaxed);
            if let Some(r) = reader {
                r.remote_fetches.fetch_add(1, Ordering::Relaxed);
                r.remote_bytes.fetch_add(stored.len() as u64, Ordering::Relaxed);
            }
            let this = self.clone();
            let (key2, id2) = (key.to_string(), *id);
            let decoded = tokio::task::spawn_blocking(move || {
                let plain = chunk::decode(&stored, &id2, this.inner.cfg.secret.as_ref())?;
                let _ = this.l1_put(&key2, &stored);
                Ok::<_, DecodeError>(plain)
            })
            .await
            .map_err(|e| StoreError::InvalidInput(format!("decode task failed: {e}")))?;
            match decoded {
                Ok(plain) => {
                    self.evict();
                    return Ok(plain);
                }
                Err(source) => {
                    self.inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                    warn!(key, tier = tier.name(), error = %source, "corrupt chunk in a remote tier");
                    failure = Some(StoreError::Corrupt { key: key.to_string(), tier: tier.name().to_string(), source });
                }
            }
        }
        Err(failure.unwrap_or_else(|| StoreError::ChunkMissing { key: key.to_string(), looked_in: self.looked_in() }))
    }

    /// Writes an image of a snapshot to `dest` (sparse: zero chunks stay holes).
    pub async fn get_image(&self, id: &str, name: &str, dest: &Path) -> Result<FetchReport, StoreError> {
        let started = Instant::now();
        let manifest = self.manifest(id).await?;
        let image = manifest
            .image(name)
            .cloned()
            .ok_or_else(|| StoreError::NoImage { id: id.to_string(), name: name.to_string() })?;
        let before = self.stats();
        let tmp = dest.with_extension(format!("partial.{}", std::process::id()));
        let file = std::fs::File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
        file.set_len(image.size).map_err(io(format!("size {}", tmp.display())))?;
        let file = Arc::new(file);
        let written = AtomicU64::new(0);
        let present: Vec<(usize, ChunkRef)> =
            image.chunks.iter().enumerate().filter_map(|(i, c)| c.as_ref().map(|c| (i, *c))).collect();
        let result = futures::stream::iter(present)
            .map(|(i, c)| {
                let file = file.clone();
                let written = &written;
                let cs = image.chunk_size as u64;
                let want = image.chunk_len(i);
                let image_name = &image.name;
                async move {
                    let plain = self.chunk(&c.id).await?;
                    // A manifest that points a slot at a chunk of another length would write past the slot.
                    if plain.len() != want {
                        return Err(StoreError::InvalidInput(format!(
                            "chunk {i} of image `{image_name}` is {} bytes, the manifest's slot {want}",
                            plain.len()
                        )));
                    }
                    use std::os::unix::fs::FileExt;
                    file.write_all_at(&plain, i as u64 * cs).map_err(io("write image"))?;
                    written.fetch_add(plain.len() as u64, Ordering::Relaxed);
                    Ok::<_, StoreError>(())
                }
            })
            .buffer_unordered(self.inner.cfg.parallelism.max(1))
            .try_collect::<Vec<()>>()
            .await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        file.sync_all().map_err(io("sync image"))?;
        std::fs::rename(&tmp, dest).map_err(io(format!("rename to {}", dest.display())))?;
        let after = self.stats();
        Ok(FetchReport {
            bytes_written: written.load(Ordering::Relaxed),
            chunks: image.chunks.len() as u64,
            fetched_chunks: after.remote_fetches - before.remote_fetches,
            fetched_bytes: after.remote_bytes - before.remote_bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Random access to one image of a snapshot (for lazy restore).
    pub async fn reader(&self, id: &str, name: &str) -> Result<crate::ImageReader, StoreError> {
        let manifest = self.manifest(id).await?;
        let image = manifest
            .image(name)
            .cloned()
            .ok_or_else(|| StoreError::NoImage { id: id.to_string(), name: name.to_string() })?;
        Ok(crate::ImageReader::new(self.clone(), Arc::new(image)))
    }

    /// What `list` says of one snapshot, from its manifest: `local`/`remote` are where its manifest is known to be;
    /// whether every chunk is in L1 is read off the cache index.
    pub fn describe(&self, m: &Manifest, local: bool, remote: bool) -> SnapshotInfo {
        let local_complete = {
            let index = lock(&self.inner.index);
            m.chunk_ids().all(|c| index.entries.contains_key(&self.chunk_key(&c)))
        };
        SnapshotInfo {
            id: m.id.clone(),
            parent: m.parent.clone(),
            created_unix_ms: m.created_unix_ms,
            logical_bytes: m.logical_bytes(),
            stored_bytes: m.stored_bytes(),
            chunks: m.chunk_ids().count(),
            local,
            local_complete,
            remote,
            metadata: m.metadata.clone(),
        }
    }

    /// Snapshots in L1 and in the remote tiers. A remote tier that cannot be listed is an error.
    pub async fn list(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        let mut out: BTreeMap<String, SnapshotInfo> = BTreeMap::new();
        for o in self.inner.l1.list_blocking("manifests")? {
            let id = o.key.trim_start_matches("manifests/").to_string();
            let Some(bytes) = self.inner.l1.get_blocking(&o.key, MAX_MANIFEST_OBJECT)? else { continue };
            match self.decode_manifest(&id, "local cache", &bytes) {
                Ok(m) => {
                    out.insert(id, self.describe(&m, true, false));
                }
                Err(e) => warn!(%id, error = %e, "skipping an unreadable local manifest"),
            }
        }
        for tier in &self.inner.remotes {
            for o in tier.list("manifests").await? {
                let id = o.key.trim_start_matches("manifests/").to_string();
                if let Some(info) = out.get_mut(&id) {
                    info.remote = true;
                    continue;
                }
                if check_name("id", &id).is_err() {
                    continue;
                }
                let Some(bytes) = tier.get(&o.key, MAX_MANIFEST_OBJECT).await? else { continue };
                match self.decode_manifest(&id, tier.name(), &bytes) {
                    Ok(m) => {
                        out.insert(id, self.describe(&m, false, true));
                    }
                    Err(e) => warn!(%id, error = %e, "skipping an unreadable remote manifest"),
                }
            }
        }
        Ok(out.into_values().collect())
    }

    /// Deletes a snapshot's manifest locally and, with `remote`, from the remote tiers. Chunks go at the next GC.
    pub async fn delete(&self, id: &str, remote: bool) -> Result<(), StoreError> {
        check_name("snapshot id", id)?;
        let local = self.inner.l1.get_blocking(&manifest_key(id), MAX_MANIFEST_OBJECT)?.is_some();
        let mut found = local;
        if remote {
            for tier in &self.inner.remotes {
                if tier.head(&manifest_key(id)).await?.is_some() {
                    found = true;
                    tier.delete(&manifest_key(id)).await?;
                }
            }
        }
        if !found {
            return Err(StoreError::NotFound { id: id.to_string(), looked_in: self.looked_in() });
        }
        if remote {
            for tier in &self.inner.remotes {
                tier.delete(&working_set_key(id)).await?;
            }
        }
        self.inner.l1.delete_blocking(&manifest_key(id))?;
        self.inner.l1.delete_blocking(&published_key(id))?;
        self.inner.l1.delete_blocking(&working_set_key(id))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain;

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    fn store(dir: &Path, remote: Option<&Path>, budget: u64) -> Store {
        let mut cfg = StoreConfig::new(&dir.join("l1"));
        cfg.local_budget = budget;
        cfg.chunk_size = 64 << 10;
        cfg.zstd_level = 1;
        let remotes: Vec<Arc<dyn Tier>> = match remote {
            Some(r) => vec![Arc::new(LocalDirTier::open(r).unwrap())],
            None => vec![],
        };
        Store::with_remotes(cfg, remotes).unwrap()
    }

    /// A tier that accepts conditional-write headers and ignores them (some S3-compatible servers do): the probe
    /// says so, naming the header.
    #[tokio::test]
    async fn the_probe_finds_a_bucket_that_ignores_conditional_writes() {
        #[derive(Debug)]
        struct Ignoring(LocalDirTier, bool);
        #[async_trait::async_trait]
        impl Tier for Ignoring {
            fn name(&self) -> &str {
                "ignoring"
            }
            async fn get(&self, key: &str, max: u64) -> Result<Option<Bytes>, crate::tier::TierError> {
                self.0.get(key, max).await
            }
            async fn put(&self, key: &str, data: Bytes) -> Result<(), crate::tier::TierError> {
                self.0.put(key, data).await
            }
            async fn put_new(&self, key: &str, data: Bytes) -> Result<bool, crate::tier::TierError> {
                self.0.put_new(key, data).await
            }
            async fn head(&self, key: &str) -> Result<Option<crate::tier::ObjectInfo>, crate::tier::TierError> {
                self.0.head(key).await
            }
            async fn delete(&self, key: &str) -> Result<(), crate::tier::TierError> {
                self.0.delete(key).await
            }
            async fn list(&self, prefix: &str) -> Result<Vec<crate::tier::ObjectInfo>, crate::tier::TierError> {
                self.0.list(prefix).await
            }
            async fn put_if(
                &self,
                key: &str,
                data: Bytes,
                version: Option<&str>,
            ) -> Result<Option<String>, crate::tier::TierError> {
                // Honours If-None-Match (when asked to) but never If-Match.
                if version.is_none() && self.1 && self.0.exists(key) {
                    return Ok(None);
                }
                self.0.put(key, data).await?;
                Ok(Some("\"v\"".into()))
            }
        }
        for (honours_create, want) in [(false, "ignores If-None-Match"), (true, "ignores If-Match")] {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = StoreConfig::new(&dir.path().join("l1"));
            cfg.chunk_size = 64 << 10;
            let tier = Ignoring(LocalDirTier::open(&dir.path().join("r")).unwrap(), honours_create);
            let s = Store::with_remotes(cfg, vec![Arc::new(tier)]).unwrap();
            let e = s.probe_conditional_writes("h").await.unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let e = store(dir.path(), None, u64::MAX).probe_conditional_writes("h").await.unwrap_err();
        assert!(e.contains("no remote tier"), "{e}");
    }

    /// A layered image (a diff snapshot's sparse memory file on its base) equals the base with the diff's data
    /// extents written over it; only the chunks a diff extent touches are read and stored, the rest are the
    /// base's entries (zero chunks included); a diff of the wrong size is refused.
    #[tokio::test]
    async fn layered_images_store_only_the_chunks_a_diff_touches() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), None, u64::MAX);
        let cs = 64 << 10;
        let mut base = random(16 * cs, 5);
        base[3 * cs..5 * cs].fill(0); // two zero chunks in the base
        s.put(SnapshotDraft::new("base").image("memory", ImageSource::Bytes(base.clone().into())), false)
            .await
            .unwrap();
        // Dirty: one page in chunk 1, a run over the chunk 6/7 boundary, a zero page in zero chunk 3 (a written
        // zero page is data in a diff: "now zero", which a hole could not say).
        let diff_path = dir.path().join("diff");
        let f = std::fs::File::create(&diff_path).unwrap();
        f.set_len(base.len() as u64).unwrap();
        let mut want = base.clone();
        for (off, data) in [(cs + 4096, random(4096, 9)), (7 * cs - 8192, random(16384, 11)), (3 * cs, vec![0; 4096])] {
            f.write_all_at(&data, off as u64).unwrap();
            want[off..off + data.len()].copy_from_slice(&data);
        }
        drop(f);
        let draft = SnapshotDraft::new("layered").image(
            "memory",
            ImageSource::Layered {
                base: ("base".into(), "memory".into()),
                diff: Arc::new(std::fs::File::open(&diff_path).unwrap()),
            },
        );
        let (m, report) = s.put(draft, false).await.unwrap();
        assert_eq!(report.new_chunks, 3, "chunks 1, 6 and 7 changed: {report:?}");
        assert_eq!(report.zero_chunks, 1, "chunk 3 stays zero: {report:?}");
        assert_eq!(report.base_chunks, 12, "{report:?}");
        let out = dir.path().join("out");
        s.get_image("layered", "memory", &out).await.unwrap();
        assert!(std::fs::read(&out).unwrap() == want, "the layered image is the base with the diff on top");
        let bm = s.manifest("base").await.unwrap();
        let (b, l) = (bm.image("memory").unwrap(), m.image("memory").unwrap());
        for i in [0, 2, 4, 5, 8, 15] {
            assert_eq!(b.chunks[i], l.chunks[i], "chunk {i} is the base's entry");
        }
        // A diff that does not match the base's size is refused; nothing is stored under the id.
        std::fs::File::options().write(true).open(&diff_path).unwrap().set_len(cs as u64).unwrap();
        let draft = SnapshotDraft::new("short").image(
            "memory",
            ImageSource::Layered {
                base: ("base".into(), "memory".into()),
                diff: Arc::new(std::fs::File::open(&diff_path).unwrap()),
            },
        );
        let e = s.put(draft, false).await.unwrap_err();
        assert!(e.to_string().contains("its base `base`/memory is"), "{e}");
        assert!(s.manifest("short").await.is_err());
    }

    /// A tampered remote tier: objects larger than they may be are refused before they are read (a 1 GiB
    /// manifest or chunk must not become a 1 GiB allocation), and a manifest that points a slot at a chunk of
    /// another length cannot make `get_image` write past the slot.
    #[tokio::test]
    async fn a_tampered_remote_cannot_exhaust_memory_or_misplace_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let remote = dir.path().join("remote");
        let writer = store(&dir.path().join("w"), Some(&remote), 1 << 30);
        let data = random((64 << 10) + 100, 7);
        let (m, _) = writer
            .put(SnapshotDraft::new("c").image("memory", ImageSource::Bytes(data.clone().into())), true)
            .await
            .unwrap();
        let huge = |rel: &str| {
            let f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(remote.join(rel)).unwrap();
            f.set_len(1 << 30).unwrap(); // sparse: costs no disk, would cost 1 GiB of memory to read
        };
        std::fs::copy(remote.join("manifests/c"), remote.join("manifests/big")).unwrap();
        huge("manifests/big");
        let fresh = store(&dir.path().join("r1"), Some(&remote), 1 << 30);
        let e = error_chain(&fresh.manifest("big").await.unwrap_err());
        assert!(e.contains("larger than"), "{e}");

        // A chunk object swollen to 1 GiB.
        let img = m.image("memory").unwrap();
        let first = img.chunks[0].unwrap().id;
        let key = chunk_key_path(&first);
        let saved = std::fs::read(remote.join(&key)).unwrap();
        huge(&key);
        let fresh = store(&dir.path().join("r2"), Some(&remote), 1 << 30);
        let e = error_chain(&fresh.get_image("c", "memory", &dir.path().join("c.out")).await.unwrap_err());
        assert!(e.contains("larger than"), "{e}");
        std::fs::write(remote.join(&key), saved).unwrap();

        // Slot 0 (64 KiB) pointed at the 100-byte last chunk.
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(remote.join("manifests/c")).unwrap()).unwrap();
        let images = v["images"].as_array_mut().unwrap();
        let chunks = images[0]["chunks"].as_array_mut().unwrap();
        chunks[0] = chunks[1].clone();
        std::fs::write(remote.join("manifests/c"), serde_json::to_vec(&v).unwrap()).unwrap();
        let fresh = store(&dir.path().join("r3"), Some(&remote), 1 << 30);
        let out = dir.path().join("c2.out");
        let e = error_chain(&fresh.get_image("c", "memory", &out).await.unwrap_err());
        assert!(e.contains("the manifest's slot 65536"), "{e}");
        assert!(!out.exists(), "no image left behind");
    }

    /// With a secret, manifests are authenticated: a plain manifest planted in the bucket (anyone who can write it
    /// can do that) is refused, and so is a sealed manifest copied under another snapshot's name.
    #[tokio::test]
    async fn with_a_secret_forged_or_moved_manifests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let remote = dir.path().join("remote");
        let sealed_store = |l1: &str| {
            let mut cfg = StoreConfig::new(&dir.path().join(l1));
            cfg.chunk_size = 64 << 10;
            cfg.secret = Some(crate::chunk::Secret([7; 32]));
            Store::with_remotes(cfg, vec![Arc::new(LocalDirTier::open(&remote).unwrap())]).unwrap()
        };
        let host = sealed_store("h1");
        host.put(SnapshotDraft::new("real").image("memory", ImageSource::Bytes(random(1000, 1).into())), true)
            .await
            .unwrap();
        // An attacker without the secret publishes a plain manifest of their own.
        let forger = store(&dir.path().join("f"), Some(&remote), 1 << 30);
        forger
            .put(SnapshotDraft::new("forged").image("memory", ImageSource::Bytes(random(1000, 2).into())), true)
            .await
            .unwrap();
        let reader = sealed_store("h2");
        let e = error_chain(&reader.manifest("forged").await.unwrap_err());
        assert!(e.contains("not sealed"), "{e}");
        // A genuine sealed manifest under another name.
        std::fs::copy(remote.join("manifests/real"), remote.join("manifests/moved")).unwrap();
        let e = error_chain(&reader.manifest("moved").await.unwrap_err());
        assert!(e.contains("describes snapshot `real`"), "{e}");
        assert!(reader.manifest("real").await.is_ok());
    }

    // The S3 behaviour is covered by tests/tests/store_s3.rs against a real server; these cover cache policy.
    #[tokio::test]
    async fn eviction_spares_pinned_and_unpublished_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let remote = dir.path().join("remote");
        let s = store(dir.path(), Some(&remote), 1 << 20);
        // Unpublished: over budget, yet nothing may be evicted (it exists nowhere else).
        let (m1, _) = s
            .put(SnapshotDraft::new("one").image("memory", ImageSource::Bytes(random(1536 << 10, 1).into())), false)
            .await
            .unwrap();
        assert_eq!(s.stats().evicted_chunks, 0);
        assert!(s.stats().l1_bytes > 1 << 20);
        s.publish("one").await.unwrap();
        let pin = s.pin(&m1);
        let (_, _) = s
            .put(SnapshotDraft::new("two").image("memory", ImageSource::Bytes(random(512 << 10, 2).into())), true)
            .await
            .unwrap();
        // `one` is pinned (a VM runs from it): still nothing of it goes; `two` is published and unpinned.
        let index_has =
            |m: &Manifest| m.chunk_ids().all(|c| lock(&s.inner.index).entries.contains_key(&s.chunk_key(&c)));
        assert!(index_has(&m1));
        drop(pin);
        let (_, _) = s
            .put(SnapshotDraft::new("three").image("memory", ImageSource::Bytes(random(256 << 10, 3).into())), true)
            .await
            .unwrap();
        assert!(s.stats().l1_bytes <= 1 << 20, "{:?}", s.stats());
        assert!(s.stats().evicted_chunks > 0);
        // Evicted chunks come back through the remote tier.
        let out = dir.path().join("one.out");
        s.get_image("one", "memory", &out).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), random(1536 << 10, 1));
        assert!(s.stats().remote_fetches > 0);
    }

    #[tokio::test]
    async fn eviction_reuses_its_manifest_scan_until_a_manifest_changes() {
        let dir = tempfile::tempdir().unwrap();
        let remote = dir.path().join("remote");
        let l1 = dir.path().join("l1");
        let s = store(dir.path(), Some(&remote), 256 << 10);
        let draft = |id: &str, n: usize, seed: u64| {
            SnapshotDraft::new(id).image("memory", ImageSource::Bytes(random(n, seed).into()))
        };
        s.put(draft("pub", 512 << 10, 1), true).await.unwrap();
        let (local, _) = s.put(draft("local", 512 << 10, 2), false).await.unwrap();
        // Over budget for good (`local` exists only here). Age the manifest directories so a scan may be kept.
        let old = SystemTime::now() - Duration::from_secs(60);
        for d in ["manifests", "published"] {
            std::fs::File::open(l1.join(d)).unwrap().set_modified(old).unwrap();
        }
        let scans = s.stats().manifest_scans;
        for i in 0..3 {
            s.get_image("pub", "memory", &dir.path().join(format!("pub.{i}"))).await.unwrap();
        }
        assert!(s.stats().remote_fetches >= 3, "{:?}", s.stats());
        assert_eq!(s.stats().manifest_scans, scans + 1, "one scan serves every eviction: {:?}", s.stats());

        // Another process sharing the directory stores a snapshot that exists only here: the next eviction
        // sees it (the manifest directory changed) and spares it.
        let other = store(dir.path(), Some(&remote), 256 << 10);
        let (m2, _) = other.put(draft("other", 256 << 10, 3), false).await.unwrap();
        s.rescan().unwrap();
        assert_eq!(s.stats().manifest_scans, scans + 2, "{:?}", s.stats());
        let on_disk = |m: &Manifest| m.chunk_ids().all(|c| l1.join(s.chunk_key(&c)).is_file());
        assert!(on_disk(&m2) && on_disk(&local));

        // Clearing the cache drops what S3 holds and keeps what exists nowhere else.
        let roomy = store(dir.path(), Some(&remote), 1 << 30);
        roomy.get_image("pub", "memory", &dir.path().join("pub.roomy")).await.unwrap();
        let pub_manifest = roomy.manifest("pub").await.unwrap();
        assert!(on_disk(&pub_manifest));
        assert!(roomy.clear_local_chunks().unwrap() > 0);
        assert!(pub_manifest.chunk_ids().all(|c| !l1.join(s.chunk_key(&c)).exists()));
        assert!(on_disk(&m2) && on_disk(&local));
        std::fs::remove_dir_all(&remote).unwrap();
        let out = dir.path().join("local.out");
        s.get_image("local", "memory", &out).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), random(512 << 10, 2));
    }

    #[tokio::test]
    async fn bad_input_gets_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), None, 1 << 30);
        let e = s.put(SnapshotDraft::new("../x"), false).await.unwrap_err();
        assert!(e.to_string().contains("invalid"), "{e}");
        let d = SnapshotDraft::new("x").image("m", ImageSource::Bytes(vec![1u8; 10].into()));
        s.put(d.clone(), false).await.unwrap();
        assert!(s.put(d, false).await.unwrap_err().to_string().contains("already exists"));
        let e = s
            .put(SnapshotDraft::new("y").image("m", ImageSource::File("/nonexistent".into())), false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent"), "{e}");
        assert!(matches!(s.manifest("nope").await, Err(StoreError::NotFound { .. })));
        assert!(matches!(s.publish("x").await, Err(StoreError::NoRemote)));
        assert!(matches!(s.get_image("x", "disk", &dir.path().join("o")).await, Err(StoreError::NoImage { .. })));
        // Deleting a local snapshot, then GC, frees its chunks.
        s.delete("x", false).await.unwrap();
        assert_eq!(s.gc(false).await.unwrap().deleted_chunks, 1);
        assert!(matches!(s.delete("x", false).await, Err(StoreError::NotFound { .. })));
    }
}
