//! End-to-end fixtures: find the guest images and binaries, start `flint-vmm` for a test,
//! talk to its control API and to the agent inside the guest, and clean up everything.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use flint_agent::client::{AgentClient, Endpoint};

/// Guest images built by `make images`.
#[derive(Clone, Debug)]
pub struct Images {
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The image directory: `$FLINT_IMAGES`, or whatever `images/build.sh` prints (building it
/// when needed).
pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = match std::env::var_os("FLINT_IMAGES") {
            Some(d) => PathBuf::from(d),
            None => {
                let out = Command::new("bash")
                    .arg(repo_root().join("images/build.sh"))
                    .stderr(Stdio::inherit())
                    .output()
                    .expect("run images/build.sh");
                assert!(out.status.success(), "images/build.sh failed");
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
        };
        let img = Images {
            vmlinux: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
            rootfs: dir.join("rootfs.ext4"),
            dir,
        };
        for p in [&img.vmlinux, &img.initramfs, &img.rootfs] {
            assert!(p.is_file(), "{} is missing: run `make images`", p.display());
        }
        img
    })
}

/// A disk-rooted image built by `images/build.sh NAME` (the Python image): `$FLINT_<NAME>_IMAGE`, or what the
/// build prints (building it when needed; cached outside the clone).
pub fn named_image(name: &str) -> PathBuf {
    let var = format!("FLINT_{}_IMAGE", name.to_ascii_uppercase());
    if let Some(d) = std::env::var_os(&var) {
        return PathBuf::from(d);
    }
    let out = Command::new("bash")
        .arg(repo_root().join("images/build.sh"))
        .arg(name)
        .stderr(Stdio::inherit())
        .output()
        .expect("run images/build.sh");
    assert!(out.status.success(), "images/build.sh {name} failed");
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(dir.join("rootfs.ext4").is_file(), "{}/rootfs.ext4 is missing", dir.display());
    dir
}

/// Directory holding the workspace's binaries: `$FLINT_BIN_DIR`, else the directory of the
/// running test's target profile (target/<profile>/).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLINT_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut d = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if d.ends_with("deps") {
        d.pop();
    }
    d
}

