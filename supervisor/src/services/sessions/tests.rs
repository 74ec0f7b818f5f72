//! Sessions on the fake launcher: wakes, hibernations, forks, idle timeouts, lifetimes, restarts.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::daemon::Daemon;
use crate::fake::{FakeLauncher, TestEnv};
use crate::launcher::Launcher;
use crate::vm::meta::SnapshotMeta;

/// Upkeep every 100 ms, eager wakes (the fake VMM has no page server).
fn env(tag: &str) -> TestEnv {
    let mut e = TestEnv::new(&format!("session-{tag}"));
    e.cfg.sessions.tick_ms = 100;
    e.cfg.sessions.lazy_wake = false;
    e
}

/// A daemon on the fake launcher with snapshot `base` of a deleted VM.
async fn with_base(e: &TestEnv, l: &FakeLauncher) -> Arc<Daemon> {
    let d = e.open(l);
    d.vms.create(vm::CreateVm { id: Some("src".into()), ..Default::default() }, None).await.unwrap();
    d.vms.snapshot("src", "base", &SnapshotHow::default()).await.unwrap();
    d.vms.delete("src").await.unwrap();
    d
}

fn session_vms(d: &Daemon, id: &str) -> usize {
    d.vms.owned_by(OWNER, id).len()
}

async fn echo(d: &Arc<Daemon>, id: &str) -> String {
    let (agent, _activity) = d.agent(id).await.unwrap();
    let req = flint_agent::protocol::ExecRequest { argv: vec!["echo".into(), "hi".into()], ..Default::default() };
    String::from_utf8_lossy(&agent.exec_output(req).await.unwrap().stdout).into_owned()
}

fn req(id: &str) -> CreateSession {
    CreateSession {
        snapshot: Some("base".into()),
        id: Some(id.into()),
        idle_timeout_s: Some(3600),
        ..Default::default()
    }
}

async fn layered(d: &Daemon, snapshot: &str) -> bool {
    let m = d.store.manifest(snapshot).await.unwrap();
    SnapshotMeta::load(&m.id, &m.metadata).unwrap().memory_layered
}

/// Concurrent calls to a hibernated session share one wake; a session past its ttl (awake time) is deleted by
/// the upkeep loop, VM and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_wake_and_ttl_ends_a_session() {
    let env = env("wake1");
    let l = FakeLauncher::default();
    let d = with_base(&env, &l).await;
    d.sessions.create(req("s")).await.unwrap();
    d.sessions.hibernate("s").await.unwrap();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let d = d.clone();
            tokio::spawn(async move { echo(&d, "s").await })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), "hi\n");
    }
    let r = d.sessions.get("s").await.unwrap();
    assert_eq!((r.state, r.wakes), (SessionState::Running, 1), "six calls, one wake");
    assert_eq!(session_vms(&d, "s"), 1);
    d.sessions.create(CreateSession { ttl_s: Some(1), ..req("short") }).await.unwrap();
    // A hibernated one reaches its lifetime too: the upkeep checks sleeping sessions on every tenth tick only.
    d.sessions.create(CreateSession { max_lifetime_s: Some(1), ..req("asleep") }).await.unwrap();
    d.sessions.hibernate("asleep").await.unwrap();
    let t = Instant::now();
    while d.sessions.get("short").await.is_ok() || d.sessions.get("asleep").await.is_ok() {
        assert!(t.elapsed() < Duration::from_secs(10), "not ended after its ttl");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(session_vms(&d, "short"), 0, "its VM went with it");
    d.sessions.delete("s").await.unwrap();
}

/// A hibernation that fails after the VMM restarted its dirty log (here: the base vanished from the store, so
/// the layered put fails) leaves the session running, and its next snapshot is full; after that, diffs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_hibernation_makes_the_next_snapshot_full() {
    let env = env("full");
    let l = FakeLauncher::default();
    let d = with_base(&env, &l).await;
    d.sessions.create(req("s")).await.unwrap();
    d.store.delete("base", false).await.unwrap();
    let e = d.sessions.hibernate("s").await.unwrap_err();
    assert!(e.to_string().contains("base"), "{e}");
    let r = d.sessions.get("s").await.unwrap();
    assert_eq!((r.state, r.full_next), (SessionState::Running, true), "{r:?}");
    assert!(r.error.unwrap().starts_with("hibernate:"));
    assert_eq!(echo(&d, "s").await, "hi\n", "still running, still answering");
    let h = d.sessions.hibernate("s").await.unwrap();
    assert!(!layered(&d, &h.base).await, "a full snapshot");
    assert!(!h.full_next);
    echo(&d, "s").await;
    let h = d.sessions.hibernate("s").await.unwrap();
    assert!(layered(&d, &h.base).await);
    d.sessions.delete("s").await.unwrap();
}

