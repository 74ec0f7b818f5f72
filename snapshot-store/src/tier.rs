//! Storage tiers: a flat namespace of immutable objects (`chunks/ab/<name>`, `manifests/<id>`).
//!
//! The local cache (L1) is a directory; the durable tier (L3) is any S3-compatible bucket through `object_store`.
//! A shared or peer tier (L2: NFS, a neighbour host's cache) implements the same trait and slots in between:
//! the store reads through tiers in order and publishes to every remote tier.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};

/// One object as listed by a tier.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub modified_unix_ms: u64,
}

/// A tier failed (as opposed to answering "no such object").
#[derive(Debug, Clone, thiserror::Error)]
#[error("{tier}: {detail}")]
pub struct TierError {
    pub tier: String,
    pub detail: String,
}

#[async_trait]
pub trait Tier: Send + Sync + fmt::Debug {
    /// Short name for errors and stats (`local`, `s3://bucket/prefix`).
    fn name(&self) -> &str;
    /// Reads an object of at most `max` bytes: a larger one is an error, found before it is read into memory
    /// (a tampered bucket must not exhaust the host).
    async fn get(&self, key: &str, max: u64) -> Result<Option<Bytes>, TierError>;
    /// Stores an object atomically: readers see the old object, no object, or all of the new one.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), TierError>;
    /// Stores an object only if no object has the key (S3: `If-None-Match: *`): `Ok(false)` when one exists, which
    /// is left as it was. Two writers racing for a key: exactly one creates it.
    async fn put_new(&self, key: &str, data: Bytes) -> Result<bool, TierError>;
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, TierError>;
    /// Deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), TierError>;
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, TierError>;
    /// Reads an object and its version (the S3 ETag) for a later [`Tier::put_if`].
    async fn get_versioned(&self, key: &str, max: u64) -> Result<Option<(Bytes, String)>, TierError> {
        let _ = (key, max);
        Err(TierError { tier: self.name().to_string(), detail: "conditional writes are not supported".into() })
    }
    /// Compare-and-swap: writes only if the object is still at `version` (S3 `If-Match`), or, with `None`, if
    /// there is none (`If-None-Match: *`). `Ok(Some(new version))` when written, `Ok(None)` when the condition
    /// failed (someone else wrote first); nothing is changed then.
    async fn put_if(&self, key: &str, data: Bytes, version: Option<&str>) -> Result<Option<String>, TierError> {
        let _ = (key, data, version);
        Err(TierError { tier: self.name().to_string(), detail: "conditional writes are not supported".into() })
    }
}

use crate::now_unix_ms;

fn too_large(size: u64, max: u64) -> String {
    format!("object of {size} bytes is larger than the {max} bytes it may have")
}

/// A file in `tmp/` older than this is a leftover of an interrupted write (no single object takes this long).
const TMP_LEFTOVER_AGE: Duration = Duration::from_secs(600);

/// A directory on local disk. Writes go to `tmp/` and are renamed into place after fsync.
#[derive(Debug)]
pub struct LocalDirTier {
    root: PathBuf,
    name: String,
}