pub fn vmm_bin() -> PathBuf {
    let p = bin_dir().join("flint-vmm");
    assert!(p.is_file(), "{} is missing: build it first (cargo build -p flint-vmm)", p.display());
    p
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::var_os("FLINT_TEST_TMP").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = base.join(format!("flint-{tag}-{}-{seq}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create temp dir");
        TempDir(d)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // FLINT_KEEP_FAILED=1: a failing test's directory (logs, consoles) stays for a post-mortem; FLINT_KEEP=1:
        // every directory stays (a benchmark's flintd logs).
        if std::thread::panicking() && std::env::var_os("FLINT_KEEP_FAILED").is_some() {
            eprintln!("kept {} (FLINT_KEEP_FAILED)", self.0.display());
            return;
        }
        if std::env::var_os("FLINT_KEEP").is_some() {
            eprintln!("kept {} (FLINT_KEEP)", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The child is killed if this process dies without cleaning up (e.g. a panic=abort or kill -9 of a test).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A running flint-vmm process; killed on drop if still running.
pub struct VmProcess {
    pub child: Child,
    pub api_sock: PathBuf,
    pub vsock_uds: PathBuf,
    pub console: PathBuf,
    pub started: Instant,
}

impl VmProcess {
    /// The `Seccomp:` and `NoNewPrivs:` values of every thread of the VMM ("2" and "1" once its
    /// filter is installed). A thread that ends while this reads is left out.
    pub fn seccomp_status(&self) -> Vec<(String, String)> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).expect("the VMM's threads");
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
            .map(|status| {
                let field = |name: &str| {
                    status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).unwrap_or_default()
                };
                (field("Seccomp:"), field("NoNewPrivs:"))
            })
            .collect()
    }

    /// Starts flint-vmm with `args` plus an API socket, a vsock socket and a console log in `dir`.
    pub fn spawn(dir: &Path, args: &[String]) -> VmProcess {
        let api_sock = dir.join("api.sock");
        let vsock_uds = dir.join("vsock.sock");
        let console = dir.join("console.log");
        let started = Instant::now();
        let mut cmd = Command::new(vmm_bin());
        die_with_parent(&mut cmd);
        let child = cmd
            .arg("--api-sock")
            .arg(&api_sock)
            .arg("--vsock-uds")
            .arg(&vsock_uds)
            .arg("--console")
            .arg(&console)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn flint-vmm");
        VmProcess { child, api_sock, vsock_uds, console, started }
    }

    /// Starts flint-vmm as flintd does: a typed launch spec in `<dir>/spec.json`, `flint-vmm --spec` (the API
    /// socket, the vsock socket and the console in `dir` unless the spec says otherwise).
    pub fn launch(dir: &Path, mut spec: flint_vmm_api::LaunchSpec) -> VmProcess {
        use flint_vmm_api::spec::Launch;
        let api_sock = dir.join("api.sock");
        let vsock_uds = dir.join("vsock.sock");
        let console = dir.join("console.log");
        spec.api_sock.get_or_insert_with(|| api_sock.clone());
        match &mut spec.launch {
            Launch::Boot(c) => {
                c.vsock.get_or_insert(flint_vmm_api::config::VsockConfig { guest_cid: 3, uds_path: vsock_uds.clone() });
                if c.console == "stdout" {
                    c.console = console.display().to_string();
                }
            }
            Launch::Restore(r) => {
                r.devices.vsock_uds.get_or_insert_with(|| vsock_uds.clone());
                r.devices.console.get_or_insert_with(|| console.display().to_string());
            }
        }
        let path = dir.join("spec.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&spec).expect("spec")).expect("write the launch spec");
        let started = Instant::now();
        let mut cmd = Command::new(vmm_bin());
        die_with_parent(&mut cmd);
        let child =
            cmd.arg("--spec").arg(&path).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn flint-vmm");
        VmProcess { child, api_sock, vsock_uds, console, started }
    }

    /// A boot of the images' initramfs (256 MiB, one vCPU), with `f`'s changes to the configuration.
    pub fn boot_with(dir: &Path, f: impl FnOnce(&mut flint_vmm_api::config::VmConfig)) -> VmProcess {
        let img = images();
        let mut c = flint_vmm_api::config::VmConfig::new(img.vmlinux.clone());
        c.initramfs = Some(img.initramfs.clone());
        c.mem_mib = 256;
        f(&mut c);
        let spec = flint_vmm_api::LaunchSpec {
            api_sock: None,
            seccomp: true,
            jail: None,
            fence: None,
            vcpu_sched_idle: false,
            launch: flint_vmm_api::spec::Launch::Boot(c),
        };
        Self::launch(dir, spec)
    }

    /// A standard boot.
    pub fn boot(dir: &Path) -> VmProcess {
        Self::boot_with(dir, |_| ())
    }

    /// A restore of `state` with `memory`, with `f`'s changes to the restore.
    pub fn restore_with(
        dir: &Path,
        state: &Path,
        memory: flint_vmm_api::spec::MemorySource,
        f: impl FnOnce(&mut flint_vmm_api::spec::RestoreSpec),
    ) -> VmProcess {
        let mut r = flint_vmm_api::spec::RestoreSpec {
            state_path: state.to_path_buf(),
            memory,
            devices: Default::default(),
            track_dirty_pages: None,
            merged_memory: false,
        };
        f(&mut r);
        let spec = flint_vmm_api::LaunchSpec {
            api_sock: None,
            seccomp: true,
            jail: None,
            fence: None,
            vcpu_sched_idle: false,
            launch: flint_vmm_api::spec::Launch::Restore(r),
        };
        Self::launch(dir, spec)
    }

    /// A restore of `state`/`mem` with memory `mode` (`private` or `uffd`).
    pub fn restore(dir: &Path, state: &Path, mem: &Path, mode: &str) -> VmProcess {
        Self::restore_with(dir, state, memory_source(mem, mode), |_| ())
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Vsock { uds: self.vsock_uds.clone(), port: flint_agent::protocol::DEFAULT_PORT }
    }

    /// Connects to the agent, waiting up to `timeout` for the guest to boot. On failure the
    /// console's tail is in the panic message.
    pub async fn agent(&mut self, timeout: Duration) -> AgentClient {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("flint-vmm exited ({st}) before the agent answered\n{}", self.diagnostics());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("the agent did not answer within {timeout:?}\n{}", self.diagnostics());
            }
            if let Ok(c) = AgentClient::connect(&self.endpoint(), left.min(Duration::from_secs(5))).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Console tail and VMM stderr, for failure messages.
    pub fn diagnostics(&mut self) -> String {
        let console = std::fs::read_to_string(&self.console).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(25).collect();
        let mut stderr = String::new();
        if let Ok(Some(_)) = self.child.try_wait() {
            if let Some(mut e) = self.child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
        }
        format!(
            "--- console (last 25 lines) ---\n{}\n--- flint-vmm stderr ---\n{stderr}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// Waits for the process to exit; returns its status and stderr.
    pub fn wait(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                return (st, stderr);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("flint-vmm did not exit within {timeout:?}\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP/1.1 request to a Unix-socket API; returns the status and JSON body.
pub fn api_call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> std::io::Result<(u16, serde_json::Value)> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    s.write_all(&flint_vmm_api::http::encode_request(method, path, body.as_bytes()))?;
    let mut buf = Vec::new();
    (&mut s).take(64 << 20).read_to_end(&mut buf)?;
    let (status, body) = flint_vmm_api::http::parse_response(&buf)
        .ok_or_else(|| std::io::Error::other(format!("malformed HTTP response from {}", sock.display())))?;
    let v = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)
    };
    Ok((status, v))
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with a tap device in it, both removed on drop.
pub struct NetnsTap {
    pub ns: String,
    pub tap: String,
    pub host_ip: String,
    pub guest_ip: String,
}

impl NetnsTap {
    pub fn create(tag: &str, subnet: u8) -> NetnsTap {
        let ns = format!("flint-{tag}-{}", std::process::id());
        let tap = format!("ftap{}", std::process::id() % 100_000);
        let t = NetnsTap { ns, tap, host_ip: format!("10.{subnet}.0.1"), guest_ip: format!("10.{subnet}.0.2") };
        let _ = Command::new("ip").args(["netns", "del", &t.ns]).output();
        run("ip", &["netns", "add", &t.ns]);
        run("ip", &["-n", &t.ns, "tuntap", "add", "dev", &t.tap, "mode", "tap"]);
        run("ip", &["-n", &t.ns, "addr", "add", &format!("{}/24", t.host_ip), "dev", &t.tap]);
        run("ip", &["-n", &t.ns, "link", "set", &t.tap, "up"]);
        run("ip", &["-n", &t.ns, "link", "set", "lo", "up"]);
        t
    }

    pub fn netns_path(&self) -> String {
        format!("/var/run/netns/{}", self.ns)
    }

    /// Kernel command line that configures the guest's eth0 statically.
    pub fn guest_ip_cmdline(&self) -> String {
        format!("ip={}::{}:255.255.255.0::eth0:off", self.guest_ip, self.host_ip)
    }
}

impl Drop for NetnsTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A snapshot of a booted guest whose agent is up and which runs a background counter
/// (`/tmp/counter`, incremented every second by a process started before the snapshot).
#[derive(Clone, Debug)]
pub struct Golden {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub mem: PathBuf,
    /// The counter's value when the snapshot was taken.
    pub counter_at_snapshot: u64,
    /// What the snapshot call reported.
    pub report: serde_json::Value,
    /// Cold boot: VMM start → agent answers, when this snapshot was made.
    pub boot_ms: f64,
}

/// Script of the background process. It waits with the shell's own `read -t 1` on a FIFO it holds open (nothing
/// is ever written to it), not `sleep 1`: busybox runs `sleep` as a child process, and a fork and exec every
/// second kept ~65% of a core of an emulating host busy per running clone (the guest kernel's work is emulated
/// there), against ~9% for this loop (measured with each in one guest, 20 s).
pub const COUNTER_SCRIPT: &str = "mkfifo /tmp/counter.tick; exec 3<>/tmp/counter.tick; i=0; \
    while :; do i=$((i+1)); echo $i > /tmp/counter; read -t 1 i_ <&3; done";

/// FNV-1a of some bytes: a cache key's part, not a checksum anything trusts.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

fn file_digest(p: &Path) -> String {
    format!("{:016x}", fnv(&std::fs::read(p).unwrap_or_default()))
}

/// Boots the images once, starts the counter, snapshots, and caches the result under
/// `${FLINT_CACHE}/golden/<images>-<flint-vmm digest>-<counter script digest>/` (SnapStart for our own tests).
pub fn golden() -> &'static Golden {
    static GOLDEN: OnceLock<Golden> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let img = images();
        let cache = std::env::var_os("FLINT_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/flint"));
        let key = format!(
            "{}-{}-{:08x}",
            img.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            file_digest(&vmm_bin()),
            fnv(COUNTER_SCRIPT.as_bytes()) as u32
        );
        let dir = cache.join("golden").join(key);
        let meta = dir.join("golden.json");
        // Test processes run side by side (scripts/test.sh): one makes the snapshot, the others wait for it.
        std::fs::create_dir_all(cache.join("golden")).expect("golden cache dir");
        let lock = std::fs::File::create(cache.join("golden/.lock")).expect("golden lock file");
        // SAFETY: flock(2) on an fd this function owns; the lock goes when `lock` is dropped at return.
        let locked = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
        assert_eq!(locked, 0, "lock the golden cache: {}", std::io::Error::last_os_error());
        if let Ok(text) = std::fs::read_to_string(&meta) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                return Golden {
                    state: dir.join("vm.state"),
                    mem: dir.join("vm.mem"),
                    dir,
                    counter_at_snapshot: v["counter"].as_u64().unwrap_or(0),
                    report: v["report"].clone(),
                    boot_ms: v["boot_ms"].as_f64().unwrap_or(0.0),
                };
            }
        }
        // Its own thread and runtime: callers may be inside an async test already.
        std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            rt.block_on(make_golden(&dir))
        })
        .join()
        .expect("making the golden snapshot failed")
    })
}

