//! Small mutable objects in the remote tier, changed only by compare-and-swap (S3 conditional writes: `If-Match`
//! on the version read, `If-None-Match: *` to create). Hosts sharing a bucket agree through them (who runs a
//! session, see flintd's sessions); there is no other protocol between hosts.
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::*;
use crate::tier::TierError;

/// Most bytes of a coordination object.
pub const MAX_COORD_OBJECT: u64 = 1 << 20;

/// An object's value and the version a conditional write must name to replace it.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    pub version: String,
}

fn coord_key(kind: &str, name: &str) -> Result<String, StoreError> {
    check_name("coordination object kind", kind)?;
    check_name("coordination object name", name)?;
    Ok(format!("coord/{kind}/{name}"))
}

impl Store {
    fn coord_tier(&self) -> Result<&Arc<dyn Tier>, StoreError> {
        self.inner.remotes.first().ok_or(StoreError::NoRemote)
    }

    /// Reads `coord/<kind>/<name>` from the first remote tier. With a store secret the object is sealed: one
    /// written by anyone without the secret is refused.
    pub async fn coord_get<T: DeserializeOwned>(
        &self,
        kind: &str,
        name: &str,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        let key = coord_key(kind, name)?;
        let tier = self.coord_tier()?;
        let Some((bytes, version)) = tier.get_versioned(&key, MAX_COORD_OBJECT).await? else { return Ok(None) };
        let bad = |detail: String| StoreError::InvalidInput(format!("{key} in {}: {detail}", tier.name()));
        let json = chunk::open_manifest(&bytes, self.inner.cfg.secret.as_ref()).map_err(|e| bad(e.to_string()))?;
        let value = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
        Ok(Some(Versioned { value, version }))
    }

    /// Writes `coord/<kind>/<name>` if it is still at `version` (`None`: if it does not exist). `Ok(None)` when
    /// another writer changed it first: nothing was written; read it again.
    pub async fn coord_put<T: Serialize>(
        &self,
        kind: &str,
        name: &str,
        value: &T,
        version: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        let key = coord_key(kind, name)?;
        let json = serde_json::to_vec(value).map_err(|e| StoreError::InvalidInput(e.to_string()))?;
        let body = match &self.inner.cfg.secret {
            None => json,
            Some(s) => chunk::seal_manifest(&json, s),
        };
        Ok(self.coord_tier()?.put_if(&key, Bytes::from(body), version).await?)
    }

    /// Deletes `coord/<kind>/<name>` (unconditionally: S3 has no conditional delete everywhere; callers delete
    /// only what they hold).
    pub async fn coord_delete(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        let key = coord_key(kind, name)?;
        Ok(self.coord_tier()?.delete(&key).await?)
    }

    /// Checks that the bucket honours conditional writes; some S3-compatible servers accept the headers and
    /// ignore them, which would let two hosts both "win". A probe object is created twice with
    /// `If-None-Match: *` (the second must fail), replaced with a wrong `If-Match` (must fail) and with the right
    /// one (must succeed), then deleted.
    pub async fn probe_conditional_writes(&self, host: &str) -> Result<(), String> {
        let tier = self.coord_tier().map_err(|e| e.to_string())?;
        let mut r = [0u8; 6];
        let _ = getrandom::getrandom(&mut r);
        let name = format!("probe-{host}-{}", r.iter().map(|b| format!("{b:02x}")).collect::<String>());
        let key = coord_key("probe", &name).map_err(|e| e.to_string())?;
        let outcome = async {
            let what = |step: &str, e: TierError| format!("{} ({step}): {e}", tier.name());
            let v1 = tier
                .put_if(&key, Bytes::from_static(b"1"), None)
                .await
                .map_err(|e| what("create", e))?
                .ok_or_else(|| format!("{}: a create of a fresh probe key failed", tier.name()))?;
            if tier.put_if(&key, Bytes::from_static(b"2"), None).await.map_err(|e| what("second create", e))?.is_some()
            {
                return Err(format!("{} ignores If-None-Match: a second create of one key succeeded", tier.name()));
            }
            let wrong = "\"0000000000000000\"";
            if tier
                .put_if(&key, Bytes::from_static(b"3"), Some(wrong))
                .await
                .map_err(|e| what("wrong If-Match", e))?
                .is_some()
            {
                return Err(format!("{} ignores If-Match: a write naming a wrong version succeeded", tier.name()));
            }
            if tier.put_if(&key, Bytes::from_static(b"4"), Some(&v1)).await.map_err(|e| what("If-Match", e))?.is_none()
            {
                return Err(format!("{} refused a write naming the current version", tier.name()));
            }
            Ok(())
        }
        .await;
        let _ = tier.delete(&key).await;
        outcome
    }
}
