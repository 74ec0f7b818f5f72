//! The VM layer on the fake launcher and a fake host network: lifecycles, failures at each step, re-adoption,
//! quotas, snapshots with drives, and the promises of the layer (two durable commits per restore, nothing left
//! by a failed start, no service imported).
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::daemon::Daemon;
use crate::error::{Kind, Refusal};
use crate::fake::{wait_for, FakeLauncher, TestEnv as Env};
use flint_vmm_api::describe::RunState;

fn vm(id: &str) -> CreateVm {
    CreateVm { id: Some(id.into()), ..Default::default() }
}

fn how(publish: bool) -> SnapshotHow {
    SnapshotHow { publish, ..Default::default() }
}

/// A daemon on the fake launcher with snapshot `s` of VM `src` (deleted).
async fn with_snapshot(env: &Env, l: &FakeLauncher, mem: u64) -> Arc<Daemon> {
    let d = env.open(l);
    d.vms.create(CreateVm { id: Some("src".into()), mem_mib: Some(mem), ..Default::default() }, None).await.unwrap();
    d.vms.snapshot("src", "s", &how(false)).await.unwrap();
    d.vms.delete("src").await.unwrap();
    d
}

fn restore(snapshot: &str) -> Restore {
    Restore { snapshot: snapshot.into(), ..Default::default() }
}

/// The quotas of `[limits]`: exceeding one is a 429 naming it, and nothing starts; failed VMs hold no quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_before_anything_starts() {
    let mut env = Env::new("quota");
    env.cfg.limits = crate::config::Limits {
        max_vms: 3,
        max_total_mem_mib: 1024,
        max_clones_per_call: 2,
        max_disk_mib: 0,
        ..Default::default()
    };
    let l = FakeLauncher::default();
    let d = env.open(&l);
    let quota = |r: Result<VmRecord, StartFailure>, what: &str| match r {
        Err(StartFailure { error, .. }) if matches!(*error, StartError::Quota(_)) => {
            assert!(error.to_string().contains(what), "{error}")
        }
        other => panic!("expected a quota error naming {what}: {other:?}"),
    };
    d.vms.create(CreateVm { id: Some("a".into()), mem_mib: Some(512), ..Default::default() }, None).await.unwrap();
    quota(d.vms.create(CreateVm { mem_mib: Some(768), ..Default::default() }, None).await, "max_total_mem_mib");
    d.vms.snapshot("a", "qa", &how(false)).await.unwrap();
    let clones = |n| {
        d.pools.clones(crate::services::pools::CreateClones {
            snapshot: Some("qa".into()),
            count: n,
            ..Default::default()
        })
    };
    let refused = |r: Result<Vec<VmRecord>, crate::services::templates::TemplateError>, what: &str| match r {
        Err(crate::services::templates::TemplateError::Quota(m)) => assert!(m.contains(what), "{m}"),
        other => panic!("{other:?}"),
    };
    refused(clones(3).await, "max_clones_per_call");
    // Two clones of 512 MiB would pass the memory quota: refused as a whole, none started.
    refused(clones(2).await, "max_total_mem_mib");
    assert_eq!((d.vms.len(), l.running()), (1, 1));
    d.vms.create(CreateVm { id: Some("b".into()), mem_mib: Some(256), ..Default::default() }, None).await.unwrap();
    d.vms.create(CreateVm { id: Some("c".into()), mem_mib: Some(128), ..Default::default() }, None).await.unwrap();
    quota(d.vms.create(CreateVm { mem_mib: Some(64), ..Default::default() }, None).await, "max_vms");
    // A failed VM holds nothing.
    l.kill(d.vms.get("c").unwrap().proc().unwrap());
    wait_for("the exit noticed", || d.vms.get("c").unwrap().status == VmStatus::Failed).await;
    d.vms.create(CreateVm { id: Some("d".into()), mem_mib: Some(64), ..Default::default() }, None).await.unwrap();
    d.vms.stop_all().await;
}

/// After any mix of operations, a VM that still exists is running or paused, its VMM is alive, and the database
/// holds exactly the in-memory record; a deleted one is gone from both and its VMM stopped.
fn check(d: &Daemon, l: &FakeLauncher, id: &str) {
    match d.vms.get(id) {
        Ok(rec) => {
            assert!(matches!(rec.status, VmStatus::Running | VmStatus::Paused), "{id}: {rec:?}");
            assert_eq!(d.vms.durable(id).as_ref(), Some(&rec), "{id}: database and memory differ");
            assert!(rec.proc().is_some_and(|p| d.vms.launcher.alive(p)), "{id}: no VMM behind {rec:?}");
        }
        Err(VmError::NotFound(_)) => {
            assert!(
                d.db.get::<VmRecord>(crate::db::VMS, id).unwrap().is_none(),
                "{id}: deleted but still in the database"
            );
            assert!(l.pid_of(&d.vms.vm_dir(id)).is_none(), "{id}: VMM left running");
        }
        Err(e) => panic!("{id}: {e}"),
    }
}

