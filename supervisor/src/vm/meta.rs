//! What flintd records about a snapshot next to its images: one versioned type, [`SnapshotMeta`], stored as JSON
//! under one manifest metadata key (`flint`). It is written when a snapshot is taken and read at every restore,
//! by the test fixtures, and by other hosts at a cross-host wake, so it is versioned like the VMM's state file:
//!
//! - a field added later has a serde default, so a newer flintd reads what an older one wrote;
//! - a manifest an older flintd wrote before this type existed (its 13 string keys: `mem_mib`, `drives`,
//!   `drives_read_only`, ...) is read through [`SnapshotMeta::from_legacy`] (`tests::a_manifest_of_0eb4d43_reads`);
//! - a version newer than [`META_VERSION`] is refused with a message that names both (it may hold something
//!   this flintd would drop silently).
//!
//! No other module reads or writes manifest metadata keys.
use std::collections::BTreeMap;

use flint_vmm_api::config::RateLimiterConfig;
use serde::{Deserialize, Serialize};

use super::model::{OwnerTag, VolumeMount, MAX_DRIVES};

/// The manifest metadata key holding [`SnapshotMeta`].
pub const META_KEY: &str = "flint";
/// The version this flintd writes; it reads this one and every older one.
pub const META_VERSION: u32 = 1;

/// One drive of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DriveMeta {
    pub read_only: bool,
    /// A disk-rooted image's root (`name@sha256`): named by the snapshot, not stored in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The drive's I/O limits (the VMM's state has them too; recorded so clones' records show them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub version: u32,
    /// The VM the snapshot was taken of.
    #[serde(default)]
    pub vm: Option<String>,
    /// The image it booted from.
    #[serde(default)]
    pub image: Option<String>,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// Every drive, in order (`drive<i>` images hold the ones without an `image`).
    #[serde(default)]
    pub drives: Vec<DriveMeta>,
    /// A disk-rooted image's VM: its writable disk's size, MiB.
    #[serde(default)]
    pub disk_mib: Option<u64>,
    /// The drive index of its mount slot and what was mounted through it.
    #[serde(default)]
    pub mount_slot: Option<usize>,
    #[serde(default)]
    pub mounts: Vec<VolumeMount>,
    /// The memory image is stored whole, layered on its base; the state file says "diff" (the VMM restores it as
    /// merged memory).
    #[serde(default)]
    pub memory_layered: bool,
    /// Who the snapshot was made for (a session's hibernation), if anyone.
    #[serde(default)]
    pub owner: Option<OwnerTag>,
    /// The guest's CPU limit (fraction of a core) when the snapshot was taken; none: no limit.
    #[serde(default)]
    pub cpu: Option<f64>,
}

/// Why a snapshot's metadata cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error(
        "snapshot `{id}` was written by a newer flintd (its metadata is version {found}, this flintd reads up to \
         {META_VERSION}): restore it on a host running that version"
    )]
    Newer { id: String, found: u32 },
    #[error("snapshot `{id}`: its metadata is malformed: {why}")]
    Malformed { id: String, why: String },
    #[error(
        "snapshot `{id}` has {n} drive(s) but no usable record of them ({why}): it was made before flintd kept \
         drives in snapshots, and cannot be cloned"
    )]
    NoDriveRecord { id: String, n: usize, why: String },
}

impl crate::error::Classify for MetaError {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::Invalid
    }
}

impl SnapshotMeta {
    pub fn new(mem_mib: u64, vcpus: u8) -> SnapshotMeta {
        SnapshotMeta {
            version: META_VERSION,
            vm: None,
            image: None,
            mem_mib,
            vcpus,
            drives: Vec::new(),
            disk_mib: None,
            mount_slot: None,
            mounts: Vec::new(),
            memory_layered: false,
            owner: None,
            cpu: None,
        }
    }

    /// Writes this into a manifest's metadata (the one key).
    pub fn store(&self, metadata: &mut BTreeMap<String, String>) {
        // Serializing plain data with string keys cannot fail.
        let json = serde_json::to_string(self).unwrap_or_default();
        metadata.insert(META_KEY.into(), json);
    }

