//! The state database (redb, one file): records as JSON, one durable commit per change. Commits are counted
//! (`commits`): the VM layer promises at most two per restore, and a test holds it to that.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A table of records: key → JSON.
pub type Table = TableDefinition<'static, &'static str, &'static [u8]>;

pub const VMS: Table = TableDefinition::new("vms");
pub const TEMPLATES: Table = TableDefinition::new("templates");
pub const SESSIONS: Table = TableDefinition::new("sessions");
/// E2B API keys (hashed) and other small settings of the services.
pub const KEYS: Table = TableDefinition::new("keys");
/// E2B sandboxes' own state (deadline, pause, access token); their sessions hold the rest.
pub const E2B_SANDBOXES: Table = TableDefinition::new("e2b_sandboxes");

#[derive(Debug, thiserror::Error)]
#[error("state database: {0}")]
pub struct DbError(String);

impl DbError {
    pub fn from_message(m: impl Into<String>) -> DbError {
        DbError(m.into())
    }
}

fn e(x: impl std::fmt::Display) -> DbError {
    DbError(x.to_string())
}

pub struct Db {
    db: Database,
    commits: AtomicU64,
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let db = Database::create(path).map_err(|x| DbError(format!("open {}: {x}", path.display())))?;
        let w = db.begin_write().map_err(e)?;
        for t in [VMS, TEMPLATES, SESSIONS, KEYS, E2B_SANDBOXES] {
            w.open_table(t).map_err(e)?;
        }
        w.commit().map_err(e)?;
        Ok(Db { db, commits: AtomicU64::new(0) })
    }

    /// Durable commits made so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), DbError> {
        let bytes = serde_json::to_vec(value).map_err(e)?;
        let w = self.db.begin_write().map_err(e)?;
        w.open_table(table).map_err(e)?.insert(key, bytes.as_slice()).map_err(e)?;
        w.commit().map_err(e)?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn delete(&self, table: Table, key: &str) -> Result<(), DbError> {
        let w = self.db.begin_write().map_err(e)?;
        w.open_table(table).map_err(e)?.remove(key).map_err(e)?;
        w.commit().map_err(e)?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>, DbError> {
        let r = self.db.begin_read().map_err(e)?;
        let t = r.open_table(table).map_err(e)?;
        match t.get(key).map_err(e)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(e)?)),
            None => Ok(None),
        }
    }

    pub fn all<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, DbError> {
        self.all_raw(table)?.into_iter().map(|(_, v)| serde_json::from_value(v).map_err(e)).collect()
    }

    /// Every record of `table` as JSON (for readers that convert records an older flintd wrote).
    pub fn all_raw(&self, table: Table) -> Result<Vec<(String, serde_json::Value)>, DbError> {
        let r = self.db.begin_read().map_err(e)?;
        let t = r.open_table(table).map_err(e)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(e)? {
            let (k, v) = item.map_err(e)?;
            out.push((k.value().to_string(), serde_json::from_slice(v.value()).map_err(e)?));
        }
        Ok(out)
    }
}