/// Bad requests are 400/404 before anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_session_requests_start_nothing() {
    let env = env("bad");
    let l = FakeLauncher::default();
    let d = with_base(&env, &l).await;
    for (r, want) in [
        (CreateSession::default(), "exactly one of `template` and `snapshot`"),
        (req(&"x".repeat(65)), "at most 64"),
        (CreateSession { idle_timeout_s: Some(0), ..req("z") }, "at least 1"),
    ] {
        match d.sessions.create(r).await {
            Err(SessionError::Invalid(m)) => assert!(m.contains(want), "{m}"),
            other => panic!("expected a 400: {other:?}"),
        }
    }
    let missing = CreateSession { snapshot: Some("nope".into()), ..Default::default() };
    assert_eq!(
        crate::error::Classify::kind(&d.sessions.create(missing).await.unwrap_err()),
        crate::error::Kind::NotFound
    );
    assert!(d.sessions.list(&BTreeMap::new()).is_empty() && l.running() == 0, "nothing was started");
}

/// Five hibernate/wake cycles, each wake by a call from the latest hibernation (a diff on the one before), the
/// replaced bases released, the origin kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_hibernate_and_wake_from_their_latest_diff() {
    let env = env("cycles");
    let l = FakeLauncher::default();
    let d = with_base(&env, &l).await;
    let metadata = BTreeMap::from([("user".to_string(), "ada".to_string())]);
    let s = d.sessions.create(CreateSession { metadata: metadata.clone(), ..req("s1") }).await.unwrap();
    assert_eq!((s.state, s.base.as_str(), s.base_owned), (SessionState::Running, "base", false));
    assert_eq!(d.sessions.list(&metadata).len(), 1);
    assert!(d.sessions.list(&BTreeMap::from([("user".to_string(), "bob".to_string())])).is_empty());
    for cycle in 1..=5u64 {
        let h = d.sessions.hibernate("s1").await.unwrap();
        assert_eq!((h.state, h.base.clone()), (SessionState::Hibernated, format!("s1.h{cycle}")));
        assert_eq!(session_vms(&d, "s1"), 0, "a hibernated session has no VM");
        let m = d.store.manifest(&h.base).await.unwrap();
        assert!(layered(&d, &h.base).await);
        let want_parent = if cycle == 1 { "base".to_string() } else { format!("s1.h{}", cycle - 1) };
        assert_eq!(m.parent.as_deref(), Some(want_parent.as_str()), "a hibernation is a diff on the last");
        if cycle > 1 {
            assert!(d.store.manifest(&format!("s1.h{}", cycle - 1)).await.is_err(), "the replaced base is released");
        }
        assert_eq!(echo(&d, "s1").await, "hi\n", "a call wakes it");
        let w = d.sessions.get("s1").await.unwrap();
        assert_eq!((w.state, w.wakes, w.hibernations), (SessionState::Running, cycle, cycle));
        assert_eq!(session_vms(&d, "s1"), 1);
    }
    assert!(d.store.manifest("base").await.is_ok(), "the origin is not the session's to release");
    let e = d.delete_snapshot("s1.h5", false).await.unwrap_err();
    assert!(e.to_string().contains("session `s1`"), "{e}");
    d.sessions.delete("s1").await.unwrap();
    assert_eq!(l.running(), 0);
}

/// Fork shares a fork point that lives until the last session using it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_share_their_fork_point_until_the_last_ends() {
    let env = env("fork");
    let l = FakeLauncher::default();
    let d = with_base(&env, &l).await;
    let metadata = BTreeMap::from([("user".to_string(), "ada".to_string())]);
    d.sessions.create(CreateSession { metadata, ..req("s1") }).await.unwrap();
    let kids = d.sessions.fork("s1", ForkSession { count: 2, ..Default::default() }).await.unwrap();
    let parent = d.sessions.get("s1").await.unwrap();
    assert_eq!((parent.base.as_str(), kids.len()), ("s1.h1", 2));
    for k in &kids {
        assert_eq!((k.state, k.base.as_str(), k.forked_from.as_deref()), (SessionState::Running, "s1.h1", Some("s1")));
        assert_eq!(k.metadata.get("user").map(String::as_str), Some("ada"));
        assert_eq!(echo(&d, &k.id).await, "hi\n");
    }
    d.sessions.delete("s1").await.unwrap();
    assert!(d.store.manifest("s1.h1").await.is_ok(), "the children still use the fork point");
    d.sessions.delete(&kids[0].id).await.unwrap();
    assert!(d.store.manifest("s1.h1").await.is_ok());
    d.sessions.delete(&kids[1].id).await.unwrap();
    assert!(d.store.manifest("s1.h1").await.is_err(), "the fork point went with the last session using it");
    assert!(d.vms.is_empty(), "no VM of any session is left");
}

