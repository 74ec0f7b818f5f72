//! Warm pools on the fake launcher.
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pools::CreateClones;
use super::templates::CreateTemplate;
use crate::daemon::Daemon;
use crate::fake::{FakeLauncher, TestEnv as Env};
use crate::launcher::Launcher;
use crate::vm::{VmRecord, VmStatus};

async fn ready(d: &Daemon, t: &str, n: usize) {
    let start = Instant::now();
    while d.pools.sizes().get(t).copied().unwrap_or(0) != n {
        assert!(start.elapsed() < Duration::from_secs(20), "pool {t} never held {n}: {:?}", d.pools.sizes());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pooled(d: &Daemon) -> Vec<VmRecord> {
    d.vms.list().into_iter().filter(|v| v.owner.as_ref().is_some_and(|o| o.kind == super::pools::OWNER)).collect()
}

async fn with_pool(env: &Env, l: &FakeLauncher) -> Arc<Daemon> {
    let d = env.open(l);
    let t = d.create_template(CreateTemplate { name: "tp".into(), pool_size: 2, ..Default::default() }).await;
    assert_eq!(t.unwrap().pool_size, 2);
    ready(&d, "tp", 2).await;
    d
}

fn clones(n: u32, env: BTreeMap<String, String>) -> CreateClones {
    CreateClones { template: Some("tp".into()), count: n, env, ..Default::default() }
}

/// A template's pool fills to its size with paused VMs; clones take them (resumed, refreshed, no longer pooled,
/// in one operation that makes no more than one commit) and restore the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_fill_and_hand_out_in_one_operation() {
    let env = Env::new("pool-fill");
    let l = FakeLauncher::default();
    let d = with_pool(&env, &l).await;
    let before = pooled(&d);
    assert!(before.len() == 2 && before.iter().all(|v| v.status == VmStatus::Paused), "{before:?}");
    let vars = BTreeMap::from([("K".to_string(), "v".to_string())]);
    let commits = d.db.commits();
    let v = d.pools.take("tp", &vars, None, None, false).await.unwrap();
    assert_eq!(d.db.commits() - commits, 1, "a hand-out is one commit");
    assert!(v.timings.resume_ms.is_some() && v.owner.is_none() && v.env == vars, "{v:?}");
    let got = d.pools.clones(clones(3, vars.clone())).await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|v| v.status == VmStatus::Running && v.owner.is_none() && v.env == vars), "{got:?}");
    let (hits, misses) = (d.pools.hits.load(Ordering::Relaxed), d.pools.misses.load(Ordering::Relaxed));
    assert!(hits >= 2 && misses >= 1, "hits {hits}, misses {misses}");
    d.vms.stop_all().await;
}

/// Concurrent requests never get one VM twice; a pooled VM that died is discarded, not handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_outs_are_once_and_never_of_a_dead_vm() {
    let env = Env::new("pool-once");
    let l = FakeLauncher::default();
    let d = with_pool(&env, &l).await;
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let d = d.clone();
            tokio::spawn(async move { d.pools.clones(clones(1, BTreeMap::new())).await.unwrap()[0].id.clone() })
        })
        .collect();
    let mut ids = Vec::new();
    for c in calls {
        ids.push(c.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "a VM was handed out twice");
    ready(&d, "tp", 2).await;
    let victim = pooled(&d).remove(0);
    l.kill(victim.proc().unwrap());
    let t0 = Instant::now();
    while d.vms.get(&victim.id).is_ok_and(|v| v.status != VmStatus::Failed) {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..2 {
        let v = d.pools.clones(clones(1, BTreeMap::new())).await.unwrap().remove(0);
        assert_ne!(v.id, victim.id, "a dead pooled VM was handed out");
    }
    d.vms.stop_all().await;
}

/// A restart rebuilds the pool from the records; size 0 and template delete empty it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_survive_a_restart_and_go_with_their_template() {
    let env = Env::new("pool-restart");
    let l = FakeLauncher::default();
    let d = with_pool(&env, &l).await;
    let before: Vec<String> = pooled(&d).into_iter().map(|v| v.id).collect();
    crate::fake::crash(d).await;
    let d = env.open(&l);
    ready(&d, "tp", 2).await;
    let v = d.pools.clones(clones(1, BTreeMap::new())).await.unwrap().remove(0);
    assert!(before.contains(&v.id), "the re-adopted pool served the clone");
    d.pools.set_size("tp", 0).await.unwrap();
    assert_eq!(d.pools.sizes().get("tp").copied().unwrap_or(0), 0);
    d.pools.set_size("tp", 1).await.unwrap();
    ready(&d, "tp", 1).await;
    d.delete_template("tp").await.unwrap();
    assert!(pooled(&d).is_empty(), "the pool went with its template");
    assert!(d.pools.set_size("tp", 1).await.unwrap_err().to_string().contains("no template"));
    assert!(d.pools.set_size("x", 1000).await.unwrap_err().to_string().contains("pools.max_total"));
    d.vms.stop_all().await;
}