async fn make_golden(dir: &Path) -> Golden {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("golden dir");
    let work = TempDir::new("golden");
    // A detached network card, as flintd boots every VM: clones of the golden snapshot may be given a network.
    let mut vm = VmProcess::boot_with(work.path(), |c| {
        c.track_dirty_pages = true;
        c.net = Some(flint_vmm_api::config::NetConfig::detached());
    });
    let agent = vm.agent(Duration::from_secs(300)).await;
    let boot_ms = vm.started.elapsed().as_secs_f64() * 1000.0;
    let req = flint_agent::protocol::ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), format!("({COUNTER_SCRIPT}) >/dev/null 2>&1 </dev/null &")],
        timeout_ms: Some(60_000),
        ..Default::default()
    };
    let out = agent.exec_output(req).await.expect("start the counter");
    assert_eq!(out.code, Some(0), "{out:?}");
    // Let it count a little.
    let mut counter = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(b) = agent.read_file("/tmp/counter").await {
            counter = String::from_utf8_lossy(&b).trim().parse().unwrap_or(0);
            if counter >= 2 {
                break;
            }
        }
    }
    assert!(counter >= 2, "the counter did not start\n{}", vm.diagnostics());
    agent.before_checkpoint().await.expect("before-checkpoint");
    let body = serde_json::json!({
        "state_path": tmp.join("vm.state"),
        "mem_path": tmp.join("vm.mem"),
        "resume": false,
    });
    let (st, report) = api_call(&vm.api_sock, "PUT", "/snapshot/create", Some(&body)).expect("snapshot");
    assert_eq!(st, 200, "{report}");
    // The counter cannot have moved while paused: read what the snapshot holds afterwards in a
    // restore; record the last value seen before it.
    let meta = serde_json::json!({ "counter": counter, "report": report["snapshot"], "boot_ms": boot_ms });
    std::fs::write(tmp.join("golden.json"), meta.to_string()).expect("golden meta");
    drop(agent);
    let _ = api_call(&vm.api_sock, "PUT", "/vm/shutdown", None);
    let _ = vm.wait(Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).expect("publish golden snapshot");
    prune_goldens(dir, 4);
    Golden {
        state: dir.join("vm.state"),
        mem: dir.join("vm.mem"),
        dir: dir.to_path_buf(),
        counter_at_snapshot: counter,
        report: report["snapshot"].clone(),
        boot_ms,
    }
}

/// Every build of flint-vmm makes its own golden snapshot (~25 MB): keep the `keep` newest
/// (other checkouts may be using theirs) and drop the rest.
fn prune_goldens(current: &Path, keep: usize) {
    let Some(parent) = current.parent() else { return };
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p != current && p.extension().is_none())
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    for (_, p) in dirs.into_iter().skip(keep.saturating_sub(1)) {
        let _ = std::fs::remove_dir_all(p);
    }
}

/// The memory source of restore mode `mode` for memory file `mem`.
pub fn memory_source(mem: &Path, mode: &str) -> flint_vmm_api::spec::MemorySource {
    use flint_vmm_api::spec::MemorySource;
    match mode {
        "uffd" => MemorySource::Uffd { path: mem.to_path_buf() },
        "private" => MemorySource::Private { path: mem.to_path_buf() },
        other => panic!("no restore mode {other}"),
    }
}

/// A real S3-compatible server (s3s-fs, installed by `scripts/s3-server.sh`) on a loopback port, storing objects
/// as files under its own directory. Killed on drop.
pub struct S3Server {
    pub dir: TempDir,
    /// The address it listens on (loopback unless started with [`S3Server::start_on`]).
    pub ip: String,
    pub port: u16,
    pub bucket: String,
    child: Option<Child>,
    /// Clients are told to go through this endpoint instead (a [`LatencyProxy`]).
    via: Option<String>,
}