impl LocalDirTier {
    pub fn open(root: &Path) -> std::io::Result<LocalDirTier> {
        std::fs::create_dir_all(root.join("tmp"))?;
        // Leftovers of writes that were interrupted: never visible under their final name, safe to drop. Only old
        // ones: another process sharing the directory may be writing the young ones now.
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let entry = entry?;
            let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if age.is_some_and(|a| a > TMP_LEFTOVER_AGE) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(LocalDirTier { root: root.to_path_buf(), name: format!("local {}", root.display()) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn err(&self, what: &str, key: &str, e: impl fmt::Display) -> TierError {
        TierError { tier: self.name.clone(), detail: format!("{what} {key}: {e}") }
    }

    /// Blocking put, used from `spawn_blocking` and by the async trait method.
    pub fn put_blocking(&self, key: &str, data: &[u8]) -> Result<(), TierError> {
        self.write_object(key, data, false).map(drop)
    }

    /// Blocking create-only put: written to `tmp/`, then hard-linked to its name (link(2) fails if the name
    /// exists, atomically), so of two writers exactly one creates the object.
    pub fn put_new_blocking(&self, key: &str, data: &[u8]) -> Result<bool, TierError> {
        self.write_object(key, data, true)
    }

    /// Writes `data` to a file in `tmp/`, fsyncs it, then gives it its name: renamed over any old object, or (with
    /// `create_only`) hard-linked, which fails if the name exists (then `Ok(false)`, the old object untouched).
    /// The directory is synced after, so the object survives a crash once this returns.
    fn write_object(&self, key: &str, data: &[u8], create_only: bool) -> Result<bool, TierError> {
        use std::io::Write;
        let dest = self.path(key);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.err("create directory for", key, e))?;
        }
        let mut nonce = [0u8; 8];
        let _ = getrandom::getrandom(&mut nonce);
        let tmp = self.root.join("tmp").join(format!("{}.{:016x}", key.replace('/', "_"), u64::from_le_bytes(nonce)));
        let write = || -> std::io::Result<bool> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            let created = if create_only {
                let linked = match std::fs::hard_link(&tmp, &dest) {
                    Ok(()) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                    Err(e) => return Err(e),
                };
                std::fs::remove_file(&tmp)?;
                linked
            } else {
                std::fs::rename(&tmp, &dest)?;
                true
            };
            if let Some(dir) = dest.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(created)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.err("write", key, e)
        })
    }

    /// Whether an object exists (one stat).
    pub fn exists(&self, key: &str) -> bool {
        self.path(key).is_file()
    }

    /// Blocking get of an object of at most `max` bytes.
    pub fn get_blocking(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>, TierError> {
        use std::io::Read;
        let f = match std::fs::File::open(self.path(key)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err("read", key, e)),
        };
        let size = f.metadata().map_err(|e| self.err("read", key, e))?.len();
        if size > max {
            return Err(self.err("read", key, too_large(size, max)));
        }
        let mut out = Vec::with_capacity(size as usize);
        f.take(max + 1).read_to_end(&mut out).map_err(|e| self.err("read", key, e))?;
        if out.len() as u64 > max {
            return Err(self.err("read", key, too_large(out.len() as u64, max)));
        }
        Ok(Some(out))
    }

    pub fn delete_blocking(&self, key: &str) -> Result<(), TierError> {
        match std::fs::remove_file(self.path(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    pub fn list_blocking(&self, prefix: &str) -> Result<Vec<ObjectInfo>, TierError> {
        let mut out = Vec::new();
        let base = self.path(prefix.trim_end_matches('/'));
        let mut stack = vec![base];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err("list", prefix, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.err("list", prefix, e))?;
                let meta = entry.metadata().map_err(|e| self.err("stat", prefix, e))?;
                if meta.is_dir() {
                    stack.push(entry.path());
                    continue;
                }
                let Ok(rel) = entry.path().strip_prefix(&self.root).map(|p| p.to_string_lossy().into_owned()) else {
                    continue;
                };
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                out.push(ObjectInfo { key: rel, size: meta.len(), modified_unix_ms: modified });
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Tier for LocalDirTier {
    fn name(&self) -> &str {
        &self.name
    }
    async fn get(&self, key: &str, max: u64) -> Result<Option<Bytes>, TierError> {
        Ok(self.get_blocking(key, max)?.map(Bytes::from))
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), TierError> {
        self.put_blocking(key, &data)
    }
    async fn put_new(&self, key: &str, data: Bytes) -> Result<bool, TierError> {
        self.put_new_blocking(key, &data)
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, TierError> {
        match std::fs::metadata(self.path(key)) {
            Ok(m) => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: m.len(),
                modified_unix_ms: m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_else(now_unix_ms),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("stat", key, e)),
        }
    }
    async fn delete(&self, key: &str) -> Result<(), TierError> {
        self.delete_blocking(key)
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, TierError> {
        self.list_blocking(prefix)
    }
}

/// Where the S3 tier lives. Credentials come from the standard AWS environment variables
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), else from `~/.aws/credentials`
/// (profile `AWS_PROFILE` or `default`); the region from `AWS_REGION`/`AWS_DEFAULT_REGION` or `~/.aws/config`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/` needed).
    #[serde(default)]
    pub prefix: String,
    /// Endpoint URL for S3-compatible servers (MinIO, Garage, Ceph); AWS when absent (`AWS_ENDPOINT_URL` also works).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket` (MinIO, Garage, most self-hosted servers) instead of `bucket.endpoint`.
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Per-request timeout.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Retries of a failed request before the tier is reported unavailable.
    #[serde(default = "default_retries")]
    pub max_retries: usize,
}

fn default_true() -> bool {
    true
}
fn default_timeout_s() -> u64 {
    30
}
fn default_retries() -> usize {
    3
}

impl S3Config {
    pub fn new(bucket: &str) -> S3Config {
        S3Config {
            bucket: bucket.to_string(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            path_style: true,
            timeout_s: default_timeout_s(),
            max_retries: default_retries(),
        }
    }
}

/// Reads `key` of `[section]` from an ini-style AWS file.
fn aws_file_value(file: &Path, section: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let mut in_section = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            let name = line.trim_matches(|c| c == '[' || c == ']').trim();
            in_section = name == section || name == format!("profile {section}");
            continue;
        }
        if in_section {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim().to_string());
                }
            }
        }
    }
    None
}

