//! Warm pools and clones. Per template, `pool_size` clones restored ahead of demand and kept paused (owner tag
//! `pool`/template). A clone or session request for the template takes one (one operation on the VM: resume,
//! the refresh every clone gets, its new owner) instead of restoring; the pool refills in the background.
//! Paused, because a pooled VM then costs no CPU: an idle running guest still takes timer interrupts.
//!
//! The queue of ready VMs is in memory and rebuilt from the VM records after a restart. A VM leaves the queue
//! under its lock before anything else happens to it, so it is handed out at most once, and one whose hand-out
//! fails is deleted, never handed out.
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use flint_vmm_api::lock;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::templates::{TemplateError, TemplateRecord, Templates};
use crate::tasks::Tasks;
use crate::vm::{self, HandOut, OwnerTag, VmRecord, VmStatus};

/// The owner tag of a pooled VM.
pub const OWNER: &str = "pool";

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateClones {
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default = "one")]
    pub count: u32,
    /// Environment for the clones' later execs (set by the agent's refresh).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Start before the memory has arrived: pages come from the store (L1, else S3) on first touch, the recorded
    /// working set is prefetched. Otherwise the memory image is fetched whole first.
    #[serde(default)]
    pub lazy: bool,
    /// A network of its own for each clone (its own address and MAC).
    #[serde(default)]
    pub network: Option<crate::net::NetworkRequest>,
    /// A CPU limit, a fraction of one core; default: the snapshot's.
    #[serde(default)]
    pub cpu: Option<f64>,
}

fn one() -> u32 {
    1
}

pub struct Pools {
    vms: Arc<vm::Manager>,
    templates: Arc<Templates>,
    max_total: usize,
    /// Ready (paused, refreshed at restore) VMs per template, oldest first.
    ready: Mutex<HashMap<String, VecDeque<String>>>,
    /// Templates whose refill task is running.
    filling: Mutex<HashSet<String>>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Hand-outs whose VM failed its resume or refresh (deleted, the next one tried).
    pub discarded: AtomicU64,
    tasks: Tasks,
    me: Weak<Pools>,
}

impl Pools {
    /// The pools service; pooled VMs still paused after a restart go back into their pool, any other pooled
    /// record is deleted, then every pool refills.
    pub fn open(vms: Arc<vm::Manager>, templates: Arc<Templates>, max_total: usize, tasks: Tasks) -> Arc<Pools> {
        let p = Arc::new_cyclic(|me| Pools {
            vms,
            templates,
            max_total,
            ready: Mutex::new(HashMap::new()),
            filling: Mutex::new(HashSet::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            tasks,
            me: me.clone(),
        });
        let mut stale = Vec::new();
        for rec in p.vms.list() {
            let Some(t) = rec.owner.as_ref().filter(|o| o.kind == OWNER).map(|o| o.id.clone()) else { continue };
            if rec.status == VmStatus::Paused {
                lock(&p.ready).entry(t).or_default().push_back(rec.id);
            } else {
                stale.push(rec.id);
            }
        }
        let this = p.clone();
        p.tasks.spawn(async move {
            for id in stale {
                let _ = this.vms.delete(&id).await;
            }
            for t in this.templates.list().unwrap_or_default() {
                this.refill(&t.name);
            }
        });
        p
    }

    /// Ready VMs per template.
    pub fn sizes(&self) -> BTreeMap<String, usize> {
        lock(&self.ready).iter().map(|(t, q)| (t.clone(), q.len())).collect()
    }

    /// Takes a ready VM of `template`'s pool for a caller: resumed, refreshed with `env`, named `hostname`,
    /// given to `owner`. `None` when the pool is empty (a miss: the caller restores).
    pub async fn take(
        &self,
        template: &str,
        env: &BTreeMap<String, String>,
        owner: Option<OwnerTag>,
        hostname: Option<String>,
        track_dirty: bool,
    ) -> Option<VmRecord> {
        let from = OwnerTag::new(OWNER, template);
        loop {
            let Some(id) = lock(&self.ready).get_mut(template).and_then(|q| q.pop_front()) else {
                if self.templates.get(template).is_ok_and(|t| t.pool_size > 0) {
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    self.refill(template);
                }
                return None;
            };
            let started = Instant::now();
            let h = HandOut { env: env.clone(), hostname: hostname.clone(), owner: owner.clone(), track_dirty };
            match self.vms.hand_out(&id, &from, h).await {
                Ok(rec) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    info!(vm = %id, template, ms = crate::ms_since(started), "handed out a pooled VM");
                    self.refill(template);
                    return Some(rec);
                }
                Err(e) => {
                    self.discarded.fetch_add(1, Ordering::Relaxed);
                    warn!(vm = %id, template, error = %e, "a pooled VM failed its hand-out; deleting it");
                    let _ = self.vms.delete(&id).await;
                }
            }
        }
    }

    /// Starts the template's refill task unless one runs: restores clones into the pool (paused) until it holds
    /// `pool_size`, within `pools.max_total` pooled VMs over all templates.
    pub fn refill(&self, template: &str) {
        if !lock(&self.filling).insert(template.to_string()) {
            return;
        }
        let (Some(this), template) = (self.me.upgrade(), template.to_string()) else { return };
        self.tasks.spawn(async move {
            let result = this.fill(&template).await;
            lock(&this.filling).remove(&template);
            if let Err(e) = result {
                warn!(template, error = %e, "could not fill the template's pool");
            }
        });
    }