/// A TCP proxy on loopback that holds back the first bytes of every answer by `latency`: each request/response
/// exchange then takes at least that long, like a remote object store (S3's first-byte latency is tens of ms).
pub struct LatencyProxy {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl LatencyProxy {
    pub fn start(upstream: u16, latency: Duration) -> LatencyProxy {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let l = TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        let port = l.local_addr().expect("proxy port").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                // Set when the client sent something the server has not answered yet.
                let asked = Arc::new(AtomicBool::new(false));
                let pump = move |mut from: TcpStream, mut to: TcpStream, asked: Arc<AtomicBool>, answer: bool| {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if answer {
                            if asked.swap(false, Ordering::Relaxed) {
                                std::thread::sleep(latency);
                            }
                        } else {
                            asked.store(true, Ordering::Relaxed);
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                };
                let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                let a2 = asked.clone();
                std::thread::spawn(move || pump(client, server, asked, false));
                std::thread::spawn(move || pump(s2, c2, a2, true));
            }
        });
        LatencyProxy { port, stop }
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A TCP proxy on loopback that can cut its clients off from the server, as a network partition would: `cut`
/// closes every open connection and every new one at once, `heal` lets new ones through again.
pub struct PartitionProxy {
    pub port: u16,
    state: std::sync::Arc<PartitionState>,
}

#[derive(Default)]
struct PartitionState {
    cut: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    open: Mutex<Vec<std::net::TcpStream>>,
}

impl PartitionProxy {
    pub fn start(upstream: u16) -> PartitionProxy {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        let port = l.local_addr().expect("proxy port").port();
        let state = std::sync::Arc::new(PartitionState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if st.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = conn else { continue };
                if st.cut.load(Ordering::Relaxed) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                {
                    let mut open = st.open.lock().unwrap();
                    open.retain(|s| s.peer_addr().is_ok());
                    open.push(client.try_clone().expect("clone"));
                    open.push(server.try_clone().expect("clone"));
                }
                let pump = |mut from: TcpStream, mut to: TcpStream| {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                };
                let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                std::thread::spawn(move || pump(client, server));
                std::thread::spawn(move || pump(s2, c2));
            }
        });
        PartitionProxy { port, state }
    }

    /// Cuts every client off: open connections are shut down, new ones closed on arrival.
    pub fn cut(&self) {
        self.state.cut.store(true, std::sync::atomic::Ordering::Relaxed);
        for s in self.state.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.state.cut.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for PartitionProxy {
    fn drop(&mut self) {
        self.cut();
        self.state.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// `$FLINT_CACHE`, else `~/.cache/flint`: what the tests build once and keep.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("FLINT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/flint"))
}

/// A Python virtualenv with E2B's SDKs from PyPI (`pkgs`: pinned requirements), made once under
/// `~/.cache/flint/tools/e2b-py-<hash of pkgs>`; its interpreter.
pub fn e2b_python(pkgs: &[&str]) -> PathBuf {
    let hash: String = blake3::hash(pkgs.join(" ").as_bytes()).to_hex()[..12].to_string();
    let dir = cache_dir().join("tools").join(format!("e2b-py-{hash}"));
    let python = dir.join("bin/python");
    if !dir.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let ok = Command::new("python3").arg("-m").arg("venv").arg(&dir).status().is_ok_and(|s| s.success())
            && Command::new(dir.join("bin/pip"))
                .args(["install", "-q", "--disable-pip-version-check"])
                .args(pkgs)
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit())
                .status()
                .is_ok_and(|s| s.success());
        assert!(ok, "installing {pkgs:?} from PyPI into {} failed", dir.display());
        std::fs::write(dir.join(".complete"), pkgs.join("\n")).unwrap();
    }
    python
}

/// E2B's JavaScript SDK from npm (`pkg`, pinned), installed once under `~/.cache/flint/tools/e2b-js-<pkg>`; the
/// directory to run node scripts from (its node_modules resolve).
pub fn e2b_node(pkg: &str) -> PathBuf {
    let dir = cache_dir().join("tools").join(format!("e2b-js-{}", pkg.replace(['@', '/'], "_")));
    if !dir.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(pkg)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "npm install {pkg} into {} failed", dir.display());
        std::fs::write(dir.join(".complete"), pkg).unwrap();
    }
    dir
}

pub const S3_ACCESS_KEY: &str = "flint-test";
pub const S3_SECRET_KEY: &str = "flint-test-secret";

