//! Bodies of the fuzz targets that reach the store (fuzz/fuzz_targets/): what a bucket can serve. Replayed from
//! the committed corpora in `cargo test` (flint-tests).
use crate::chunk::{self, ChunkId, Secret};
use crate::manifest::Manifest;

/// A manifest object: opened (plain or sealed, with and without a secret), parsed, validated.
pub fn manifest(data: &[u8]) {
    let secret = Secret([9; 32]);
    for s in [None, Some(&secret)] {
        if let Ok(json) = chunk::open_manifest(data, s) {
            if let Ok(m) = serde_json::from_slice::<Manifest>(&json) {
                let _ = m.validate();
            }
        }
    }
}

/// A chunk object: header, decompression (bounded by the header's length), unsealing, hash check.
pub fn chunk(data: &[u8]) {
    let id = ChunkId::of(data.get(..16).unwrap_or(data));
    let secret = Secret([9; 32]);
    let _ = chunk::decode(data, &id, None);
    let _ = chunk::decode(data, &id, Some(&secret));
}
