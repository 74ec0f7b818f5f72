//! The store's configuration.
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::chunk::Secret;
use crate::tier::S3Config;

/// 256 KiB: see docs/snapshot-store.md for the measurement behind it.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 << 10;

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// L1 directory (chunks, manifests).
    pub local_dir: PathBuf,
    /// L1 byte budget for chunks; least recently used chunks of published, unpinned snapshots are evicted past it.
    pub local_budget: u64,
    pub chunk_size: u32,
    pub zstd_level: i32,
    /// Convergent encryption at rest (chunks and manifests, in every tier).
    pub secret: Option<Secret>,
    pub s3: Option<S3Config>,
    /// Remote chunks no manifest references are deleted by GC only once older than this; a publish re-uploads a
    /// chunk it reuses when that chunk is older than half of it, so GC and publishes never race (docs/snapshot-store.md).
    pub gc_grace: Duration,
    /// Concurrent chunk operations (compression, uploads, fetches).
    pub parallelism: usize,
}

impl StoreConfig {
    pub fn new(local_dir: &Path) -> StoreConfig {
        StoreConfig {
            local_dir: local_dir.to_path_buf(),
            local_budget: 20 << 30,
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: 3,
            secret: None,
            s3: None,
            gc_grace: Duration::from_secs(7 * 24 * 3600),
            parallelism: 16,
        }
    }
}
