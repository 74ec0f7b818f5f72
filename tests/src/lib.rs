//! End-to-end fixtures: find the guest images and binaries, start `flint-vmm` for a test,
//! talk to its control API and to the agent inside the guest, and clean up everything.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
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
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
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
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build -p flint-vmm)",
        p.display()
    );
    p
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::var_os("FLINT_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let d = base.join(format!(
            "flint-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
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
        let _ = std::fs::remove_dir_all(&self.0);
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
    /// Starts flint-vmm with `args` plus an API socket, a vsock socket and a console log in `dir`.
    pub fn spawn(dir: &Path, args: &[String]) -> VmProcess {
        let api_sock = dir.join("api.sock");
        let vsock_uds = dir.join("vsock.sock");
        let console = dir.join("console.log");
        let started = Instant::now();
        let child = Command::new(vmm_bin())
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
        VmProcess {
            child,
            api_sock,
            vsock_uds,
            console,
            started,
        }
    }

    /// Standard boot from the images' initramfs with `extra` flags.
    pub fn boot(dir: &Path, extra: &[String]) -> VmProcess {
        let img = images();
        let mut args = vec![
            "--kernel".to_string(),
            img.vmlinux.display().to_string(),
            "--initramfs".into(),
            img.initramfs.display().to_string(),
            "--mem".into(),
            "256".into(),
        ];
        args.extend_from_slice(extra);
        Self::spawn(dir, &args)
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Vsock {
            uds: self.vsock_uds.clone(),
            port: flint_agent::protocol::DEFAULT_PORT,
        }
    }

    /// Connects to the agent, waiting up to `timeout` for the guest to boot. On failure the
    /// console's tail is in the panic message.
    pub async fn agent(&mut self, timeout: Duration) -> AgentClient {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "flint-vmm exited ({st}) before the agent answered\n{}",
                    self.diagnostics()
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "the agent did not answer within {timeout:?}\n{}",
                    self.diagnostics()
                );
            }
            if let Ok(c) =
                AgentClient::connect(&self.endpoint(), left.min(Duration::from_secs(5))).await
            {
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
                panic!(
                    "flint-vmm did not exit within {timeout:?}\n{}",
                    self.diagnostics()
                );
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
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut len = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut buf = Vec::new();
    match len {
        Some(n) => {
            buf.resize(n, 0);
            r.read_exact(&mut buf)?;
        }
        None => {
            r.read_to_end(&mut buf)?;
        }
    }
    let v = if buf.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&buf).unwrap_or(serde_json::Value::Null)
    };
    Ok((status, v))
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
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
        let t = NetnsTap {
            ns,
            tap,
            host_ip: format!("10.{subnet}.0.1"),
            guest_ip: format!("10.{subnet}.0.2"),
        };
        let _ = Command::new("ip").args(["netns", "del", &t.ns]).output();
        run("ip", &["netns", "add", &t.ns]);
        run(
            "ip",
            &["-n", &t.ns, "tuntap", "add", "dev", &t.tap, "mode", "tap"],
        );
        run(
            "ip",
            &[
                "-n",
                &t.ns,
                "addr",
                "add",
                &format!("{}/24", t.host_ip),
                "dev",
                &t.tap,
            ],
        );
        run("ip", &["-n", &t.ns, "link", "set", &t.tap, "up"]);
        run("ip", &["-n", &t.ns, "link", "set", "lo", "up"]);
        t
    }

    pub fn netns_path(&self) -> String {
        format!("/var/run/netns/{}", self.ns)
    }

    /// Kernel command line that configures the guest's eth0 statically.
    pub fn guest_ip_cmdline(&self) -> String {
        format!(
            "ip={}::{}:255.255.255.0::eth0:off",
            self.guest_ip, self.host_ip
        )
    }
}

impl Drop for NetnsTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}