/// An S3-compatible bucket through `object_store`.
#[derive(Debug)]
pub struct ObjectTier {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    name: String,
}

impl ObjectTier {
    pub fn s3(cfg: &S3Config) -> Result<ObjectTier, TierError> {
        let name = format!("s3://{}/{}", cfg.bucket, cfg.prefix.trim_matches('/'));
        let err = |detail: String| TierError { tier: name.clone(), detail };
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&cfg.bucket);
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            if let Some(home) = &home {
                let creds = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home.join(".aws/credentials"));
                if let (Some(id), Some(secret)) = (
                    aws_file_value(&creds, &profile, "aws_access_key_id"),
                    aws_file_value(&creds, &profile, "aws_secret_access_key"),
                ) {
                    b = b.with_access_key_id(id).with_secret_access_key(secret);
                    if let Some(token) = aws_file_value(&creds, &profile, "aws_session_token") {
                        b = b.with_token(token);
                    }
                }
            }
        }
        let region = cfg
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .or_else(|| {
                let config = std::env::var_os("AWS_CONFIG_FILE")
                    .map(PathBuf::from)
                    .or_else(|| home.as_ref().map(|h| h.join(".aws/config")))?;
                aws_file_value(&config, &profile, "region")
            })
            .unwrap_or_else(|| "us-east-1".into());
        b = b.with_region(region);
        b = b.with_virtual_hosted_style_request(!cfg.path_style);
        let retry = RetryConfig {
            max_retries: cfg.max_retries,
            retry_timeout: Duration::from_secs(cfg.timeout_s.max(1) * (cfg.max_retries as u64 + 1)),
            ..Default::default()
        };
        b = b.with_retry(retry).with_client_options(
            ClientOptions::new()
                .with_timeout(Duration::from_secs(cfg.timeout_s.max(1)))
                .with_connect_timeout(Duration::from_secs(cfg.timeout_s.clamp(1, 5))),
        );
        // After the client options, which would otherwise reset allow_http.
        let endpoint = cfg.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(endpoint) = endpoint {
            b = b.with_allow_http(endpoint.starts_with("http://")).with_endpoint(endpoint);
        }
        let store = b.build().map_err(|e| err(format!("bad S3 configuration: {e}")))?;
        Ok(ObjectTier { store: Arc::new(store), prefix: cfg.prefix.trim_matches('/').to_string(), name })
    }

    /// Any `object_store` backend (used by tests of pure logic and by future tiers).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, name: &str) -> ObjectTier {
        ObjectTier { store, prefix: prefix.trim_matches('/').to_string(), name: name.to_string() }
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{}", self.prefix, key))
        }
    }

    fn err(&self, what: &str, key: &str, e: object_store::Error) -> TierError {
        // The whole source chain: connection refused, HTTP status, ...
        TierError { tier: self.name.clone(), detail: format!("{what} {key}: {}", crate::error_chain(&e)) }
    }

    fn strip(&self, location: &ObjPath) -> String {
        let s = location.as_ref();
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&self.prefix).unwrap_or(s).trim_start_matches('/').to_string()
        }
    }
}