    /// The metadata of manifest `id`: the versioned record, else the keys an older flintd wrote.
    pub fn load(id: &str, metadata: &BTreeMap<String, String>) -> Result<SnapshotMeta, MetaError> {
        let Some(json) = metadata.get(META_KEY) else { return Self::from_legacy(id, metadata) };
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| MetaError::Malformed { id: id.into(), why: e.to_string() })?;
        let found = v.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        if found > META_VERSION {
            return Err(MetaError::Newer { id: id.into(), found });
        }
        let meta: SnapshotMeta =
            serde_json::from_value(v).map_err(|e| MetaError::Malformed { id: id.into(), why: e.to_string() })?;
        meta.check(id)?;
        Ok(meta)
    }

    fn check(&self, id: &str) -> Result<(), MetaError> {
        let bad = |why: String| MetaError::Malformed { id: id.into(), why };
        if self.drives.len() > MAX_DRIVES {
            return Err(bad(format!("{} drives, at most {MAX_DRIVES}", self.drives.len())));
        }
        for (i, d) in self.drives.iter().enumerate() {
            if let Some(r) = &d.image {
                if crate::image::parse_ref(r).is_none() || !d.read_only {
                    return Err(bad(format!("drive {i} names image `{r}`, which must be `name@sha256` and read-only")));
                }
            }
        }
        if self.mount_slot.is_some_and(|m| m >= self.drives.len()) {
            return Err(bad("its mount slot is not one of its drives".into()));
        }
        Ok(())
    }

    /// The keys a flintd before the versioned record wrote (0eb4d43 and earlier).
    pub fn from_legacy(id: &str, m: &BTreeMap<String, String>) -> Result<SnapshotMeta, MetaError> {
        let bad = |why: String| MetaError::Malformed { id: id.into(), why };
        let num = |k: &str| m.get(k).and_then(|v| v.parse::<u64>().ok());
        let n = match m.get("drives") {
            None => 0,
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= MAX_DRIVES)
                .ok_or_else(|| bad(format!("bad drive count `{n}`")))?,
        };
        let flags = crate::drives::parse_read_only_list(m.get("drives_read_only").map_or("", |s| s), n)
            .map_err(|why| MetaError::NoDriveRecord { id: id.into(), n, why })?;
        let images: Vec<Option<String>> = match m.get("drives_image") {
            None => vec![None; n],
            Some(j) => serde_json::from_str::<Vec<Option<String>>>(j)
                .ok()
                .filter(|v| v.len() == n)
                .ok_or_else(|| bad("bad `drives_image` record".into()))?,
        };
        // Informational (the VMM applies the limits from its state): an unreadable list shows no limits.
        let limits: Vec<Option<RateLimiterConfig>> =
            m.get("drives_rate_limiters").and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default();
        let drives = (0..n)
            .map(|i| DriveMeta {
                read_only: flags[i],
                image: images[i].clone(),
                rate_limiter: limits.get(i).cloned().flatten(),
            })
            .collect();
        let meta = SnapshotMeta {
            version: 0,
            vm: m.get("vm").cloned(),
            image: m.get("image").cloned(),
            mem_mib: num("mem_mib").unwrap_or(0),
            vcpus: num("vcpus").unwrap_or(0).min(u64::from(u8::MAX)) as u8,
            drives,
            disk_mib: num("disk_mib"),
            mount_slot: num("mount_slot").map(|s| s as usize),
            mounts: m.get("mounts").and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default(),
            memory_layered: m.get("memory_layered").is_some_and(|v| v == "true"),
            owner: m.get("session").map(|s| OwnerTag::new("session", s)),
            cpu: None,
        };
        meta.check(id)?;
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metadata of a manifest 0eb4d43 wrote (a disk-rooted image's VM with a mount, a hibernation diff):
    /// every field reads as it was meant.
    #[test]
    fn a_manifest_of_0eb4d43_reads() {
        let json = include_str!("testdata/manifest-0eb4d43.json");
        let manifest: flint_snapshot_store::Manifest = serde_json::from_str(json).unwrap();
        let meta = SnapshotMeta::load(&manifest.id, &manifest.metadata).unwrap();
        assert_eq!((meta.version, meta.mem_mib, meta.vcpus), (0, 256, 1));
        assert_eq!(meta.image.as_deref(), Some("python"));
        assert_eq!(meta.drives.len(), 3);
        assert!(meta.drives[0].read_only && meta.drives[0].image.as_deref().is_some_and(|r| r.starts_with("python@")));
        assert!(!meta.drives[1].read_only && meta.drives[1].image.is_none());
        assert_eq!((meta.disk_mib, meta.mount_slot), (Some(512), Some(2)));
        assert_eq!(meta.mounts[0].path, "/mnt/data");
        assert!(meta.memory_layered);
        assert_eq!(meta.owner, Some(OwnerTag::new("session", "s1")));
        assert_eq!(meta.vm.as_deref(), Some("s1-2a"));
    }

    #[test]
    fn round_trip_newer_versions_and_forged_drives() {
        let mut meta = SnapshotMeta::new(512, 2);
        meta.drives.push(DriveMeta {
            read_only: true,
            image: Some(format!("img@{}", "a".repeat(64))),
            ..Default::default()
        });
        meta.cpu = Some(0.25);
        let mut m = BTreeMap::new();
        meta.store(&mut m);
        assert_eq!(m.len(), 1, "one key");
        assert_eq!(SnapshotMeta::load("s", &m).unwrap(), meta);
        // A newer version is refused, naming both versions.
        let mut v: serde_json::Value = serde_json::from_str(&m[META_KEY]).unwrap();
        v["version"] = serde_json::json!(META_VERSION + 1);
        v["something_new"] = serde_json::json!(true);
        m.insert(META_KEY.into(), v.to_string());
        let e = SnapshotMeta::load("s", &m).unwrap_err().to_string();
        assert!(e.contains(&format!("version {}", META_VERSION + 1)) && e.contains("newer flintd"), "{e}");
        // An image root that is writable, or a count past the limit, is refused.
        let mut forged = meta.clone();
        forged.drives[0].read_only = false;
        forged.store(&mut m);
        assert!(SnapshotMeta::load("s", &m).unwrap_err().to_string().contains("read-only"));
        let legacy = BTreeMap::from([("drives".to_string(), "3".to_string()), ("mem_mib".to_string(), "256".into())]);
        assert!(SnapshotMeta::load("s", &legacy).unwrap_err().to_string().contains("cannot be cloned"));
        let legacy = BTreeMap::from([("drives".to_string(), "99".to_string())]);
        assert!(SnapshotMeta::load("s", &legacy).unwrap_err().to_string().contains("bad drive count"));
    }
}
