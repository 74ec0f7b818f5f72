//! Standby VMMs (`[standby]`, docs/operations.md): per configured memory size, `count` VMM processes started
//! ahead by the launcher, jailed in a directory of their own (`<data_dir>/standby/s<uid>`) as a uid of the jail's
//! range, their KVM VM and memory slots made. A VM start of that size takes one in [`Manager::reserve`]: the
//! standby's uid moves to the VM in the allocator, its directory is renamed to the VM's (the jail's `/` is the
//! directory, not its name), and the VMM is handed the launch spec instead of a process being started. The set
//! refills in the background, one standby at a time. Standbys hold no quota, appear in no listing, and serve one
//! VM each; they exit by themselves when flintd goes (their control socket closes).
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flint_vmm_api::lock;
use tracing::{info, warn};

use super::Manager;
use crate::launcher::{Confinement, Standby};

/// Why a standby did not start.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error(transparent)]
    Alloc(#[from] super::alloc::AllocError),
    #[error("create {}: {source}", dir.display())]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Vmm(#[from] crate::launcher::VmmError),
    #[error("the standby start panicked: {0}")]
    Panicked(String),
}

/// The idle standbys and what became of them.
#[derive(Default)]
pub struct Standbys {
    idle: Mutex<HashMap<u64, Vec<Standby>>>,
    /// Woken when a standby is taken (`notify_one` keeps a permit: no wake is lost).
    refill: Arc<tokio::sync::Notify>,
    /// Standbys started, handed a VM, and found dead when taken (metrics).
    pub started: AtomicU64,
    pub taken: AtomicU64,
    pub lost: AtomicU64,
}

/// The allocator's key for a standby's uid (no VM id starts with NUL).
fn key(uid: u32) -> String {
    format!("\0standby-{uid}")
}

impl Manager {
    fn standby_root(&self) -> PathBuf {
        self.cfg.data_dir.join("standby")
    }

    /// Whether this flintd keeps standby VMMs (the jail on, a count and sizes configured).
    fn standbys_on(&self) -> bool {
        self.cfg.jail.enabled && self.cfg.standby.count > 0 && !self.cfg.standby.mem_mib.is_empty()
    }

    /// Idle standbys per memory size (metrics, tests).
    pub fn standby_counts(&self) -> Vec<(u64, usize)> {
        let idle = lock(&self.standbys.idle);
        self.cfg.standby.mem_mib.iter().map(|m| (*m, idle.get(m).map_or(0, Vec::len))).collect()
    }

    /// Removes what standbys of a previous run left (their processes ended with its control sockets) and starts
    /// the refill task.
    pub(super) fn start_standbys(self: &Arc<Self>) {
        let root = self.standby_root();
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            self.launcher.release(&e.path());
            let _ = std::fs::remove_dir_all(e.path());
        }
        if !self.standbys_on() {
            return;
        }
        let weak = Arc::downgrade(self);
        let refill = self.standbys.refill.clone();
        self.tasks.spawn_loop(async move {
            let mut backoff = Duration::from_millis(0);
            loop {
                let Some(this) = weak.upgrade() else { return };
                match this.refill_one().await {
                    Ok(true) => {
                        backoff = Duration::ZERO;
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // A host that cannot start standbys (a broken jail) still starts VMs the ordinary way;
                        // the error is logged, and retried less and less often.
                        backoff = (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                        warn!(error = %e, retry_s = backoff.as_secs(), "could not start a standby VMM");
                    }
                }
                drop(this);
                if backoff.is_zero() {
                    refill.notified().await;
                } else {
                    let _ = tokio::time::timeout(backoff, refill.notified()).await;
                }
            }
        });
    }

    /// Starts one standby where a size has fewer than `count`; whether it started one.
    async fn refill_one(self: &Arc<Self>) -> Result<bool, StandbyError> {
        let Some(mem_mib) = ({
            let idle = lock(&self.standbys.idle);
            self.cfg.standby.mem_mib.iter().copied().find(|m| idle.get(m).map_or(0, Vec::len) < self.cfg.standby.count)
        }) else {
            return Ok(false);
        };
        let uid = {
            let mut alloc = lock(&self.alloc);
            let tmp = key(u32::MAX);
            let uid = alloc.reserve_uid(&tmp, &self.cfg.jail)?;
            let held = alloc.held(&tmp).unwrap_or_default();
            alloc.release(&tmp);
            alloc.add(&key(uid), held);
            uid
        };
        let dir = self.standby_root().join(format!("s{uid}"));
        let (launcher, d) = (self.launcher.clone(), dir.clone());
        let c = Confinement { uid, gid: uid, mem_mib, cpu: None };
        let started = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).map_err(|source| StandbyError::Dir { dir: d.clone(), source })?;
            Ok(launcher.standby(&d, c)?)
        })
        .await
        .unwrap_or_else(|e| Err(StandbyError::Panicked(e.to_string())));
        match started {
            Ok(s) => {
                self.standbys.started.fetch_add(1, Ordering::Relaxed);
                lock(&self.standbys.idle).entry(mem_mib).or_default().push(s);
                Ok(true)
            }
            Err(e) => {
                lock(&self.alloc).release(&key(uid));
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// A start that took a standby has ended: the refill replaces it now (not while the start runs, which it
    /// would slow down on a small host).
    pub(super) fn standby_used(&self) {
        self.standbys.refill.notify_one();
    }

    /// An idle, living standby for a VM of `mem_mib` (replaced once its start ends), with the allocator key its uid
    /// is held under; none if the size has none.
    pub(super) fn take_standby(self: &Arc<Self>, mem_mib: u64) -> Option<(Standby, String)> {
        if !self.standbys_on() {
            return None;
        }
        let mut dead = Vec::new();
        let found = {
            let mut idle = lock(&self.standbys.idle);
            let list = idle.get_mut(&mem_mib)?;
            let mut found = None;
            while let Some(s) = list.pop() {
                if self.launcher.alive(s.proc) {
                    found = Some(s);
                    break;
                }
                dead.push(s);
            }
            found
        };
        if !dead.is_empty() {
            self.standbys.refill.notify_one();
        }
        for s in dead {
            warn!(pid = s.proc.pid, dir = %s.dir.display(), "a standby VMM had exited; see its vmm.log");
            self.standbys.lost.fetch_add(1, Ordering::Relaxed);
            self.drop_standby(s);
        }
        let s = found?;
        self.standbys.taken.fetch_add(1, Ordering::Relaxed);
        let k = key(s.uid);
        Some((s, k))
    }

    /// A standby taken for a start refused before it used it: idle again.
    pub(super) fn return_standby(&self, s: Standby) {
        lock(&self.standbys.idle).entry(s.mem_mib).or_default().push(s);
    }

    /// A standby taken but not used (the start failed before its hand-over), or found dead: ended, then (once
    /// its process is reaped, so no process of that uid is left) its uid, cgroup and files freed.
    pub(super) fn drop_standby(self: &Arc<Self>, s: Standby) {
        let (dir, uid) = (s.dir.clone(), s.uid);
        let gone = self.launcher.discard(s);
        let this = self.clone();
        self.tasks.spawn(async move {
            gone.await;
            lock(&this.alloc).release(&key(uid));
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        });
    }

    /// Ends every idle standby (flintd stopping; they would end with its control sockets anyway).
    pub fn stop_standbys(self: &Arc<Self>) {
        let all: Vec<Standby> = lock(&self.standbys.idle).drain().flat_map(|(_, v)| v).collect();
        if !all.is_empty() {
            info!(count = all.len(), "stopping standby VMMs");
        }
        for s in all {
            self.drop_standby(s);
        }
    }
}
