//! Publishing a local snapshot to the remote tiers, and pulling one down.
use super::*;

impl Store {
    /// Whether the first remote tier honours conditional writes (`probe_conditional_writes`, once; `true` while
    /// it cannot be reached, when the publish fails anyway).
    pub async fn conditional_writes(&self) -> bool {
        if let Some(v) = self.inner.conditional.get() {
            return *v;
        }
        match self.probe_conditional_writes("publish").await {
            Ok(()) => *self.inner.conditional.get_or_init(|| async { true }).await,
            Err(e) if e.contains("ignores") => {
                warn!(error = %e, "the bucket ignores conditional writes: manifests are checked before they are put");
                *self.inner.conditional.get_or_init(|| async { false }).await
            }
            Err(_) => true,
        }
    }

    /// Uploads a locally stored snapshot to every remote tier: missing chunks first, the manifest last.
    pub async fn publish(&self, id: &str) -> Result<PublishReport, StoreError> {
        if self.inner.remotes.is_empty() {
            return Err(StoreError::NoRemote);
        }
        let started = Instant::now();
        let manifest = self.manifest(id).await?;
        let _pin = self.pin(&manifest);
        let ids: Vec<ChunkId> = manifest.chunk_ids().collect();
        let sizes: HashMap<ChunkId, u32> =
            manifest.images.iter().flat_map(|i| i.chunks.iter().flatten()).map(|c| (c.id, c.stored)).collect();
        let sizes = &sizes;
        let mut report = PublishReport { chunks: ids.len() as u64, ..Default::default() };
        let refresh_after_ms = self.inner.cfg.gc_grace.as_millis() as u64 / 2;
        for tier in &self.inner.remotes {
            let outcomes: Vec<Option<u64>> = futures::stream::iter(ids.iter().copied())
                .map(|cid| {
                    let tier = tier.clone();
                    let this = self.clone();
                    async move {
                        let key = this.chunk_key(&cid);
                        if let Some(info) = tier.head(&key).await? {
                            // A stored object of the wrong size (a torn write on a non-atomic server) is re-sent.
                            let size_ok = sizes.get(&cid).is_none_or(|s| *s as u64 == info.size);
                            if size_ok && now_unix_ms().saturating_sub(info.modified_unix_ms) < refresh_after_ms {
                                return Ok(None);
                            }
                        }
                        let stored = match this.inner.l1.get_blocking(&key, chunk::MAX_CHUNK_OBJECT)? {
                            Some(b) => Bytes::from(b),
                            None => {
                                // Evicted from L1 (it was published before): bring it back through the tiers.
                                this.chunk(&cid).await?;
                                Bytes::from(this.inner.l1.get_blocking(&key, chunk::MAX_CHUNK_OBJECT)?.ok_or_else(
                                    || StoreError::ChunkMissing { key: key.clone(), looked_in: this.looked_in() },
                                )?)
                            }
                        };
                        let len = stored.len() as u64;
                        tier.put(&key, stored).await?;
                        Ok::<_, StoreError>(Some(len))
                    }
                })
                .buffer_unordered(self.inner.cfg.parallelism.max(1))
                .try_collect()
                .await?;
            for o in outcomes {
                match o {
                    Some(len) => {
                        report.uploaded_chunks += 1;
                        report.uploaded_bytes += len;
                    }
                    None => report.already_present += 1,
                }
            }
            if started.elapsed() > self.inner.cfg.gc_grace / 2 {
                return Err(StoreError::PublishTooSlow { id: id.to_string(), grace: self.inner.cfg.gc_grace });
            }
            // Create-only: a manifest of the same id from another host is never replaced (GC would then delete
            // the chunks only it referenced). Our own earlier upload (a retried push) is the same manifest. On a
            // bucket that ignores If-None-Match (the probe says so), a look first: no blind overwrite.
            let created = if self.conditional_writes().await || tier.head(&manifest_key(id)).await?.is_none() {
                tier.put_new(&manifest_key(id), self.encode_manifest(&manifest)).await?
            } else {
                false
            };
            if !created {
                let theirs = tier.get(&manifest_key(id), MAX_MANIFEST_OBJECT).await?;
                let same = theirs.map(|b| self.decode_manifest(id, tier.name(), &b)).transpose()?;
                if same.as_ref() != Some(&manifest) {
                    return Err(StoreError::Exists {
                        id: id.to_string(),
                        tier: tier.name().to_string(),
                        detail: " with other content (another host published that id); this snapshot stays local"
                            .into(),
                    });
                }
            }
        }
        let c = &self.inner.counters;
        c.uploaded_chunks.fetch_add(report.uploaded_chunks, Ordering::Relaxed);
        c.uploaded_bytes.fetch_add(report.uploaded_bytes, Ordering::Relaxed);
        c.upload_skipped.fetch_add(report.already_present, Ordering::Relaxed);
        self.inner.l1.put_blocking(&published_key(id), b"")?;
        report.seconds = started.elapsed().as_secs_f64();
        info!(id, uploaded = report.uploaded_bytes, chunks = report.uploaded_chunks, "snapshot published");
        Ok(report)
    }

    /// Makes every chunk of a snapshot local (eager restore, or preparing to run without the network).
    pub async fn pull(&self, id: &str) -> Result<FetchReport, StoreError> {
        let started = Instant::now();
        let manifest = self.manifest(id).await?;
        let before = self.stats();
        let ids: Vec<ChunkId> = manifest.chunk_ids().collect();
        futures::stream::iter(ids.clone())
            .map(|cid| {
                let this = self.clone();
                async move { this.chunk(&cid).await.map(|_| ()) }
            })
            .buffer_unordered(self.inner.cfg.parallelism.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        let after = self.stats();
        Ok(FetchReport {
            bytes_written: 0,
            chunks: ids.len() as u64,
            fetched_chunks: after.remote_fetches - before.remote_fetches,
            fetched_bytes: after.remote_bytes - before.remote_bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
