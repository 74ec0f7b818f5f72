//! Garbage collection of unreferenced chunks, and verification of a snapshot's chunks.
use super::*;

impl Store {
    /// Deletes chunks no manifest references: in L1 (unpinned ones) and, with `remote`, in the remote tiers
    /// (only those older than the GC grace period, so a publish in flight never loses a chunk).
    pub async fn gc(&self, remote: bool) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        // No put (of this or another process) is between its first chunk and its manifest while this is held.
        let lease = self.lease(true, lease::LEASE_WAIT).await?;
        let mut referenced = HashSet::new();
        let local_manifests = self.inner.l1.list_blocking("manifests")?;
        for o in &local_manifests {
            let id = o.key.trim_start_matches("manifests/");
            if let Some(bytes) = self.inner.l1.get_blocking(&o.key, MAX_MANIFEST_OBJECT)? {
                let m = self.decode_manifest(id, "local cache", &bytes)?;
                referenced.extend(m.chunk_ids().map(|c| self.chunk_key(&c)));
            }
        }
        report.manifests += local_manifests.len() as u64;
        let pinned: HashSet<String> = lock(&self.inner.pins).keys().cloned().collect();
        let local_chunks: Vec<(String, u64)> =
            lock(&self.inner.index).entries.iter().map(|(k, v)| (k.clone(), v.0)).collect();
        for (key, size) in local_chunks {
            report.chunks_seen += 1;
            if !referenced.contains(&key) && !pinned.contains(&key) {
                self.l1_remove(&key);
                report.deleted_chunks += 1;
                report.deleted_bytes += size;
            }
        }
        drop(lease);
        if !remote {
            return Ok(report);
        }
        let grace_ms = self.inner.cfg.gc_grace.as_millis() as u64;
        for tier in &self.inner.remotes {
            // Chunks are listed before manifests: a chunk uploaded after this listing is not a candidate, and a
            // manifest published after the manifest listing only reuses chunks younger than the grace period.
            let chunks = tier.list("chunks").await?;
            let mut referenced = HashSet::new();
            let manifests = tier.list("manifests").await?;
            for o in &manifests {
                let id = o.key.trim_start_matches("manifests/");
                let Some(bytes) = tier.get(&o.key, MAX_MANIFEST_OBJECT).await? else { continue };
                let m = self.decode_manifest(id, tier.name(), &bytes)?;
                referenced.extend(m.chunk_ids().map(|c| self.chunk_key(&c)));
            }
            report.manifests += manifests.len() as u64;
            let now = now_unix_ms();
            for o in chunks {
                report.chunks_seen += 1;
                if referenced.contains(&o.key) {
                    continue;
                }
                if now.saturating_sub(o.modified_unix_ms) <= grace_ms {
                    report.kept_young += 1;
                    continue;
                }
                debug!(key = %o.key, "gc: deleting unreferenced chunk");
                tier.delete(&o.key).await?;
                report.deleted_chunks += 1;
                report.deleted_bytes += o.size;
            }
        }
        Ok(report)
    }

    /// Reads every chunk of a snapshot from one tier (`local` or a remote's name; default: the first remote) and
    /// checks it against its hash, without filling L1.
    pub async fn verify(&self, id: &str, local: bool) -> Result<VerifyReport, StoreError> {
        let manifest = self.manifest(id).await?;
        let tier: Option<Arc<dyn Tier>> = if local { None } else { self.inner.remotes.first().cloned() };
        if !local && tier.is_none() {
            return Err(StoreError::NoRemote);
        }
        let tier_name = tier.as_ref().map(|t| t.name().to_string()).unwrap_or_else(|| "local cache".into());
        let ids: Vec<ChunkId> = manifest.chunk_ids().collect();
        let problems: Vec<Option<String>> = futures::stream::iter(ids.iter().copied())
            .map(|cid| {
                let tier = tier.clone();
                let this = self.clone();
                async move {
                    let key = this.chunk_key(&cid);
                    let stored = match &tier {
                        Some(t) => t.get(&key, chunk::MAX_CHUNK_OBJECT).await?.map(|b| b.to_vec()),
                        None => this.inner.l1.get_blocking(&key, chunk::MAX_CHUNK_OBJECT)?,
                    };
                    let Some(stored) = stored else { return Ok::<_, StoreError>(Some(format!("{key}: missing"))) };
                    Ok(chunk::decode(&stored, &cid, this.inner.cfg.secret.as_ref())
                        .err()
                        .map(|e| format!("{key}: {e}")))
                }
            })
            .buffer_unordered(self.inner.cfg.parallelism.max(1))
            .try_collect()
            .await?;
        let problems: Vec<String> = problems.into_iter().flatten().collect();
        Ok(VerifyReport {
            tier: tier_name,
            chunks: ids.len() as u64,
            ok: ids.len() as u64 - problems.len() as u64,
            problems,
        })
    }
}
