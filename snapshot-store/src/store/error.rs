//! What can go wrong in the store.
use std::time::Duration;

use crate::chunk::DecodeError;
use crate::tier::TierError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    InvalidInput(String),
    #[error("snapshot `{id}` not found ({looked_in})")]
    NotFound { id: String, looked_in: String },
    #[error("snapshot `{id}` has no image `{name}`")]
    NoImage { id: String, name: String },
    #[error("chunk {key} from {tier} is corrupt")]
    Corrupt {
        key: String,
        tier: String,
        #[source]
        source: DecodeError,
    },
    #[error("chunk {key} is missing from every tier ({looked_in})")]
    ChunkMissing { key: String, looked_in: String },
    #[error("storage tier unavailable")]
    Unavailable(#[source] TierError),
    #[error("manifest of `{id}` from {tier} is invalid: {detail}")]
    BadManifest { id: String, tier: String, detail: String },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot `{id}` already exists in {tier}{detail}")]
    Exists { id: String, tier: String, detail: String },
    #[error("the store is busy: {0}")]
    Busy(String),
    #[error("no remote tier is configured (set [store.s3] / FLINT_S3_BUCKET)")]
    NoRemote,
    #[error("publishing `{id}` took longer than half the GC grace period ({grace:?}); retry it")]
    PublishTooSlow { id: String, grace: Duration },
}

impl From<crate::manifest::BadName> for StoreError {
    fn from(e: crate::manifest::BadName) -> Self {
        StoreError::InvalidInput(e.to_string())
    }
}

impl From<TierError> for StoreError {
    fn from(e: TierError) -> Self {
        StoreError::Unavailable(e)
    }
}

pub(super) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}
