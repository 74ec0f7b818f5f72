//! Working sets: the chunks a restore touched first, recorded to prefetch them next time.
use super::*;

impl Store {
    /// Records which chunks of `image` a restore of snapshot `id` touched, in first-touch order (the working set
    /// that later restores prefetch). Stored next to the manifest in L1 and, best effort, in the remote tiers.
    pub async fn put_working_set(&self, id: &str, image: &str, chunks: &[u32]) -> Result<(), StoreError> {
        let manifest = self.manifest(id).await?;
        let n = manifest
            .image(image)
            .ok_or_else(|| StoreError::NoImage { id: id.to_string(), name: image.to_string() })?
            .chunks
            .len();
        if let Some(bad) = chunks.iter().find(|c| **c as usize >= n) {
            return Err(StoreError::InvalidInput(format!(
                "working set chunk {bad} is past the {n} chunks of `{image}`"
            )));
        }
        let body = Bytes::from(
            serde_json::to_vec(&WorkingSet { image: image.to_string(), chunks: chunks.to_vec() }).unwrap_or_default(),
        );
        self.inner.l1.put_blocking(&working_set_key(id), &body)?;
        for tier in &self.inner.remotes {
            if let Err(e) = tier.put(&working_set_key(id), body.clone()).await {
                warn!(id, error = %e, "could not store the working set remotely");
            }
        }
        Ok(())
    }

    /// The recorded working set of a snapshot, if any (L1, then the remote tiers).
    pub async fn working_set(&self, id: &str) -> Result<Option<WorkingSet>, StoreError> {
        check_name("snapshot id", id)?;
        let mut bytes = self.inner.l1.get_blocking(&working_set_key(id), MAX_WORKING_SET_OBJECT)?.map(Bytes::from);
        if bytes.is_none() {
            for tier in &self.inner.remotes {
                if let Some(b) = tier.get(&working_set_key(id), MAX_WORKING_SET_OBJECT).await? {
                    self.inner.l1.put_blocking(&working_set_key(id), &b)?;
                    bytes = Some(b);
                    break;
                }
            }
        }
        match bytes {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| StoreError::BadManifest {
                id: id.to_string(),
                tier: "working set".into(),
                detail: e.to_string(),
            }),
        }
    }
}
