//! The kill -9 harness: for each operation (snapshot + push, clone eager, clone lazy, delete, session hibernate,
//! session wake, template create),
//! start it through the CLI, kill -9 flintd (even rounds) or the VMMs it involves (odd rounds) at a random point
//! of its measured duration, restart flintd, and check the invariants:
//! - no `flint-vmm` that no record owns, and every running or paused record's VMM alive (and its agent answering);
//! - every failed or lost record's VMM gone;
//! - every snapshot in S3 verifies there, every snapshot only in the local cache verifies there (no chunk a
//!   manifest references is missing or corrupt);
//! - the session settles running, hibernated or failed; only its current VM runs (never two VMMs of it, by the
//!   processes); and its guest memory holds the
//!   last marker written before the operation when flintd was killed (nothing lost), or one written earlier
//!   when its VMM was (what ran since its last hibernation goes with the VMM).
//!
//! `FLINT_CRASH_OPS` (e.g. `hibernate,wake`) selects operations; `FLINT_CRASH_ROUNDS` kill rounds per
//! operation (default 2, as CI runs it; `make crash-test` runs 20) and `FLINT_CRASH_TEMPLATE_ROUNDS` for template
//! create, which boots a VM each round (default 1). The cheap operations start from the golden snapshot imported
//! into flintd's store, so only template create boots.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flint_snapshot_store::Store;
use flint_tests::{bin_dir, processes_naming, Flintd, KillVmmsUnder, S3Server, TempDir};
use serde_json::Value;

const PREFIX: &str = "crash";

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// xorshift seeded from the clock (printed, so a failing run can be replayed with FLINT_CRASH_SEED).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, d: Duration) -> Duration {
        Duration::from_micros(self.next() % (d.as_micros() as u64).max(1))
    }
}

struct Harness {
    s3: S3Server,
    data: PathBuf,
    socket: PathBuf,
    /// flintd's configuration: jail uids of this suite's own, apart from the flintd suite's (scripts/test.sh
    /// runs the two side by side).
    config: PathBuf,
    flintd: Option<Flintd>,
}

impl Harness {
    fn start(&mut self) {
        let config = ["--allow-unauthenticated-bucket", "--config", self.config.to_str().unwrap()];
        self.flintd = Some(Flintd::start_with(&self.data, &self.socket, &self.s3, PREFIX, &config));
    }