#[async_trait]
impl Tier for ObjectTier {
    fn name(&self) -> &str {
        &self.name
    }
    async fn get(&self, key: &str, max: u64) -> Result<Option<Bytes>, TierError> {
        use futures::StreamExt;
        let result = match self.store.get(&self.path(key)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("get", key, e)),
        };
        let oversize =
            |n: u64| TierError { tier: self.name.clone(), detail: format!("get {key}: {}", too_large(n, max)) };
        // The declared size first, then what actually arrives (a server may not tell the truth).
        if result.meta.size > max {
            return Err(oversize(result.meta.size));
        }
        let mut out = Vec::with_capacity(result.meta.size as usize);
        let mut body = result.into_stream();
        while let Some(part) = body.next().await {
            let part = part.map_err(|e| self.err("get", key, e))?;
            if (out.len() + part.len()) as u64 > max {
                return Err(oversize((out.len() + part.len()) as u64));
            }
            out.extend_from_slice(&part);
        }
        Ok(Some(Bytes::from(out)))
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), TierError> {
        self.store.put(&self.path(key), data.into()).await.map(|_| ()).map_err(|e| self.err("put", key, e))
    }
    async fn put_new(&self, key: &str, data: Bytes) -> Result<bool, TierError> {
        let opts = object_store::PutOptions { mode: object_store::PutMode::Create, ..Default::default() };
        match self.store.put_opts(&self.path(key), data.into(), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err("put (if none match)", key, e)),
        }
    }
    async fn get_versioned(&self, key: &str, max: u64) -> Result<Option<(Bytes, String)>, TierError> {
        let result = match self.store.get(&self.path(key)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("get", key, e)),
        };
        if result.meta.size > max {
            return Err(TierError {
                tier: self.name.clone(),
                detail: format!("get {key}: {}", too_large(result.meta.size, max)),
            });
        }
        let version = result.meta.e_tag.clone().ok_or_else(|| TierError {
            tier: self.name.clone(),
            detail: format!("get {key}: the server sent no ETag (conditional writes need one)"),
        })?;
        let bytes = result.bytes().await.map_err(|e| self.err("get", key, e))?;
        if bytes.len() as u64 > max {
            return Err(TierError {
                tier: self.name.clone(),
                detail: format!("get {key}: {}", too_large(bytes.len() as u64, max)),
            });
        }
        Ok(Some((bytes, version)))
    }
    async fn put_if(&self, key: &str, data: Bytes, version: Option<&str>) -> Result<Option<String>, TierError> {
        let mode = match version {
            None => object_store::PutMode::Create,
            Some(v) => {
                object_store::PutMode::Update(object_store::UpdateVersion { e_tag: Some(v.to_string()), version: None })
            }
        };
        let opts = object_store::PutOptions { mode, ..Default::default() };
        match self.store.put_opts(&self.path(key), data.into(), opts).await {
            Ok(r) => r.e_tag.map(Some).ok_or_else(|| TierError {
                tier: self.name.clone(),
                detail: format!("put {key}: the server sent no ETag (conditional writes need one)"),
            }),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(None),
            // An If-Match on a missing object: S3 answers 404 or 412, both "the condition failed".
            Err(object_store::Error::NotFound { .. }) if version.is_some() => Ok(None),
            Err(e) => Err(self.err("put (conditional)", key, e)),
        }
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, TierError> {
        match self.store.head(&self.path(key)).await {
            Ok(m) => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: m.size,
                modified_unix_ms: m.last_modified.timestamp_millis().max(0) as u64,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("head", key, e)),
        }
    }
    async fn delete(&self, key: &str) -> Result<(), TierError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, TierError> {
        let p = self.path(prefix.trim_end_matches('/'));
        let metas: Vec<_> = self.store.list(Some(&p)).try_collect().await.map_err(|e| self.err("list", prefix, e))?;
        Ok(metas
            .into_iter()
            .map(|m| ObjectInfo {
                key: self.strip(&m.location),
                size: m.size,
                modified_unix_ms: m.last_modified.timestamp_millis().max(0) as u64,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_files_are_read_by_profile() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("credentials");
        std::fs::write(
            &f,
            "[default]\naws_access_key_id = A\n[profile dev]\naws_access_key_id=B\nregion = eu-west-1\n",
        )
        .unwrap();
        assert_eq!(aws_file_value(&f, "default", "aws_access_key_id").as_deref(), Some("A"));
        assert_eq!(aws_file_value(&f, "dev", "aws_access_key_id").as_deref(), Some("B"));
        assert_eq!(aws_file_value(&f, "dev", "region").as_deref(), Some("eu-west-1"));
        assert_eq!(aws_file_value(&f, "nope", "region"), None);
    }

    #[tokio::test]
    async fn local_tier_put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tmp-leftover"), b"x").unwrap();
        let t = LocalDirTier::open(dir.path()).unwrap();
        t.put("chunks/ab/abc", Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(t.get("chunks/ab/abc", 5).await.unwrap().unwrap(), Bytes::from_static(b"hello"));
        assert!(t.get("chunks/ab/nope", 5).await.unwrap().is_none());
        // One byte over the cap is refused, with the sizes in the message.
        let e = t.get("chunks/ab/abc", 4).await.unwrap_err().to_string();
        assert!(e.contains("5 bytes") && e.contains("4 bytes"), "{e}");
        let listed = t.list("chunks").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].key, "chunks/ab/abc");
        assert_eq!(t.head("chunks/ab/abc").await.unwrap().unwrap().size, 5);
        t.delete("chunks/ab/abc").await.unwrap();
        t.delete("chunks/ab/abc").await.unwrap();
        assert!(t.list("chunks").await.unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
