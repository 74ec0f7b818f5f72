//! What the store's operations report, and what a put takes.
use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreStats {
    pub l1_hits: u64,
    pub l1_misses: u64,
    pub remote_fetches: u64,
    pub remote_bytes: u64,
    pub corrupt: u64,
    pub chunks_written: u64,
    pub chunks_deduplicated: u64,
    pub zero_chunks: u64,
    pub uploaded_chunks: u64,
    pub uploaded_bytes: u64,
    pub upload_skipped: u64,
    pub evicted_chunks: u64,
    pub evicted_bytes: u64,
    pub l1_chunks: u64,
    pub l1_bytes: u64,
    pub l1_budget: u64,
    /// Times eviction had to read every local manifest to learn which chunks exist nowhere else
    /// (the result is reused while the manifest directories do not change).
    #[serde(default)]
    pub manifest_scans: u64,
}

/// Where a listed snapshot lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub parent: Option<String>,
    pub created_unix_ms: u64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub chunks: usize,
    /// The manifest is in L1.
    pub local: bool,
    /// Every chunk is in L1 (it restores without the network).
    pub local_complete: bool,
    /// The manifest is in the remote tier.
    pub remote: bool,
    pub metadata: BTreeMap<String, String>,
}

/// What a put or publish did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PutReport {
    pub logical_bytes: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    /// Chunks already in L1 (deduplicated against earlier snapshots or repeats within this one).
    pub deduplicated_chunks: u64,
    pub new_chunks: u64,
    pub new_stored_bytes: u64,
    pub new_plain_bytes: u64,
    /// A layered image's chunks taken from its base unread (the diff does not touch them).
    #[serde(default)]
    pub base_chunks: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PublishReport {
    pub chunks: u64,
    pub uploaded_chunks: u64,
    pub uploaded_bytes: u64,
    pub already_present: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FetchReport {
    pub bytes_written: u64,
    pub chunks: u64,
    pub fetched_chunks: u64,
    pub fetched_bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GcReport {
    pub manifests: u64,
    pub chunks_seen: u64,
    pub deleted_chunks: u64,
    pub deleted_bytes: u64,
    pub kept_young: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub tier: String,
    pub chunks: u64,
    pub ok: u64,
    pub problems: Vec<String>,
}

/// Chunks of one image a restore touched, in first-touch order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkingSet {
    pub image: String,
    pub chunks: Vec<u32>,
}

/// Where image bytes come from when a snapshot is put.
#[derive(Debug, Clone)]
pub enum ImageSource {
    File(PathBuf),
    /// A file the caller opened (from a directory someone else shapes, resolved without symlinks).
    Open(std::sync::Arc<std::fs::File>),
    Bytes(Bytes),
    /// Snapshot `base.0`'s image `base.1` with the data extents of the sparse file `diff` written over it (a diff
    /// snapshot's memory file on its base: holes are "unchanged"). Stored as a whole image: a restore of it needs
    /// nothing of the base but the chunks they share.
    Layered {
        base: (String, String),
        diff: std::sync::Arc<std::fs::File>,
    },
}

/// A snapshot to put into the store.
#[derive(Debug, Clone)]
pub struct SnapshotDraft {
    pub id: String,
    pub parent: Option<String>,
    pub vmm_format: Option<u32>,
    pub cpu_profile: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub images: Vec<(String, ImageSource)>,
}

impl SnapshotDraft {
    pub fn new(id: &str) -> SnapshotDraft {
        SnapshotDraft {
            id: id.to_string(),
            parent: None,
            vmm_format: None,
            cpu_profile: None,
            metadata: BTreeMap::new(),
            images: Vec::new(),
        }
    }
    pub fn image(mut self, name: &str, source: ImageSource) -> SnapshotDraft {
        self.images.push((name.to_string(), source));
        self
    }
}

/// One reader's share of the store's fetch counters (a lazily restored VM's, say).
#[derive(Debug, Default)]
pub struct ReadCounters {
    pub l1_hits: std::sync::atomic::AtomicU64,
    pub l1_misses: std::sync::atomic::AtomicU64,
    pub remote_fetches: std::sync::atomic::AtomicU64,
    pub remote_bytes: std::sync::atomic::AtomicU64,
}