/// Idle: no call for idle_timeout_s → hibernated by the upkeep loop; a running call keeps it awake; records
/// survive a restart and a session hibernated before it wakes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_hibernate_and_survive_a_restart() {
    let env = env("idle");
    let l = FakeLauncher::default();
    let d = with_base(&env, &l).await;
    d.sessions.create(CreateSession { idle_timeout_s: Some(1), ..req("idle") }).await.unwrap();
    let (_agent, activity) = d.agent("idle").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(d.sessions.get("idle").await.unwrap().state, SessionState::Running, "a call in progress is activity");
    drop(activity);
    let t = Instant::now();
    while d.sessions.get("idle").await.unwrap().state != SessionState::Hibernated {
        assert!(t.elapsed() < Duration::from_secs(10), "not hibernated after its idle timeout");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(t.elapsed() >= Duration::from_millis(900), "hibernated before its idle timeout");
    d.sessions.create(req("awake")).await.unwrap();
    let before: Vec<(String, SessionState, String)> =
        d.sessions.list(&BTreeMap::new()).into_iter().map(|r| (r.id, r.state, r.base)).collect();
    crate::fake::crash(d).await;
    let d = env.open(&l);
    let after: Vec<(String, SessionState, String)> =
        d.sessions.list(&BTreeMap::new()).into_iter().map(|r| (r.id, r.state, r.base)).collect();
    assert_eq!(before, after);
    assert_eq!(echo(&d, "idle").await, "hi\n", "a session hibernated before the restart wakes after it");
    assert_eq!(echo(&d, "awake").await, "hi\n", "a running one's VM was re-adopted");
    for s in d.sessions.list(&BTreeMap::new()) {
        d.sessions.delete(&s.id).await.unwrap();
    }
    assert_eq!(l.running(), 0);
}

/// A session whose VM dies fails (the VM layer's event), and a wake restores its last hibernation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_vm_dies_fails_and_wakes() {
    let env = env("died");
    let l = FakeLauncher::default();
    let d = with_base(&env, &l).await;
    let s = d.sessions.create(req("s")).await.unwrap();
    l.kill(d.vms.get(s.vm.as_deref().unwrap()).unwrap().proc().unwrap());
    let t = Instant::now();
    while d.sessions.get("s").await.unwrap().state != SessionState::Failed {
        assert!(t.elapsed() < Duration::from_secs(10), "the session did not fail with its VM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = d.sessions.wake("s").await.unwrap();
    assert_eq!((r.state, r.wakes), (SessionState::Running, 1));
    assert_eq!(session_vms(&d, "s"), 1, "the dead VM is gone, the new one runs");
    d.sessions.delete("s").await.unwrap();
}

/// Findings 4 and 9 of #26: the front end's resolver authorises (port exposed, token right) before anything
/// wakes: a hibernated session stays asleep for requests without the token or with a wrong one, wakes for the
/// right one; ids are found whatever their case, and are unique whatever their case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_end_authorises_before_anything_wakes() {
    use crate::net::front::Resolve;
    let env = env("front");
    let l = FakeLauncher::default();
    let d = with_base(&env, &l).await;
    let mut r = req("MySes");
    let mut net = crate::net::NetworkRequest::default();
    net.ports.insert(8080, crate::net::ExposedPort { token: Some("auto".into()), tcp_listen: None });
    r.network = Some(net);
    let s = d.sessions.create(r).await.unwrap();
    let token = s.network.as_ref().unwrap().ports[&8080].token.clone().unwrap();
    assert_eq!(token.len(), 32, "made by flintd: {token}");
    d.sessions.hibernate("MySes").await.unwrap();
    let front = crate::daemon::FrontRoutes(Arc::downgrade(&d));
    let asleep = |d: &Daemon| d.sessions.session("MySes").unwrap().rec.get().state == SessionState::Hibernated;
    for (id, port, tok, kind) in [
        ("myses", 8080, None, Kind::Unauthorized),
        ("MYSES", 8080, Some("0123456789abcdef0123456789abcdef"), Kind::Unauthorized),
        ("myses", 9090, Some(token.as_str()), Kind::NotFound),
        ("nosuch", 8080, Some(token.as_str()), Kind::NotFound),
    ] {
        let e = front.resolve(id.into(), port, tok.map(String::from)).await.err().expect("refused");
        assert_eq!(e.kind, kind, "{id}:{port}: {}", e.message);
        assert!(asleep(&d), "{id}:{port} woke the session");
    }
    // The right token wakes it (whatever the route to the fake guest then says).
    let _ = front.resolve("myses".into(), 8080, Some(token.clone())).await;
    assert_eq!(d.sessions.session("MySes").unwrap().rec.get().state, SessionState::Running);
    // Unique whatever the case, across VMs and sessions.
    let e = d.sessions.create(req("MYSES")).await.unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    d.vms.create(vm::CreateVm { id: Some("MyVm".into()), ..Default::default() }, None).await.unwrap();
    let e = d.vms.create(vm::CreateVm { id: Some("myvm".into()), ..Default::default() }, None).await.unwrap_err();
    assert!(e.to_string().contains("MyVm"), "{e}");
    let e = d.sessions.create(req("MYVM")).await.unwrap_err().to_string();
    assert!(e.contains("is a VM id"), "{e}");
}