fn s3_server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("FLINT_S3_SERVER") {
            return PathBuf::from(p);
        }
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/s3-server.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/s3-server.sh");
        assert!(out.status.success(), "scripts/s3-server.sh failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

impl S3Server {
    pub fn start() -> S3Server {
        Self::start_on("127.0.0.1")
    }

    /// A server listening on `ip` (an address of the calling thread's network namespace).
    pub fn start_on(ip: &str) -> S3Server {
        let dir = TempDir::new("s3");
        let bucket = "flint".to_string();
        std::fs::create_dir_all(dir.path().join("data").join(&bucket)).expect("create bucket dir");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("pick a port");
            l.local_addr().expect("port").port()
        };
        let mut s = S3Server { dir, ip: ip.to_string(), port, bucket, child: None, via: None };
        s.resume();
        s
    }

    pub fn endpoint(&self) -> String {
        self.via.clone().unwrap_or_else(|| format!("http://{}:{}", self.ip, self.port))
    }

    /// From now on clients (`env`, `endpoint`) go through `proxy`.
    pub fn route_through(&mut self, proxy: &LatencyProxy) {
        self.via = Some(format!("http://127.0.0.1:{}", proxy.port));
    }

    /// From now on clients go through the proxy on loopback port `port`, or straight to the server (`None`).
    pub fn route_via(&mut self, port: Option<u16>) {
        self.via = port.map(|p| format!("http://127.0.0.1:{p}"));
    }

    /// Where the server keeps an object (for tests that damage one).
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.dir.path().join("data").join(&self.bucket).join(key)
    }

    /// Environment for a process (flint-store, flintd) that should use this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), S3_ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), S3_SECRET_KEY.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("FLINT_S3_ENDPOINT".into(), self.endpoint()),
            ("FLINT_S3_BUCKET".into(), self.bucket.clone()),
        ]
    }

    /// Stops the server (connections are refused until [`S3Server::resume`]).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)starts the server on the same port and data.
    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("server log");
        let mut cmd = Command::new(s3_server_bin());
        cmd.args(["--host", &self.ip, "--port", &self.port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(self.dir.path().join("data"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        die_with_parent(&mut cmd);
        self.child = Some(cmd.spawn().expect("start s3s-fs"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect((self.ip.as_str(), self.port)).is_err() {
            assert!(Instant::now() < deadline, "S3 server did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A flintd started by a test, the demo or a benchmark: the workspace's binary, the default image, `s3` as its
/// remote tier (under `prefix` when not empty), its log appended to `<data>.log`. Stopped with SIGTERM on drop.
pub struct Flintd {
    pub child: Child,
    pub socket: PathBuf,
}

impl Flintd {
    /// flintd on a test bucket only this test writes (`--allow-unauthenticated-bucket`: the tests read manifests
    /// in the bucket directly).
    pub fn start(data: &Path, socket: &Path, s3: &S3Server, prefix: &str) -> Flintd {
        Self::start_with(data, socket, s3, prefix, &["--allow-unauthenticated-bucket"])
    }

    pub fn start_with(data: &Path, socket: &Path, s3: &S3Server, prefix: &str, extra: &[&str]) -> Flintd {
        Self::start_full(data, socket, Some((s3, prefix)), extra, None)
    }

    /// flintd with the S3 tier `s3` (under a prefix) or none, in network namespace `netns` (a path such as
    /// /run/netns/NAME) or the test's own.
    pub fn start_full(
        data: &Path,
        socket: &Path,
        s3: Option<(&S3Server, &str)>,
        extra: &[&str],
        netns: Option<&Path>,
    ) -> Flintd {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(data.with_extension("log")).expect("flintd log");
        let mut cmd = Command::new(bin_dir().join("flintd"));
        cmd.arg("--socket")
            .arg(socket)
            .arg("--data-dir")
            .arg(data)
            .arg("--image")
            .arg(format!("default={}", images().dir.display()))
            .args(extra)
            .stdout(log.try_clone().expect("flintd log"))
            .stderr(log);
        match s3 {
            Some((s3, prefix)) => {
                cmd.envs(s3.env());
                if !prefix.is_empty() {
                    cmd.env("FLINT_S3_PREFIX", prefix);
                }
            }
            // No S3 tier, whatever an earlier test of this process left in its environment (`flintd_store` sets
            // the S3 variables for the store it opens).
            None => {
                for k in [
                    "FLINT_S3_BUCKET",
                    "FLINT_S3_ENDPOINT",
                    "FLINT_S3_PREFIX",
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                ] {
                    cmd.env_remove(k);
                }
            }
        }
        die_with_parent(&mut cmd);
        if let Some(ns) = netns {
            let f = std::fs::File::open(ns).expect("open the network namespace");
            let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
            std::mem::forget(f); // open until the child has started (the test process ends soon anyway)
                                 // SAFETY: setns(2) is async-signal-safe and changes only the child, between fork and exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("start flintd (cargo build --workspace --bins)");
        let mut f = Flintd { child, socket: socket.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(socket).is_err() {
            let exited = f.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "flintd did not listen on {} ({}); the end of {}.log:\n{}",
                    socket.display(),
                    exited.map(|s| s.to_string()).unwrap_or_else(|| "still running after 30 s".into()),
                    data.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        f
    }
}

impl Drop for Flintd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child, still running and not reaped: SIGTERM for a graceful stop.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The store flintd uses under `data` with `s3` under `prefix` (no secret: flintd started with
/// `--allow-unauthenticated-bucket`), for tests that read or seed it directly.
pub fn flintd_store(data: &Path, s3: &S3Server, prefix: &str) -> flint_snapshot_store::Store {
    let mut cfg = flint_snapshot_store::StoreConfig::new(&data.join("store"));
    let mut s3c = flint_snapshot_store::S3Config::new(&s3.bucket);
    s3c.endpoint = Some(s3.endpoint());
    s3c.prefix = prefix.into();
    cfg.s3 = Some(s3c);
    for (k, v) in s3.env() {
        std::env::set_var(k, v);
    }
    flint_snapshot_store::Store::open(cfg).unwrap()
}

/// A network namespace the test makes (`ip netns add`), deleted on drop.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    pub fn new(tag: &str) -> TestNetns {
        let name = format!("flint-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = TestNetns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME args...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `f` on a thread inside the namespace (sockets it makes stay in it, also when used from elsewhere;
    /// processes it starts run in it, and a `die_with_parent` child ends when `f` returns).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = std::fs::File::open(self.path()).expect("open the network namespace");
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: setns(2) on a namespace fd we hold; it changes only this thread.
                    let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
                    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A test's own network: a `fabric` namespace with a bridge (the shared services run there: etcd, the S3 server,
/// routers) and one namespace per host, each joined to the bridge by a veth pair. Cutting a host's link takes it off
/// the network as a pulled cable would: it reaches neither etcd, nor S3, nor routers, and they do not reach it.
pub struct Fabric {
    pub ns: TestNetns,
    pub hosts: Vec<TestNetns>,
}

impl Fabric {
    /// The fabric's own address on the bridge (10.213.0.0/24).
    pub const IP: &'static str = "10.213.0.1";

    pub fn new(tag: &str, hosts: usize) -> Fabric {
        let ns = TestNetns::new(&format!("{tag}-fab"));
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["addr", "add", &format!("{}/24", Self::IP), "dev", "br0"]);
        ns.ip(&["link", "set", "br0", "up"]);
        let hosts = (0..hosts)
            .map(|i| {
                let h = TestNetns::new(&format!("{tag}-h{i}"));
                let port = format!("h{i}");
                ns.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &h.name]);
                ns.ip(&["link", "set", &port, "master", "br0", "up"]);
                h.ip(&["addr", "add", &format!("{}/24", Self::host_ip(i)), "dev", "eth0"]);
                h.ip(&["link", "set", "eth0", "up"]);
                h
            })
            .collect();
        Fabric { ns, hosts }
    }

    /// Host `i`'s address.
    pub fn host_ip(i: usize) -> String {
        format!("10.213.0.{}", i + 2)
    }

    /// Takes host `i` off the network (its bridge port down).
    pub fn cut(&self, i: usize) {
        self.ns.ip(&["link", "set", &format!("h{i}"), "down"]);
    }

    pub fn heal(&self, i: usize) {
        self.ns.ip(&["link", "set", &format!("h{i}"), "up"]);
    }
}

/// Puts the golden snapshot into flintd's local store only (flintd without an S3 tier) as snapshot `id`.
pub fn import_golden_local(data: &Path, id: &str) {
    let g = golden();
    std::fs::create_dir_all(data).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let draft = golden_draft(g, id, None);
    rt.block_on(async {
        let cfg = flint_snapshot_store::StoreConfig::new(&data.join("store"));
        flint_snapshot_store::Store::open(cfg).unwrap().put(draft, false).await.unwrap();
    });
}

/// Puts the golden snapshot into flintd's store as snapshot `id` (and publishes it), so a test restores clones
/// through flintd without a cold boot. `mem_mib` is what its metadata says (what flintd sizes the VM's cgroup by).
pub fn import_golden(data: &Path, s3: &S3Server, prefix: &str, id: &str, mem_mib: Option<u64>) {
    let g = golden();
    std::fs::create_dir_all(data).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let draft = golden_draft(g, id, mem_mib);
    rt.block_on(async {
        flintd_store(data, s3, prefix).put(draft, true).await.unwrap();
    });
}

/// The golden snapshot as a store draft named `id`, with the metadata flintd reads (`mem_mib` overridable).
fn golden_draft(g: &Golden, id: &str, mem_mib: Option<u64>) -> flint_snapshot_store::SnapshotDraft {
    snapshot_draft(id, &g.state, &g.mem, &g.report, mem_mib)
}

/// A snapshot the VMM wrote (`state`, `mem`, and the report of its snapshot call) as a store draft named `id`,
/// with the metadata flintd reads (`mem_mib` overridable).
pub fn snapshot_draft(
    id: &str,
    state: &Path,
    mem: &Path,
    report: &serde_json::Value,
    mem_mib: Option<u64>,
) -> flint_snapshot_store::SnapshotDraft {
    let mut draft = flint_snapshot_store::SnapshotDraft::new(id)
        .image("state", flint_snapshot_store::ImageSource::File(state.to_path_buf()))
        .image("memory", flint_snapshot_store::ImageSource::File(mem.to_path_buf()));
    draft.metadata.insert("vcpus".into(), report["vcpus"].to_string());
    let mem = mem_mib.map(|m| m.to_string()).unwrap_or_else(|| report["mem_mib"].to_string());
    draft.metadata.insert("mem_mib".into(), mem);
    draft.metadata.insert("drives".into(), "0".into());
    draft.vmm_format = report["format_version"].as_u64().map(|v| v as u32);
    draft
}

/// Puts a draft into the local store of flintd's data directory `data` (no S3 tier).
pub fn import_local(data: &Path, draft: flint_snapshot_store::SnapshotDraft) {
    std::fs::create_dir_all(data).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let cfg = flint_snapshot_store::StoreConfig::new(&data.join("store"));
        flint_snapshot_store::Store::open(cfg).unwrap().put(draft, false).await.unwrap();
    });
}

/// What the jail promises, read from /proc: process `pid` runs as a uid that is not root, with no_new_privs, pid 1
/// of its own pid namespace and in its own mount, network, IPC and UTS namespaces, with its VM directory `dir` as
/// `/` (its /dev holding kvm), `Seccomp: 2` on every thread, and in a cgroup with a memory limit.
pub fn assert_jailed(pid: u64, dir: &Path) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).unwrap_or_default()
    };
    assert!(field("Uid:").split_whitespace().all(|u| u != "0"), "VMM {pid} runs as root: {}", field("Uid:"));
    assert!(field("Gid:").split_whitespace().all(|g| g != "0"), "VMM {pid} has gid 0");
    assert_eq!(field("NoNewPrivs:"), "1", "VMM {pid}");
    let nspid: Vec<String> = field("NSpid:").split_whitespace().map(String::from).collect();
    assert!(nspid.len() == 2 && nspid[1] == "1", "VMM {pid} is not pid 1 of its own pid namespace: {nspid:?}");
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "VMM {pid} shares the {ns} namespace");
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert!(
        root.join("spec.json").is_file() && dir.join("spec.json").is_file(),
        "VMM {pid}: / is not {}",
        dir.display()
    );
    assert!(!root.join("etc").exists() && !root.join("usr").exists(), "VMM {pid} sees the host's tree");
    assert!(root.join("dev/kvm").exists(), "VMM {pid} has no /dev/kvm");
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        // A thread that ended since the listing (a short-lived helper) has no status to read: nothing to check.
        let Ok(s) = std::fs::read_to_string(t.path().join("status")) else { continue };
        if s.lines().any(|l| l.starts_with("State:") && (l.contains("(zombie)") || l.contains("(dead)"))) {
            continue;
        }
        assert!(
            s.lines().any(|l| l == "Seccomp:\t2"),
            "VMM {pid} thread {:?} has no seccomp filter:\n{s}",
            t.file_name()
        );
    }
    let (dir, v2) = cgroup_dir(pid, "memory").unwrap_or_else(|| panic!("VMM {pid} has no memory cgroup"));
    let file = dir.join(if v2 { "memory.max" } else { "memory.limit_in_bytes" });
    let limit = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("VMM {pid}: {}: {e}", file.display()));
    let bytes: u64 = limit.trim().parse().unwrap_or(u64::MAX);
    assert!(bytes < 1 << 40, "VMM {pid}: memory limit {limit:?}");
}

/// The directory of process `pid`'s cgroup that holds `controller` (`memory`, `cpu`): in that controller's v1
/// hierarchy if it has one, else in the unified (v2) one; and whether it is v2. None: no such process.
pub fn cgroup_dir(pid: u64, controller: &str) -> Option<(PathBuf, bool)> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    // `ID:CONTROLLERS:PATH`; the v2 line has no controllers.
    let entries = || {
        cgroups.lines().filter_map(|l| {
            let mut f = l.splitn(3, ':').skip(1);
            Some((f.next()?, f.next()?.trim_start_matches('/')))
        })
    };
    let root = Path::new("/sys/fs/cgroup");
    match entries().find(|(c, _)| c.split(',').any(|c| c == controller)) {
        Some((_, path)) => Some((root.join(controller).join(path), false)),
        None => entries().find(|(c, _)| c.is_empty()).map(|(_, path)| (root.join(path), true)),
    }
}

/// Processes whose command line names `dir` (flintd and its VMMs under a test's data directory): pid and command
/// line.
pub fn processes_naming(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            out.push((pid, cmdline));
        }
    }
    out
}

