//! The fleet's E2B endpoint (`flint-router --e2b-listen`, docs/e2b.md "A fleet"): the unchanged E2B SDKs see one
//! endpoint for every host. Each request is routed on its own, as a host's endpoint routes it (the SDK keeps one
//! connection for both planes and several sandboxes):
//! - a data-plane call (`E2b-Sandbox-Id`/`-Port` headers, or a `<port>-<id>.<domain>` Host) goes to the host
//!   holding its sandbox's session, or the one placed to wake it, with the sandbox and port named in headers;
//! - the control plane needs an API key the router accepts (`--e2b-keys`): `POST /sandboxes` is placed like a
//!   session, `GET /sandboxes` is answered from etcd (each session's entry carries its sandbox's record), a call
//!   naming a sandbox goes where its session is held or woken.
//!
//! Hosts take these calls on their cluster listener under `/v1/e2b/fleet/…` (mutual TLS: only routers reach it),
//! which skips the key check the router made.
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode};
use flint_vmm_api::lock;
use sha2::{Digest, Sha256};

use super::{body_to_send, Router};
use crate::e2b::{SandboxRecord, FLEET_PREFIX};

/// `flint-router --e2b-*`: the domain of Host routing and the API keys accepted.
pub struct E2bFront {
    pub domain: String,
    pub keys: KeyFile,
}

/// The API keys a router accepts: a file of keys (`e2b_…`, as `flint e2b key create` prints them) or of their
/// digests (`sha256:<hex>`), one per line, `#` comments. Read again whenever it changes: keys are added and
/// revoked without a restart.
pub struct KeyFile {
    path: PathBuf,
    loaded: Mutex<(Option<SystemTime>, HashSet<String>)>,
}

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("E2B key file {path}: {why}")]
pub struct KeyFileError {
    path: String,
    why: String,
}

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The digests a key file's text names.
fn parse_keys(text: &str) -> Result<HashSet<String>, String> {
    let mut out = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_prefix("sha256:") {
            Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                out.insert(hex.to_ascii_lowercase());
            }
            Some(_) => return Err(format!("line {}: `sha256:` takes 64 hex digits", n + 1)),
            None => {
                out.insert(sha256_hex(line));
            }
        }
    }
    Ok(out)
}

impl KeyFile {
    /// Reads the file once (a missing or malformed one is an error at startup, not a router that refuses all).
    pub fn open(path: &Path) -> Result<KeyFile, KeyFileError> {
        let err = |why: String| KeyFileError { path: path.display().to_string(), why };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let keys = parse_keys(&text).map_err(err)?;
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Ok(KeyFile { path: path.to_path_buf(), loaded: Mutex::new((mtime, keys)) })
    }

    /// Whether `key` is one of the file's (as it is now; a file that became unreadable keeps its last keys).
    pub fn accepts(&self, key: &str) -> bool {
        let mtime = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut loaded = lock(&self.loaded);
        if mtime.is_some() && mtime != loaded.0 {
            match std::fs::read_to_string(&self.path).map_err(|e| e.to_string()).and_then(|t| parse_keys(&t)) {
                Ok(keys) => *loaded = (mtime, keys),
                Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "E2B key file not re-read"),
            }
        }
        loaded.1.contains(&sha256_hex(key))
    }
}

/// A router-made error in E2B's shape (`{"code", "message"}`); hosts' answers (`X-Flint-Host`) pass as they are.
async fn e2b_shaped(r: Response<Body>) -> Response<Body> {
    if r.status().is_success() || r.headers().contains_key("x-flint-host") {
        return r;
    }
    let status = r.status();
    let retry = r.headers().get("retry-after").cloned();
    let body = axum::body::to_bytes(r.into_body(), 64 << 10).await.unwrap_or_default();
    let msg = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    let mut out = crate::e2b::error(status.as_u16(), msg);
    if let Some(v) = retry {
        out.headers_mut().insert("retry-after", v);
    }
    out
}