async fn random_op(d: Arc<Daemon>, id: String, i: usize, op: u64) -> Result<(), Refusal> {
    match op {
        0 => Ok(d.vms.pause(&id).await.map(drop)?),
        1 => Ok(d.vms.resume(&id).await.map(drop)?),
        2 => Ok(d.vms.snapshot(&id, &format!("s{id}-{i}"), &how(false)).await.map(drop)?),
        3 => Ok(d.vms.delete(&id).await?),
        _ => {
            let a = d.vms.agent(&id).await?;
            let req = flint_agent::protocol::ExecRequest { argv: vec!["/bin/true".into()], ..Default::default() };
            a.exec_output(req).await.map(drop).map_err(|e| Refusal::new(Kind::Guest, e.to_string()))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_interleavings_on_one_vm_end_in_valid_states() {
    let env = Env::new("interleave");
    let l = FakeLauncher::default();
    let d = env.open(&l);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut outcomes: HashMap<&str, usize> = HashMap::new();
    for round in 0..100 {
        let id = format!("vm{round}");
        d.vms.create(vm(&id), None).await.unwrap();
        let tasks: Vec<_> = (0..5)
            .map(|i| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                tokio::spawn(random_op(d.clone(), id.clone(), i, seed % 5))
            })
            .collect();
        for t in tasks {
            let k = match t.await.unwrap() {
                Ok(()) => "ok",
                Err(e) if e.kind == Kind::NotFound => "not found",
                Err(e) if e.kind == Kind::Conflict => "conflict",
                Err(e) => panic!("round {round}: unexpected error {} {e}", e.status()),
            };
            *outcomes.entry(k).or_default() += 1;
        }
        check(&d, &l, &id);
        if d.vms.get(&id).is_ok() {
            d.vms.delete(&id).await.unwrap();
            check(&d, &l, &id);
        }
    }
    assert_eq!(l.running(), 0, "every VMM stopped");
    // The mix really interleaved: each kind of outcome happened.
    for k in ["ok", "conflict", "not found"] {
        assert!(outcomes.get(k).copied().unwrap_or(0) > 0, "{k} never happened: {outcomes:?}");
    }
}

/// A start that fails at any step (its network, its VMM's spawn, its agent, its refresh) leaves nothing behind:
/// no VMM, no network namespace, no directory, no record, nothing in the quotas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_failing_at_each_step_leaves_nothing() {
    let mut env = Env::new("fail-steps");
    env.cfg.restore_agent_timeout_s = 1;
    env.cfg.limits.max_vms = 2;
    let l = FakeLauncher::default();
    let d = with_snapshot(&env, &l, 256).await;
    let fake = d.vms.net.fake().unwrap();
    let net = crate::net::NetworkRequest::default();
    let steps: [(&str, &dyn Fn()); 4] = [
        ("network", &|| fake.fail_setups.store(1, std::sync::atomic::Ordering::Relaxed)),
        ("spawn", &|| l.fail_next_spawns(1)),
        ("agent", &|| l.silence_next_agents(1)),
        ("refresh", &|| l.refuse_next_agents(1)),
    ];
    for (step, inject) in steps {
        inject();
        let r = Restore { network: Some(net.clone()), id_prefix: Some(step.into()), ..restore("s") };
        let f = d.vms.restore(r).await.expect_err(step);
        let id = f.vm.as_ref().expect("the failed start's record").id.clone();
        assert_eq!(f.vm.as_ref().unwrap().status, VmStatus::Failed);
        assert_eq!(env.leftovers(&d, &id), Vec::<String>::new(), "{step}: {f}");
        assert_eq!(l.running(), 0, "{step}: a VMM was left running");
    }
    // Nothing was held in the quotas either: two VMs (the limit) still start.
    for _ in 0..2 {
        d.vms.restore(Restore { network: Some(net.clone()), ..restore("s") }).await.unwrap();
    }
    d.vms.stop_all().await;
    assert_eq!(std::fs::read_dir(env.cfg.data_dir.join("netns")).unwrap().count(), 0, "no namespace left");
}

/// A restore writes the database twice: its VMM spawned (a restart finds it) and its start done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_makes_at_most_two_durable_commits() {
    let env = Env::new("commits");
    let l = FakeLauncher::default();
    let d = with_snapshot(&env, &l, 256).await;
    for r in [
        restore("s"),
        Restore { network: Some(Default::default()), ..restore("s") },
        Restore { paused: true, ..restore("s") },
    ] {
        let before = d.db.commits();
        let v = d.vms.restore(r).await.unwrap();
        assert_eq!(d.db.commits() - before, 2, "{v:?}");
        assert_eq!(d.vms.durable(&v.id).as_ref(), Some(&v), "the second commit holds the whole record");
        assert!(v.timings.ready_ms.is_some() && v.timings.refresh_ms.is_some() && v.timings.fetch_ms.is_some());
    }
    d.vms.stop_all().await;
}

