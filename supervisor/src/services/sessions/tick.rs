//! Sessions over time: re-adoption after a restart, the upkeep loop (idle timeouts, lifetimes, lease renewals)
//! and what the VM layer reports (a session whose VM died fails).
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flint_vmm_api::{lock, now_unix_ms};
use tracing::{info, warn};

use super::lease::LeaseDue;
use super::{OnIdle, Session, SessionRecord, SessionState, Sessions, OWNER};
use crate::db::SESSIONS;
use crate::vm::{EventKind, VmStatus};

enum TickAction {
    End(String),
    Idle,
}

impl Sessions {
    /// After a restart: every session's record is brought back to a true state (its VM was re-adopted or lost;
    /// a hibernation or wake the restart interrupted is finished or undone), then the upkeep loop starts.
    pub(super) fn adopt(self: &Arc<Self>) -> Result<(), crate::db::DbError> {
        let records: Vec<SessionRecord> = self.db.all(SESSIONS)?;
        for rec in records {
            let vm = rec.vm.as_deref().and_then(|v| self.vms.get(v).ok());
            let vm_alive = vm.as_ref().is_some_and(|v| v.status.has_process() && v.status != VmStatus::Stopping);
            let fixed = self.adopted_state(&rec, vm_alive);
            let s = Session::new(fixed.clone().unwrap_or_else(|| rec.clone()), true);
            if let Some(next) = fixed {
                self.db.put(SESSIONS, &next.id, &next)?;
                info!(session = %rec.id, from = rec.state.name(), to = next.state.name(), "session re-adopted");
            }
            self.map.write().unwrap_or_else(|p| p.into_inner()).insert(rec.id.clone(), s.clone());
            if let Err(e) = self.reconcile_forwards(&s) {
                warn!(session = %rec.id, error = %e, "could not re-adopt the session's plain TCP forwards");
            }
            if rec.state == SessionState::Hibernating && fixed_is_none_and_stored(self, &rec) {
                // The snapshot is stored: finish the hibernation (delete the VM) in the background.
                let this = self.clone();
                self.tasks.spawn(async move {
                    let _op = s.rec.op.lock().await;
                    if let Err(e) = this.finish_hibernation(&s, Instant::now(), None).await {
                        warn!(session = %s.rec.get().id, error = %e, "could not finish an interrupted hibernation");
                    }
                });
            }
        }
        self.remove_orphan_vms();
        self.retake_leases();
        self.start_upkeep();
        Ok(())
    }

    /// The true state of a session whose VM is (or is not) alive after a restart, if it is not its record's.
    fn adopted_state(&self, rec: &SessionRecord, vm_alive: bool) -> Option<SessionRecord> {
        let to = match rec.state {
            SessionState::Running if !vm_alive => SessionState::Failed,
            SessionState::Hibernating if fixed_is_none_and_stored(self, rec) => return None,
            SessionState::Hibernating if vm_alive => SessionState::Running,
            SessionState::Hibernating => SessionState::Failed,
            SessionState::Starting | SessionState::Waking if vm_alive => SessionState::Running,
            SessionState::Starting => SessionState::Failed,
            SessionState::Waking => SessionState::Hibernated,
            _ => return None,
        };
        // Straight to the true state: a restart is not a transition of the table.
        let mut next = rec.clone();
        next.state = to;
        // An undone hibernation may have restarted the VM's dirty log: its next snapshot is full.
        next.full_next |= rec.state == SessionState::Hibernating;
        next.pending_base = None;
        if to != SessionState::Running {
            next.vm = None;
            if let Some(s) = next.awake_since_unix_ms.take() {
                next.awake_ms += now_unix_ms().saturating_sub(s);
            }
        }
        if to == SessionState::Failed {
            next.error = Some(format!(
                "its VM was lost while flintd was down ({}); a wake restores its last hibernation `{}`",
                rec.state.name(),
                rec.base
            ));
        }
        Some(next)
    }

