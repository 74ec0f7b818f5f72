//! `make demo`: start flintd on its embedded defaults (temporary socket and data directory) with a loopback S3
//! server, create a template from the default image (boot, init, snapshot, push), restore clones from it, exec in
//! each, print a timing table (cold boot vs. restore with the VMM-side breakdown), and stop everything.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flint_tests::{images, Flintd, S3Server, TempDir};
use serde_json::{json, Value};

const CLONES: u32 = 3;

fn api(
    rt: &tokio::runtime::Runtime,
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let body = body.map(|b| b.to_string().into_bytes());
    let (status, out) = rt
        .block_on(flint_supervisor::http::request(sock, method, path, body.as_deref(), Duration::from_secs(3600)))
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
    if status >= 300 {
        return Err(format!("{method} {path}: HTTP {status}: {}", v["error"].as_str().unwrap_or("?")));
    }
    Ok(v)
}

/// Runs `argv` in a VM through the API's exec stream; returns (stdout, exit description).
fn exec(rt: &tokio::runtime::Runtime, sock: &Path, vm: &str, argv: &[&str]) -> Result<(String, String), String> {
    let body = json!({"argv": argv, "timeout_ms": 60000}).to_string().into_bytes();
    let (status, out) = rt
        .block_on(flint_supervisor::http::request(
            sock,
            "POST",
            &format!("/v1/vms/{vm}/exec"),
            Some(&body),
            Duration::from_secs(120),
        ))
        .map_err(|e| e.to_string())?;
    if status >= 300 {
        return Err(String::from_utf8_lossy(&out).into_owned());
    }
    let (mut stdout, mut exit) = (String::new(), String::from("?"));
    for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        if let Some(s) = v["stdout"].as_str() {
            stdout.push_str(s);
        } else if let Some(e) = v.get("exit") {
            exit = match (e["code"].as_i64(), e["signal"].as_i64()) {
                (Some(c), _) => format!("exit {c}"),
                (_, Some(s)) => format!("signal {s}"),
                _ => "?".into(),
            };
        } else if let Some(e) = v["error"].as_str() {
            return Err(e.to_string());
        }
    }
    Ok((stdout.trim().to_string(), exit))
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("e2b") {
        if let Err(e) = e2b_demo() {
            eprintln!("flint e2b demo: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = run() {
        eprintln!("flint demo: {e}");
        std::process::exit(1);
    }
}

/// `make e2b-demo`: flintd with its E2B endpoint, the `base` template from the `e2b` image, a key, and E2B's own
/// quickstart run by the unchanged Python SDK (tests/e2b/demo.py).
fn e2b_demo() -> Result<(), String> {
    let image = flint_tests::named_image("e2b");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let work = TempDir::new("e2b-demo");
    let data = work.path().join("data");
    let _reap = flint_tests::KillVmmsUnder(data.clone());
    let sock = work.path().join("flintd.sock");
    let (listen, image_arg) = ("127.0.0.1:18580", format!("e2b={}", image.display()));
    println!("$ flintd --image {image_arg} --e2b-listen {listen}");
    let _daemon = Flintd::start_full(&data, &sock, None, &["--image", &image_arg, "--e2b-listen", listen], None);
    println!("$ flint template create base --image e2b     (one cold boot)");
    let t = Instant::now();
    api(&rt, &sock, "POST", "/v1/templates", Some(json!({"name": "base", "image": "e2b"})))?;
    println!("  {:.1} s", t.elapsed().as_secs_f64());
    println!("$ flint e2b key create");
    let key = api(&rt, &sock, "POST", "/v1/e2b/keys", Some(json!({"name": "demo"})))?["key"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let python = flint_tests::e2b_python(&["e2b==2.63.0", "e2b-code-interpreter==2.11.5"]);
    println!(
        "$ E2B_API_KEY={key} E2B_API_URL=http://{listen} E2B_SANDBOX_URL=http://{listen} python tests/e2b/demo.py"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2b/demo.py");
    let status = std::process::Command::new(python)
        .arg(script)
        .env("E2B_API_KEY", &key)
        .env("E2B_API_URL", format!("http://{listen}"))
        .env("E2B_SANDBOX_URL", format!("http://{listen}"))
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("the SDK demo failed ({status})"));
    }
    Ok(())
}

fn run() -> Result<(), String> {
    let img = images();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let s3 = S3Server::start();
    let work = TempDir::new("demo");
    let data: PathBuf = work.path().join("data");
    let sock = work.path().join("flintd.sock");
    println!("flint demo: images {}, S3 (s3s-fs) at {}", img.dir.display(), s3.endpoint());
    // The bucket's secret: manifests are sealed (authenticated) and chunks encrypted, as on any host whose bucket
    // others could write. Every host of a bucket shares it.
    let secret = work.path().join("store.secret");
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").expect("urandom"), &mut key).expect("urandom");
    std::fs::write(&secret, key.iter().map(|b| format!("{b:02x}")).collect::<String>()).expect("write the secret");
    println!(
        "$ flintd --socket {} --data-dir {} --image default={} --store-secret-file {}",
        sock.display(),
        data.display(),
        img.dir.display(),
        secret.display()
    );
    let secret_arg = secret.display().to_string();
    let daemon = Flintd::start_with(&data, &sock, &s3, "", &["--store-secret-file", &secret_arg]);

    println!(
        "$ flint template create demo --push -- /bin/sh -c 'echo warmed > /tmp/warm'   (boot, init, snapshot, push)"
    );
    let t = api(
        &rt,
        &sock,
        "POST",
        "/v1/templates",
        Some(json!({"name": "demo", "init": ["/bin/sh", "-c", "echo warmed > /tmp/warm"], "publish": true})),
    )?;
    let snaps = api(&rt, &sock, "GET", "/v1/snapshots", None)?;
    let snap = snaps.as_array().and_then(|a| a.iter().find(|s| s["id"] == "tmpl-demo").cloned()).unwrap_or_default();

    println!("$ flint clone demo -n {CLONES}");
    let started = Instant::now();
    let clones = api(&rt, &sock, "POST", "/v1/clones", Some(json!({"template": "demo", "count": CLONES})))?;
    let clones_ms = started.elapsed().as_secs_f64() * 1000.0;
    let clones: Vec<Value> = clones.as_array().cloned().unwrap_or_default();

    println!();
    println!("{:<20} {:<44} {:>9}  output", "clone", "$ flint exec CLONE -- ...", "ms");
    let mut details = Vec::new();
    for c in &clones {
        let id = c["id"].as_str().unwrap_or("?");
        for argv in [&["/bin/cat", "/proc/sys/kernel/random/uuid"][..], &["/bin/cat", "/tmp/warm"][..]] {
            let t0 = Instant::now();
            let (out, status) = exec(&rt, &sock, id, argv).unwrap_or_else(|e| (e, "error".into()));
            println!(
                "{:<20} {:<44} {:>9.1}  {out} [{status}]",
                id,
                argv.join(" "),
                t0.elapsed().as_secs_f64() * 1000.0
            );
        }
        details.push(api(&rt, &sock, "GET", &format!("/v1/vms/{id}"), None)?);
    }

    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let us = |v: &Value| v.as_u64().unwrap_or(0) as f64 / 1000.0;
    let boot = f(&t["boot_ms"]);
    println!();
    println!("{:<52} {:>12}", "phase (through flintd)", "ms");
    println!("{:<52} {:>12.1}", "cold boot: VMM start -> agent answers", boot);
    println!("{:<52} {:>12.1}", "template init command", f(&t["init_ms"]));
    println!(
        "{:<52} {:>12.1}",
        format!(
            "snapshot + store + push ({:.1} MB logical -> {:.1} MB stored)",
            f(&snap["logical_bytes"]) / 1e6,
            f(&snap["stored_bytes"]) / 1e6
        ),
        f(&t["snapshot_ms"])
    );
    for d in &details {
        let ready = f(&d["ready_ms"]);
        println!(
            "{:<52} {:>12.1}   ({:.0}x faster than cold boot)",
            format!("restore {} -> agent answers + refresh", d["id"].as_str().unwrap_or("?")),
            ready,
            boot / ready.max(0.001)
        );
        println!("{:<52} {:>12.1}", "  fetch snapshot images from the store", f(&d["fetch_ms"]));
        let r = &d["vmm"]["restore"];
        for (label, key) in [
            ("  VMM: read + check state file", "read_state_us"),
            ("  VMM: KVM VM + irqchip", "kvm_setup_us"),
            ("  VMM: map guest memory", "memory_us"),
            ("  VMM: devices", "devices_us"),
            ("  VMM: VM + vCPU state", "vcpu_state_us"),
        ] {
            println!("{:<52} {:>12.2}", label, us(&r[key]));
        }
        let standby = d["standby"].as_bool().unwrap_or(false);
        println!(
            "{:<52} {:>12.2}",
            if standby {
                "  VMM: standby hand-over -> first instruction"
            } else {
                "  VMM: process start -> first instruction"
            },
            us(&d["vmm"]["timings"]["process_to_first_run_us"])
        );
        println!(
            "{:<52} {:>12.2}   (flintd's part {:.2}; {})",
            "  flintd: request -> first guest instruction",
            us(&d["first_run_us"]),
            us(&d["launch_us"]),
            if standby { "a standby VMM, jailed ahead" } else { "a VMM process spawned and jailed" }
        );
    }
    println!("{:<52} {:>12.1}", format!("{CLONES} clones, all answering (wall)"), clones_ms);
    println!();
    println!("cold boot vs. restore: the ratio is what a host with hardware KVM also sees; the absolute");
    println!("boot time here reflects this machine's emulating KVM (see docs/images.md).");

    for c in &clones {
        api(&rt, &sock, "DELETE", &format!("/v1/vms/{}", c["id"].as_str().unwrap_or("?")), None)?;
    }
    drop(daemon);
    let left = std::fs::read_dir(data.join("vms")).map(|d| d.count()).unwrap_or(0);
    println!("stopped flintd and {} clones cleanly ({} VM directories left)", clones.len(), left);
    Ok(())
}