/// A shutdown with VMs running ends without waiting for them: their exit watches are loops of the shutdown (the
/// VMs outlive flintd and are watched again when re-adopted), not work in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_does_not_wait_for_running_vms() {
    let env = Env::new("shutdown");
    let l = FakeLauncher::default();
    let d = with_snapshot(&env, &l, 256).await;
    let v = d.vms.restore(restore("s")).await.unwrap();
    assert!(d.shutdown(Duration::from_secs(10)).await, "tasks still running: {}", d.tasks.len());
    assert!(l.pid_of(&d.vms.vm_dir(&v.id)).is_some(), "the VM runs on after flintd's shutdown");
    d.vms.stop_all().await;
}

/// A clone whose agent never answers fails by its own deadline and frees its restore slot: the other clones of
/// the same call are restored meanwhile; the failed one is answered as `failed`, with nothing of it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_whose_agent_never_answers_fails_alone() {
    let mut env = Env::new("stuck");
    env.cfg.restore_agent_timeout_s = 2;
    env.cfg.max_parallel_restores = 1;
    let l = FakeLauncher::default();
    let d = with_snapshot(&env, &l, 256).await;
    l.silence_next_agents(1);
    let t = Instant::now();
    let req = crate::services::pools::CreateClones { snapshot: Some("s".into()), count: 3, ..Default::default() };
    let clones = d.pools.clones(req).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "one silent agent held the single restore slot for {:?}",
        t.elapsed()
    );
    let failed: Vec<&VmRecord> = clones.iter().filter(|r| r.status == VmStatus::Failed).collect();
    assert_eq!((clones.len(), failed.len()), (3, 1), "{clones:?}");
    assert!(failed[0].error.as_deref().unwrap_or("").contains("did not answer within 2s"), "{failed:?}");
    assert_eq!(env.leftovers(&d, &failed[0].id), Vec::<String>::new());
    assert_eq!(d.vms.len(), 2, "the two clones with an agent");
    d.vms.stop_all().await;
}

mod more;

/// #30: standby VMMs (`[standby]`, 256 MiB by default) are started ahead; a restore of that size takes one (its
/// uid and its directory, renamed, become the VM's), the set refills, other sizes start a VMM of their own, a start
/// that fails after the take leaves nothing held, and standbys are never VMs of the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_vmms_serve_restores_of_their_size_and_refill() {
    let env = Env::new("standby");
    let l = FakeLauncher::default();
    let d = with_snapshot(&env, &l, 256).await;
    let big = {
        d.vms
            .create(CreateVm { id: Some("big".into()), mem_mib: Some(512), ..Default::default() }, None)
            .await
            .unwrap();
        d.vms.snapshot("big", "s512", &how(false)).await.unwrap();
        d.vms.delete("big").await.unwrap();
        "s512"
    };
    let standby_root = env.cfg.data_dir.join("standby");
    let waiting = || -> Vec<u32> {
        let mut v: Vec<u32> = std::fs::read_dir(&standby_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().strip_prefix('s')?.parse().ok())
            .collect();
        v.sort();
        v
    };
    wait_for("two standbys", || d.vms.standby_counts() == vec![(256, 2)] && l.standbys().0 == 2).await;
    let before = waiting();
    assert_eq!(before.len(), 2, "{before:?}");
    // Hand-overs so far (the boot of `src` may have taken a standby started in time).
    let h0 = l.standbys().1;
    assert!(d.vms.list().is_empty(), "standbys are not VMs");

    let r = d.vms.restore(restore("s")).await.unwrap();
    assert!(r.timings.standby, "{r:?}");
    let uid = r.uid.expect("jailed");
    assert!(before.contains(&uid), "the VM runs as the standby's uid {uid} ({before:?})");
    assert!(r.dir.ends_with(&r.id) && r.dir.is_dir(), "the standby's directory is the VM's: {}", r.dir.display());
    assert!(!waiting().contains(&uid), "its standby directory was renamed");
    assert!(r.timings.first_run_us.is_none(), "the fake VMM reports no first-run clock");
    wait_for("the set refilled", || d.vms.standby_counts() == vec![(256, 2)]).await;
    assert_eq!(l.standbys(), (2, h0 + 1));
    assert!(!waiting().contains(&uid), "a new standby never gets a uid in use");

    // Another size: a VMM of its own.
    let other = d.vms.restore(restore(big)).await.unwrap();
    assert!(!other.timings.standby);
    assert_eq!(l.standbys(), (2, h0 + 1));

    // A hand-over that fails: the start fails, the standby is gone, and nothing of it is held.
    l.fail_next_spawns(1);
    let e = d.vms.restore(restore("s")).await.unwrap_err();
    assert!(e.to_string().contains("injected"), "{e}");
    wait_for("the set refilled after the failure", || d.vms.standby_counts() == vec![(256, 2)]).await;
    assert_eq!(l.standbys(), (2, h0 + 2));

    for v in d.vms.list() {
        d.vms.delete(&v.id).await.unwrap();
    }
    // Only the two waiting standbys hold uids (none of the VMs' or the failed start's is left).
    let held: Vec<u32> = {
        let a = lock(&d.vms.alloc);
        waiting().into_iter().filter(|u| a.held(&format!("\0standby-{u}")).is_some()).collect()
    };
    assert_eq!(held, waiting());
    assert_eq!(std::fs::read_dir(env.cfg.data_dir.join("vms")).map(|d| d.count()).unwrap_or(0), 0);
}
