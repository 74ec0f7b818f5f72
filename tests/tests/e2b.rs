//! E2B's unchanged SDKs against flintd's E2B endpoint (docs/e2b.md): the Python `e2b` and `e2b-code-interpreter`
//! SDKs (the latest and one from months before) and the npm `e2b` SDK, from PyPI and npm, in plain-HTTP mode
//! (`E2B_API_URL` + `E2B_SANDBOX_URL`) and TLS mode (`E2B_DOMAIN`, a wildcard certificate from a CA the test
//! makes). One flintd, one `base` template from the `e2b` image (one cold boot), shared by the tests of this file
//! (a fixture made by the first and stopped at exit); each test drives one feature group through a script.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use flint_tests::{bin_dir, e2b_node, e2b_python, named_image, Flintd, KillVmmsUnder, TempDir};

/// The SDK versions tested (pinned: docs/e2b.md).
const PY_LATEST: &[&str] = &["e2b==2.63.0", "e2b-code-interpreter==2.11.5"];
const PY_OLDER: &[&str] = &["e2b==2.45.1"];
const JS: &str = "e2b@2.51.0";
const PLAIN: &str = "127.0.0.1:18680";
const TLS_PORT: u16 = 18643;
/// `[e2b] max_upload_bytes` of the fixture: above the flows' 1 MiB file, below the oversized upload.
const MAX_UPLOAD: usize = 4 << 20;

struct Fixture {
    work: PathBuf,
    socket: PathBuf,
    key: String,
    ca: PathBuf,
}

/// flintd and what the test process must stop at exit (statics are never dropped).
static RUNNING: Mutex<Option<(Flintd, KillVmmsUnder, TempDir)>> = Mutex::new(None);
/// Set by the panic hook: some test failed, and flintd's log is kept.
static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn stop_fixture() {
    if let Ok(mut r) = RUNNING.lock() {
        if let Some((d, reap, work)) = r.take() {
            drop(d);
            // flintd's log outlives a failed run, for whoever reads the failure; a run that passed leaves none.
            let kept = std::env::temp_dir().join("flint-e2b-flintd.log");
            if FAILED.load(std::sync::atomic::Ordering::SeqCst) {
                if std::fs::copy(work.path().join("data.log"), &kept).is_ok() {
                    eprintln!("flintd's log: {}", kept.display());
                }
            } else {
                let _ = std::fs::remove_file(&kept);
            }
            drop((reap, work));
        }
    }
}

fn flint(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin_dir().join("flint")).arg("--socket").arg(socket).args(args).output().unwrap()
}

/// A CA and a certificate for `*.flint.localhost` and `api.flint.localhost` signed by it (openssl).
fn make_certs(dir: &Path) -> PathBuf {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Flint test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "e2b.key",
        "-out",
        "e2b.csr",
        "-subj",
        "/CN=flint.localhost",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:*.flint.localhost,DNS:api.flint.localhost\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "e2b.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "e2b.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    // SSL_CERT_FILE replaces the roots: the system's plus the test CA.
    let mut bundle = std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    bundle.extend(std::fs::read(dir.join("ca.pem")).unwrap());
    std::fs::write(dir.join("bundle.pem"), bundle).unwrap();
    dir.join("bundle.pem")
}

/// The shared fixture, made by a thread of its own that never ends: flintd dies with the thread that started it
/// (PR_SET_PDEATHSIG), and each test runs on a thread of its own.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let made = std::panic::catch_unwind(make_fixture);
            let ok = made.is_ok();
            let _ = tx.send(made);
            if ok {
                loop {
                    std::thread::park();
                }
            }
        });
        rx.recv().unwrap().unwrap_or_else(|_| panic!("the E2B fixture could not be made (see above)"))
    })
}

