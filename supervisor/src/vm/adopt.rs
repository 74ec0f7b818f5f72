//! After a flintd restart, each record is brought back to a true status, and its cleanup stack rebuilt from it:
//! - running / paused with its VMM alive: watched again (its network's DNS proxy restarted, a lazy VM's page
//!   server back, its VMM brought back to the record's run state);
//! - starting with its VMM alive: the start is finished (agent awaited, env or refresh applied) in the
//!   background; with its VMM gone: lost;
//! - stopping: the delete is finished;
//! - failed / lost: kept for `flint vm ls` (their directory and uid, nothing else).
//!
//! VMMs, VM directories (with their disks and cgroups) and network namespaces no record owns (flintd died
//! between reserving a VM and recording its VMM) are removed. Records an older flintd wrote (`session`/`pool`
//! fields) get owner tags.
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use super::alloc::Held;
use super::model::*;
use super::{Manager, Resource, Vm};
use crate::db::VMS;

/// A record as an older flintd may have written it: who it was for, before owner tags.
#[derive(serde::Deserialize, Default)]
struct Legacy {
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    pool: Option<String>,
}

impl Manager {
    pub(super) fn adopt(self: &Arc<Self>) -> Result<(), crate::db::DbError> {
        let mut records = Vec::new();
        for (key, raw) in self.db.all_raw(VMS)? {
            let legacy: Legacy = serde_json::from_value(raw.clone()).unwrap_or_default();
            match serde_json::from_value::<VmRecord>(raw) {
                Ok(mut r) => {
                    if r.owner.is_none() {
                        r.owner = legacy
                            .session
                            .map(|s| OwnerTag::new("session", &s))
                            .or(legacy.pool.map(|p| OwnerTag::new("pool", &p)));
                    }
                    records.push(r);
                }
                Err(e) => warn!(vm = %key, error = %e, "an unreadable VM record is skipped"),
            }
        }
        // A VMM no record owns: flintd died between starting it and recording it. Nothing can reach it.
        for (p, dir) in self.launcher.running_under(&self.vms_dir()) {
            let owner = records.iter().find(|r| r.dir == dir);
            if owner.is_none_or(|r| r.proc() != Some(p)) {
                warn!(pid = p.pid, dir = %dir.display(), "stopping a VMM that no record owns");
                self.launcher.kill(p);
                if owner.is_none() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        // Directories of starts that never reached the database.
        for e in std::fs::read_dir(self.vms_dir()).into_iter().flatten().flatten() {
            let dir = e.path();
            if !records.iter().any(|r| r.dir == dir) {
                warn!(dir = %dir.display(), "removing a VM directory no record owns");
                self.launcher.release(&dir);
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        let keep: std::collections::HashSet<String> =
            records.iter().filter(|r| r.network.is_some()).map(|r| r.id.clone()).collect();
        self.net.remove_orphans(&keep);
        if !keep.is_empty() {
            if let Err(e) = self.net.ensure_host() {
                warn!(error = %e, "could not set up the host side of VM networks");
            }
        }
        for rec in records {
            self.adopt_one(rec);
        }
        Ok(())
    }

    fn adopt_one(self: &Arc<Self>, mut rec: VmRecord) {
        let alive = rec.proc().is_some_and(|p| self.launcher.alive(p));
        let id = rec.id.clone();
        let status = rec.status;
        if !alive && matches!(status, VmStatus::Running | VmStatus::Paused | VmStatus::Starting) {
            warn!(vm = %id, "VMM is gone after a flintd restart; marking the VM lost");
            rec.status = VmStatus::Lost;
            rec.error = Some("the VMM process was not running when flintd restarted".into());
            rec.pid = None;
            rec.pid_start = None;
        }
        let vm = Vm::new(rec.clone(), true);
        if rec.status != status {
            if let Err(e) = self.db.put(VMS, &id, &rec) {
                warn!(vm = %id, error = %e, "could not record a lost VM");
            }
        }
        // The stack, as the start built it.
        self.alloc_lock().add(
            &id,
            Held {
                live: rec.status.holds_quota(),
                mem_mib: rec.mem_mib,
                disk_mib: rec.disk_budget_mib(self.cfg.vm.mount_slot_mib),
                uid: rec.uid,
                net: rec.network.as_ref().map(|n| n.index),
            },
        );
        vm.push(Resource::Allocation);
        vm.push(Resource::Dir(rec.dir.clone()));
        let live = matches!(rec.status, VmStatus::Running | VmStatus::Paused | VmStatus::Starting | VmStatus::Stopping);
        if let (Some(n), true) = (&rec.network, live) {
            vm.push(Resource::Network(n.clone()));
            let rules = n.request.check(usize::MAX).unwrap_or_default();
            let redone = self.net.set_policy(&id, n, rules.clone()).and_then(|_| self.net.start_proxy(&id, n, rules));
            match redone {
                Ok(()) => info!(vm = %id, "network re-adopted"),
                Err(e) => warn!(vm = %id, error = %e, "could not re-adopt the VM's network"),
            }
        }
        if let (Some(p), true) = (rec.proc(), alive) {
            vm.push(Resource::Process(p));
            self.watch(&vm, p);
            self.launcher.readopt(p, &rec.dir, rec.uid.is_some());
            if rec.lazy && rec.status != VmStatus::Stopping {
                if let Some(snapshot) = rec.snapshot.clone() {
                    self.readopt_pager(&vm, &snapshot, &rec.dir, p);
                }
            }
        }
        if rec.owner.is_none() && rec.status == VmStatus::Running {
            if let Some(n) = rec.network.as_ref().filter(|n| n.request.ports.values().any(|e| e.tcp_listen.is_some())) {
                let up: Arc<dyn crate::net::forward::Upstream> = Arc::new(super::ops::VmUpstream::new(self, &id));
                match self.net.forwards.reconcile(&id, Some(&n.request), Vec::new(), &up) {
                    Ok(f) => vm.push(Resource::Forwards(f)),
                    Err(e) => warn!(vm = %id, error = %e, "could not re-adopt the VM's plain TCP forwards"),
                }
            }
        }
        self.vms.write().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), vm.clone());
        match rec.status {
            VmStatus::Stopping => {
                let this = self.clone();
                self.tasks.spawn(async move {
                    if let Err(e) = this.delete(&id).await {
                        warn!(vm = %id, error = %e, "could not finish deleting a VM after a restart");
                    }
                });
            }
            VmStatus::Starting => {
                info!(vm = %id, "re-adopted a starting VMM: finishing its start");
                let this = self.clone();
                self.tasks.spawn(async move {
                    let _op = vm.rec.op.lock().await;
                    let started = Instant::now();
                    let result = this.await_ready(&vm).await;
                    let restore = vm.rec.get().snapshot.is_some();
                    let _ = this.finish_start(&vm, started, result, restore, false).await;
                });
            }
            VmStatus::Running | VmStatus::Paused => {
                info!(vm = %id, status = rec.status.name(), "re-adopted a running VMM");
                self.reconcile_run_state(vm);
            }
            VmStatus::Failed | VmStatus::Lost => {}
        }
    }

    fn alloc_lock(&self) -> std::sync::MutexGuard<'_, super::alloc::Allocator> {
        flint_vmm_api::lock(&self.alloc)
    }

    /// A VMM left paused or running against its record by an operation that flintd did not finish (killed in a
    /// pause, a resume, or a snapshot that keeps the VM paused while it copies drives): the record, which is
    /// written only when an operation completes, wins, and the VMM is brought back to it.
    fn reconcile_run_state(self: &Arc<Self>, vm: Arc<Vm>) {
        let this = self.clone();
        self.tasks.spawn(async move {
            let _op = vm.rec.op.lock().await;
            let rec = vm.rec.get();
            let vmm = this.launcher.vmm(&rec.dir, rec.uid.is_some());
            let Ok(d) = vmm.describe().await else { return };
            let fix = match (rec.status, d.state) {
                (VmStatus::Running, flint_vmm_api::describe::RunState::Paused) => Some(vmm.resume().await),
                (VmStatus::Paused, flint_vmm_api::describe::RunState::Running) => Some(vmm.pause().await),
                _ => None,
            };
            match fix {
                Some(Ok(())) => info!(vm = %rec.id, status = rec.status.name(), "VMM brought back to its record"),
                Some(Err(e)) => warn!(vm = %rec.id, error = %e, "could not bring the VMM back to its record"),
                None => {}
            }
        });
    }
}
