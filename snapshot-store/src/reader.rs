//! Random access to one image of a snapshot, fetching only the chunks a read touches (lazy restore).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::manifest::Image;
use crate::store::{ReadCounters, Store, StoreError};

/// Reads ranges of an image; safe to share between threads.
pub struct ImageReader {
    store: Store,
    image: Arc<Image>,
    /// Chunks this reader asked the store for, in first-touch order: the working set of a restore.
    touched: std::sync::Mutex<(Vec<u32>, Vec<bool>)>,
    pub chunks_read: AtomicU64,
    /// What this reader's chunks cost: L1 hits and misses, fetches and bytes from the remote tiers.
    pub counters: ReadCounters,
}

impl ImageReader {
    pub(crate) fn new(store: Store, image: Arc<Image>) -> ImageReader {
        let n = image.chunks.len();
        ImageReader {
            store,
            image,
            touched: std::sync::Mutex::new((Vec::new(), vec![false; n])),
            chunks_read: AtomicU64::new(0),
            counters: ReadCounters::default(),
        }
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    pub fn size(&self) -> u64 {
        self.image.size
    }

    pub fn chunk_size(&self) -> u64 {
        self.image.chunk_size as u64
    }

    fn record(&self, index: usize) {
        let mut t = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        if !t.1[index] {
            t.1[index] = true;
            t.0.push(index as u32);
        }
    }

    /// Chunk indices touched so far, in first-touch order.
    pub fn touched(&self) -> Vec<u32> {
        self.touched.lock().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    /// The plaintext of chunk `index`, or `None` for an all-zero chunk.
    pub async fn chunk(&self, index: usize) -> Result<Option<Vec<u8>>, StoreError> {
        let entry = *self.image.chunks.get(index).ok_or_else(|| {
            StoreError::InvalidInput(format!("chunk {index} is past the end of image `{}`", self.image.name))
        })?;
        self.record(index);
        let Some(c) = entry else { return Ok(None) };
        self.chunks_read.fetch_add(1, Ordering::Relaxed);
        let plain = self.store.chunk_counted(&c.id, Some(&self.counters)).await?;
        if plain.len() != self.image.chunk_len(index) {
            return Err(StoreError::InvalidInput(format!(
                "chunk {index} of image `{}` is {} bytes, expected {}",
                self.image.name,
                plain.len(),
                self.image.chunk_len(index)
            )));
        }
        Ok(Some(plain))
    }

    /// Fills `buf` from `offset`; zero chunks read as zeros.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let end = offset.checked_add(buf.len() as u64).filter(|e| *e <= self.image.size).ok_or_else(|| {
            StoreError::InvalidInput(format!(
                "read of {} bytes at {offset} is past the end of image `{}` ({} bytes)",
                buf.len(),
                self.image.name,
                self.image.size
            ))
        })?;
        let cs = self.chunk_size();
        let mut pos = offset;
        while pos < end {
            let index = (pos / cs) as usize;
            let within = (pos % cs) as usize;
            let take = ((cs - within as u64).min(end - pos)) as usize;
            let dst = &mut buf[(pos - offset) as usize..(pos - offset) as usize + take];
            match self.chunk(index).await? {
                Some(plain) => dst.copy_from_slice(&plain[within..within + take]),
                None => dst.fill(0),
            }
            pos += take as u64;
        }
        Ok(())
    }

    /// Brings the given chunks into L1 in parallel (working-set prefetch). Does not record them as touched.
    pub async fn prefetch(&self, indices: &[u32]) -> Result<u64, StoreError> {
        let ids: Vec<_> = indices
            .iter()
            .filter_map(|i| self.image.chunks.get(*i as usize).copied().flatten())
            .map(|c| c.id)
            .collect();
        let n = ids.len() as u64;
        futures::stream::iter(ids)
            .map(|id| {
                let store = self.store.clone();
                async move { store.chunk(&id).await.map(|_| ()) }
            })
            .buffer_unordered(self.store.config().parallelism.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(n)
    }
}