fn make_fixture() -> Fixture {
    {
        let image = named_image("e2b");
        let work = TempDir::new("e2b");
        let (data, socket) = (work.path().join("data"), work.path().join("flintd.sock"));
        let ca = make_certs(work.path());
        let config = work.path().join("flintd.toml");
        let w = work.path().display();
        std::fs::write(
            &config,
            format!(
                "[jail]\nuid_base = 975000\nuid_count = 2000\n[e2b]\nlisten = \"{PLAIN}\"\ntls_listen = \"127.0.0.1:{TLS_PORT}\"\ntls_cert = \"{w}/e2b.pem\"\n\
                 tls_key = \"{w}/e2b.key\"\ndomain = \"flint.localhost:{TLS_PORT}\"\nmax_upload_bytes = {MAX_UPLOAD}\n"
            ),
        )
        .unwrap();
        let reap = KillVmmsUnder(data.clone());
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            FAILED.store(true, std::sync::atomic::Ordering::SeqCst);
            report(info)
        }));
        let image_arg = format!("e2b={}", image.display());
        let d = Flintd::start_full(
            &data,
            &socket,
            None,
            &["--image", &image_arg, "--config", config.to_str().unwrap()],
            None,
        );
        let t = Instant::now();
        let out = flint(&socket, &["--json", "template", "create", "base", "--image", "e2b"]);
        assert!(out.status.success(), "template create: {}", String::from_utf8_lossy(&out.stderr));
        println!("the `base` template (one cold boot): {:?}", t.elapsed());
        let out = flint(&socket, &["e2b", "key", "create", "--name", "tests"]);
        assert!(out.status.success(), "key create: {}", String::from_utf8_lossy(&out.stderr));
        let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(key.starts_with("e2b_") && key.len() == 44, "{key}");
        let path = work.path().to_path_buf();
        *RUNNING.lock().unwrap() = Some((d, reap, work));
        // SAFETY: atexit(3) with a plain function that stops this test process's own flintd and VMs.
        unsafe { libc::atexit(stop_fixture) };
        Fixture { work: path, socket, key, ca }
    }
}

/// Runs tests/e2b/sdk_flow.py FLOWS with `python`, plain-HTTP mode unless `tls`; asserts it ends well.
fn python_flow(python: &Path, flows: &str, tls: bool) {
    let f = fixture();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2b/sdk_flow.py");
    let mut cmd = Command::new(python);
    cmd.arg(&script).arg(flows).env("E2B_API_KEY", &f.key).env_remove("E2B_DEBUG");
    // For the flows that act as flintd itself would (idle_wake hibernates a session through Flint's CLI).
    cmd.env("FLINT_CLI", bin_dir().join("flint")).env("FLINT_SOCKET", &f.socket);
    if tls {
        cmd.env("E2B_DOMAIN", format!("flint.localhost:{TLS_PORT}")).env("SSL_CERT_FILE", &f.ca);
    } else {
        cmd.env("E2B_API_URL", format!("http://{PLAIN}")).env("E2B_SANDBOX_URL", format!("http://{PLAIN}"));
    }
    let t = Instant::now();
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{flows} ({:?}):\n{text}", t.elapsed());
    assert!(out.status.success() && text.contains("ALL OK"), "the SDK flow {flows} failed:\n{text}");
}

#[test]
fn python_sdk_commands_pty_files_watch_info_idle_wake_and_pause() {
    python_flow(
        &e2b_python(PY_LATEST),
        "commands,background,pty,files,watch,info_and_list,idle_wake,pause_and_connect",
        false,
    );
}

#[test]
fn python_sdk_deadlines_and_two_sandboxes_on_one_connection() {
    python_flow(&e2b_python(PY_LATEST), "timeout_and_kill,two_sandboxes", false);
}

#[test]
fn python_code_interpreter_keeps_state_streams_and_times_out() {
    python_flow(&e2b_python(PY_LATEST), "code_interpreter", false);
}

#[test]
fn an_older_python_sdk_works_too() {
    python_flow(&e2b_python(PY_OLDER), "commands,files", false);
}

#[test]
fn the_python_sdk_over_tls_with_e2b_domain() {
    python_flow(&e2b_python(PY_LATEST), "commands,files,pause_and_connect", true);
}

#[test]
fn the_javascript_sdk_creates_runs_writes_and_kills() {
    let f = fixture();
    let dir = e2b_node(JS);
    // An ES module resolves packages from where it is: run a copy beside the installed node_modules.
    let script = dir.join("sdk_smoke.mjs");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("e2b/sdk_smoke.mjs"), &script).unwrap();
    let out = Command::new("node")
        .arg(&script)
        .current_dir(&dir)
        .env("E2B_API_KEY", &f.key)
        .env("E2B_API_URL", format!("http://{PLAIN}"))
        .env("E2B_SANDBOX_URL", format!("http://{PLAIN}"))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success() && text.contains("JS OK"), "the JS SDK smoke failed:\n{text}");
}

