//! E2B API keys: minted as `e2b_<40 hex>` (what every SDK version accepts), shown once, stored as their SHA-256
//! in the state database (table `keys`, `e2b/<id>`), checked in constant time.
use std::sync::Arc;

use flint_vmm_api::now_unix_ms;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::db::{Db, DbError, KEYS};

/// A key as stored (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    /// The key's first characters (`e2b_1234`), to tell keys apart.
    pub prefix: String,
    pub created_unix_ms: u64,
    #[serde(default, skip_serializing)]
    pub sha256: String,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    info: KeyInfo,
    sha256: String,
}

/// A key just made: the only time it is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewKey {
    #[serde(flatten)]
    pub info: KeyInfo,
    pub key: String,
}

pub struct Keys {
    db: Arc<Db>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn digest(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

const PREFIX: &str = "e2b/";

impl Keys {
    pub fn new(db: Arc<Db>) -> Keys {
        Keys { db }
    }

    /// A new key named `name`.
    pub fn create(&self, name: &str) -> Result<NewKey, DbError> {
        let mut r = [0u8; 20];
        getrandom::getrandom(&mut r).map_err(|e| DbError::from_message(format!("random key: {e}")))?;
        let key = format!("e2b_{}", hex(&r));
        let mut idb = [0u8; 6];
        let _ = getrandom::getrandom(&mut idb);
        let info = KeyInfo {
            id: hex(&idb),
            name: name.to_string(),
            prefix: key[..8].to_string(),
            created_unix_ms: now_unix_ms(),
            sha256: String::new(),
        };
        let sha256 = digest(&key);
        self.db.put(KEYS, &format!("{PREFIX}{}", info.id), &Stored { info: info.clone(), sha256 })?;
        Ok(NewKey { info, key })
    }

    pub fn list(&self) -> Result<Vec<KeyInfo>, DbError> {
        let mut out: Vec<KeyInfo> = self
            .db
            .all_raw(KEYS)?
            .into_iter()
            .filter(|(k, _)| k.starts_with(PREFIX))
            .filter_map(|(_, v)| serde_json::from_value::<Stored>(v).ok())
            .map(|s| KeyInfo { sha256: s.sha256, ..s.info })
            .collect();
        out.sort_by_key(|k| k.created_unix_ms);
        Ok(out)
    }

    /// Removes key `id`. `false`: no such key.
    pub fn remove(&self, id: &str) -> Result<bool, DbError> {
        let key = format!("{PREFIX}{id}");
        if self.db.get::<serde_json::Value>(KEYS, &key)?.is_none() {
            return Ok(false);
        }
        self.db.delete(KEYS, &key)?;
        Ok(true)
    }

    /// Whether `key` is one of the keys (its digest compared with every stored one, in constant time each).
    pub fn check(&self, key: &str) -> bool {
        if key.is_empty() || key.len() > 200 {
            return false;
        }
        let d = digest(key);
        self.list().unwrap_or_default().iter().fold(false, |ok, k| ok | crate::net::front::same(&d, &k.sha256))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_shown_once_stored_hashed_and_checked() {
        let dir = std::env::temp_dir().join(format!("flint-e2b-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = Arc::new(Db::open(&dir.join("db.redb")).unwrap());
        let keys = Keys::new(db.clone());
        let a = keys.create("ci").unwrap();
        assert!(a.key.starts_with("e2b_") && a.key.len() == 44 && a.key[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(keys.check(&a.key));
        assert!(!keys.check("e2b_0000000000000000000000000000000000000000"));
        assert!(!keys.check(""));
        let raw = serde_json::to_string(&db.all_raw(KEYS).unwrap()).unwrap();
        assert!(!raw.contains(&a.key), "the key itself is stored: {raw}");
        let listed = keys.list().unwrap();
        assert_eq!((listed.len(), listed[0].name.as_str(), listed[0].prefix.as_str()), (1, "ci", &a.key[..8]));
        assert!(!serde_json::to_string(&listed).unwrap().contains("sha256"), "listings carry no digest");
        assert!(keys.remove(&a.info.id).unwrap());
        assert!(!keys.remove(&a.info.id).unwrap());
        assert!(!keys.check(&a.key), "a removed key no longer works");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
