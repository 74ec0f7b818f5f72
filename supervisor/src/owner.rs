//! The one owner of a record (a VM's, a session's): every operation that changes the thing holds its `op` lock
//! for its whole duration, so two of them never interleave; every change of the record goes through the owner.
//!
//! Two ways to change a record: [`Owner::commit`] writes the database first and changes the in-memory record only
//! if that succeeded (a durable change: a status, something a restart must know); [`Owner::stage`] changes the
//! in-memory record only (timings, a pid the restart finds anyway), to be written by the next commit. Readers
//! ([`Owner::get`]) never wait for a database write: a commit holds the record's lock only to read it and to
//! swap in the new one, not across the write (a slow fsync stalls this record's writers, nobody else).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use flint_vmm_api::lock;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::db::{Db, DbError, Table};

/// What a record must say about itself for its owner.
pub trait Record: Clone + Serialize + DeserializeOwned + Send + Sync + 'static {
    type State: Copy + Eq + std::fmt::Debug + Send + Sync;
    const WHAT: &'static str;
    fn key(&self) -> &str;
    fn state(&self) -> Self::State;
    fn state_name(s: Self::State) -> &'static str;
    /// The transition table.
    fn can_become(from: Self::State, to: Self::State) -> bool;
}

/// Why a change of a record was refused.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("{what} `{id}` was deleted")]
    Removed { what: &'static str, id: String },
    #[error("{what} `{id}` is {from}; it cannot become {to}")]
    Transition { what: &'static str, id: String, from: &'static str, to: &'static str },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl crate::error::Classify for CommitError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            CommitError::Removed { .. } => crate::error::Kind::NotFound,
            CommitError::Transition { .. } => crate::error::Kind::Conflict,
            CommitError::Db(_) => crate::error::Kind::Internal,
        }
    }
}

pub struct Owner<R: Record> {
    /// Held by every operation that changes the thing, for its whole duration.
    pub op: tokio::sync::Mutex<()>,
    /// The record (after removal: the last one, never written again).
    rec: Mutex<R>,
    removed: AtomicBool,
    /// The last record that reached the database (what a restart would find).
    durable: Mutex<Option<R>>,
    /// Serializes this record's writers (stages and commits, across their database write); readers never take it.
    writing: Mutex<()>,
    table: Table,
}

impl<R: Record> Owner<R> {
    /// An owner of a record that is already in the database (`durable`), or not yet (`!durable`).
    pub fn new(rec: R, table: Table, durable: bool) -> Owner<R> {
        Owner {
            op: tokio::sync::Mutex::new(()),
            durable: Mutex::new(durable.then(|| rec.clone())),
            rec: Mutex::new(rec),
            removed: AtomicBool::new(false),
            writing: Mutex::new(()),
            table,
        }
    }

    /// The record as it is now (staged changes included).
    pub fn get(&self) -> R {
        lock(&self.rec).clone()
    }

    /// Reads the record without cloning it.
    pub fn with<T>(&self, f: impl FnOnce(&R) -> T) -> T {
        f(&lock(&self.rec))
    }

    pub fn removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The record as the database has it (tests: it must equal [`Owner::get`] once operations end).
    pub fn durable(&self) -> Option<R> {
        lock(&self.durable).clone()
    }

    /// The next record: `f` applied to a copy of the current one, checked against the transition table.
    fn next(&self, f: impl FnOnce(&mut R)) -> Result<R, CommitError> {
        let cur = self.get();
        if self.removed() {
            return Err(CommitError::Removed { what: R::WHAT, id: cur.key().to_string() });
        }
        let mut next = cur.clone();
        f(&mut next);
        if next.state() != cur.state() && !R::can_become(cur.state(), next.state()) {
            return Err(CommitError::Transition {
                what: R::WHAT,
                id: cur.key().to_string(),
                from: R::state_name(cur.state()),
                to: R::state_name(next.state()),
            });
        }
        Ok(next)
    }

    /// Changes the in-memory record only; the next [`Owner::commit`] writes it.
    pub fn stage(&self, f: impl FnOnce(&mut R)) -> Result<R, CommitError> {
        let _w = lock(&self.writing);
        let next = self.next(f)?;
        *lock(&self.rec) = next.clone();
        Ok(next)
    }

    /// Applies `f` to a copy of the record, writes the copy to the database, then makes it the record.
    pub fn commit(&self, db: &Db, f: impl FnOnce(&mut R)) -> Result<R, CommitError> {
        let _w = lock(&self.writing);
        let next = self.next(f)?;
        db.put(self.table, next.key(), &next)?;
        *lock(&self.durable) = Some(next.clone());
        *lock(&self.rec) = next.clone();
        Ok(next)
    }

    /// Deletes the record from the database; later commits find it gone.
    pub fn remove(&self, db: &Db) -> Result<(), CommitError> {
        let _w = lock(&self.writing);
        if self.removed() {
            return Ok(());
        }
        let key = self.get().key().to_string();
        if lock(&self.durable).is_some() {
            db.delete(self.table, &key)?;
        }
        *lock(&self.durable) = None;
        self.removed.store(true, Ordering::Release);
        Ok(())
    }
}
