//! The L1 cache: pins, the scan of snapshots that exist only here, eviction under the byte budget.
use super::*;

impl Store {
    /// Pins chunk keys so eviction skips them.
    pub(super) fn pin_keys(&self, keys: Vec<String>) -> PinGuard {
        let mut pins = lock(&self.inner.pins);
        for k in &keys {
            *pins.entry(k.clone()).or_insert(0) += 1;
        }
        PinGuard { inner: self.inner.clone(), keys }
    }

    /// Keeps every chunk of `manifest` in L1 while the guard lives (running VMs restored from it).
    pub fn pin(&self, manifest: &Manifest) -> PinGuard {
        let keys = manifest.chunk_ids().map(|id| self.chunk_key(&id)).collect();
        self.pin_keys(keys)
    }

    /// Modification times of L1's `manifests/` and `published/` directories (a missing one reads
    /// as the epoch); `None` if they cannot be read.
    pub(super) fn manifest_dirs_stamp(&self) -> Option<(SystemTime, SystemTime)> {
        let mtime = |dir: &str| match std::fs::metadata(self.inner.l1.root().join(dir)) {
            Ok(m) => m.modified().ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(UNIX_EPOCH),
            Err(_) => None,
        };
        Some((mtime("manifests")?, mtime("published")?))
    }

    /// Chunk keys of local snapshots that exist nowhere else: unpublished ones, or all of them
    /// without a remote tier. Reading every manifest is reused until a manifest directory changes.
    pub(super) fn local_only_keys(&self) -> Arc<HashSet<String>> {
        let stamp = self.manifest_dirs_stamp();
        if let (Some(st), Some(scan)) = (stamp, lock(&self.inner.local_only).as_ref()) {
            if scan.stamp == st {
                return scan.keys.clone();
            }
        }
        self.inner.counters.manifest_scans.fetch_add(1, Ordering::Relaxed);
        let mut keys = HashSet::new();
        if let Ok(local) = self.inner.l1.list_blocking("manifests") {
            for o in local {
                let id = o.key.trim_start_matches("manifests/");
                let published =
                    matches!(self.inner.l1.get_blocking(&published_key(id), MAX_MARKER_OBJECT), Ok(Some(_)));
                if published && self.has_remote() {
                    continue;
                }
                if let Ok(Some(bytes)) = self.inner.l1.get_blocking(&o.key, MAX_MANIFEST_OBJECT) {
                    if let Ok(m) = self.decode_manifest(id, "local", &bytes) {
                        keys.extend(m.chunk_ids().map(|c| self.chunk_key(&c)));
                    }
                }
            }
        }
        let keys = Arc::new(keys);
        let settled = |t: SystemTime| SystemTime::now().duration_since(t).is_ok_and(|age| age >= SCAN_SETTLE);
        *lock(&self.inner.local_only) = match stamp {
            Some(st) if settled(st.0) && settled(st.1) => Some(LocalOnlyScan { stamp: st, keys: keys.clone() }),
            _ => None,
        };
        keys
    }

    /// The chunks L1 must keep right now.
    pub(super) fn protected(&self) -> Protected {
        let local_only = self.local_only_keys();
        Protected { pinned: lock(&self.inner.pins).keys().cloned().collect(), local_only }
    }

    /// Evicts least recently used chunks until L1 is within budget.
    pub(super) fn evict(&self) {
        if lock(&self.inner.index).bytes <= self.inner.cfg.local_budget {
            return;
        }
        let protected = self.protected();
        let mut index = lock(&self.inner.index);
        let candidates: Vec<String> = index.order.values().cloned().collect();
        for key in candidates {
            if index.bytes <= self.inner.cfg.local_budget {
                break;
            }
            if protected.contains(&key) {
                continue;
            }
            if self.inner.l1.delete_blocking(&key).is_ok() {
                if let Some(size) = index.remove(&key) {
                    self.inner.counters.evicted_chunks.fetch_add(1, Ordering::Relaxed);
                    self.inner.counters.evicted_bytes.fetch_add(size, Ordering::Relaxed);
                }
            }
        }
        if index.bytes > self.inner.cfg.local_budget {
            warn!(
                bytes = index.bytes,
                budget = self.inner.cfg.local_budget,
                "local snapshot cache over budget: the rest is pinned or not yet published"
            );
        }
    }

    pub(super) fn l1_put(&self, key: &str, stored: &[u8]) -> Result<(), StoreError> {
        self.inner.l1.put_blocking(key, stored)?;
        lock(&self.inner.index).insert(key, stored.len() as u64);
        Ok(())
    }

    pub(super) fn l1_remove(&self, key: &str) {
        let _ = self.inner.l1.delete_blocking(key);
        lock(&self.inner.index).remove(key);
    }

    /// Re-reads the L1 directory into the cache index (chunks written by other processes, e.g. a VMM serving a
    /// lazy restore from the same cache).
    pub fn rescan(&self) -> Result<(), StoreError> {
        let listed = self.inner.l1.list_blocking("chunks")?;
        let mut index = lock(&self.inner.index);
        for o in listed {
            if !index.entries.contains_key(&o.key) {
                index.insert(&o.key, o.size);
            }
        }
        drop(index);
        self.evict();
        Ok(())
    }

    /// Drops every chunk from L1 that exists elsewhere too (keeps manifests, pinned chunks and
    /// the chunks of snapshots that are only here): models a fresh host, or frees a disk.
    pub fn clear_local_chunks(&self) -> Result<u64, StoreError> {
        let protected = self.protected();
        let mut index = lock(&self.inner.index);
        let keys: Vec<String> = index.entries.keys().cloned().collect();
        let mut n = 0;
        for key in keys {
            if protected.contains(&key) {
                continue;
            }
            self.inner.l1.delete_blocking(&key)?;
            index.remove(&key);
            n += 1;
        }
        Ok(n)
    }
}