    fn kill_flintd(&mut self) {
        if let Some(mut d) = self.flintd.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(d.child.id() as i32, libc::SIGKILL) };
            let _ = d.child.wait();
        }
    }

    fn flint(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin_dir().join("flint"));
        c.arg("--socket").arg(&self.socket).arg("--json").args(args);
        c
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.flint(args).output().unwrap();
        assert!(out.status.success(), "flint {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn vms(&self) -> Vec<Value> {
        self.json(&["vm", "ls"]).as_array().cloned().unwrap_or_default()
    }

    fn store(&self) -> Store {
        flint_tests::flintd_store(&self.data, &self.s3, PREFIX)
    }

    /// flint-vmm processes of this flintd: pid and command line. A VM's VMM names its `vms/<id>/spec.json`, or,
    /// started ahead as a standby, its `standby/s<uid>/standby.json` (the directory renamed to the VM's since).
    fn vmm_processes(&self) -> Vec<(i32, String)> {
        processes_naming(&self.data)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("flint-vmm"))
            .map(|(pid, cmd)| {
                let arg = cmd.split(' ').find(|a| a.ends_with(".json")).unwrap_or("").to_string();
                (pid, arg)
            })
            .collect()
    }

    /// Waits until no record is starting or stopping (flintd finishes those after a restart).
    fn settle(&self) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let vms = self.vms();
            if vms.iter().all(|v| v["status"] != "starting" && v["status"] != "stopping") {
                return vms;
            }
            assert!(Instant::now() < deadline, "records never settled: {vms:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn check_invariants(&self, what: &str) {
        let vms = self.settle();
        // Let exit watchers notice VMMs killed a moment ago, then read records and processes.
        std::thread::sleep(Duration::from_millis(300));
        let vms = if vms.is_empty() { vms } else { self.settle() };
        let procs = self.vmm_processes();
        for (pid, spec) in &procs {
            let owner = vms.iter().find(|v| v["pid"].as_i64() == Some(i64::from(*pid)));
            if owner.is_none() && spec.ends_with("standby.json") {
                // An idle standby (no VM yet); one of a killed flintd exits as its control socket closes.
                continue;
            }
            let owner =
                owner.unwrap_or_else(|| panic!("{what}: flint-vmm {pid} ({spec}) is owned by no record: {vms:?}"));
            assert!(
                owner["status"] == "running" || owner["status"] == "paused",
                "{what}: flint-vmm {pid} runs for a {} record: {owner}",
                owner["status"]
            );
        }
        for v in &vms {
            let id = v["id"].as_str().unwrap();
            let alive = v["pid"].as_i64().is_some_and(|p| procs.iter().any(|(q, _)| i64::from(*q) == p));
            match v["status"].as_str().unwrap() {
                "running" => {
                    assert!(alive, "{what}: running record {id} has no VMM: {v}");
                    let out = self.flint(&["exec", id, "--", "/bin/true"]).output().unwrap();
                    assert!(out.status.success(), "{what}: running VM {id} does not answer: {:?}", out);
                }
                "paused" => assert!(alive, "{what}: paused record {id} has no VMM: {v}"),
                "failed" | "lost" => assert!(!alive, "{what}: {} record {id} still has a VMM: {v}", v["status"]),
                other => panic!("{what}: record {id} is {other} after settling"),
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = self.store();
            for s in store.list().await.unwrap() {
                let remote = s.remote;
                let report =
                    store.verify(&s.id, !remote).await.unwrap_or_else(|e| panic!("{what}: verify {}: {e}", s.id));
                assert!(
                    report.problems.is_empty(),
                    "{what}: snapshot {} ({}) does not verify: {:?}",
                    s.id,
                    report.tier,
                    report.problems
                );
            }
        });
    }

    /// Deletes every VM but `keep`.
    fn clean(&self, keep: &[&str]) {
        let ids: Vec<String> = self
            .vms()
            .iter()
            .filter(|v| v["owner"]["kind"] != "session")
            .filter_map(|v| v["id"].as_str().map(String::from))
            .filter(|id| !keep.contains(&id.as_str()))
            .collect();
        if !ids.is_empty() {
            let mut args = vec!["vm", "rm"];
            args.extend(ids.iter().map(String::as_str));
            self.json(&args);
        }
    }

    fn running_clone(&self, id: &str) -> String {
        if let Some(v) = self.vms().iter().find(|v| v["id"] == id && v["status"] == "running") {
            return v["id"].as_str().unwrap().to_string();
        }
        self.clean(&[]);
        let v = self.json(&["clone", "--snapshot", "base"]);
        v[0]["id"].as_str().unwrap().to_string()
    }
}

const SESSION: &str = "cs";

impl Harness {
    fn session(&self) -> Option<Value> {
        let out = self.flint(&["session", "get", SESSION]).output().unwrap();
        out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    }

