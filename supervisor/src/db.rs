//! The state database (redb, one file): VM and template records as JSON, committed per change.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
pub const TEMPLATES: TableDefinition<&str, &[u8]> = TableDefinition::new("templates");
pub const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

#[derive(Debug, thiserror::Error)]
#[error("state database: {0}")]
pub struct DbError(String);

fn e(x: impl std::fmt::Display) -> DbError {
    DbError(x.to_string())
}

pub struct Db {
    db: Database,
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let db = Database::create(path).map_err(|x| DbError(format!("open {}: {x}", path.display())))?;
        let w = db.begin_write().map_err(e)?;
        w.open_table(VMS).map_err(e)?;
        w.open_table(TEMPLATES).map_err(e)?;
        w.open_table(SESSIONS).map_err(e)?;
        w.commit().map_err(e)?;
        Ok(Db { db })
    }

    pub fn put<T: Serialize>(&self, table: TableDefinition<&str, &[u8]>, key: &str, value: &T) -> Result<(), DbError> {
        let bytes = serde_json::to_vec(value).map_err(e)?;
        let w = self.db.begin_write().map_err(e)?;
        w.open_table(table).map_err(e)?.insert(key, bytes.as_slice()).map_err(e)?;
        w.commit().map_err(e)
    }

    pub fn delete(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<(), DbError> {
        let w = self.db.begin_write().map_err(e)?;
        w.open_table(table).map_err(e)?.remove(key).map_err(e)?;
        w.commit().map_err(e)
    }

    pub fn all<T: DeserializeOwned>(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<T>, DbError> {
        let r = self.db.begin_read().map_err(e)?;
        let t = r.open_table(table).map_err(e)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(e)? {
            let (_, v) = item.map_err(e)?;
            out.push(serde_json::from_slice(v.value()).map_err(e)?);
        }
        Ok(out)
    }
}