/// VMMs started by flintd live in their own sessions (they must survive flintd): kill any left under `0` when the
/// test ends, pass or fail.
pub struct KillVmmsUnder(pub PathBuf);

impl Drop for KillVmmsUnder {
    fn drop(&mut self) {
        for (pid, _) in processes_naming(&self.0) {
            // SAFETY: kill(2) on a process whose command line names this test's private directory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Network namespaces flintd made for them (bind mounts under <data>/netns).
        for e in std::fs::read_dir(self.0.join("netns")).into_iter().flatten().flatten() {
            if let Ok(c) = std::ffi::CString::new(e.path().as_os_str().as_encoded_bytes()) {
                // SAFETY: umount2(2) with a NUL-terminated path; failure (not mounted) is fine.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        // The jail's cgroups of those VMs (flintd removes a VM's cgroup when it deletes the VM).
        // Named after the uid each VM (or standby) directory belongs to.
        let ids: Vec<std::ffi::OsString> = ["vms", "standby"]
            .iter()
            .flat_map(|d| std::fs::read_dir(self.0.join(d)).into_iter().flatten().flatten())
            .filter_map(|e| {
                use std::os::unix::fs::MetadataExt;
                let uid = e.metadata().ok()?.uid();
                (uid != 0).then(|| std::ffi::OsString::from(format!("vm-{uid}")))
            })
            .collect();
        let bases = ["memory/flint", "cpu/flint", "cpu,cpuacct/flint", "pids/flint", "flint"];
        for _ in 0..100 {
            let mut left = false;
            for id in &ids {
                for b in bases {
                    let d = Path::new("/sys/fs/cgroup").join(b).join(id);
                    if d.exists() && std::fs::remove_dir(&d).is_err() {
                        left = true;
                    }
                }
            }
            if !left {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Every fuzz target's corpus (fuzz/corpus/<target>/, committed: seeds, minimized finds, regressions) replayed
/// through the target's body on stable: `make test` guards every case the fuzzer found (docs/testing.md).
/// A fleet's certificates (openssl): a CA, a server certificate for 127.0.0.1/localhost (hosts' cluster
/// listeners, the router) and a client certificate (routers towards hosts, the CLI towards routers).
pub struct FleetCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl FleetCerts {
    pub fn make(dir: &Path) -> FleetCerts {
        Self::make_for(dir, &[])
    }

    /// Certificates whose server certificate also names the addresses `ips` (hosts on a test's own network).
    pub fn make_for(dir: &Path, ips: &[&str]) -> FleetCerts {
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Flint test fleet CA"],
        ]
        .concat());
        let alt: String = ips.iter().map(|ip| format!(",IP:{ip}")).collect();
        let server = format!("subjectAltName=IP:127.0.0.1,DNS:localhost{alt}\nextendedKeyUsage=serverAuth\n");
        for (name, ext) in [("server", server.as_str()), ("client", "extendedKeyUsage=clientAuth\n")] {
            let (key, csr, pem, extf) =
                (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
            std::fs::write(dir.join(&extf), ext).unwrap();
            run(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN=flint-{name}")]].concat());
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extf,
            ]);
        }
        FleetCerts {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

/// A free TCP port on loopback (bound and released: good enough for a test's own servers).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("pick a port").local_addr().unwrap().port()
}

/// A `flint-router` in front of an etcd cluster, with the fleet's certificates (its log in `<dir>/<name>.log`), and
/// `flint --url` to it with the fleet's client certificate. Killed on drop.
pub struct FleetRouter {
    pub url: String,
    pub port: u16,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
    pub ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl FleetRouter {
    /// Starts a router on `port` (0: a free one) for the etcd members `etcd` (client URLs).
    pub fn start(dir: &Path, name: &str, etcd: &[String], certs: &FleetCerts, port: u16) -> FleetRouter {
        Self::start_with(dir, name, etcd, certs, port, &[])
    }

    /// [`FleetRouter::start`] with more arguments (`--e2b-listen …`).
    pub fn start_with(
        dir: &Path,
        name: &str,
        etcd: &[String],
        certs: &FleetCerts,
        port: u16,
        extra: &[String],
    ) -> FleetRouter {
        let port = if port == 0 { free_port() } else { port };
        let p = |x: &Path| x.to_str().unwrap().to_string();
        let mut args = Vec::new();
        for e in etcd {
            args.extend(["--etcd".to_string(), e.clone()]);
        }
        args.extend(["--listen".into(), format!("127.0.0.1:{port}"), "--min-free-mib".into(), "64".into()]);
        args.extend(["--tls-cert".into(), p(&certs.server_cert), "--tls-key".into(), p(&certs.server_key)]);
        args.extend(["--client-ca".into(), p(&certs.ca), "--host-ca".into(), p(&certs.ca)]);
        args.extend(["--cert".into(), p(&certs.client_cert), "--key".into(), p(&certs.client_key)]);
        args.extend(extra.iter().cloned());
        let mut r = FleetRouter {
            url: format!("https://127.0.0.1:{port}"),
            port,
            child: None,
            args,
            log: dir.join(format!("{name}.log")),
            ca: certs.ca.clone(),
            cert: certs.client_cert.clone(),
            key: certs.client_key.clone(),
        };
        r.restart();
        r
    }

    /// Kills the router (SIGKILL: it holds no state) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("router log");
        let mut cmd = Command::new(bin_dir().join("flint-router"));
        die_with_parent(&mut cmd);
        cmd.args(&self.args).stdout(log.try_clone().expect("router log")).stderr(log);
        self.child = Some(cmd.spawn().expect("start flint-router (cargo build --workspace --bins)"));
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `--cert` and `--key` of the fleet's client certificate.
    pub fn identity(&self) -> [&std::ffi::OsStr; 4] {
        ["--cert".as_ref(), self.cert.as_os_str(), "--key".as_ref(), self.key.as_os_str()]
    }

    /// `flint --url <router> ARGS` with the fleet's client certificate.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin_dir().join("flint"))
            .arg("--url")
            .arg(&self.url)
            .arg("--ca")
            .arg(&self.ca)
            .arg("--cert")
            .arg(&self.cert)
            .arg("--key")
            .arg(&self.key)
            .args(args)
            .output()
            .expect("run flint")
    }

    /// `flint --url <router> --json ARGS`, which must succeed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(&[&["--json"][..], args].concat());
        assert!(out.status.success(), "flint --url {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Waits until the router lists `n` hosts.
    pub fn wait_for_hosts(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.run(&["--json", "host", "ls"]);
            let listed = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v.as_array().map(Vec::len))
                .unwrap_or(0);
            if out.status.success() && listed >= n {
                return;
            }
            assert!(Instant::now() < deadline, "the router never saw {n} hosts: {out:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for FleetRouter {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real etcd (Debian's etcd-server) on loopback, in a directory of its own; killed and removed on drop.
pub struct EtcdServer {
    /// The first member's client port.
    pub port: u16,
    /// The address its members listen on.
    pub ip: String,
    members: Vec<EtcdMember>,
    dir: TempDir,
}

struct EtcdMember {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// One member.
    pub fn start() -> EtcdServer {
        Self::start_cluster(1)
    }

    /// A cluster of `n` members on loopback.
    pub fn start_cluster(n: usize) -> EtcdServer {
        Self::start_cluster_on(n, "127.0.0.1")
    }

    /// A cluster of `n` members on `ip` (an address of the calling thread's network namespace).
    pub fn start_cluster_on(n: usize, ip: &str) -> EtcdServer {
        let dir = TempDir::new("etcd");
        let members: Vec<EtcdMember> = (0..n)
            .map(|i| EtcdMember { name: format!("m{i}"), client: free_port(), peer: free_port(), child: None })
            .collect();
        let mut e = EtcdServer { port: members[0].client, ip: ip.to_string(), members, dir };
        for i in 0..n {
            e.start_member(i);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while e.get_prefix("/").is_none() {
            assert!(Instant::now() < deadline, "etcd did not answer on port {} within 60 s", e.port);
            std::thread::sleep(Duration::from_millis(100));
        }
        e
    }

    /// (Re)starts member `i` on its data directory.
    pub fn start_member(&mut self, i: usize) {
        let initial: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://{}:{}", m.name, self.ip, m.peer)).collect();
        let m = &self.members[i];
        let client = format!("http://{}:{}", self.ip, m.client);
        let peer = format!("http://{}:{}", self.ip, m.peer);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .expect("etcd log");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.dir.path().join(&m.name))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("start etcd (Debian package etcd-server; scripts/test.sh installs it)");
        self.members[i].child = Some(child);
    }

    /// Kills member `i` (SIGKILL): with a majority gone the cluster has no quorum.
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every member's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("http://{}:{}", self.ip, m.client)).collect()
    }

    /// Every member's client URL, as a TOML array's items.
    pub fn urls_toml(&self) -> String {
        self.urls().iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ")
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }

    /// Every key under `prefix` and its value (through etcd's JSON gateway); `None` if etcd did not answer.
    pub fn get_prefix(&self, prefix: &str) -> Option<std::collections::BTreeMap<String, String>> {
        use flint_supervisor::cluster::etcd::prefix_end;
        use flint_supervisor::e2b::b64;
        let body = serde_json::json!({
            "key": b64::encode(prefix.as_bytes()),
            "range_end": b64::encode(&prefix_end(prefix)),
        });
        let out = Command::new("curl")
            .args(["-sf", "-m", "5", "-X", "POST", &format!("{}/v3/kv/range", self.url()), "-d", &body.to_string()])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let kvs = v.get("kvs").and_then(|k| k.as_array()).cloned().unwrap_or_default();
        let text = |f: &str, kv: &serde_json::Value| {
            kv.get(f).and_then(|s| s.as_str()).and_then(b64::decode).map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        Some(kvs.iter().filter_map(|kv| Some((text("key", kv)?, text("value", kv).unwrap_or_default()))).collect())
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }
}

#[cfg(test)]
mod fuzz_corpora_tests {
    type Body = fn(&[u8]);

    #[test]
    fn every_fuzz_corpus_replays() {
        let targets: [(&str, Body); 13] = [
            ("state_file", flint_vmm::fuzzing::state_file),
            ("control_api", flint_vmm::fuzzing::control_api),
            ("virtq_block", flint_vmm::fuzzing::block),
            ("virtq_net", flint_vmm::fuzzing::net),
            ("virtq_rng", flint_vmm::fuzzing::rng),
            ("virtq_vsock", flint_vmm::fuzzing::vsock),
            ("manifest", flint_snapshot_store::fuzzing::manifest),
            ("chunk", flint_snapshot_store::fuzzing::chunk),
            ("agent_frames", flint_agent::fuzzing::frames),
            ("flintd_api", flint_supervisor::fuzzing::api_bodies),
            ("dns", flint_supervisor::fuzzing::dns),
            ("front_end", flint_supervisor::fuzzing::front_end),
            ("e2b", flint_supervisor::fuzzing::e2b),
        ];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (name, body) in targets {
            let mut inputs: Vec<_> =
                std::fs::read_dir(root.join(name)).into_iter().flatten().flatten().map(|e| e.path()).collect();
            inputs.sort();
            assert!(!inputs.is_empty(), "no corpus committed for {name}");
            for path in inputs {
                eprintln!("{name}: {}", path.display());
                body(&std::fs::read(&path).unwrap());
            }
        }
        let _ = std::fs::remove_file(flint_vmm::fuzzing::block_disk());
    }
}

#[cfg(test)]
mod test_shape_tests {
    use std::path::{Path, PathBuf};

    /// Longest a test function may be: past it, a failure names a scenario rather than a feature (docs/testing.md).
    const MAX_TEST_LINES: usize = 80;

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() && !matches!(name.as_str(), "target" | ".git" | "fuzz" | "node_modules") {
                rust_files(&p, out);
            } else if name.ends_with(".rs") {
                out.push(p);
            }
        }
    }

    /// The test functions of `text` longer than [`MAX_TEST_LINES`]: (first line, name, lines).
    fn long_tests(text: &str) -> Vec<(usize, String, usize)> {
        let lines: Vec<&str> = text.lines().collect();
        let mut out = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            if !(t.starts_with("#[test]") || t.starts_with("#[tokio::test")) {
                continue;
            }
            let Some(j) = (i + 1..lines.len()).find(|&j| {
                let s = lines[j].trim_start();
                s.starts_with("fn ") || s.starts_with("async fn ") || s.starts_with("pub fn ")
            }) else {
                continue;
            };
            let indent = lines[j].len() - lines[j].trim_start().len();
            let end = (j + 1..lines.len()).find(|&k| {
                let s = lines[k];
                s.len() > indent && s[..indent].trim().is_empty() && s[indent..].starts_with('}')
            });
            let n = end.map_or(lines.len(), |k| k + 1) - j;
            if n > MAX_TEST_LINES {
                let name = lines[j].trim().split('(').next().unwrap_or("").to_string();
                out.push((j + 1, name, n));
            }
        }
        out
    }

    #[test]
    fn the_shape_check_finds_a_long_test() {
        let long = format!("#[test]\nfn long() {{\n{}}}\n", "    x();\n".repeat(MAX_TEST_LINES));
        assert_eq!(long_tests(&long), vec![(2, "fn long".to_string(), MAX_TEST_LINES + 2)]);
        let short = "#[tokio::test]\nasync fn short() {\n    x();\n}\n";
        assert!(long_tests(short).is_empty());
    }

    #[test]
    fn no_test_function_is_longer_than_80_lines() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        rust_files(&root, &mut files);
        assert!(files.len() > 50, "the workspace's sources were not found under {}", root.display());
        let mut found = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            for (line, name, n) in long_tests(&text) {
                found.push(format!("{}:{line} {name}: {n} lines", f.display()));
            }
        }
        assert!(found.is_empty(), "split these into named steps:\n{}", found.join("\n"));
    }
}
