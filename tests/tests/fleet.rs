//! A fleet's control plane without KVM (docs/cluster.md): six flintd processes on fake VMMs (`flintd --fake-vmm`:
//! in-process fake VMs whose agent is flint-agent in host mode), one etcd (Debian's etcd-server), two
//! `flint-router`s, a real S3 server, the CLI over mutual TLS. What is checked is who runs each session: after
//! every step, no session runs on two hosts (every host's VM list) and each running one runs where its owner key
//! in etcd says.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use flint_tests::{bin_dir, e2b_python, EtcdServer, FleetCerts, FleetRouter, Flintd, S3Server, TempDir};
use serde_json::Value;

/// Hosts in each test's fleet (fake VMMs serve no lazy restores: wakes are eager, `lazy_wake = false`).
const HOSTS: usize = 6;
/// The hosts' etcd lease (s): a host that stops renewing loses its sessions this long after its last renewal.
const TTL_S: u64 = 6;
/// The S3 prefix the fleet shares.
const PREFIX: &str = "fleet";

/// One flintd of the fleet.
struct Host {
    id: String,
    sock: PathBuf,
    flintd: Option<Flintd>,
}

impl Host {
    fn pid(&self) -> i32 {
        self.flintd.as_ref().expect("a running flintd").child.id() as i32
    }

