//! Warm pools: per template, `pool_size` clones restored ahead of demand and kept paused. A clone or session
//! request for the template takes one (resume, then the refresh every clone gets: clock, entropy, env, hostname)
//! instead of restoring; the pool refills in the background. Paused, because a pooled VM then costs no CPU: an
//! idle running guest still takes timer interrupts (on an emulating host, a measurable share of a core each).
//!
//! A pooled VM is an ordinary VM record with `pool = Some(template)`; the queue of ready ones is in memory and
//! rebuilt from the records after a restart. A VM leaves the queue under its lock before anything else happens to
//! it, so it is handed out at most once, and one whose resume or refresh fails is deleted, never handed out.
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flint_vmm_api::lock;
use tracing::{info, warn};

use crate::daemon::{Daemon, RestoreOpts};
use crate::vm::model::{OpError, VmRecord, VmStatus};

#[derive(Default)]
pub struct Pools {
    /// Ready (paused, refreshed at restore) VMs per template, oldest first.
    ready: Mutex<HashMap<String, VecDeque<String>>>,
    /// Templates whose refill task is running.
    filling: Mutex<HashSet<String>>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Hand-outs whose VM failed its resume or refresh (deleted, the next one tried).
    pub discarded: AtomicU64,
}

impl Pools {
    /// Ready VMs per template.
    pub fn sizes(&self) -> BTreeMap<String, usize> {
        lock(&self.ready).iter().map(|(t, q)| (t.clone(), q.len())).collect()
    }
}

impl Daemon {
    /// After a restart: pooled VMs still paused go back into their pool; any other pooled record is deleted. Then
    /// every pool refills.
    pub(crate) fn adopt_pools(self: &Arc<Self>) {
        let mut stale = Vec::new();
        for rec in self.list() {
            let Some(t) = rec.pool.clone() else { continue };
            if rec.status == VmStatus::Paused {
                lock(&self.pools.ready).entry(t).or_default().push_back(rec.id);
            } else {
                stale.push(rec.id);
            }
        }
        let this = self.clone();
        tokio::spawn(async move {
            for id in stale {
                let _ = this.delete(&id).await;
            }
            for t in this.templates().unwrap_or_default() {
                this.refill_pool(&t.name);
            }
        });
    }

    /// Takes a ready VM of `template`'s pool for a caller: resumed, refreshed with `env` and named `hostname`,
    /// then no longer the pool's. `None` when the pool is empty (a miss: the caller restores).
    pub(crate) async fn take_pooled(
        self: &Arc<Self>,
        template: &str,
        env: &BTreeMap<String, String>,
        session: Option<&str>,
    ) -> Option<VmRecord> {
        loop {
            let Some(id) = lock(&self.pools.ready).get_mut(template).and_then(|q| q.pop_front()) else {
                if self.template(template).is_ok_and(|t| t.pool_size > 0) {
                    self.pools.misses.fetch_add(1, Ordering::Relaxed);
                    self.refill_pool(template);
                }
                return None;
            };
            let started = Instant::now();
            match self.hand_out(&id, env, session).await {
                Ok(rec) => {
                    self.pools.hits.fetch_add(1, Ordering::Relaxed);
                    info!(vm = %id, template, ms = crate::ms_since(started), "handed out a pooled VM");
                    self.refill_pool(template);
                    return Some(rec);
                }
                Err(e) => {
                    self.pools.discarded.fetch_add(1, Ordering::Relaxed);
                    warn!(vm = %id, template, error = %e, "a pooled VM failed its hand-out; deleting it");
                    let _ = self.delete(&id).await;
                }
            }
        }
    }

