//! Bodies of the fuzz targets that reach the store (fuzz/fuzz_targets/): what a bucket can serve. Replayed from
//! the committed corpora in `cargo test`.
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

/// Every input committed for `target` under fuzz/corpus/.
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut out: Vec<_> =
        std::fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|e| std::fs::read(e.path()).ok()).collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn fuzz_corpora_replay() {
        for (name, body) in [("manifest", super::manifest as fn(&[u8])), ("chunk", super::chunk)] {
            let inputs = super::corpus(name);
            assert!(!inputs.is_empty(), "no corpus committed for {name}");
            inputs.iter().for_each(|d| body(d));
        }
    }
}