    /// `flint --socket <host> ARGS`.
    fn run(&self, args: &[&str]) -> Output {
        Command::new(bin_dir().join("flint")).arg("--socket").arg(&self.sock).args(args).output().unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.run(&[&["--json"][..], args].concat());
        assert!(out.status.success(), "flint {args:?} on {}: {}", self.id, String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// The sessions this host runs a VM for (running or paused), from its VM list.
    fn session_vms(&self) -> Vec<(String, String)> {
        let vms = self.json(&["vm", "ls"]);
        vms.as_array()
            .unwrap()
            .iter()
            .filter(|v| v["owner"]["kind"] == "session" && (v["status"] == "running" || v["status"] == "paused"))
            .map(|v| (v["owner"]["id"].as_str().unwrap().to_string(), v["status"].as_str().unwrap().to_string()))
            .collect()
    }

    /// kill -9 (its fake VMs die with it, as a host's VMs do), and the directory its fake VMs' agent served as
    /// `/` (the fake launcher removes it at exit, which a killed process never reaches).
    fn kill(&mut self) {
        let mut d = self.flintd.take().unwrap();
        d.child.kill().unwrap();
        d.child.wait().unwrap();
        let _ = std::fs::remove_dir_all(flint_supervisor::fake::agent_root_of(d.child.id()));
        std::mem::forget(d); // its Drop would signal a reaped pid
    }
}

struct Fleet {
    work: TempDir,
    s3: S3Server,
    etcd: EtcdServer,
    certs: FleetCerts,
    hosts: Vec<Host>,
    routers: Vec<FleetRouter>,
}

impl Fleet {
    /// `HOSTS` hosts and two routers, and a template `t` (snapshot `tmpl-t`) pushed to the bucket by the first host.
    fn start(tag: &str) -> Fleet {
        let work = TempDir::new(&format!("fleet-{tag}"));
        let certs = FleetCerts::make(work.path());
        let mut f = Fleet {
            s3: S3Server::start(),
            etcd: EtcdServer::start(),
            certs,
            hosts: Vec::new(),
            routers: Vec::new(),
            work,
        };
        // A fake VMM boots nothing: the image only has to be there.
        let image = f.work.path().join("image");
        std::fs::create_dir_all(&image).unwrap();
        std::fs::write(image.join("vmlinux"), b"fake").unwrap();
        std::fs::write(image.join("initramfs.cpio"), b"fake").unwrap();
        for i in 0..HOSTS {
            let host = f.start_host(i, &image);
            f.hosts.push(host);
        }
        for name in ["router-a", "router-b"] {
            let r = FleetRouter::start(f.work.path(), name, &f.etcd.urls(), &f.certs, 0);
            f.routers.push(r);
        }
        for r in &f.routers {
            r.wait_for_hosts(HOSTS);
        }
        let t = f.hosts[0].json(&["template", "create", "t", "--push", "--", "/bin/true"]);
        assert_eq!(t["snapshot"], "tmpl-t", "{t}");
        f
    }

    fn start_host(&self, i: usize, image: &Path) -> Host {
        let p = |x: &Path| x.to_str().unwrap().to_string();
        let data = self.work.path().join(format!("h{i}"));
        let sock = self.work.path().join(format!("h{i}.sock"));
        let port = flint_tests::free_port();
        let config = self.work.path().join(format!("h{i}.toml"));
        let etcd: Vec<String> = self.etcd.urls().iter().map(|u| format!("\"{u}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "[sessions]\ntick_ms = 200\nlazy_wake = false\n[cluster]\netcd = [{}]\nlease_ttl_s = {TTL_S}\npause_margin_ms = 1500\n\
                 etcd_timeout_ms = 1000\nlisten = \"127.0.0.1:{port}\"\nadvertise = \"https://127.0.0.1:{port}\"\n\
                 tls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\n",
                etcd.join(", "),
                p(&self.certs.server_cert),
                p(&self.certs.server_key),
                p(&self.certs.ca),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.work.path().join(format!("h{i}.log"))).unwrap();
        let mut cmd = Command::new(bin_dir().join("flintd"));
        cmd.arg("--fake-vmm")
            .arg("--socket")
            .arg(&sock)
            .arg("--data-dir")
            .arg(&data)
            .arg("--image")
            .arg(format!("default={}", image.display()))
            .args(["--allow-unauthenticated-bucket", "--config", config.to_str().unwrap()])
            .envs(self.s3.env())
            .env("FLINT_S3_PREFIX", PREFIX)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        flint_tests::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("start flintd (cargo build --workspace --bins)");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "flintd h{i} exited: see h{i}.log");
            assert!(Instant::now() < deadline, "flintd h{i} did not listen within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut host = Host { id: String::new(), sock: sock.clone(), flintd: Some(Flintd { child, socket: sock }) };
        host.id = host.json(&["health"])["host"].as_str().unwrap().to_string();
        host
    }

    /// Session id → the host its owner key names.
    fn owners(&self) -> BTreeMap<String, String> {
        let keys = self.etcd.get_prefix("/flint/owners/").expect("etcd answers");
        keys.into_iter().map(|(k, v)| (k.trim_start_matches("/flint/owners/").to_string(), v)).collect()
    }

    /// The fleet's invariant, from every live host's VM list and the owner keys: no session runs on two hosts,
    /// and a session that runs somewhere runs on the host its owner key names. Session id → its host.
    fn assert_one_owner_each(&self, when: &str) -> BTreeMap<String, String> {
        let owners = self.owners();
        let mut runs: BTreeMap<String, String> = BTreeMap::new();
        for h in self.hosts.iter().filter(|h| h.flintd.is_some()) {
            for (session, status) in h.session_vms() {
                if let Some(other) = runs.insert(session.clone(), h.id.clone()) {
                    panic!("{when}: session {session} runs on {other} and on {} ({status})", h.id);
                }
                assert_eq!(
                    owners.get(&session),
                    Some(&h.id),
                    "{when}: session {session} runs on {} ({status}), its owner key says {:?}",
                    h.id,
                    owners.get(&session)
                );
            }
        }
        runs
    }

    fn host(&self, id: &str) -> &Host {
        self.hosts.iter().find(|h| h.id == id).unwrap_or_else(|| panic!("no host {id}"))
    }
}

/// Waits until `f` gives a value, up to `within`.
fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Creates through both routers spread over the hosts; a storm of concurrent creates of one id from every client
/// gives it exactly one owner (one 200, the rest 409); a restarted router routes as before.
#[test]
fn creates_spread_over_the_hosts_and_a_storm_never_gives_a_session_two_owners() {
    let t0 = Instant::now();
    let mut f = Fleet::start("storm");
    println!("[{:>6.1} s] fleet up", t0.elapsed().as_secs_f64());
    // 4 clients per router, 4 sessions each, all at once; and each client's create of `dup` at the same moment.
    let barrier = std::sync::Barrier::new(8);
    let dup_answers: Vec<Output> = std::thread::scope(|s| {
        let tasks: Vec<_> = (0..8)
            .map(|c| {
                let (r, barrier) = (&f.routers[c % 2], &barrier);
                s.spawn(move || {
                    for i in 0..4 {
                        r.json(&["session", "create", "--snapshot", "tmpl-t", "--id", &format!("c{c}-{i}")]);
                    }
                    barrier.wait();
                    r.run(&["session", "create", "--snapshot", "tmpl-t", "--id", "dup"])
                })
            })
            .collect();
        tasks.into_iter().map(|t| t.join().unwrap()).collect()
    });
    println!("[{:>6.1} s] the create storm ended", t0.elapsed().as_secs_f64());
    let won = dup_answers.iter().filter(|o| o.status.success()).count();
    let lost: Vec<String> = dup_answers.iter().filter(|o| !o.status.success()).map(stderr).collect();
    assert_eq!(won, 1, "one create of `dup` wins: {lost:?}");
    assert!(lost.iter().all(|e| e.contains("HTTP 409")), "the others are told it exists: {lost:?}");
    let runs = f.assert_one_owner_each("after the storm");
    assert_eq!(runs.len(), 33, "32 sessions and `dup` run: {runs:?}");
    let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
    for h in runs.values() {
        *per_host.entry(h.as_str()).or_default() += 1;
    }
    println!("placement of 33 sessions over {HOSTS} hosts: {per_host:?}");
    assert!(per_host.len() >= 3, "best-of-two placement spreads: {per_host:?}");
    let listed = f.routers[0].json(&["session", "ls"]);
    assert_eq!(listed.as_array().unwrap().len(), 33, "the router merges every host's list");

    // A router holds no state: killed and started again on its port, it routes as before.
    println!("[{:>6.1} s] checked", t0.elapsed().as_secs_f64());
    f.routers[1].restart();
    f.routers[1].wait_for_hosts(HOSTS);
    let out = f.routers[1].run(&["exec", "c3-0", "--", "/bin/echo", "routed"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "routed", "{}", stderr(&out));
    interactive_exec_through_a_router(&f.routers[0], "c5-1");
    let h = f.routers[1].json(&["session", "hibernate", "dup"]);
    assert_eq!(h["state"], "hibernated", "{h}");
    // A storm of wakes of one hibernated session, through both routers: it wakes once, on one host.
    let woken: Vec<Output> = std::thread::scope(|s| {
        let tasks: Vec<_> = (0..6)
            .map(|c| {
                let r = &f.routers[c % 2];
                s.spawn(move || r.run(&["exec", "dup", "--", "/bin/true"]))
            })
            .collect();
        tasks.into_iter().map(|t| t.join().unwrap()).collect()
    });
    println!("[{:>6.1} s] the wake storm ended", t0.elapsed().as_secs_f64());
    let ok = woken.iter().filter(|o| o.status.success()).count();
    println!("concurrent wakes of `dup`: {ok} of 6 answered");
    assert!(ok >= 1, "{:?}", woken.iter().map(stderr).collect::<Vec<_>>());
    let runs = f.assert_one_owner_each("after the wake storm");
    assert!(runs.contains_key("dup"), "`dup` runs again: {runs:?}");
    for o in woken.iter().filter(|o| !o.status.success()) {
        assert!(
            stderr(o).contains("HTTP 409") || stderr(o).contains("HTTP 503"),
            "a wake lost the race: {}",
            stderr(o)
        );
    }
}

/// `flint --url <router> exec -i`: the router relays the upgraded connection to the session's host: 100 kB of
/// piped stdin reach the command, its output and exit status come back.
fn interactive_exec_through_a_router(r: &FleetRouter, session: &str) {
    use std::io::Write;
    let mut child = Command::new(bin_dir().join("flint"))
        .arg("--url")
        .arg(&r.url)
        .arg("--ca")
        .arg(&r.ca)
        .args(r.identity())
        .args(["exec", "-i", session, "--", "/bin/sh", "-c", "wc -c; exit 3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&vec![b'x'; 100_000]).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100000", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(3), "the command's exit status: {}", stderr(&out));
}

/// kill -9 of a host: its sessions wake on other hosts through the router once its lease has ended, and the
/// dead host's registration and owner keys are gone.
#[test]
fn a_killed_hosts_sessions_wake_elsewhere_once_its_lease_is_over() {
    let mut f = Fleet::start("kill");
    for i in 0..12 {
        f.routers[0].json(&["session", "create", "--snapshot", "tmpl-t", "--id", &format!("k{i}")]);
    }
    let runs = f.assert_one_owner_each("after the creates");
    let victim = runs["k0"].clone();
    let theirs: Vec<String> = runs.iter().filter(|(_, h)| **h == victim).map(|(s, _)| s.clone()).collect();
    // One of the victim's sessions was hibernated (its last state is in the bucket), the others run.
    f.routers[0].json(&["session", "hibernate", &theirs[0]]);
    f.routers[0].json(&["session", "wake", &theirs[0]]);
    let i = f.hosts.iter().position(|h| h.id == victim).unwrap();
    f.hosts[i].kill();
    let killed = Instant::now();
    // Refused while the dead host's lease lives (409 naming it), then woken elsewhere.
    for s in &theirs {
        let host = wait_for(&format!("{s} woken elsewhere"), Duration::from_secs(120), || {
            let out = f.routers[1].run(&["exec", s, "--", "/bin/true"]);
            if out.status.success() {
                return f.owners().get(s).cloned();
            }
            let e = stderr(&out);
            assert!(["HTTP 409", "HTTP 502", "HTTP 503"].iter().any(|c| e.contains(c)), "{s}: {e}");
            None
        });
        assert_ne!(host, victim, "{s} woke on the dead host");
    }
    let took = killed.elapsed();
    println!("the dead host's {} sessions woke elsewhere {took:?} after the kill", theirs.len());
    assert!(took >= Duration::from_secs(TTL_S) - Duration::from_secs(2), "woken before the lease could end: {took:?}");
    let runs = f.assert_one_owner_each("after the takeover");
    assert_eq!(runs.len(), 12, "every session runs again: {runs:?}");
    assert!(runs.values().all(|h| *h != victim));
    let reg = f.etcd.get_prefix("/flint/hosts/").unwrap();
    assert!(!reg.contains_key(&format!("/flint/hosts/{victim}")), "the dead host's registration expired");
    for s in runs.keys() {
        f.routers[0].json(&["session", "rm", s]);
    }
    assert!(f.owners().is_empty(), "no owner key is left: {:?}", f.owners());
}

/// SIGSTOP of a host past its lease, then SIGCONT: its sessions were taken over meanwhile; once it runs again it
/// stops its VMs of them by itself (none runs beside the new owner's), records why, and its late hibernation is
/// refused.
#[test]
fn a_host_stopped_past_its_lease_is_fenced_when_it_runs_again() {
    let f = Fleet::start("stop");
    for i in 0..6 {
        f.routers[0].json(&["session", "create", "--snapshot", "tmpl-t", "--id", &format!("z{i}")]);
    }
    let runs = f.assert_one_owner_each("after the creates");
    let frozen = runs["z0"].clone();
    let theirs: Vec<String> = runs.iter().filter(|(_, h)| **h == frozen).map(|(s, _)| s.clone()).collect();
    let pid = f.host(&frozen).pid();
    // SAFETY: kill(2) on our own child (a flintd of this test).
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    for s in &theirs {
        wait_for(&format!("{s} taken over"), Duration::from_secs(120), || {
            let out = f.routers[1].run(&["exec", s, "--", "/bin/true"]);
            out.status.success().then_some(())
        });
    }
    let owners = f.owners();
    assert!(theirs.iter().all(|s| owners.get(s).is_some_and(|h| *h != frozen)), "taken over: {owners:?}");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let stopped = f.host(&frozen);
    wait_for("the stopped host fenced its VMs", Duration::from_secs(120), || {
        let left: Vec<_> = stopped.session_vms().into_iter().filter(|(s, _)| theirs.contains(s)).collect();
        left.is_empty().then_some(())
    });
    let s = stopped.json(&["session", "get", &theirs[0]]);
    assert_eq!(s["state"], "failed", "{s}");
    assert!(s["error"].as_str().unwrap_or("").contains("lease"), "it says why: {s}");
    let late = stopped.run(&["session", "hibernate", &theirs[0]]);
    assert!(!late.status.success(), "a late hibernation of a lost session is refused: {late:?}");
    let runs = f.assert_one_owner_each("after SIGCONT");
    assert_eq!(runs.len(), 6, "{runs:?}");
    for s in runs.keys() {
        f.routers[0].json(&["session", "rm", s]);
    }
}

/// The ownership contract (an entry created once, compare-and-swap by version, released and taken over under the
/// next epoch, one winner of a race of creates) holds for both backends: the bucket's conditional writes (a real S3
/// server) and etcd's transactions (a real etcd).
#[test]
fn both_ownership_backends_keep_one_contract() {
    use flint_supervisor::services::sessions::owners::contract;
    let work = TempDir::new("fleet-contract");
    let s3 = S3Server::start();
    let etcd = EtcdServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (a, b) = {
        let _in = rt.enter();
        let store = |name: &str| flint_tests::flintd_store(&work.path().join(name), &s3, "contract");
        (store("a"), store("b"))
    };
    rt.block_on(contract::s3(a, b, &work.path().join("s3")));
    let cluster = flint_supervisor::cluster::ClusterConfig {
        etcd: etcd.urls(),
        prefix: "/contract/".into(),
        lease_ttl_s: TTL_S,
        ..Default::default()
    };
    rt.block_on(contract::etcd(&cluster, &work.path().join("etcd")));
}

/// Runs a step of tests/e2b/fleet_flow.py (E2B's unchanged Python SDK) against the router's E2B endpoint; its
/// output, which must end well.
fn e2b_step(endpoint: &str, key: &str, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2b/fleet_flow.py");
    // The same SDK pins as tests/tests/e2b.rs (one virtualenv for both).
    let out = Command::new(e2b_python(&["e2b==2.63.0", "e2b-code-interpreter==2.11.5"]))
        .arg(&script)
        .args(args)
        .env("E2B_API_KEY", key)
        .env("E2B_API_URL", endpoint)
        .env("E2B_SANDBOX_URL", endpoint)
        .env_remove("E2B_DEBUG")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("ALL OK"), "fleet_flow.py {args:?}:\n{text}");
    text
}

/// E2B's SDK drives the fleet through one endpoint, the router's: a sandbox is created on a host the router
/// places it on, runs a command, pauses; its host is drained; `connect` through the router wakes it on another
/// host, which knows the sandbox from its session's record in etcd (its env and state with it); the fleet's list
/// shows it where it is; kill ends it everywhere. A key the router does not accept is refused.
#[test]
fn the_e2b_sdk_drives_the_fleet_through_the_routers_endpoint() {
    let f = Fleet::start("e2b");
    let key = f.hosts[0].json(&["e2b", "key", "create", "--name", "fleet"])["key"].as_str().unwrap().to_string();
    let keys = f.work.path().join("e2b-keys");
    std::fs::write(&keys, format!("# the fleet's E2B keys\n{key}\n")).unwrap();
    let port = flint_tests::free_port();
    let extra: Vec<String> =
        vec!["--e2b-listen".into(), format!("127.0.0.1:{port}"), "--e2b-keys".into(), keys.to_str().unwrap().into()];
    let r = FleetRouter::start_with(f.work.path(), "router-e2b", &f.etcd.urls(), &f.certs, 0, &extra);
    r.wait_for_hosts(HOSTS);
    let endpoint = format!("http://127.0.0.1:{port}");

    let out = e2b_step(&endpoint, &key, &["create"]);
    let id = out.lines().find_map(|l| l.strip_prefix("SANDBOX ")).expect("the sandbox's id").trim().to_string();
    let entry: Value =
        serde_json::from_str(&f.etcd.get_prefix("/flint/sessions/").unwrap()[&format!("/flint/sessions/{id}")])
            .unwrap();
    let first = entry["last_holder"].as_str().expect("the host that paused it").to_string();
    assert!(entry["session"]["annotations"]["e2b"].as_str().unwrap().contains("\"paused\":true"), "{entry}");
    f.assert_one_owner_each("after the E2B pause");

    // Its host takes no more sessions: the sandbox wakes elsewhere.
    f.routers[0].json(&["host", "drain", &first]);
    e2b_step(&endpoint, &key, &["resume", &id]);
    let runs = f.assert_one_owner_each("after the E2B connect");
    let second = runs.get(&id).expect("the sandbox runs after connect").clone();
    assert_ne!(second, first, "the sandbox woke on another host than the drained one");
    println!("E2B sandbox {id}: created and paused on {first}, resumed on {second}");

    e2b_step(&endpoint, &key, &["finish", &id]);
    let runs = f.assert_one_owner_each("after the E2B kill");
    assert!(!runs.contains_key(&id) && !f.owners().contains_key(&id), "the killed sandbox is gone: {runs:?}");
    assert!(!f.etcd.get_prefix("/flint/sessions/").unwrap().contains_key(&format!("/flint/sessions/{id}")));
}
