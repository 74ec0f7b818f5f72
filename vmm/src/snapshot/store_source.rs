//! Lazy restore straight from the snapshot store: guest memory is fetched chunk by chunk (L1 cache, S3 on a miss)
//! as the guest touches it, through the userfaultfd handler.

use std::path::Path;
use std::time::Duration;

use flint_snapshot_store::{ImageReader, Store, StoreSpec};
use serde::{Deserialize, Serialize};

use super::uffd::PageSource;

/// What `--restore-mode store` reads from the `--restore-mem` path (written by flintd).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSourceConfig {
    pub store: StoreSpec,
    pub snapshot: String,
    #[serde(default = "memory")]
    pub image: String,
    /// Chunks to fetch and install before the guest asks (a recorded working set).
    #[serde(default)]
    pub prefetch: Vec<u32>,
    /// A chunk that cannot be fetched within this stops the VM.
    #[serde(default = "fetch_timeout")]
    pub fetch_timeout_s: u64,
    /// Parallel fetches.
    #[serde(default = "workers")]
    pub workers: usize,
}

fn memory() -> String {
    "memory".into()
}
fn fetch_timeout() -> u64 {
    60
}
fn workers() -> usize {
    4
}

pub struct StoreSource {
    rt: tokio::runtime::Runtime,
    store: Store,
    reader: ImageReader,
    timeout: Duration,
    snapshot: String,
}

impl StoreSource {
    /// Reads the config, opens the store and the image (its manifest: L1, else S3).
    pub fn open(path: &Path) -> Result<(StoreSource, StoreSourceConfig), String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("read store source {}: {e}", path.display()))?;
        let cfg: StoreSourceConfig =
            serde_json::from_str(&text).map_err(|e| format!("store source {}: {e}", path.display()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("store")
            .enable_all()
            .build()
            .map_err(|e| format!("store runtime: {e}"))?;
        let store = cfg.store.open().map_err(|e| flint_snapshot_store::error_chain(&e))?;
        let reader =
            rt.block_on(store.reader(&cfg.snapshot, &cfg.image)).map_err(|e| flint_snapshot_store::error_chain(&e))?;
        let src = StoreSource {
            rt,
            store,
            reader,
            timeout: Duration::from_secs(cfg.fetch_timeout_s.max(1)),
            snapshot: cfg.snapshot.clone(),
        };
        Ok((src, cfg))
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
        let fetched =
            self.rt.block_on(async { tokio::time::timeout(self.timeout, self.reader.chunk(index as usize)).await });
        match fetched {
            Err(_) => Err(std::io::Error::other(format!(
                "chunk {index} of snapshot `{}` did not arrive within {:?}",
                self.snapshot, self.timeout
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
    fn stats(&self) -> serde_json::Value {
        let s = self.store.stats();
        serde_json::json!({
            "snapshot": self.snapshot,
            "chunk_bytes": self.reader.chunk_size(),
            "chunks_read": self.reader.chunks_read.load(std::sync::atomic::Ordering::Relaxed),
            "l1_hits": s.l1_hits,
            "l1_misses": s.l1_misses,
            "remote_fetches": s.remote_fetches,
            "remote_bytes": s.remote_bytes,
            "corrupt": s.corrupt,
        })
    }
}