    async fn fill(&self, template: &str) -> Result<(), TemplateError> {
        let mut failures = 0;
        loop {
            let Ok(t) = self.templates.get(template) else { return Ok(()) };
            let have = lock(&self.ready).get(template).map_or(0, |q| q.len());
            let pooled: usize = lock(&self.ready).values().map(|q| q.len()).sum();
            if have >= t.pool_size as usize || pooled >= self.max_total || self.tasks.is_cancelled() {
                return Ok(());
            }
            // Dirty-page logging on: a pooled VM may become a session, whose hibernation is a diff on this snapshot.
            let r = vm::Restore {
                snapshot: t.snapshot.clone(),
                track_dirty: true,
                owner: Some(OwnerTag::new(OWNER, template)),
                id_prefix: Some("pool".into()),
                paused: true,
                ..Default::default()
            };
            match self.vms.restore(r).await {
                Ok(vm) => {
                    // The template may have been deleted or shrunk meanwhile: then this VM goes.
                    let keep = self.templates.get(template).is_ok_and(|t| have < t.pool_size as usize);
                    if keep {
                        lock(&self.ready).entry(template.to_string()).or_default().push_back(vm.id);
                    } else {
                        let _ = self.vms.delete(&vm.id).await;
                    }
                }
                Err(e) => {
                    failures += 1;
                    if failures >= 3 {
                        return Err(e.into());
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Sets a template's pool size; extra ready VMs are deleted, missing ones restored in the background.
    pub async fn set_size(&self, template: &str, size: u32) -> Result<TemplateRecord, TemplateError> {
        if size as usize > self.max_total {
            return Err(TemplateError::Quota(format!("pool size {size} is over pools.max_total = {}", self.max_total)));
        }
        let mut t = self.templates.get(template)?;
        t.pool_size = size;
        self.templates.put(&t)?;
        self.drain(template, size as usize).await;
        self.refill(template);
        Ok(t)
    }

    /// Deletes ready VMs of the pool beyond `keep`.
    pub async fn drain(&self, template: &str, keep: usize) {
        let extra: Vec<String> = {
            let mut ready = lock(&self.ready);
            let q = ready.entry(template.to_string()).or_default();
            let n = q.len().saturating_sub(keep);
            (0..n).filter_map(|_| q.pop_back()).collect()
        };
        for id in extra {
            if let Err(e) = self.vms.delete(&id).await {
                warn!(vm = %id, error = %e, "could not delete a pooled VM");
            }
        }
    }

    /// Clones of a template (a warm pool's VMs first) or of a snapshot: all started clones, and the failed ones
    /// as records in `failed` (nothing of them is left). An error only when none started.
    pub async fn clones(&self, req: CreateClones) -> Result<Vec<VmRecord>, TemplateError> {
        let snapshot = match (&req.template, &req.snapshot) {
            (Some(t), None) => self.templates.get(t)?.snapshot,
            (None, Some(s)) => s.clone(),
            _ => return Err(TemplateError::Invalid("give exactly one of `template` and `snapshot`".into())),
        };
        if req.count == 0 {
            return Err(TemplateError::Invalid("count 0: ask for at least one clone".into()));
        }
        let max = self.vms.cfg.limits.max_clones_per_call;
        if req.count > max {
            return Err(TemplateError::Quota(format!(
                "{} clones in one call, limits.max_clones_per_call = {max}",
                req.count
            )));
        }
        // Fetch once (the clones then share the L1 chunks), then restore in parallel up to the slot limit.
        let manifest = self.vms.store.manifest(&snapshot).await?;
        // All or nothing: every clone must fit the quotas before the first starts (each also checks as it starts).
        let meta = crate::vm::meta::SnapshotMeta::load(&manifest.id, &manifest.metadata).ok();
        let mem = meta.as_ref().map_or(0, |m| m.mem_mib);
        let slot = self.vms.cfg.vm.mount_slot_mib;
        let disk = meta.as_ref().map_or(0, |m| m.disk_mib.unwrap_or(0) + m.mount_slot.map_or(0, |_| slot));
        self.vms.check_quota(req.count as usize, mem, disk).map_err(|e| TemplateError::Quota(e.to_string()))?;
        let tasks: Vec<_> = (0..req.count)
            .map(|_| {
                let (this, snapshot, req) = (self.me.upgrade(), snapshot.clone(), req.clone());
                self.tasks.spawn(async move {
                    let this = this.ok_or_else(|| TemplateError::Invalid("flintd is stopping".into()))?;
                    // A warm pool's VM first (resume + refresh), else a restore. Pooled VMs have no network: a
                    // clone that asks for one is restored.
                    if let (Some(t), None, None) = (&req.template, &req.network, req.cpu) {
                        if let Some(vm) = this.take(t, &req.env, None, None, false).await {
                            return Ok(vm);
                        }
                    }
                    let r = vm::Restore {
                        snapshot,
                        env: req.env.clone(),
                        lazy: req.lazy,
                        network: req.network.clone(),
                        cpu: req.cpu,
                        ..Default::default()
                    };
                    this.vms.restore(r).await.map_err(TemplateError::from)
                })
            })
            .collect();
        super::gather_with_failures(tasks, "clones").await
    }
}