    async fn hand_out(
        self: &Arc<Self>,
        id: &str,
        env: &BTreeMap<String, String>,
        session: Option<&str>,
    ) -> Result<VmRecord, OpError> {
        let rec = self.get(id)?;
        if rec.status != VmStatus::Paused {
            return Err(OpError::Conflict(format!("pooled VM `{id}` is {}", rec.status.name())));
        }
        let t = std::time::Instant::now();
        self.pause(id, false).await?;
        let resume_ms = crate::ms_since(t);
        let agent = self.agent(id).await?;
        let hostname = session.map(String::from).unwrap_or_else(|| id.to_string());
        let sent = std::time::Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(self.cfg.restore_agent_timeout_s),
            agent.refresh(env.clone(), Some(hostname)),
        )
        .await
        .map_err(|_| OpError::VmFailed(format!("VM `{id}`: the refresh did not answer")))?
        .map_err(|e| OpError::VmFailed(format!("VM `{id}`: refresh: {e}")))?;
        let refresh_agent_ms = crate::ms_since(sent);
        let ms = crate::ms_since(t);
        self.commit_vm(id, |r| {
            r.pool = None;
            r.env = env.clone();
            r.session = session.map(String::from);
            // A hand-out is resume + refresh: what the caller waited for.
            r.ready_ms = Some(ms);
            r.refresh_ms = Some(ms);
            r.refresh_guest_ms = crate::daemon::refresh_guest_ms(Some(&answer));
            r.refresh_agent_ms = Some(refresh_agent_ms);
            r.resume_ms = Some(resume_ms);
        })
    }

    /// Starts the template's refill task unless one runs: restores clones into the pool (paused) until it holds
    /// `pool_size`, within `pools.max_total` pooled VMs over all templates.
    pub(crate) fn refill_pool(self: &Arc<Self>, template: &str) {
        if !lock(&self.pools.filling).insert(template.to_string()) {
            return;
        }
        let (this, template) = (self.clone(), template.to_string());
        tokio::spawn(async move {
            let result = this.fill(&template).await;
            lock(&this.pools.filling).remove(&template);
            if let Err(e) = result {
                warn!(template, error = %e, "could not fill the template's pool");
            }
        });
    }

    async fn fill(self: &Arc<Self>, template: &str) -> Result<(), OpError> {
        let mut failures = 0;
        loop {
            let Ok(t) = self.template(template) else { return Ok(()) };
            let have = lock(&self.pools.ready).get(template).map_or(0, |q| q.len());
            let pooled: usize = lock(&self.pools.ready).values().map(|q| q.len()).sum();
            if have >= t.pool_size as usize || pooled >= self.cfg.pools.max_total {
                return Ok(());
            }
            // Dirty-page logging on: a pooled VM may become a session, whose hibernation is a diff on this snapshot.
            let opts = RestoreOpts { track_dirty: true, pool: Some(template.to_string()), ..Default::default() };
            let made = async {
                let vm = self.restore(&t.snapshot, &opts).await?;
                self.pause(&vm.id, true).await?;
                Ok::<_, OpError>(vm.id)
            }
            .await;
            match made {
                Ok(id) => {
                    // The template may have been deleted or shrunk meanwhile: then this VM goes.
                    let keep = self.template(template).is_ok_and(|t| have < t.pool_size as usize);
                    if keep {
                        lock(&self.pools.ready).entry(template.to_string()).or_default().push_back(id);
                    } else {
                        let _ = self.delete(&id).await;
                    }
                }
                Err(e) => {
                    failures += 1;
                    if failures >= 3 {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Sets a template's pool size; extra ready VMs are deleted, missing ones restored in the background.
    pub async fn set_pool_size(
        self: &Arc<Self>,
        template: &str,
        size: u32,
    ) -> Result<crate::vm::model::TemplateRecord, OpError> {
        if size as usize > self.cfg.pools.max_total {
            return Err(OpError::QuotaExceeded(format!(
                "quota: pool size {size} is over pools.max_total = {}",
                self.cfg.pools.max_total
            )));
        }
        let mut t = self.template(template)?;
        t.pool_size = size;
        self.put_template(&t)?;
        self.drain_pool(template, size as usize).await;
        self.refill_pool(template);
        Ok(t)
    }

    /// Deletes ready VMs of the pool beyond `keep`.
    pub(crate) async fn drain_pool(self: &Arc<Self>, template: &str, keep: usize) {
        let extra: Vec<String> = {
            let mut ready = lock(&self.pools.ready);
            let q = ready.entry(template.to_string()).or_default();
            let n = q.len().saturating_sub(keep);
            (0..n).filter_map(|_| q.pop_back()).collect()
        };
        for id in extra {
            if let Err(e) = self.delete(&id).await {
                warn!(vm = %id, error = %e, "could not delete a pooled VM");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeLauncher;
    use crate::vm::model::{CreateClones, CreateTemplate};

    use crate::fake::TestEnv as Env;

    async fn ready(d: &Daemon, t: &str, n: usize) {
        let start = Instant::now();
        while d.pools.sizes().get(t).copied().unwrap_or(0) != n {
            assert!(start.elapsed() < Duration::from_secs(20), "pool {t} never held {n}: {:?}", d.pools.sizes());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A template's pool fills to its size with paused VMs; clones take them (resumed, refreshed, no longer
    /// pooled) and restore the rest; concurrent requests never get one VM twice; a pooled VM that died is
    /// discarded, not handed out; a restart rebuilds the pool from the records; size 0 and template delete
    /// empty it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pools_fill_hand_out_once_and_survive_a_restart() {
        let env = Env::new("pool-life");
        let l = FakeLauncher::default();
        let d = env.open(&l);
        let t = d.create_template(CreateTemplate { name: "tp".into(), pool_size: 2, ..Default::default() }).await;
        assert_eq!(t.unwrap().pool_size, 2);
        ready(&d, "tp", 2).await;
        let pooled: Vec<VmRecord> = d.list().into_iter().filter(|v| v.pool.is_some()).collect();
        assert_eq!(pooled.len(), 2);
        assert!(pooled.iter().all(|v| v.status == VmStatus::Paused), "{pooled:?}");
        let env_vars = BTreeMap::from([("K".to_string(), "v".to_string())]);
        let req = CreateClones { template: Some("tp".into()), count: 3, env: env_vars.clone(), ..Default::default() };
        let got = d.clones(req).await.unwrap();
        assert_eq!(got.len(), 3);
        let from_pool = got.iter().filter(|v| pooled.iter().any(|p| p.id == v.id)).count();
        assert_eq!(from_pool, 2, "two from the pool, one restored");
        for v in &got {
            assert_eq!((v.status, v.pool.as_deref(), &v.env), (VmStatus::Running, None, &env_vars), "{v:?}");
        }
        assert_eq!((d.pools.hits.load(Ordering::Relaxed), d.pools.misses.load(Ordering::Relaxed)), (2, 1));

        // Concurrent hand-outs: every caller gets its own VM.
        ready(&d, "tp", 2).await;
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let d = d.clone();
                tokio::spawn(async move {
                    let req = CreateClones { template: Some("tp".into()), count: 1, ..Default::default() };
                    d.clones(req).await.unwrap()[0].id.clone()
                })
            })
            .collect();
        let mut ids = Vec::new();
        for c in calls {
            ids.push(c.await.unwrap());
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 4, "a VM was handed out twice");

        // A pooled VM that died is discarded, never handed out.
        ready(&d, "tp", 2).await;
        let victim = d.list().into_iter().find(|v| v.pool.is_some()).unwrap();
        d.launcher.kill(victim.proc().unwrap());
        let t0 = Instant::now();
        while d.get(&victim.id).unwrap().status != VmStatus::Failed {
            assert!(t0.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let before = d.pools.discarded.load(Ordering::Relaxed);
        let mut handed = Vec::new();
        for _ in 0..2 {
            let req = CreateClones { template: Some("tp".into()), count: 1, ..Default::default() };
            handed.push(d.clones(req).await.unwrap()[0].id.clone());
        }
        assert!(!handed.contains(&victim.id), "a dead pooled VM was handed out");
        assert!(d.pools.discarded.load(Ordering::Relaxed) > before || d.get(&victim.id).is_err());

        // A restart rebuilds the pool from the records.
        ready(&d, "tp", 2).await;
        let pooled: Vec<String> = d.list().into_iter().filter(|v| v.pool.is_some()).map(|v| v.id).collect();
        drop(d);
        let d = env.open(&l);
        ready(&d, "tp", 2).await;
        let req = CreateClones { template: Some("tp".into()), count: 1, ..Default::default() };
        let v = d.clones(req).await.unwrap().remove(0);
        assert!(pooled.contains(&v.id), "the re-adopted pool served the clone");

        d.set_pool_size("tp", 0).await.unwrap();
        assert_eq!(d.pools.sizes().get("tp").copied().unwrap_or(0), 0);
        d.set_pool_size("tp", 1).await.unwrap();
        ready(&d, "tp", 1).await;
        d.delete_template("tp").await.unwrap();
        assert!(d.list().iter().all(|v| v.pool.is_none()), "the pool went with its template");
        match d.set_pool_size("tp", 1).await {
            Err(OpError::NotFound(_)) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(d.set_pool_size("x", 1000).await, Err(OpError::QuotaExceeded(_))));
    }
}