/// `POST /files?path=PATH` of `len` bytes to sandbox `id`, the body written by a thread of its own while the answer
/// is read (flintd answers 413 before it has read the whole body). With `cut_after`, the client closes after that
/// many bytes and reads nothing. Returns the status and the answer.
fn upload(id: &str, path: &str, len: usize, cut_after: Option<usize>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(PLAIN).unwrap();
    let head = format!(
        "POST /files?path={path} HTTP/1.1\r\nHost: {PLAIN}\r\nE2b-Sandbox-Id: {id}\r\nE2b-Sandbox-Port: 49983\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut w = s.try_clone().unwrap();
    let send = cut_after.unwrap_or(len);
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 << 10];
        let mut sent = 0;
        while sent < send {
            let n = chunk.len().min(send - sent);
            if w.write_all(&chunk[..n]).is_err() {
                return;
            }
            sent += n;
        }
    });
    if cut_after.is_some() {
        writer.join().unwrap();
        drop(s);
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let _ = writer.join();
    (out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), out)
}

/// Bad input gets what the SDK expects, and nothing of it is left behind (no sandbox, no process).
#[test]
fn bad_keys_unknown_sandboxes_and_malformed_frames() {
    let f = fixture();
    let call = |method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]| -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(PLAIN).unwrap();
        let h: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {PLAIN}\r\n{h}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        (out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), out)
    };
    let key = f.key.as_str();
    assert_eq!(call("GET", "/v2/sandboxes", &[("X-API-KEY", "e2b_00")], b"").0, 401, "a wrong key");
    assert_eq!(call("GET", "/v2/sandboxes", &[], b"").0, 401, "no key");
    assert_eq!(call("DELETE", "/sandboxes/inosuch", &[("X-API-KEY", key)], b"").0, 404);
    let (st, body) = call(
        "POST",
        "/v2/sandboxes",
        &[("X-API-KEY", key), ("Content-Type", "application/json")],
        b"{\"templateID\":\"nope\"}",
    );
    assert!(st == 404 && body.contains("template nope not found"), "{body}");
    let dp = [("E2b-Sandbox-Id", "inosuch"), ("E2b-Sandbox-Port", "49983")];
    let (st, body) = call("GET", "/health", &dp, b"");
    assert!(st == 502 && body.contains("was not found"), "{body}");
    // A live sandbox, then frames that are not Connect envelopes.
    let (st, body) = call(
        "POST",
        "/v2/sandboxes",
        &[("X-API-KEY", key), ("Content-Type", "application/json")],
        b"{\"templateID\":\"base\"}",
    );
    assert_eq!(st, 201, "{body}");
    let id = body.split("\"sandboxID\":\"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
    let live =
        [("E2b-Sandbox-Id", id.as_str()), ("E2b-Sandbox-Port", "49983"), ("Content-Type", "application/connect+json")];
    for bad in [&b"\x00\x00\x00"[..], b"\x00\x00\x00\x00\x09{}", b"\x01\x00\x00\x00\x02{}", b"\x00\xff\xff\xff\xff"] {
        let (st, body) = call("POST", "/process.Process/Start", &live, bad);
        let refused = body.contains("invalid_argument") || body.contains("resource_exhausted");
        assert!(st == 200 && refused, "a malformed frame gets an end-of-stream error: {body}");
    }
    let (st, body) = call(
        "POST",
        "/filesystem.Filesystem/Stat",
        &[live[0], live[1], ("Content-Type", "application/json")],
        b"{not json",
    );
    assert!(st == 400 && body.contains("invalid_argument"), "{body}");
    // An upload past the limit: 413, and nothing written.
    let (st, body) = upload(&id, "/tmp/big", MAX_UPLOAD + (1 << 20), None);
    assert!(st == 413 && body.contains("at most"), "an oversized upload: {st} {body}");
    // An upload cut mid-way (the client goes after 64 KiB of 1 MiB): nothing written either.
    upload(&id, "/tmp/cut", 1 << 20, Some(64 << 10));
    let stat = |path: &str| {
        let req = format!("{{\"path\":\"{path}\"}}");
        call(
            "POST",
            "/filesystem.Filesystem/Stat",
            &[live[0], live[1], ("Content-Type", "application/json")],
            req.as_bytes(),
        )
    };
    for path in ["/tmp/big", "/tmp/cut"] {
        let (st, body) = stat(path);
        assert!(st == 404 && body.contains("not_found"), "{path} after a refused upload: {st} {body}");
    }
    assert_eq!(call("DELETE", &format!("/sandboxes/{id}"), &[("X-API-KEY", key)], b"").0, 204);
    let vms = flint(&f.socket, &["--json", "vm", "ls"]);
    assert!(!String::from_utf8_lossy(&vms.stdout).contains(&id), "the sandbox's VM is left");
    let _ = &f.work;
}
