//! The snapshot manifest: the one object that makes a snapshot exist.
//!
//! A manifest lists every image of a snapshot (state blob, memory image, disks, the recorded working set) as a
//! sequence of fixed-size chunks; a `null` entry is an all-zero chunk, which is never stored. It is written after
//! every chunk it names, in every tier, so a snapshot whose upload was interrupted has no manifest and is invisible.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;

/// Bumped when a reader of the previous format could misread a new manifest.
pub const MANIFEST_FORMAT: u32 = 1;
/// Manifests larger than this are refused (a 64 GiB image at 256 KiB chunks is ~20 MiB of JSON).
pub const MAX_MANIFEST_BYTES: usize = 64 << 20;
/// Most bytes a manifest object may take in a tier (sealing adds a nonce and a tag).
pub const MAX_MANIFEST_OBJECT: u64 = MAX_MANIFEST_BYTES as u64 + 64;
/// Most bytes of a working-set object (4 bytes per chunk index of a large guest, and JSON around them).
pub const MAX_WORKING_SET_OBJECT: u64 = 16 << 20;
/// Most bytes of a publish marker.
pub const MAX_MARKER_OBJECT: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    /// The snapshot this one was derived from (a diff snapshot's base, or the template a clone came from).
    #[serde(default)]
    pub parent: Option<String>,
    pub created_unix_ms: u64,
    /// The VMM's state-file format version, so a host never restores state it cannot read.
    #[serde(default)]
    pub vmm_format: Option<u32>,
    /// CPU/host profile the snapshot was taken on (restores must match it).
    #[serde(default)]
    pub cpu_profile: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub images: Vec<Image>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// `state`, `memory`, `disk.<name>`, `workingset`, ...
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    /// One entry per chunk; `None` is an all-zero chunk.
    pub chunks: Vec<Option<ChunkRef>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    pub id: ChunkId,
    /// Bytes of the stored (compressed, maybe sealed) object.
    pub stored: u32,
}

impl Manifest {
    pub fn image(&self, name: &str) -> Option<&Image> {
        self.images.iter().find(|i| i.name == name)
    }

    /// Every distinct chunk the snapshot references.
    pub fn chunk_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        let mut seen = std::collections::HashSet::new();
        self.images.iter().flat_map(|i| i.chunks.iter().flatten()).map(|c| c.id).filter(move |id| seen.insert(*id))
    }

    /// Sum of the image sizes (logical bytes).
    pub fn logical_bytes(&self) -> u64 {
        self.images.iter().map(|i| i.size).sum()
    }

    /// Sum of the distinct stored chunk sizes.
    pub fn stored_bytes(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.images
            .iter()
            .flat_map(|i| i.chunks.iter().flatten())
            .filter(|c| seen.insert(c.id))
            .map(|c| c.stored as u64)
            .sum()
    }

    /// Checks the invariants a reader relies on; run on every manifest read from a tier.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "manifest format {} is not supported (this build reads format {MANIFEST_FORMAT})",
                self.format
            ));
        }
        check_name("snapshot id", &self.id).map_err(|e| e.to_string())?;
        let mut names = std::collections::HashSet::new();
        for image in &self.images {
            check_name("image name", &image.name).map_err(|e| e.to_string())?;
            if !names.insert(&image.name) {
                return Err(format!("image `{}` is listed twice", image.name));
            }
            if image.chunk_size == 0 || image.chunk_size as usize > crate::chunk::MAX_CHUNK_SIZE {
                return Err(format!("image `{}` has an invalid chunk size {}", image.name, image.chunk_size));
            }
            let want = image.size.div_ceil(image.chunk_size as u64);
            if image.chunks.len() as u64 != want {
                return Err(format!(
                    "image `{}` of {} bytes needs {want} chunks, the manifest lists {}",
                    image.name,
                    image.size,
                    image.chunks.len()
                ));
            }
        }
        Ok(())
    }
}

impl Image {
    /// Length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: usize) -> usize {
        let start = index as u64 * self.chunk_size as u64;
        (self.size - start).min(self.chunk_size as u64) as usize
    }
}

/// Snapshot ids and image names: 1-128 of `[A-Za-z0-9._-]`, not starting with `.` (they become object keys and
/// file names, so nothing can climb out of the store's directory).
pub fn check_name(what: &str, name: &str) -> Result<(), BadName> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BadName { what: what.to_string(), name: name.to_string() })
    }
}

/// A name [`check_name`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} `{name}` is invalid: use 1-128 of A-Z a-z 0-9 . _ - and do not start with `.`")]
pub struct BadName {
    pub what: String,
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let c = ChunkRef { id: ChunkId::of(b"a"), stored: 10 };
        Manifest {
            format: MANIFEST_FORMAT,
            id: "snap-1".into(),
            parent: None,
            created_unix_ms: 1,
            vmm_format: Some(1),
            cpu_profile: None,
            metadata: BTreeMap::new(),
            images: vec![Image {
                name: "memory".into(),
                size: 10,
                chunk_size: 4,
                chunks: vec![Some(c), None, Some(c)],
            }],
        }
    }

    #[test]
    fn valid_manifest_round_trips() {
        let m = manifest();
        m.validate().unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
        assert_eq!(m.chunk_ids().count(), 1);
        assert_eq!(m.stored_bytes(), 10);
        assert_eq!(m.images[0].chunk_len(2), 2);
    }

    #[test]
    fn invalid_manifests_are_refused() {
        let mut m = manifest();
        m.images[0].chunks.pop();
        assert!(m.validate().unwrap_err().contains("needs 3 chunks"));
        let mut m = manifest();
        m.format = 99;
        assert!(m.validate().unwrap_err().contains("not supported"));
        let mut m = manifest();
        m.id = "../x".into();
        assert!(m.validate().is_err());
        assert!(check_name("id", ".hidden").is_err());
        assert!(check_name("id", "a/b").is_err());
        assert!(check_name("id", "ok-1.2_3").is_ok());
    }
}