    /// VMs a session does not run (a wake or create interrupted after its VM started, before the session recorded
    /// it): nothing can reach them; deleted.
    fn remove_orphan_vms(self: &Arc<Self>) {
        let orphans: Vec<String> = self
            .vms
            .list()
            .into_iter()
            .filter(|v| {
                v.owner.as_ref().is_some_and(|o| {
                    o.kind == OWNER
                        && self.session(&o.id).is_none_or(|s| s.rec.with(|r| r.vm.as_deref() != Some(v.id.as_str())))
                })
            })
            .map(|v| v.id)
            .collect();
        if orphans.is_empty() {
            return;
        }
        let vms = self.vms.clone();
        self.tasks.spawn(async move {
            for vm in orphans {
                warn!(vm = %vm, "deleting a VM no session runs (left by an interrupted wake)");
                if let Err(e) = vms.delete(&vm).await {
                    warn!(vm = %vm, error = %e, "could not delete an orphaned session VM");
                }
            }
        });
    }

    /// Running sessions' leases: taken back (a lease lapsed while flintd was down may have gone to another host:
    /// then this host stops running the session).
    fn retake_leases(self: &Arc<Self>) {
        let running: Vec<Arc<Session>> = self
            .all()
            .into_iter()
            .filter(|s| s.rec.with(|r| matches!(r.state, SessionState::Running | SessionState::Hibernating)))
            .collect();
        if running.is_empty() {
            return;
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            if !this.coordinated().await.unwrap_or(false) {
                return;
            }
            for s in running {
                let taken = {
                    let _op = s.rec.op.lock().await;
                    if s.rec.get().state != SessionState::Running {
                        continue;
                    }
                    this.acquire_lease(&s).await
                };
                if let Err(e) = taken {
                    this.fence(&s, &e.to_string()).await;
                }
            }
        });
    }

    /// The upkeep loop (every `sessions.tick_ms`) and the VM layer's events.
    fn start_upkeep(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let tick = Duration::from_millis(self.cfg.sessions.tick_ms);
        self.tasks.spawn_loop(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 0u64.. {
                interval.tick().await;
                let Some(s) = me.upgrade() else { return };
                s.tick(n % SLEEPERS_EVERY == 0);
            }
        });
        let me = Arc::downgrade(self);
        let mut events = self.vms.subscribe();
        self.tasks.spawn_loop(async move {
            loop {
                let e = match events.recv().await {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                };
                let (Some(s), Some(owner), EventKind::Failed(why)) = (me.upgrade(), e.owner, e.kind) else { continue };
                if owner.kind == OWNER {
                    let tasks = s.tasks.clone();
                    tasks.spawn(async move { s.vm_failed(&owner.id, &e.id, &why).await });
                }
            }
        });
    }

    /// A session's VM died: the session fails (a wake restores its last hibernation).
    async fn vm_failed(self: &Arc<Self>, id: &str, vm: &str, why: &str) {
        let Some(s) = self.session(id) else { return };
        let _op = s.rec.op.lock().await;
        if s.rec.with(|r| r.state != SessionState::Running || r.vm.as_deref() != Some(vm)) {
            return;
        }
        let r = s.rec.commit(&self.db, |r| {
            r.state = SessionState::Failed;
            r.error = Some(format!("its VM stopped ({why}); a wake restores its last hibernation `{}`", r.base));
            if let Some(t) = r.awake_since_unix_ms.take() {
                r.awake_ms += now_unix_ms().saturating_sub(t);
            }
        });
        if let Err(e) = r {
            warn!(session = %id, error = %e, "could not record a session's lost VM");
        }
    }

    /// Idle timeouts, lifetimes and lease renewals; each action runs in its own task and skips a session another
    /// operation holds. The lease is kept apart from operations: renewed beside them, and a claim that could not
    /// be renewed freezes, then fences, the session whatever runs on it. Sessions with no VM and no claim
    /// (hibernated, failed) have only their lifetime to check: on `sleepers` ticks only (on a host of mostly
    /// hibernated sessions the walk is most of flintd's idle CPU).
    fn tick(self: &Arc<Self>, sleepers: bool) {
        let now = now_unix_ms();
        if let Some(m) = &self.membership {
            m.sessions.store(self.len(), Ordering::Relaxed);
            m.vms.store(self.vms.len(), Ordering::Relaxed);
            m.headroom_mib.store(self.vms.mem_headroom_mib().unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        for s in self.all() {
            let asleep = |rec: &SessionRecord| matches!(rec.state, SessionState::Hibernated | SessionState::Failed);
            if !sleepers && s.rec.with(asleep) && lock(&s.lease).is_none() {
                continue;
            }
            self.tend_lease(&s, now);
            let action = s.rec.with(|rec| {
                if let Some(why) = rec.expired(now) {
                    return Some(TickAction::End(why));
                }
                if rec.state != SessionState::Running {
                    return None;
                }
                (s.idle_ms(now) >= rec.idle_timeout_s * 1000).then_some(TickAction::Idle)
            });
            let Some(action) = action else { continue };
            let this = self.clone();
            self.tasks.spawn(async move {
                let Ok(_op) = s.rec.op.try_lock() else { return };
                let rec = s.rec.get();
                let result = match action {
                    TickAction::End(why) => {
                        this.metrics.expired.fetch_add(1, Ordering::Relaxed);
                        this.delete_locked(&s, &why).await
                    }
                    TickAction::Idle if rec.state != SessionState::Running || s.idle_ms(now_unix_ms()) == 0 => Ok(()),
                    TickAction::Idle => match rec.on_idle {
                        OnIdle::Hibernate => {
                            this.metrics.idle_hibernations.fetch_add(1, Ordering::Relaxed);
                            this.hibernate_locked(&s).await.map(drop)
                        }
                        OnIdle::Stop => this.delete_locked(&s, "idle (on_idle: stop)").await,
                    },
                };
                if let Err(e) = result {
                    warn!(session = %rec.id, error = %e, "session upkeep failed");
                }
            });
        }
    }

    /// The lease's part of the tick: a renewal when a third of the lease has passed (one in flight at a time),
    /// the VM paused at half the lease without a successful renewal, stopped at two thirds.
    fn tend_lease(self: &Arc<Self>, s: &Arc<Session>, now: u64) {
        match self.lease_due(s, now) {
            LeaseDue::Nothing => return,
            LeaseDue::Fence { since_ms } => {
                // Given up here, at once: no renewal, no publication after this point.
                *lock(&s.lease) = None;
                let (this, s) = (self.clone(), s.clone());
                self.tasks.spawn(async move {
                    let why =
                        format!("no lease renewal succeeded for {since_ms} ms (lease_s {})", this.cfg.sessions.lease_s);
                    this.fence(&s, &why).await
                });
                return;
            }
            LeaseDue::Lost => {
                *lock(&s.lease) = None;
                let (this, s) = (self.clone(), s.clone());
                self.tasks.spawn(async move {
                    this.fence(&s, "this host's etcd lease ended (etcd lost sight of it for longer than its TTL)").await
                });
                return;
            }
            LeaseDue::Thaw => return self.freeze(s, false),
            LeaseDue::Freeze if self.owners.host_lease().is_some() => return self.freeze(s, true),
            LeaseDue::Freeze => self.freeze(s, true),
            LeaseDue::Renew => {}
        }
        if s.renewing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (this, s) = (self.clone(), s.clone());
        self.tasks.spawn(async move {
            let r = this.renew(&s).await;
            s.renewing.store(false, Ordering::Release);
            match r {
                // Resumed only with a claim the fence deadline is still ahead of (a renewal sent long ago may
                // end late).
                Ok(true) if this.lease_current(&s) => this.freeze(&s, false),
                Ok(true) => {}
                Ok(false) => this.fence(&s, "another host took the session's lease").await,
                Err(e) => {
                    this.metrics.lease_renew_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(session = %s.rec.get().id, error = %e, "could not renew the session's lease");
                }
            }
        });
    }
}

/// Every this many ticks the upkeep also checks sleeping sessions (their lifetimes): every 5 s at the default
/// `tick_ms`.
const SLEEPERS_EVERY: u64 = 10;

/// Whether an interrupted hibernation's snapshot reached the store (then it is finished, not undone).
fn fixed_is_none_and_stored(s: &Sessions, rec: &SessionRecord) -> bool {
    rec.pending_base.as_deref().is_some_and(|p| s.vms.store.has_local_manifest(p))
}