    fn sh(&self, script: &str) -> String {
        let out = self.flint(&["exec", SESSION, "--", "/bin/sh", "-c", script]).output().unwrap();
        assert!(out.status.success(), "exec in the session: {script}: {}", String::from_utf8_lossy(&out.stderr));
        let mut text = String::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                text.push_str(v["stdout"].as_str().unwrap_or(""));
            }
        }
        text.trim().to_string()
    }

    /// The session running (created, woken or restarted as needed), with `mark` written into its memory.
    fn session_running(&self, mark: &str) {
        match self.session() {
            Some(s) if s["state"] == "failed" => {
                self.json(&["session", "wake", SESSION]);
            }
            Some(_) => {}
            None => {
                self.json(&["session", "create", "--snapshot", "base", "--id", SESSION, "--idle-timeout", "3600"]);
            }
        }
        self.sh(&format!("echo {mark} > /tmp/mark"));
    }

    /// The session's state settles; only its current VM runs; its memory holds `mark` (nothing lost), or, when
    /// `lossy` (its VMM was killed), one of the marks written before.
    fn check_session(&self, what: &str, marks: &[String], lossy: bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let s = loop {
            let s = self.session().unwrap_or_else(|| panic!("{what}: the session is gone"));
            if ["running", "hibernated", "failed"].contains(&s["state"].as_str().unwrap_or("")) {
                break s;
            }
            assert!(Instant::now() < deadline, "{what}: the session never settled: {s}");
            std::thread::sleep(Duration::from_millis(200));
        };
        let vms = self.settle();
        // Never two VMs of the session at once, by the processes as much as by the records.
        let vmms: Vec<_> =
            self.vmm_processes().into_iter().filter(|(_, spec)| spec.contains(&format!("/vms/{SESSION}-"))).collect();
        assert!(vmms.len() <= 1, "{what}: {} VMMs run the session at once: {vmms:?}", vmms.len());
        for v in
            vms.iter().filter(|v| v["owner"]["id"] == SESSION && (v["status"] == "running" || v["status"] == "paused"))
        {
            assert_eq!(v["id"], s["vm"], "{what}: a VM the session does not run is {}: {v}\n{s}", v["status"]);
            assert_eq!(s["state"], "running", "{what}: a {} session has a live VM: {v}", s["state"]);
        }
        if s["state"] == "failed" {
            assert!(lossy, "{what}: flintd was killed and the session failed: {s}");
            self.json(&["session", "wake", SESSION]);
        }
        let got = self.sh("cat /tmp/mark");
        let want = marks.last().unwrap();
        if lossy {
            assert!(marks.contains(&got), "{what}: the session's memory holds `{got}`, not one of {marks:?}");
        } else {
            assert_eq!(&got, want, "{what}: the session lost what it had ({s})");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    SnapshotPush,
    CloneEager,
    CloneLazy,
    Delete,
    Hibernate,
    Wake,
    TemplateCreate,
}

impl Op {
    /// The `flint` arguments of one run of the operation (`src`: the VM it works on).
    fn args(self, src: Option<&str>, tag: &str) -> Vec<String> {
        let src = || src.expect("the operation's VM").to_string();
        match self {
            Op::SnapshotPush => vec!["snapshot".into(), "create".into(), src(), format!("s{tag}"), "--push".into()],
            Op::CloneEager => ["clone", "--snapshot", "base", "-n", "2"].map(String::from).to_vec(),
            Op::CloneLazy => ["clone", "--snapshot", "base", "-n", "2", "--lazy"].map(String::from).to_vec(),
            Op::Delete => vec!["vm".into(), "rm".into(), src()],
            Op::Hibernate => vec!["session".into(), "hibernate".into(), SESSION.into()],
            Op::Wake => vec!["session".into(), "wake".into(), SESSION.into()],
            Op::TemplateCreate => {
                ["template", "create", &format!("t{tag}"), "--push", "--", "/bin/true"].map(String::from).to_vec()
            }
        }
    }
}

impl Harness {
    /// What operation `op` starts from: a running clone for a snapshot or delete (its id), the session running
    /// with a new mark (recorded in `marks`; hibernated for a wake), else nothing but the base snapshot.
    fn prepare(&mut self, op: Op, tag: &str, marks: &mut Vec<String>) -> Option<String> {
        match op {
            Op::SnapshotPush | Op::Delete => Some(self.running_clone("")),
            Op::Hibernate | Op::Wake => {
                self.clean(&[]);
                let mark = format!("m{tag}");
                self.session_running(&mark);
                marks.push(mark);
                if op == Op::Wake {
                    self.json(&["session", "hibernate", SESSION]);
                }
                None
            }
            _ => {
                self.clean(&[]);
                None
            }
        }
    }

    /// Kills, at `at` into the operation run by `child` (or when it ends, if sooner), flintd on odd rounds, else
    /// the VMMs the operation started (those not in `before`), or the one it works on. What was killed, when.
    fn cut(&mut self, child: &mut Child, started: Instant, at: Duration, round: usize, before: &[i32]) -> String {
        while started.elapsed() < at && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = started.elapsed();
        if round % 2 == 1 {
            self.kill_flintd();
            return format!("flintd at {t:?}");
        }
        let mut victims: Vec<i32> =
            self.vmm_processes().into_iter().map(|p| p.0).filter(|p| !before.contains(p)).collect();
        if victims.is_empty() {
            victims = before.to_vec();
        }
        for p in &victims {
            // SAFETY: kill(2) on a flint-vmm of this test's flintd.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        format!("{} VMM(s) at {t:?}", victims.len())
    }
}

#[test]
fn kill_9_at_random_points_keeps_every_invariant() {
    let rounds = env_count("FLINT_CRASH_ROUNDS", 2);
    let template_rounds = env_count("FLINT_CRASH_TEMPLATE_ROUNDS", 1);
    let seed = std::env::var("FLINT_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    println!("crash harness: {rounds} kill rounds per operation, {template_rounds} for template create, seed {seed}");
    let mut rng = Rng(seed);
    let work = TempDir::new("crash");
    let data = work.path().join("data");
    let _reaper = KillVmmsUnder(data.clone());
    let config = work.path().join("flintd.toml");
    std::fs::write(&config, "[jail]\nuid_base = 980000\nuid_count = 2000\n").unwrap();
    let socket = work.path().join("flintd.sock");
    let mut h = Harness { s3: S3Server::start(), data: data.clone(), socket, config, flintd: None };

    // The golden snapshot as flintd's snapshot `base`, local and in S3.
    flint_tests::import_golden(&data, &h.s3, PREFIX, "base", None);
    h.start();
    h.check_invariants("start");

    let mut summary = Vec::new();
    let mut marks: Vec<String> = Vec::new();
    // FLINT_CRASH_OPS=hibernate,wake (names of `Op`, any case) runs only those.
    let only = std::env::var("FLINT_CRASH_OPS").ok().map(|v| v.to_lowercase());
    let ops =
        [Op::SnapshotPush, Op::CloneEager, Op::CloneLazy, Op::Delete, Op::Hibernate, Op::Wake, Op::TemplateCreate];
    let chosen =
        |op: &Op| only.as_deref().is_none_or(|o| o.split(',').any(|n| n.trim() == format!("{op:?}").to_lowercase()));
    for op in ops.into_iter().filter(chosen) {
        let kills = if op == Op::TemplateCreate { template_rounds } else { rounds };
        // Round 0 runs uncut and measures the span the kills are drawn from (template create: a cold boot).
        let mut span = Duration::from_secs(if op == Op::TemplateCreate { 60 } else { 2 });
        let first = if op == Op::TemplateCreate { 1 } else { 0 };
        for round in first..=kills {
            let what = format!("{op:?} round {round}");
            if h.flintd.is_none() {
                h.start();
            }
            let tag = format!("{}{round}", rng.next() % 100_000);
            let src = h.prepare(op, &tag, &mut marks);
            let before: Vec<i32> = h.vmm_processes().into_iter().map(|p| p.0).collect();
            let args = op.args(src.as_deref(), &tag);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let started = Instant::now();
            let mut child: Child = h.flint(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
            let victim = if round == 0 {
                let st = child.wait().unwrap();
                assert!(st.success(), "{what}: the uncut operation failed");
                span = started.elapsed();
                "none (measures the span)".to_string()
            } else {
                h.cut(&mut child, started, rng.below(span), round, &before)
            };
            let _ = child.wait();
            if h.flintd.is_none() {
                h.start();
            }
            h.check_invariants(&what);
            if matches!(op, Op::Hibernate | Op::Wake) {
                // Odd rounds kill flintd (nothing may be lost), even ones the VMMs.
                h.check_session(&what, &marks, round != 0 && round % 2 == 0);
            }
            println!("{what}: killed {victim} of {span:?}: invariants hold");
            summary.push(what);
        }
        if op == Op::Wake {
            h.json(&["session", "rm", SESSION]);
        }
        h.clean(&[]);
    }
    println!("{} rounds passed", summary.len());
    h.clean(&[]);
    h.kill_flintd();
}