/// #30's small specs: a CPU limit is checked, recorded, carried by snapshots to clones and by a session across
/// its hibernations; a clone may ask for another; without the jail it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_limits_are_checked_and_kept_across_snapshots_and_wakes() {
    let env = env("cpu");
    let l = FakeLauncher::default();
    let d = with_base(&env, &l).await;
    for bad in [0.0, 0.001, 2.0, f64::NAN] {
        let e = d.vms.create(vm::CreateVm { cpu: Some(bad), ..Default::default() }, None).await.unwrap_err();
        assert!(e.to_string().contains("a fraction of a core"), "{bad}: {e}");
    }
    let v =
        d.vms.create(vm::CreateVm { id: Some("c1".into()), cpu: Some(0.5), ..Default::default() }, None).await.unwrap();
    assert_eq!(v.cpu, Some(0.5));
    d.vms.snapshot("c1", "c1-snap", &SnapshotHow::default()).await.unwrap();
    let clone = d.vms.restore(vm::Restore { snapshot: "c1-snap".into(), ..Default::default() }).await.unwrap();
    assert_eq!(clone.cpu, Some(0.5), "a clone keeps its snapshot's limit");
    let other =
        d.vms.restore(vm::Restore { snapshot: "c1-snap".into(), cpu: Some(0.2), ..Default::default() }).await.unwrap();
    assert_eq!(other.cpu, Some(0.2));
    let mut r = req("lim");
    r.cpu = Some(0.1);
    let s = d.sessions.create(r).await.unwrap();
    assert_eq!((s.cpu, d.vms.get(s.vm.as_deref().unwrap()).unwrap().cpu), (Some(0.1), Some(0.1)));
    d.sessions.hibernate("lim").await.unwrap();
    let w = d.sessions.wake("lim").await.unwrap();
    assert_eq!(d.vms.get(w.vm.as_deref().unwrap()).unwrap().cpu, Some(0.1), "the wake keeps the limit");
    crate::fake::crash(d).await;
    let mut env = env;
    env.cfg.jail.enabled = false;
    let d = env.open(&l);
    let e = d.vms.create(vm::CreateVm { cpu: Some(0.5), ..Default::default() }, None).await.unwrap_err();
    assert!(e.to_string().contains("needs the jail"), "{e}");
}

/// Pages of the session list walk every session once, in the list's order, whatever is deleted between pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_walk_every_session_once() {
    let env = env("pages");
    let l = FakeLauncher::default();
    let d = with_base(&env, &l).await;
    for i in 0..5 {
        d.sessions.create(req(&format!("p{i}"))).await.unwrap();
    }
    let all: Vec<String> = d.sessions.list(&BTreeMap::new()).into_iter().map(|r| r.id).collect();
    assert_eq!(all.len(), 5);
    let mut walked = Vec::new();
    let mut page = Page { after: None, limit: Some(2) };
    loop {
        let (items, next) = d.sessions.page(&BTreeMap::new(), &page);
        assert!(items.len() <= 2);
        walked.extend(items.into_iter().map(|r| r.id));
        if walked.len() == 2 {
            // The cursor's session goes: the walk goes on from its place.
            d.sessions.delete(&walked[1]).await.unwrap();
        }
        match next {
            Some(c) => page.after = Some(c.to_string().parse().unwrap()),
            None => break,
        }
    }
    assert_eq!(walked, all);
    assert!(
        "no-dot".parse::<Cursor>().is_err() && "x.id".parse::<Cursor>().is_err() && "1.".parse::<Cursor>().is_err()
    );
}
