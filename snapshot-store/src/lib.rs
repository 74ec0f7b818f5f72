//! Tiered, content-addressed snapshot storage: an L1 local cache with a byte budget in front of S3-compatible
//! object storage. Images are split into fixed-size chunks named by the BLAKE3 hash of their plaintext,
//! zstd-compressed (optionally sealed), all-zero chunks not stored; a manifest written last makes a snapshot exist.
//! See docs/snapshot-store.md.

pub mod chunk;
#[doc(hidden)]
pub mod fuzzing;
pub mod manifest;
mod reader;
mod store;
pub mod tier;

pub use chunk::{ChunkId, Secret};
pub use manifest::{ChunkRef, Image, Manifest};
pub use reader::ImageReader;
pub use store::{
    FetchReport, GcReport, ImageSource, PinGuard, PublishReport, PutReport, ReadCounters, SnapshotDraft, SnapshotInfo,
    Store, StoreConfig, StoreError, StoreStats, VerifyReport, Versioned, WorkingSet, DEFAULT_CHUNK_SIZE,
    MAX_COORD_OBJECT,
};
pub use tier::{ObjectTier, S3Config, Tier, TierError};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Locks a mutex, taking the data even if a panicking thread poisoned it (counters, indexes, pins: valid at every
/// point a panic could interrupt).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An error and its whole `source()` chain on one line (`outer: cause: root cause`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}