impl Router {
    /// One request to the fleet's E2B endpoint.
    pub async fn handle_e2b(self: Arc<Self>, front: Arc<E2bFront>, req: Request<Body>) -> Response<Body> {
        self.metrics.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (mut parts, body) = req.into_parts();
        let path_q = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let to_host = format!("{FLEET_PREFIX}{path_q}");
        if let Some(t) = crate::e2b::data_plane_target(&parts.headers, &front.domain) {
            let host = match self.host_for(&t.id).await {
                Ok(h) => h,
                Err(r) if r.status() == StatusCode::NOT_FOUND => return crate::e2b::sandbox_not_found(&t.id),
                Err(r) => return e2b_shaped(r).await,
            };
            // The host learns the sandbox and port from these (its Host header is its own address).
            if let (Ok(id), Ok(port)) = (HeaderValue::from_str(&t.id), HeaderValue::from_str(&t.port.to_string())) {
                parts.headers.insert("e2b-sandbox-id", id);
                parts.headers.insert("e2b-sandbox-port", port);
            }
            let (bytes, stream) = match body_to_send(&parts.method, &parts.headers, body).await {
                Ok(b) => b,
                Err(e) => return crate::e2b::error(400, format!("request body: {e}")),
            };
            return e2b_shaped(self.forward(host, &parts.method, &to_host, &parts.headers, bytes, stream).await).await;
        }
        let key = parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()).unwrap_or("");
        if key.is_empty() || !front.keys.accepts(key) {
            return crate::e2b::error(401, "Invalid API key (the router accepts the keys of its --e2b-keys file)");
        }
        let segs = crate::e2b::control_segments(parts.uri.path());
        let host = match (&parts.method, segs.as_slice()) {
            (&Method::GET, ["sandboxes"]) => return self.e2b_list(parts.uri.query().unwrap_or("")).await,
            (&Method::POST, ["sandboxes"]) => match self.place(None) {
                Some(h) => {
                    self.metrics.placed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    h.host
                }
                None => return e2b_shaped(self.no_host()).await,
            },
            (_, ["sandboxes", id, ..]) if !id.is_empty() => match self.host_for(id).await {
                Ok(h) => h,
                Err(r) if r.status() == StatusCode::NOT_FOUND => {
                    return crate::e2b::error(404, format!("sandbox {id} not found"))
                }
                Err(r) => return e2b_shaped(r).await,
            },
            _ => {
                return crate::e2b::error(
                    404,
                    format!("no such E2B API route: {} {} (docs/e2b.md lists what is served)", parts.method, path_q),
                )
            }
        };
        let (bytes, stream) = match body_to_send(&parts.method, &parts.headers, body).await {
            Ok(b) => b,
            Err(e) => return crate::e2b::error(400, format!("request body: {e}")),
        };
        e2b_shaped(self.forward(host, &parts.method, &to_host, &parts.headers, bytes, stream).await).await
    }

    /// `GET /sandboxes` for the whole fleet, from etcd: every session's entry carries its sandbox's record (as of
    /// its last claim or hibernation), whichever host holds it or none.
    async fn e2b_list(&self, query: &str) -> Response<Body> {
        let kvs = match self.etcd.get_prefix(&format!("{}sessions/", self.prefix)).await {
            Ok((kvs, _)) => kvs,
            Err(e) => return crate::e2b::error(503, format!("the router cannot read the fleet's state: {e}")),
        };
        let held = |id: &str| self.view.read().unwrap_or_else(|p| p.into_inner()).owners.contains_key(id);
        let recs: Vec<SandboxRecord> = kvs
            .iter()
            .filter_map(|kv| {
                let v: serde_json::Value = serde_json::from_slice(&kv.value).ok()?;
                let mut r: SandboxRecord =
                    serde_json::from_str(v["session"]["annotations"][crate::e2b::ANNOTATION].as_str()?).ok()?;
                // A held sandbox runs: it was woken (`connect`) since the record that says paused was written.
                r.paused &= !held(&r.id);
                Some(r)
            })
            .collect();
        crate::e2b::list_page(recs, query)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_name_keys_or_their_digests() {
        let k = "e2b_0123456789abcdef";
        let text = format!("# fleet keys\n{k}\n\nsha256:{}\n", sha256_hex("e2b_other").to_uppercase());
        let keys = parse_keys(&text).unwrap();
        assert!(keys.contains(&sha256_hex(k)) && keys.contains(&sha256_hex("e2b_other")) && keys.len() == 2);
        assert!(parse_keys("sha256:abc").unwrap_err().contains("line 1"));
        let dir = std::env::temp_dir().join(format!("flint-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(&path, format!("{k}\n")).unwrap();
        let f = KeyFile::open(&path).unwrap();
        assert!(f.accepts(k) && !f.accepts("e2b_other") && !f.accepts(""));
        // Revoked by editing the file (a later mtime), no restart.
        std::fs::write(&path, "e2b_other\n").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        assert!(!f.accepts(k) && f.accepts("e2b_other"));
        assert!(KeyFile::open(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
