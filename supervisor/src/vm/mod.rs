//! VMs: records and their status transitions ([`model`]), and the per-VM owner ([`Slot`]) through which every
//! operation on a VM goes.
pub mod model;

use std::sync::{Arc, Mutex};

use flint_agent::client::AgentClient;
use flint_vmm_api::lock;

use crate::db::{Db, VMS};
use crate::pager::Served;
use model::{OpError, VmRecord, VmStatus};

/// The one owner of a VM's record, agent connection and page server. State-changing operations (start, pause,
/// resume, snapshot, delete, re-adoption) hold `op` for their whole duration, so two of them on one VM never
/// interleave; every change of the record goes through [`Slot::commit`], which writes the database first and
/// changes the in-memory record only if that succeeded, so the two never differ.
pub struct Slot {
    pub op: tokio::sync::Mutex<()>,
    /// The record, and whether it was removed (then nothing may write it again).
    rec: Mutex<(VmRecord, bool)>,
    pub agent: tokio::sync::Mutex<Option<Arc<AgentClient>>>,
    pub pager: Mutex<Option<Arc<Served>>>,
}

impl Slot {
    pub fn new(rec: VmRecord) -> Arc<Slot> {
        Arc::new(Slot {
            op: tokio::sync::Mutex::new(()),
            rec: Mutex::new((rec, false)),
            agent: tokio::sync::Mutex::new(None),
            pager: Mutex::new(None),
        })
    }

    pub fn get(&self) -> VmRecord {
        lock(&self.rec).0.clone()
    }

    /// Deletes the record from the database; later commits (a late exit notice) find it gone.
    pub fn remove(&self, db: &Db) -> Result<(), OpError> {
        let mut guard = lock(&self.rec);
        db.delete(VMS, &guard.0.id)?;
        guard.1 = true;
        Ok(())
    }

    /// Applies `f` to a copy of the record, persists the copy, then makes it the record. A status change in `f`
    /// must be allowed by the transition table.
    pub fn commit(&self, db: &Db, f: impl FnOnce(&mut VmRecord)) -> Result<VmRecord, OpError> {
        let mut guard = lock(&self.rec);
        let (rec, removed) = &mut *guard;
        if *removed {
            return Err(OpError::NotFound(format!("VM `{}` was deleted", rec.id)));
        }
        let mut next = rec.clone();
        f(&mut next);
        if next.status != rec.status && !rec.status.can_become(next.status) {
            return Err(OpError::Conflict(format!(
                "VM `{}` is {}; it cannot become {}",
                rec.id,
                rec.status.name(),
                next.status.name()
            )));
        }
        db.put(VMS, &next.id, &next)?;
        *rec = next.clone();
        Ok(next)
    }

    /// Moves to `to` (checked by the transition table), with other changes from `f`.
    pub fn transition(&self, db: &Db, to: VmStatus, f: impl FnOnce(&mut VmRecord)) -> Result<VmRecord, OpError> {
        self.commit(db, |r| {
            r.status = to;
            f(r);
        })
    }
}
