//! flintd end to end, driven only through its API (the flint CLI and the socket): template from an image, exec,
//! snapshot pushed to a real S3 server, local cache wiped, clones pulled from S3 and restored, distinct entropy in
//! each, kill -9 of flintd, restart, and the clones still listed and answering.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use flint_tests::{bin_dir, Flintd, KillVmmsUnder, S3Server, TempDir};

fn start_flintd(data: &Path, socket: &Path, s3: &S3Server) -> Flintd {
    Flintd::start(data, socket, s3, "e2e")
}

fn flint(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin_dir().join("flint")).arg("--socket").arg(socket).args(args).output().unwrap()
}

fn flint_json(socket: &Path, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = flint(socket, &full);
    assert!(
        out.status.success(),
        "flint {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    // With --json (and not on a terminal) long calls print no progress.
    assert!(out.stderr.is_empty(), "flint {args:?} wrote to stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn random_bytes(socket: &Path, vm: &str, dir: &Path) -> Vec<u8> {
    // Through the agent's file API, not a new process: reads 32 bytes of the clone's /dev/urandom.
    let dest = dir.join(format!("{vm}.rand"));
    let _ = std::fs::remove_file(&dest);
    let out = Command::new(bin_dir().join("flint"))
        .arg("--socket")
        .arg(socket)
        .args(["cp", &format!("{vm}:/proc/sys/kernel/random/uuid"), dest.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let uuid = std::fs::read(&dest).unwrap();
    let raw = flint_supervisor_get(socket, &format!("/v1/vms/{vm}/files?path=/dev/urandom&limit=32"));
    assert_eq!(raw.len(), 32, "32 bytes of /dev/urandom from {vm}");
    [uuid, raw].concat()
}

fn flint_supervisor_get(socket: &Path, path: &str) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (status, body) =
        rt.block_on(flint_supervisor::http::request(socket, "GET", path, None, Duration::from_secs(60))).unwrap();
    assert_eq!(status, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
    body
}

#[test]
fn template_push_wipe_clone_from_s3_and_survive_a_flintd_kill() {
    let s3 = S3Server::start();
    let work = TempDir::new("flintd");
    let data = work.path().join("data");
    let _reaper = KillVmmsUnder(data.clone());
    let socket = work.path().join("flintd.sock");
    let mut d = start_flintd(&data, &socket, &s3);

    // Bad input gets a 4xx with a message, and flintd stays up.
    let bad = flint(&socket, &["clone", "no-such-template", "-n", "2"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no template `no-such-template`"), "{bad:?}");
    let bad = flint(&socket, &["vm", "create", "--image", "nope"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no image `nope`"), "{bad:?}");

    let disk = a_template_with_drives_and_hooks_is_pushed_to_s3(work.path(), &socket, &s3);

    // Wipe the local cache: stop flintd, delete its store directory (a fresh host), start again.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    std::fs::remove_dir_all(data.join("store")).unwrap();
    let mut d = start_flintd(&data, &socket, &s3);

    let clones =
        clones_from_s3_have_their_own_entropy_drives_and_the_templates_state(work.path(), &socket, &data, &disk);
    a_drives_rate_limit_holds_in_a_clone(&socket, &clones[2]);
    let detail = vm_detail(&socket, &clones[1]);
    let copy = PathBuf::from(detail["drives"][0]["path"].as_str().unwrap());
    assert!(copy.starts_with(&data) && copy != disk, "{detail}");

    // kill -9 flintd: the VMs run on; a new flintd re-adopts them.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGKILL) };
    d.child.wait().unwrap();
    let d2 = start_flintd(&data, &socket, &s3);
    let vms = flint_json(&socket, &["vm", "ls"]);
    for c in &clones {
        let vm = vms.as_array().unwrap().iter().find(|v| v["id"] == c.as_str()).expect("clone listed after restart");
        assert_eq!(vm["status"], "running", "{vm}");
    }
    for c in &clones {
        random_bytes(&socket, c, work.path());
    }
    every_file_under_the_data_dir_is_private(&data);
    // On a terminal, a long call shows its progress (phase and elapsed time) and leaves a summary line.
    let flint_cmd =
        format!("{} --socket {} snapshot pull tmpl-py", bin_dir().join("flint").display(), socket.display());
    let tty = Command::new("script").args(["-qec", &flint_cmd, "/dev/null"]).output().unwrap();
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success() && shown.contains("downloading snapshot tmpl-py: done in"), "{shown}");
    let handed = a_warm_pool_hands_out_to_a_clone_and_a_session_and_refills(&socket);
    let mut args = vec!["vm", "rm", handed.as_str()];
    args.extend(clones.iter().map(String::as_str));
    assert!(flint(&socket, &args).status.success());
    assert!(flint_json(&socket, &["vm", "ls"]).as_array().unwrap().is_empty());
    drop(d2);
}

/// Template `py`: boot the default image with two drives, run an init command (it also writes the first drive
/// and installs hooks), snapshot, push to S3. The drive's content is part of the snapshot. The first drive's
/// host file.
fn a_template_with_drives_and_hooks_is_pushed_to_s3(work: &Path, socket: &Path, s3: &S3Server) -> PathBuf {
    // Template: boot the default image with a drive, run an init command (it also writes the drive), snapshot,
    // push to S3. The drive's content is part of the snapshot.
    let disk = work.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(4 << 20).unwrap();
    // A second drive limited to 128 KiB/s (clones keep the limit: it is in the snapshot). Guest block I/O on an
    // emulating host is slow even unlimited, so the limit is set well below 1 MiB/s.
    let slow = work.join("slow.img");
    std::fs::write(&slow, vec![0x5a; 4 << 20]).unwrap();
    let slow_arg = format!("{},bw=131072", slow.display());
    // The init also installs a before-checkpoint and an after-restore hook that log to /tmp/hooks.log.
    let init = "set -e; echo warm > /tmp/warm; echo template-disk | dd of=/dev/vda conv=fsync 2>/dev/null; \
        mkdir -p /etc/flint/hooks/before-checkpoint.d /etc/flint/hooks/after-restore.d; \
        printf '#!/bin/sh\\necho checkpoint >> /tmp/hooks.log\\n' > /etc/flint/hooks/before-checkpoint.d/10-log; \
        printf '#!/bin/sh\\necho restored $(hostname) >> /tmp/hooks.log\\n' > /etc/flint/hooks/after-restore.d/10-log; \
        chmod +x /etc/flint/hooks/*/10-log";
    let t = flint_json(
        socket,
        &[
            "template",
            "create",
            "py",
            "--push",
            "--drive",
            disk.to_str().unwrap(),
            "--drive",
            &slow_arg,
            "--",
            "/bin/sh",
            "-c",
            init,
        ],
    );
    println!("template: {t}");
    assert_eq!(t["snapshot"], "tmpl-py");
    let snaps = flint_json(socket, &["snapshot", "ls"]);
    assert!(snaps.as_array().unwrap().iter().any(|s| s["id"] == "tmpl-py" && s["remote"] == true), "{snaps}");
    assert!(s3.object_path("e2e/manifests/tmpl-py").is_file(), "the manifest is in the S3 bucket");
    disk
}

/// Five clones of `py` on a host whose cache was wiped: their memory from S3, their own entropy, the template's
/// init file, the hooks run, a jailed VMM each, and their own copy of the drive. Their ids.
fn clones_from_s3_have_their_own_entropy_drives_and_the_templates_state(
    work: &Path,
    socket: &Path,
    data: &Path,
    disk: &Path,
) -> Vec<String> {
    let started = Instant::now();
    let clones = flint_json(socket, &["clone", "py", "-n", "5"]);
    let clones: Vec<String> =
        clones.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect();
    println!("5 clones from S3 in {:?}", started.elapsed());
    assert_eq!(clones.len(), 5);
    let metrics = String::from_utf8(flint(socket, &["metrics"]).stdout).unwrap();
    assert!(metrics.contains("flint_vms{status=\"running\"} 5"), "{metrics}");
    let fetched: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("flint_store_remote_bytes_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(fetched > 0, "the clones' memory came from S3");

    let mut seen = Vec::new();
    for c in &clones {
        let r = random_bytes(socket, c, work);
        assert!(!seen.contains(&r), "two clones share entropy");
        seen.push(r);
    }
    // The template's init ran before the snapshot: its file is in every clone.
    let warm = work.join("warm");
    assert!(flint(socket, &["cp", &format!("{}:/tmp/warm", clones[0]), warm.to_str().unwrap()]).status.success());
    assert_eq!(std::fs::read_to_string(&warm).unwrap(), "warm\n");
    // The hooks ran inside the guests: before-checkpoint in the template's VM (so its line is in the snapshot),
    // after-restore in each clone, after the clone got its hostname.
    for c in &clones[..2] {
        let log = flint_supervisor_get(socket, &format!("/v1/vms/{c}/files?path=/tmp/hooks.log"));
        assert_eq!(String::from_utf8_lossy(&log), format!("checkpoint\nrestored {c}\n"), "hooks in {c}");
    }
    // Each clone has its own copy of the drive (from S3: this host's cache was wiped), holding what the template
    // wrote; a write in one clone is seen neither by another clone nor by the template's host file.
    let head = |vm: &str| flint_supervisor_get(socket, &format!("/v1/vms/{vm}/files?path=/dev/vda&limit=14"));
    assert_eq!(head(&clones[0]), b"template-disk\n");
    let write = "echo clone-0-disk | dd of=/dev/vda conv=fsync 2>/dev/null";
    assert!(flint(socket, &["exec", &clones[0], "--", "/bin/sh", "-c", write]).status.success());
    assert_eq!(head(&clones[0]), b"clone-0-disk\n\n");
    assert_eq!(head(&clones[1]), b"template-disk\n", "clones share no drive");
    assert_eq!(&std::fs::read(disk).unwrap()[..14], b"template-disk\n", "the template's file is untouched");
    for c in &clones {
        flint_tests::assert_jailed(vm_detail(socket, c)["pid"].as_u64().unwrap(), &data.join("vms").join(c));
    }
    clones
}

/// The rate limiter in clone `vm`: reading 1 MiB of the limited drive takes about the 7.75 s its 128 KiB/s allow,
/// the unlimited one runs several times faster.
fn a_drives_rate_limit_holds_in_a_clone(socket: &Path, vm: &str) {
    // `bw=131072` is a bucket of a quarter second's worth (32 KiB), full when the read starts (the guest was idle
    // for longer): the first 32 KiB pass at once, the other 992 take 7.75 s, so 1 MiB reads at 132 KiB/s at most.
    // The read is timed inside the guest less a process start, and starts differ by about half a second on a loaded
    // host (7.23 s measured once in CI, with one zero-length dd before: 141.6 KiB/s): 1.25 x that bound still tells
    // a limited drive from one that is not (the unlimited one reads at 350 KiB/s here, far more on hardware).
    let rate = |dev: &str| -> f64 {
        // Timed inside the guest (/proc/uptime, 10 ms ticks), less the mean time of a zero-length dd before and
        // after it: starting a process costs about a second on this host and is not I/O.
        let dd = |count: u32| format!("dd if={dev} of=/dev/null bs=64k count={count} 2>/dev/null");
        let up = "$(cat /proc/uptime)";
        let script = format!("a={up}; {}; b={up}; {}; c={up}; {0}; d={up}; echo $a $b $c $d", dd(0), dd(16));
        let out = flint(socket, &["exec", vm, "--", "/bin/sh", "-c", &script]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let f: Vec<f64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        assert!(f.len() == 8, "dd {dev}: {text} {}", String::from_utf8_lossy(&out.stderr));
        let io = ((f[4] - f[2]) - ((f[2] - f[0]) + (f[6] - f[4])) / 2.0).max(0.05);
        1024.0 / io
    };
    let limited = rate("/dev/vdb");
    // The unlimited read is bound by the emulated guest's CPU, which a loaded host slows (1.98x once in CI): the
    // best of up to three reads is what that drive can do.
    let mut free = rate("/dev/vda");
    for _ in 0..2 {
        if free >= 2.0 * limited {
            break;
        }
        free = free.max(rate("/dev/vda"));
    }
    println!("dd in a clone: limited drive {limited:.1} KiB/s, unlimited {free:.1} KiB/s");
    let most = 1.25 * 1024.0 / ((1024.0 - 32.0) / 128.0);
    assert!(
        limited <= most,
        "the 128 KiB/s drive read 1 MiB at {limited:.1} KiB/s (at most {most:.1} with a full bucket)"
    );
    assert!(free >= 2.0 * limited, "unlimited {free:.1} KiB/s is not several times the limited {limited:.1}");
}

fn every_file_under_the_data_dir_is_private(data: &Path) {
    // Every file flintd and the VMMs made (memory and state files, chunks, drive copies, logs, sockets, the
    // database) is private to flintd's user: no group or other permission bits anywhere under the data dir.
    let mut open_files = Vec::new();
    walk(data, &mut |p: &Path| {
        let mode = std::fs::symlink_metadata(p).unwrap().mode();
        if mode & 0o077 != 0 {
            open_files.push(format!("{:o} {}", mode & 0o7777, p.display()));
        }
    });
    assert!(open_files.is_empty(), "files others can read: {open_files:#?}");
}

/// The VM a warm pool of template `py` handed to a clone.
fn a_warm_pool_hands_out_to_a_clone_and_a_session_and_refills(socket: &Path) -> String {
    // A warm pool of 2: paused VMs of the template; a clone and a session each take one (resumed and refreshed:
    // named after the clone / the session), the pool refills; size 0 empties it.
    let pooled_ids = |n: usize| -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let vms = flint_json(socket, &["vm", "ls"]);
            let ids: Vec<String> = vms
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v["owner"]["kind"] == "pool" && v["owner"]["id"] == "py" && v["status"] == "paused")
                .map(|v| v["id"].as_str().unwrap().to_string())
                .collect();
            if ids.len() == n {
                return ids;
            }
            assert!(Instant::now() < deadline, "the pool never held {n}: {vms}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(flint_json(socket, &["template", "pool", "py", "2"])["pool_size"], 2);
    let pool = pooled_ids(2);
    let t = Instant::now();
    let c = flint_json(socket, &["clone", "py"]);
    println!("pool hand-out: {:?} for the API call", t.elapsed());
    let handed = c[0]["id"].as_str().unwrap().to_string();
    assert!(pool.contains(&handed), "the clone came from the pool: {c}");
    assert!(c[0]["owner"].is_null() && c[0]["status"] == "running", "{c}");
    let hostname = flint_supervisor_get(socket, &format!("/v1/vms/{handed}/files?path=/proc/sys/kernel/hostname"));
    assert_eq!(String::from_utf8_lossy(&hostname).trim(), handed);
    // The hand-out's accounting: resume + refresh, the agent's part of it as flintd timed it.
    let ms = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"));
    let refresh = ms(&c[0], "refresh_ms");
    assert!(ms(&c[0], "resume_ms") <= refresh && ms(&c[0], "refresh_agent_ms") <= refresh, "{c}");
    an_exec_says_how_long_flintd_waited_for_the_agent(socket, &handed);
    let s = flint_json(socket, &["session", "create", "py", "--id", "pooled"]);
    assert!(pool.contains(&s["vm"].as_str().unwrap().to_string()), "the session's VM came from the pool: {s}");
    assert_eq!(sh(socket, "pooled", "hostname"), "pooled");
    let metrics = String::from_utf8(flint(socket, &["metrics"]).stdout).unwrap();
    assert!(metrics.contains("flint_pool_hits_total 2"), "{metrics}");
    pooled_ids(2);
    flint_json(socket, &["template", "pool", "py", "0"]);
    pooled_ids(0);
    flint_json(socket, &["session", "rm", "pooled"]);
    handed
}

/// An exec's exit line says how long flintd waited for the agent: within the caller's wall time.
fn an_exec_says_how_long_flintd_waited_for_the_agent(socket: &Path, handed: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let t = Instant::now();
    let (status, out) = rt
        .block_on(flint_supervisor::http::request(
            socket,
            "POST",
            &format!("/v1/vms/{handed}/exec"),
            Some(br#"{"argv": ["/bin/true"]}"#),
            Duration::from_secs(120),
        ))
        .unwrap();
    let wall = t.elapsed().as_secs_f64() * 1000.0;
    let out = String::from_utf8_lossy(&out);
    assert_eq!(status, 200, "{out}");
    let exit = out.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).next_back().unwrap();
    assert_eq!(exit["exit"]["code"], 0, "{out}");
    let agent = exit["exit"]["agent_ms"].as_f64().unwrap_or_else(|| panic!("no agent_ms in {exit}"));
    assert!(agent > 0.0 && agent <= wall, "agent_ms {agent} vs {wall} ms wall: {out}");
}

/// Every route of docs/api/flintd.yaml is live (answers something other than "no such route"), and bad input gets
/// a 4xx JSON error, never a crash. No VM is booted.
#[test]
fn every_documented_route_is_served_and_bad_input_is_a_4xx() {
    let s3 = S3Server::start();
    let work = TempDir::new("flintd-routes");
    let data = work.path().join("data");
    let socket = work.path().join("flintd.sock");
    // A data directory made open by someone else is closed at start.
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _d =
        Flintd::start_with(&data, &socket, &s3, "e2e", &["--allow-unauthenticated-bucket", "--socket-group", "daemon"]);
    // The API socket is 0660 and its group is socket_group: operators grant access without root.
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 1), "socket mode and group (daemon is gid 1)");
    assert_eq!(std::fs::metadata(&data).unwrap().mode() & 0o777, 0o700);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for (method, path) in flint_supervisor::api::ROUTES {
        let path = path
            .replace("{id}", "no-such")
            .replace("{name}", "no-such")
            .replace("{port}", "8080")
            .replace("{rest}", "sandboxes/no-such");
        let path = if path.ends_with("/files") { format!("{path}?path=/etc/hostname") } else { path };
        let body: &[u8] = b"{\"bogus\": 1}";
        let (status, out) = rt
            .block_on(flint_supervisor::http::request(
                &socket,
                &method.to_uppercase(),
                &path,
                Some(body),
                Duration::from_secs(30),
            ))
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        println!("{method} {path} -> {status} {}", text.chars().take(100).collect::<String>());
        assert!(!text.contains("no such route") && status != 405, "{method} {path} is not served: {status} {text}");
        if status >= 400 {
            assert!(status < 500 || status == 503, "{method} {path}: {status} {text}");
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
            // The E2B surface a router forwards answers in E2B's shape (`{"code", "message"}`, docs/e2b.md).
            let message = if path.starts_with(flint_supervisor::e2b::FLEET_PREFIX) { "message" } else { "error" };
            assert!(v[message].as_str().is_some_and(|e| !e.is_empty()) || status == 400, "{method} {path}: {text}");
        }
    }
    let (status, _) =
        rt.block_on(flint_supervisor::http::request(&socket, "GET", "/v1/nope", None, Duration::from_secs(5))).unwrap();
    assert_eq!(status, 404);
    // Still alive.
    assert!(flint(&socket, &["health"]).status.success());
    // Logs that go to a file (or journald) carry no terminal colour codes.
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(log.contains("flintd ready"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escape codes in a log file: {log}");
}

/// flintd will not run an S3 tier whose manifests anyone with write access to the bucket could forge: without a
/// store secret it refuses to start, saying what to set; with one it starts.
#[test]
fn an_s3_tier_without_a_secret_is_refused() {
    let s3 = S3Server::start();
    let work = TempDir::new("flintd-secret");
    let out = Command::new(bin_dir().join("flintd"))
        .arg("--socket")
        .arg(work.path().join("s.sock"))
        .arg("--data-dir")
        .arg(work.path().join("data"))
        .envs(s3.env())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "flintd started with an unauthenticated bucket");
    let bad_group = Command::new(bin_dir().join("flintd"))
        .arg("--socket")
        .arg(work.path().join("g.sock"))
        .arg("--data-dir")
        .arg(work.path().join("data-g"))
        .args(["--socket-group", "no-such-group-flint"])
        .output()
        .unwrap();
    let gerr = String::from_utf8_lossy(&bad_group.stderr);
    assert!(
        !bad_group.status.success() && gerr.contains("socket_group `no-such-group-flint`: no such group"),
        "{gerr}"
    );
    assert!(err.contains("without a store secret") && err.contains("allow_unauthenticated_bucket"), "{err}");
    let secret = work.path().join("store.secret");
    std::fs::write(&secret, "ab".repeat(32)).unwrap();
    let sock = work.path().join("ok.sock");
    let d = Flintd::start_with(
        &work.path().join("data2"),
        &sock,
        &s3,
        "sealed",
        &["--store-secret-file", secret.to_str().unwrap()],
    );
    assert!(flint(&sock, &["health"]).status.success());
    drop(d);
}

/// The shipped systemd unit passes `systemd-analyze verify` (with ExecStart pointing at this build), and starts
/// flintd without a configuration file: a fresh install has none.
#[test]
fn the_systemd_unit_verifies_and_needs_no_config_file() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/flintd.service")).unwrap();
    let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).expect("ExecStart");
    assert_eq!(exec, "ExecStart=/usr/local/bin/flintd", "the unit must not require a config file");
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed; skipping the unit check");
        return;
    };
    assert!(out.status.success());
    let work = TempDir::new("unit");
    let path = work.path().join("flintd.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/flintd", &bin_dir().join("flintd").display().to_string()))
        .unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // systemd before 254 does not know DelegateSubgroup= (flintd then keeps its VM cgroups at the top level).
    let version = String::from_utf8_lossy(&out.stdout);
    let major: u32 = version.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    let text: String = text
        .lines()
        .filter(|l| !(major < 254 && l.contains("Unknown key 'DelegateSubgroup'")))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(out.status.success() && !text.contains("flintd.service:"), "systemd-analyze verify: {text}");
    assert!(unit.contains("\nDelegate=yes\n") && unit.contains("\nDelegateSubgroup=daemon\n"), "{unit}");
    // The router's unit (docs/cluster.md) too.
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/flint-router.service")).unwrap();
    let path = work.path().join("flint-router.service");
    let exe = bin_dir().join("flint-router").display().to_string();
    let env = work.path().join("router.env");
    std::fs::write(&env, "FLINT_ROUTER_ARGS=--etcd http://127.0.0.1:2379\n").unwrap();
    let unit =
        unit.replace("/usr/local/bin/flint-router", &exe).replace("/etc/flint/router.env", &env.display().to_string());
    std::fs::write(&path, &unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("flint-router.service:"), "systemd-analyze verify: {text}");
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    f(dir);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

fn vm_detail(socket: &Path, id: &str) -> serde_json::Value {
    serde_json::from_slice(&flint_supervisor_get(socket, &format!("/v1/vms/{id}"))).unwrap()
}

/// Lazy restore from S3 with an empty cache: the clone answers after fetching part of its memory, its memory is
/// byte-exact, the first restore records the working set and the next prefetches it; with S3 gone the VM fails
/// cleanly and quickly instead of hanging.
#[test]
fn lazy_clones_from_s3_working_set_and_outage() {
    let mut s3 = S3Server::start();
    let work = TempDir::new("flintd-lazy");
    let data = work.path().join("data");
    let _reaper = KillVmmsUnder(data.clone());
    let socket = work.path().join("flintd.sock");
    let _d = start_flintd(&data, &socket, &s3);

    // Limits are checked at the edge with the VMM's own rules: 400, nothing started.
    for (args, want) in [
        (["vm", "create", "--vcpus", "9"], "vcpus must be between 1 and 8, not 9"),
        (["vm", "create", "--mem-mib", "257"], "mem_mib must be a multiple of 2"),
    ] {
        let out = flint(&socket, &args);
        assert!(String::from_utf8_lossy(&out.stderr).contains(want), "{args:?}: {out:?}");
    }
    assert!(flint_json(&socket, &["vm", "ls"]).as_array().unwrap().is_empty(), "nothing was started");

    let (blob, stored) = a_two_vcpu_vm_with_a_known_blob_is_snapshotted_to_s3(&socket, work.path(), &data);
    lazy_clones_fetch_part_of_the_memory_and_prefetch_the_working_set(&socket, work.path(), &data, &blob, stored);
    the_bucket_gone_mid_restore_fails_the_clone_and_leaves_nothing(&socket, &data, &mut s3);
}

/// A 2-vCPU VM holding a known 192 KiB of random bytes in guest memory (tmpfs), exec'd in, snapshotted as `lz`
/// and pushed to S3, then deleted. The blob and the snapshot's stored bytes.
fn a_two_vcpu_vm_with_a_known_blob_is_snapshotted_to_s3(socket: &Path, work: &Path, data: &Path) -> (Vec<u8>, u64) {
    // A 2-vCPU VM holding a known 192 KiB of random bytes in guest memory (tmpfs), snapshotted and pushed to S3.
    let src = flint_json(socket, &["vm", "create", "--id", "src", "--vcpus", "2", "--env", "FLINT_TEST=forty-two"]);
    assert_eq!(src["vcpus"], 2, "{src}");
    flint_tests::assert_jailed(src["pid"].as_u64().unwrap(), &data.join("vms/src"));
    // exec through the CLI: streamed output, the command's exit status, the VM's env.
    let out = flint(socket, &["exec", "src", "--", "/bin/sh", "-c", "echo out-$FLINT_TEST; echo err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out-forty-two\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err"), "{out:?}");
    let out = flint(socket, &["exec", "nope", "--", "/bin/true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM or session `nope`"), "{out:?}");
    let blob: Vec<u8> = {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..192 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let blob_path = work.join("blob");
    std::fs::write(&blob_path, &blob).unwrap();
    let out = flint(socket, &["cp", blob_path.to_str().unwrap(), "src:/tmp/blob"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    flint_json(socket, &["snapshot", "create", "src", "lz", "--push"]);
    assert!(flint(socket, &["vm", "rm", "src"]).status.success());
    let snaps = flint_json(socket, &["snapshot", "ls"]);
    let stored = snaps.as_array().unwrap().iter().find(|s| s["id"] == "lz").unwrap()["stored_bytes"].as_u64().unwrap();
    (blob, stored)
}

/// Two lazy clones of `lz` from an empty cache: each fetches part of the memory, byte-exact, in a jailed VMM
/// without store credentials; the second prefetches the working set the first recorded and faults less.
fn lazy_clones_fetch_part_of_the_memory_and_prefetch_the_working_set(
    socket: &Path,
    work: &Path,
    data: &Path,
    blob: &[u8],
    stored: u64,
) {
    let mut report = Vec::new();
    for round in ["first lazy (records the working set)", "second lazy (prefetches it)"] {
        flint_json(socket, &["cache", "clear"]);
        let c = flint_json(socket, &["clone", "--snapshot", "lz", "-n", "1", "--lazy"]);
        let id = c[0]["id"].as_str().unwrap().to_string();
        let d = vm_detail(socket, &id);
        // The clone is what the snapshot was: 2 vCPUs, in flintd's record and in the VMM's description.
        assert_eq!(d["vcpus"], 2, "{d}");
        assert_eq!(d["vmm"]["config"]["vcpus"], 2);
        assert_eq!(d["vmm"]["vcpus"].as_array().map(|a| a.len()), Some(2));
        // The VMM holds no store credentials: flintd has them in its environment, the VMM's is cleared.
        let pid = d["pid"].as_u64().unwrap();
        flint_tests::assert_jailed(pid, &data.join("vms").join(&id));
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        assert!(!environ.contains("AWS_ACCESS_KEY_ID") && !environ.contains("AWS_SECRET_ACCESS_KEY"), "{environ}");
        assert_eq!(d["vmm"]["restore"]["mode"], "pager");
        let u = &d["vmm"]["uffd"];
        let fetched = u["source"]["remote_bytes"].as_u64().unwrap();
        println!(
            "{round}: ready in {:.0} ms, fetched {fetched} of {stored} stored bytes ({:.0}%), {} faults, {} units touched, {} prefetched",
            d["ready_ms"].as_f64().unwrap(),
            fetched as f64 * 100.0 / stored as f64,
            u["faults"],
            u["touched_units"].as_array().map(|a| a.len()).unwrap_or(0),
            u["prefetched_units"]
        );
        assert!(fetched > 0 && fetched < stored, "a lazy clone fetches part of the memory: {u}");
        report.push(u.clone());
        // Byte-exact memory: the blob written before the snapshot reads back identical from the lazy clone.
        let back = work.join("blob.back");
        let out = flint(socket, &["cp", &format!("{id}:/tmp/blob"), back.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(std::fs::read(&back).unwrap() == blob, "guest memory differs after a lazy restore");
        assert!(flint(socket, &["vm", "rm", &id]).status.success());
    }
    assert_eq!(report[0]["prefetched_units"], 0);
    assert!(report[1]["prefetched_units"].as_u64().unwrap() > 0, "the second restore prefetched the working set");
    assert!(
        report[1]["faults"].as_u64().unwrap() < report[0]["faults"].as_u64().unwrap(),
        "prefetch saves faults: {} vs {}",
        report[1]["faults"],
        report[0]["faults"]
    );
}

fn the_bucket_gone_mid_restore_fails_the_clone_and_leaves_nothing(socket: &Path, data: &Path, s3: &mut S3Server) {
    // S3 goes away after the manifest and state are local: the VMM cannot get memory, the VM fails with a clear
    // error in bounded time, and no VMM is left running.
    flint_json(socket, &["cache", "clear"]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s3.object_path("e2e/manifests/lz")).unwrap()).unwrap();
    let state_images = manifest["images"].as_array().unwrap();
    let state = state_images.iter().find(|i| i["name"] == "state").unwrap();
    for c in state["chunks"].as_array().unwrap().iter().filter(|c| !c.is_null()) {
        let hex = c["id"].as_str().unwrap();
        let key = format!("chunks/{}/{hex}", &hex[..2]);
        let dest = data.join("store").join(&key);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(s3.object_path(&format!("e2e/{key}")), &dest).unwrap();
    }
    s3.stop();
    let started = Instant::now();
    let out = flint(socket, &["clone", "--snapshot", "lz", "-n", "1", "--lazy"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("with S3 stopped: {err} (after {:?})", started.elapsed());
    assert!(!out.status.success());
    assert!(err.contains("lazy restore failed") && err.contains("could not be provided"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(120), "a lost page source must fail the VM, not hang it");
    // A failed start leaves nothing: no VMM, no record, no directory.
    let vms = flint_json(socket, &["vm", "ls"]);
    assert!(vms.as_array().unwrap().is_empty(), "the failed clone left a VM behind: {vms}");
    assert_eq!(std::fs::read_dir(data.join("vms")).unwrap().count(), 0, "and no directory");
}

/// A VMM taken over by its guest reaches nothing: `jail-probe` (tests/src/bin), started by flintd's launcher with
/// the same jail, cgroup and inherited fds as flint-vmm and confined by the same code, tries to open /etc/shadow
/// and another VM's memory, connect to flintd, execve, ptrace and signal flintd, open an AF_INET socket, mount,
/// clone a user namespace and become root: each attempt fails or kills it.
#[test]
fn a_compromised_vmm_reaches_nothing() {
    use flint_supervisor::launcher::{Confinement, Launcher, ProcessLauncher};
    let work = TempDir::new("jail-probe");
    let vms = work.path().join("vms");
    let (dir, other) = (vms.join("probe"), vms.join("other"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("memory"), b"another tenant's memory").unwrap();
    let socket = work.path().join("flintd.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let targets = serde_json::json!({
        "flintd_socket": socket,
        "flintd_pid": std::process::id(),
        "other_memory": other.join("memory"),
    });
    std::fs::write(dir.join("probe-targets.json"), targets.to_string()).unwrap();
    let img = flint_tests::images();
    let mut config = flint_vmm_api::config::VmConfig::new(img.vmlinux.clone());
    config.initramfs = Some(img.initramfs.clone());
    config.console = dir.join("console.log").display().to_string();
    let spec = flint_vmm_api::LaunchSpec {
        api_sock: Some(dir.join("api.sock")),
        seccomp: true,
        jail: None,
        fence: None,
        vcpu_sched_idle: false,
        launch: flint_vmm_api::spec::Launch::Boot(config),
    };
    let launcher = ProcessLauncher::new(bin_dir().join("jail-probe"), Some(Default::default()));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let how = rt.block_on(async {
        let p = launcher
            .spawn(&dir, &spec, Some(Confinement { uid: 965_432, gid: 965_432, mem_mib: 256, cpu: None }))
            .unwrap();
        let how = tokio::time::timeout(Duration::from_secs(60), launcher.exited(p)).await.expect("the probe ended");
        launcher.release(&dir);
        how
    });
    let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap();
    println!("probe: {how}\n{log}");
    assert!(log.contains("UID 965432 PID 1") && log.contains("DONE"), "{log}");
    let attempts: Vec<&str> = log.lines().filter(|l| l.starts_with("ATTEMPT ")).collect();
    assert_eq!(attempts.len(), 10, "{log}");
    for a in attempts {
        assert!(a.contains(" blocked ("), "{a}");
    }
    for (name, how) in [("execve", "signal 31"), ("ptrace-flintd", "signal 31"), ("socket-af-inet", "signal 31")] {
        assert!(log.contains(&format!("ATTEMPT {name} blocked (killed by {how})")), "{name}: {log}");
    }
}

/// A VMM pushed past its cgroup's memory limit is killed by the kernel; flintd marks only that VM failed and the
/// other VM keeps answering. The victim is a clone of a snapshot whose metadata sizes its cgroup at 30 MiB (with
/// no VMM allowance) while its guest has 256 MiB; the guest then fills 40 MB of its RAM (slowly
/// on emulating hosts: the guest kernel zeroing pages is emulated).
/// CPU time a process has used so far (all its threads, user + system, the guest's vCPU time included), µs.
fn process_cpu_us(pid: i64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command.
    let ticks: u64 = f.get(11..13).map_or(0, |t| t.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000 / hz
}

/// Stops the golden guest's counter (it wakes every second: ~0.1 of a core of emulated guest kernel here).
const STOP_COUNTER: &str = "for p in /proc/[0-9]*; do n=${p#/proc/}; [ $n = $$ ] && continue; \
    grep -q /tmp/counter $p/cmdline 2>/dev/null && kill $n; done; echo stopped";

/// #30: a sandbox limited to a tenth of a core that spins gets a tenth of a core (its cgroup's CPU time over
/// 10 s of wall time), the limit is reported and its clone keeps it; bad limits are 400s.
#[test]
fn a_cpu_limit_holds_a_spinning_guest_to_its_share() {
    let work = TempDir::new("flintd-cpu");
    let data = work.path().join("data");
    let _reaper = KillVmmsUnder(data.clone());
    let socket = work.path().join("flintd.sock");
    flint_tests::import_golden_local(&data, "gold");
    let _d = Flintd::start_full(&data, &socket, None, &[], None);
    let bad = flint(&socket, &["clone", "--snapshot", "gold", "--cpu", "0.001"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("a fraction of a core"), "{bad:?}");
    // The golden guest's counter alone takes about a tenth of a core of emulated kernel here: under that limit
    // it would starve the guest's agent. A snapshot of it with the counter stopped is what runs under the limit.
    let quiet = flint_json(&socket, &["clone", "--snapshot", "gold"])[0]["id"].as_str().unwrap().to_string();
    assert_eq!(sh(&socket, &quiet, STOP_COUNTER), "stopped");
    assert!(flint_json(&socket, &["snapshot", "create", &quiet, "quiet"]).is_object());
    let vm = flint_json(&socket, &["clone", "--snapshot", "quiet", "--cpu", "0.1"])[0].clone();
    assert_eq!(vm["cpu"], 0.1, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    let pid = vm["pid"].as_i64().expect("the VMM's pid");
    // Its snapshot, while its guest is quiet (a guest left spinning would starve its clone's agent under the
    // same limit).
    let snap = flint_json(&socket, &["snapshot", "create", &id, "cpu-snap"]);
    assert!(snap.is_object(), "{snap}");
    let child = flint_json(&socket, &["clone", "--snapshot", "cpu-snap"])[0].clone();
    assert_eq!(child["cpu"], 0.1, "a clone keeps its snapshot's limit: {child}");
    a_session_keeps_its_cpu_limit(&socket, "quiet");
    let spin = Command::new(bin_dir().join("flint"))
        .arg("--socket")
        .arg(&socket)
        .args(["exec", &id, "--timeout-ms", "120000", "--", "/bin/sh", "-c", "while :; do :; done"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut spin = scopeguard_kill(spin);
    // Spinning once the guest's CPU time moves; then 10 s of wall time.
    let t0 = Instant::now();
    let start = process_cpu_us(pid);
    while process_cpu_us(pid) < start + 200_000 {
        assert!(t0.elapsed() < Duration::from_secs(120), "the guest never spun");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (u0, w0) = (process_cpu_us(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let share = (process_cpu_us(pid) - u0) as f64 / w0.elapsed().as_micros() as f64;
    println!("a guest limited to 0.1 core that spins used {share:.3} of a core over 10 s");
    assert!((0.07..=0.13).contains(&share), "{share:.3} of a core, not 0.1 ± 0.03");
    let _ = spin.0.kill();
}

/// A session made with `flint session create --cpu 0.1` runs under that limit (its record, its VM, its VMM's
/// cgroup) and keeps it across a hibernation and a wake.
fn a_session_keeps_its_cpu_limit(socket: &Path, snapshot: &str) {
    let args = ["session", "create", "--snapshot", snapshot, "--id", "cpu-s", "--idle-timeout", "3600", "--cpu", "0.1"];
    let created = flint_json(socket, &args);
    let limit = |s: &serde_json::Value| {
        assert_eq!(s["cpu"], 0.1, "the session's record: {s}");
        let vm = vm_detail(socket, s["vm"].as_str().unwrap_or_else(|| panic!("a running session's VM: {s}")));
        assert_eq!(vm["cpu"], 0.1, "its VM: {vm}");
        cgroup_cpu_limit(vm["pid"].as_i64().expect("the VMM's pid"))
    };
    assert_eq!(limit(&created), Some(0.1), "the VMM's cgroup");
    let slept = flint_json(socket, &["session", "hibernate", "cpu-s"]);
    assert_eq!((slept["state"].as_str(), slept["cpu"].as_f64()), (Some("hibernated"), Some(0.1)), "{slept}");
    let woken = flint_json(socket, &["session", "wake", "cpu-s"]);
    assert_eq!(limit(&woken), Some(0.1), "the woken VM's cgroup");
    assert!(flint(socket, &["session", "rm", "cpu-s"]).status.success());
}

/// The CPU limit of a process's cgroup, a fraction of one core (v1 CFS quota / period, v2 `cpu.max`); None: none.
fn cgroup_cpu_limit(pid: i64) -> Option<f64> {
    let (dir, v2) = flint_tests::cgroup_dir(pid as u64, "cpu").expect("the VMM's cpu cgroup");
    let read = |f: &str| {
        let p = dir.join(f);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).trim().to_string()
    };
    let (quota, period) = if v2 {
        let max = read("cpu.max");
        let (q, p) = max.split_once(' ').expect("cpu.max: QUOTA PERIOD");
        (q.to_string(), p.to_string())
    } else {
        (read("cpu.cfs_quota_us"), read("cpu.cfs_period_us"))
    };
    let quota: f64 = quota.parse().ok().filter(|q: &f64| *q > 0.0)?;
    Some(quota / period.parse::<f64>().expect("a period"))
}

/// Anonymous memory of a process, KiB (`RssAnon`: a VMM's private copies of guest pages).
fn rss_anon_kib(pid: i64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The balloon device's counters in a VM's VMM description.
fn balloon_of(socket: &Path, vm: &str) -> serde_json::Value {
    let d = vm_detail(socket, vm);
    let devices = d["vmm"]["devices"].as_array().cloned().unwrap_or_default();
    let b = devices.into_iter().find(|v| v["id"] == "balloon0").unwrap_or_else(|| panic!("no balloon0 device: {d}"));
    b["device"].clone()
}

/// 128 MiB of guest memory filled, then freed, by one process: awk holds 128 strings of 1 MiB, each a window at
/// its own offset into 2 MiB made of 512 blocks of 4 KiB drawn at random from 8 of random characters (seeded per
/// guest, so two guests' memory differs and cannot deduplicate), joined pairwise (joining them one by one
/// faulted in ~0.5 GiB of short-lived copies, each page fault emulated). Written in user mode, which runs at native speed on the emulating host
/// here; the guest kernel only zeroes each page as it faults in. A 256 KiB chunk of it compresses to ~32 KiB
/// (the blocks repeat within a chunk, never as a whole chunk): what a hibernation stores when freed pages are not
/// left out. Prints the KiB held. (128 MiB of copies by the guest kernel took over 20 minutes of two guests' time
/// here: every byte a guest kernel copies is emulated. Data in a tmpfs, freed apart from the process's memory,
/// was not reported at all: its pages never formed free blocks of 4 MiB.)
fn fill_and_free(seed: u32) -> String {
    format!(
        "awk -v seed={seed} 'BEGIN {{ srand(seed); \
           for (b = 0; b < 8; b++) {{ p = \"\"; for (c = 0; c < 4096; c++) p = p sprintf(\"%c\", 33 + int(rand() * 90)); pool[b] = p }} \
           n = 512; for (k = 0; k < n; k++) s[k] = pool[int(rand() * 8)]; \
           while (n > 1) {{ n = n / 2; for (k = 0; k < n; k++) s[k] = s[2 * k] s[2 * k + 1]; \
             for (k = n; k < 2 * n; k++) delete s[k] }} \
           for (i = 0; i < 128; i++) a[i] = substr(s[0], 1 + (i * 4099) % 1048576, 1048576); \
           print 128 * 1024 }}'"
    )
}

/// Memory that goes back (#30): two sessions of the golden snapshot (its guest has the balloon device with free
/// page reporting); the guest of `off` has reporting turned off (its order past the largest). Each fills 128 MiB
/// and frees it. `on` gives it back to the host (its VMM's anonymous memory drops, the device counts the
/// bytes) and its hibernation leaves it out; `off` keeps it and its hibernation stores it. `on` wakes after.
#[test]
fn freed_guest_memory_goes_back_to_the_host_and_out_of_hibernations() {
    let s3 = S3Server::start();
    let work = TempDir::new("flintd-balloon");
    let data = work.path().join("data");
    let _reaper = KillVmmsUnder(data.clone());
    let socket = work.path().join("flintd.sock");
    flint_tests::import_golden(&data, &s3, "balloon", "gold", None);
    let _d = Flintd::start_with(&data, &socket, &s3, "balloon", &["--allow-unauthenticated-bucket"]);
    let mut vms = std::collections::HashMap::new();
    for id in ["on", "off"] {
        let s = flint_json(&socket, &["session", "create", "--snapshot", "gold", "--id", id, "--idle-timeout", "3600"]);
        let vm = s["vm"].as_str().unwrap().to_string();
        let pid = vm_detail(&socket, &vm)["pid"].as_i64().expect("the VMM's pid");
        assert_eq!(sh(&socket, id, STOP_COUNTER), "stopped");
        vms.insert(id, (vm, pid));
    }
    let order = "/sys/module/page_reporting/parameters/page_reporting_order";
    assert_eq!(sh(&socket, "off", &format!("echo 11 > {order}; cat {order}")), "11", "reporting off in `off`");

    // Both fill at once (one vCPU each).
    let before: std::collections::HashMap<&str, u64> =
        vms.iter().map(|(id, (_, pid))| (*id, rss_anon_kib(*pid))).collect();
    let t = Instant::now();
    let filled: Vec<u64> = std::thread::scope(|sc| {
        let socket = &socket;
        let fill = |(id, seed): (&'static str, u32)| sc.spawn(move || sh(socket, id, &fill_and_free(seed)));
        let fills: Vec<_> = [("on", 1), ("off", 2)].into_iter().map(fill).collect();
        fills.into_iter().map(|f| f.join().unwrap().parse().expect("the fill's KiB")).collect()
    });
    let fill_kib = filled[0];
    assert_eq!(filled, [128 << 10, 128 << 10], "KiB filled");
    println!("filled and freed {fill_kib} KiB in each guest in {:.1} s", t.elapsed().as_secs_f64());

    // `on`: the guest reports the freed blocks (2 s after they are freed) and the VMM discards them.
    let (vm_on, pid_on) = vms["on"].clone();
    let t = Instant::now();
    loop {
        let b = balloon_of(&socket, &vm_on);
        let rss = rss_anon_kib(pid_on);
        let reported = b["reported_bytes"].as_u64().unwrap_or(0);
        // Blocks of 4 MiB and up are reported, about 2 s after they are freed: not every page of the fill ends up
        // in one.
        if reported >= (fill_kib / 2) << 10 && rss < before["on"] + fill_kib / 4 {
            println!(
                "on: {reported} bytes reported, VMM RssAnon {} → {rss} KiB, {:.1} s after the fill",
                before["on"],
                t.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(180), "the freed memory never went back: RssAnon {rss} KiB, {b}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let rss_off = rss_anon_kib(vms["off"].1);
    println!("off: VMM RssAnon {} → {rss_off} KiB", before["off"]);
    assert!(rss_off > before["off"] + fill_kib * 3 / 4, "`off` keeps what its guest freed");

    // What each hibernation stores anew. `off` goes first: `on` then stores only what `off` did not (much of the
    // two guests' memory is alike), and its freed memory is its own, so it would be stored anew if it were kept.
    let stored = |id: &str| {
        let h = flint_json(&socket, &["session", "hibernate", id]);
        assert_eq!(h["state"], "hibernated", "{h}");
        h["last_hibernate_stored_bytes"].as_u64().unwrap()
    };
    let (off, on) = (stored("off"), stored("on"));
    println!("hibernation stored {on} bytes with free page reporting, {off} without");
    assert!(off > (fill_kib << 10) / 16, "without reporting the freed memory is stored: {off} bytes");
    assert!(on * 4 < off, "with reporting the freed memory is left out: {on} bytes stored, {off} without");
    assert_eq!(sh(&socket, "on", "echo awake"), "awake", "the session wakes from a hibernation without them");
    flint_json(&socket, &["session", "rm", "on"]);
    flint_json(&socket, &["session", "rm", "off"]);
}

/// A child process killed (and reaped) when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scopeguard_kill(c: std::process::Child) -> KillOnDrop {
    KillOnDrop(c)
}

#[test]
fn a_vmm_past_its_memory_limit_is_killed_alone() {
    let s3 = S3Server::start();
    let work = TempDir::new("flintd-oom");
    let data = work.path().join("data");
    let _reaper = KillVmmsUnder(data.clone());
    let socket = work.path().join("flintd.sock");
    let config = work.path().join("flintd.toml");
    std::fs::write(&config, "[jail]\nvmm_overhead_mib = 0\n").unwrap();
    flint_tests::import_golden(&data, &s3, "oom", "small", Some(30));
    flint_tests::import_golden(&data, &s3, "oom", "full", None);
    let _d = Flintd::start_with(
        &data,
        &socket,
        &s3,
        "oom",
        &["--allow-unauthenticated-bucket", "--config", config.to_str().unwrap()],
    );
    let victim = flint_json(&socket, &["clone", "--snapshot", "small"])[0]["id"].as_str().unwrap().to_string();
    let bystander = flint_json(&socket, &["clone", "--snapshot", "full"])[0]["id"].as_str().unwrap().to_string();
    let fill = flint(
        &socket,
        &[
            "exec",
            &victim,
            "--timeout-ms",
            "180000",
            "--",
            "/bin/dd",
            "if=/dev/zero",
            "of=/tmp/fill",
            "bs=1M",
            "count=40",
        ],
    );
    println!("fill: {:?} {}", fill.status, String::from_utf8_lossy(&fill.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    // A VM's cgroup is named after its jail uid.
    let cgroup = format!("vm-{}", vm_detail(&socket, &victim)["uid"].as_u64().expect("a jailed VM's uid"));
    let failed = loop {
        let d = vm_detail(&socket, &victim);
        if d["status"] == "failed" {
            break d;
        }
        if Instant::now() > deadline {
            let cg = std::path::Path::new("/sys/fs/cgroup/memory/flint").join(&cgroup);
            let read = |f: &str| std::fs::read_to_string(cg.join(f)).unwrap_or_default();
            panic!(
                "the VMM past its limit was not stopped: usage {} failcnt {} stat {}\n{d}",
                read("memory.usage_in_bytes"),
                read("memory.failcnt"),
                read("memory.stat")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("victim: {}", failed["error"]);
    // Stopped for its memory limit: by flintd's watchdog (guest faults taken by KVM do not wake the kernel's OOM
    // killer), or by the kernel's OOM killer (counted in the cgroup).
    let error = failed["error"].as_str().unwrap_or("");
    let events = std::fs::read_to_string(format!("/sys/fs/cgroup/memory/flint/{cgroup}/memory.oom_control"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/flint/{cgroup}/memory.events")))
        .unwrap_or_default();
    let kills: u64 = events.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(error.contains("reached its memory limit") || kills >= 1, "not stopped for its memory limit: {failed}");
    let out = flint(&socket, &["exec", &bystander, "--", "/bin/true"]);
    assert!(out.status.success(), "the other VM stopped answering: {out:?}");
    assert_eq!(vm_detail(&socket, &bystander)["status"], "running");
}

/// Runs `sh -c script` in a VM or session through the CLI; its stdout, trimmed.
fn sh(socket: &Path, id: &str, script: &str) -> String {
    let out = flint(socket, &["exec", id, "--", "/bin/sh", "-c", script]);
    assert!(
        out.status.success(),
        "exec in {id}: {script}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn session(socket: &Path, id: &str) -> serde_json::Value {
    flint_json(socket, &["session", "get", id])
}

fn wait_state(socket: &Path, id: &str, state: &str, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let s = session(socket, id);
        if s["state"] == state {
            return s;
        }
        assert!(Instant::now() < deadline, "session {id} not {state} within {within:?}: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sessions end to end on real guests (restored from the golden snapshot, no cold boot): five hibernate/wake
/// cycles with the guest's memory kept (a counter in its tmpfs, the pre-stop command's log) and each hibernation
/// storing far less than the guest's memory; an idle timeout hibernates a session and the next exec wakes it; a
/// flintd restart keeps running and hibernated sessions; a second flintd on the same bucket wakes a session the
/// first hibernated, the first then gets 409 naming it, and takes the session back once the second is killed
/// and its lease lapses; fork gives refreshed children; deleting leaves no VM and no lease object.
#[test]
fn sessions_hibernate_wake_and_move_between_hosts() {
    let s3 = S3Server::start();
    let work = TempDir::new("flintd-sessions");
    let (data_a, data_b) = (work.path().join("a"), work.path().join("b"));
    let _reap_a = KillVmmsUnder(data_a.clone());
    let _reap_b = KillVmmsUnder(data_b.clone());
    let (sock_a, sock_b) = (work.path().join("a.sock"), work.path().join("b.sock"));
    let config = work.path().join("flintd.toml");
    std::fs::write(&config, "[sessions]\nlease_s = 4\ntick_ms = 200\n").unwrap();
    let args = ["--allow-unauthenticated-bucket", "--config", config.to_str().unwrap()];
    flint_tests::import_golden(&data_a, &s3, "ses", "gold", None);
    let mut a = Some(Flintd::start_with(&data_a, &sock_a, &s3, "ses", &args));

    a_session_is_named_after_itself_listed_by_metadata_and_owns_its_vm(&sock_a);
    five_hibernate_wake_cycles_keep_the_guests_memory(&sock_a);
    idle_sessions_hibernate_and_a_running_exec_is_activity(&sock_a);
    interactive_exec_streams_stdin_forwards_sigint_and_gives_a_terminal(&sock_a);
    flint_json(&sock_a, &["session", "rm", "busy"]);

    // A restart: the running session is re-adopted (same VM), the other keeps its state.
    let (vm_before, idle_before) = (session(&sock_a, "s1")["vm"].clone(), session(&sock_a, "idle")["state"].clone());
    drop(a.take());
    let a = Flintd::start_with(&data_a, &sock_a, &s3, "ses", &args);
    let s = session(&sock_a, "s1");
    assert_eq!((&s["state"], &s["vm"]), (&serde_json::json!("running"), &vm_before), "{s}");
    assert_eq!(session(&sock_a, "idle")["state"], idle_before);
    // Longer than the lease: the restarted host took its running sessions' leases back and renews them.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(sh(&sock_a, "s1", "cat /tmp/count"), "5");

    flint_json(&sock_a, &["session", "hibernate", "s1"]);
    a_flintd_whose_uid_range_overlaps_a_running_one_refuses_to_start(work.path(), &data_a);
    another_host_wakes_it_is_refused_while_it_holds_it_and_loses_it_when_it_dies(
        work.path(),
        &s3,
        &sock_a,
        &data_b,
        &sock_b,
    );
    let kids = forks_get_the_parents_memory_and_their_own_entropy(&sock_a);

    let mut rm = vec!["session", "rm", "s1", "idle"];
    rm.extend(kids.iter().map(String::as_str));
    flint_json(&sock_a, &rm);
    assert!(flint_json(&sock_a, &["session", "ls"]).as_array().unwrap().is_empty());
    assert!(flint_json(&sock_a, &["vm", "ls"]).as_array().unwrap().is_empty(), "no VM is left");
    let leases = s3.object_path("ses/coord/sessions");
    let left: Vec<_> = std::fs::read_dir(&leases).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "lease objects left in the bucket: {left:?}");
    drop(a);
}

/// Session `s1` (a counter in /tmp/count), listed by its metadata; its VM cannot be deleted under it.
fn a_session_is_named_after_itself_listed_by_metadata_and_owns_its_vm(sock_a: &Path) {
    let s = flint_json(
        sock_a,
        &[
            "session",
            "create",
            "--snapshot",
            "gold",
            "--id",
            "s1",
            "--idle-timeout",
            "3600",
            "--meta",
            "user=ada",
            "--pre-stop",
            "echo pre-stop >> /tmp/pre-stop.log",
        ],
    );
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(sh(sock_a, "s1", "hostname; echo 0 > /tmp/count"), "s1", "the guest is named after the session");
    let listed = flint_json(sock_a, &["session", "ls", "--meta", "user=ada"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert!(flint_json(sock_a, &["session", "ls", "--meta", "user=bob"]).as_array().unwrap().is_empty());
    let vm = s["vm"].as_str().unwrap().to_string();
    let out = flint(sock_a, &["vm", "rm", &vm]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("runs session `s1`"));
}

/// Five hibernate/wake cycles of `s1`: each stores far less than the guest's memory, carries its claim's epoch,
/// leaves no VM, and the next exec wakes it with its memory (the counter, the pre-stop log).
fn five_hibernate_wake_cycles_keep_the_guests_memory(sock_a: &Path) {
    let mem_bytes = 256u64 << 20;
    for cycle in 1..=5u64 {
        let t = Instant::now();
        let h = flint_json(sock_a, &["session", "hibernate", "s1"]);
        println!(
            "hibernate {cycle}: {:.0} ms, stored {} bytes",
            t.elapsed().as_secs_f64() * 1e3,
            h["last_hibernate_stored_bytes"]
        );
        assert_eq!(h["state"], "hibernated", "{h}");
        // Each wake takes the lease again: the epoch (fencing token) goes up with it.
        assert_eq!(h["base"], format!("s1.h{cycle}.e{cycle}"), "the hibernation carries its claim's epoch");
        assert!(h["vm"].is_null());
        let stored = h["last_hibernate_stored_bytes"].as_u64().unwrap();
        assert!(stored < mem_bytes / 4, "hibernation {cycle} stored {stored} bytes of a {mem_bytes}-byte guest");
        let vms = flint_json(sock_a, &["vm", "ls"]);
        assert!(
            vms.as_array().unwrap().iter().all(|v| v["owner"]["id"] != "s1"),
            "a hibernated session has no VM: {vms}"
        );
        // The next exec wakes it, with everything the guest had in memory.
        let t = Instant::now();
        let got = sh(
            sock_a,
            "s1",
            "echo $(( $(cat /tmp/count) + 1 )) > /tmp/count; cat /tmp/count; wc -l < /tmp/pre-stop.log",
        );
        println!("exec waking s1: {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(got, format!("{cycle}\n{cycle}"), "cycle {cycle}: counter and pre-stop log");
        let w = session(sock_a, "s1");
        assert_eq!(
            (w["state"].as_str(), w["wakes"].as_u64(), w["hibernations"].as_u64()),
            (Some("running"), Some(cycle), Some(cycle))
        );
    }
}

/// Idle: no call for 2 s → hibernated by flintd; an exec wakes it. A running exec is activity.
fn idle_sessions_hibernate_and_a_running_exec_is_activity(sock_a: &Path) {
    // Idle: no call for 2 s → hibernated by flintd; an exec wakes it.
    flint_json(sock_a, &["session", "create", "--snapshot", "gold", "--id", "idle", "--idle-timeout", "2"]);
    let h = wait_state(sock_a, "idle", "hibernated", Duration::from_secs(60));
    assert_eq!(h["hibernations"], 1);
    assert_eq!(sh(sock_a, "idle", "hostname"), "idle");
    let metrics = String::from_utf8_lossy(&flint(sock_a, &["metrics"]).stdout).into_owned();
    assert!(metrics.contains("flint_session_idle_hibernations_total 1"), "{metrics}");
    assert!(metrics.contains("flint_session_hibernate_ms_count 6"), "{metrics}");

    // A running exec is activity: a 6 s command in a session with a 2 s idle timeout does not see it hibernate.
    flint_json(sock_a, &["session", "create", "--snapshot", "gold", "--id", "busy", "--idle-timeout", "2"]);
    assert_eq!(sh(sock_a, "busy", "sleep 6; echo done"), "done");
    let b = session(sock_a, "busy");
    assert_eq!((b["state"].as_str(), b["hibernations"].as_u64()), (Some("running"), Some(0)), "{b}");
}

/// Interactive exec in session `busy`.
fn interactive_exec_streams_stdin_forwards_sigint_and_gives_a_terminal(sock_a: &Path) {
    // Interactive exec: stdin streamed from a pipe; ^C forwarded as SIGINT; a terminal (through script(1)) of
    // the default size that takes typed commands.
    let mut child = Command::new(bin_dir().join("flint"))
        .args(["--socket", sock_a.to_str().unwrap(), "exec", "-i", "busy", "--", "/bin/sh", "-c", "wc -c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&vec![b'x'; 100_000]).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100000");
    let mut child = Command::new(bin_dir().join("flint"))
        .args(["--socket", sock_a.to_str().unwrap(), "exec", "-i", "busy", "--", "/bin/sleep", "60"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t = Instant::now();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "SIGINT reached the guest's sleep (128 + 2)");
    assert!(t.elapsed() < Duration::from_secs(30));
    let flint_cmd =
        format!("{} --socket {} exec -it busy -- /bin/sh", bin_dir().join("flint").display(), sock_a.display());
    let mut child = Command::new("script")
        .args(["-qec", &flint_cmd, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"echo tty=$(tty) size=$(stty size) sum=$((40+2)); exit 7\n").unwrap();
        std::thread::sleep(Duration::from_secs(8));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tty=/dev/pts/") && text.contains("size=24 80") && text.contains("sum=42"), "{text}");
    assert_eq!(out.status.code(), Some(7), "the shell's exit status: {text}");
}

fn a_flintd_whose_uid_range_overlaps_a_running_one_refuses_to_start(work: &Path, data_a: &Path) {
    // Each flintd of a host runs its VMs as uids of a range of its own: one whose range overlaps a running
    // flintd's refuses to start, naming the other (its VMMs could otherwise signal or open A's VMs' files).
    let overlapping = work.join("overlapping.toml");
    std::fs::write(&overlapping, "[jail]\nuid_base = 960000\nuid_count = 10000\n").unwrap();
    let out = Command::new(bin_dir().join("flintd"))
        .arg("--socket")
        .arg(work.join("c.sock"))
        .arg("--data-dir")
        .arg(work.join("c"))
        .args(["--allow-unauthenticated-bucket", "--config", overlapping.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("jail uids 960000..970000 overlap 900000..965536")
            && err.contains(&data_a.display().to_string()),
        "{err}"
    );
}

/// Host B wakes what host A hibernated; A is refused while B holds it; A takes it over once B dies and its
/// lease lapses.
fn another_host_wakes_it_is_refused_while_it_holds_it_and_loses_it_when_it_dies(
    work: &Path,
    s3: &S3Server,
    sock_a: &Path,
    data_b: &Path,
    sock_b: &Path,
) {
    let config_b = work.join("flintd-b.toml");
    std::fs::write(&config_b, "[sessions]\nlease_s = 4\ntick_ms = 200\n[jail]\nuid_base = 970000\nuid_count = 1000\n")
        .unwrap();
    let args_b = ["--allow-unauthenticated-bucket", "--config", config_b.to_str().unwrap()];
    let mut b = Some(Flintd::start_with(data_b, sock_b, s3, "ses", &args_b));
    assert_eq!(sh(sock_b, "s1", "echo 6 > /tmp/count; cat /tmp/count; hostname"), "6\ns1");
    let host_b = flint_json(sock_b, &["health"])["host"].as_str().unwrap().to_string();
    let out = flint(sock_a, &["exec", "s1", "--", "/bin/true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("HTTP 409") && err.contains(&host_b), "{err}");
    // B hibernates it: A wakes it with B's changes.
    flint_json(sock_b, &["session", "hibernate", "s1"]);
    assert_eq!(sh(sock_a, "s1", "cat /tmp/count"), "6");
    // B takes it again after A hibernates; B dies with it: A is refused until B's lease lapses, then wakes the
    // last hibernation (what B did since is lost with B).
    flint_json(sock_a, &["session", "hibernate", "s1"]);
    assert_eq!(sh(sock_b, "s1", "echo 7 > /tmp/count; cat /tmp/count"), "7");
    let mut dead = b.take().unwrap();
    dead.child.kill().unwrap();
    let _ = dead.child.wait();
    drop(KillVmmsUnder(data_b.to_path_buf()));
    let out = flint(sock_a, &["exec", "s1", "--", "/bin/true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 409"), "B's lease is still current");
    // Refused until B's lease (4 s) and the allowed clock skew have passed, then taken over.
    let since = Instant::now();
    let got = loop {
        let out = flint(sock_a, &["exec", "s1", "--", "/bin/sh", "-c", "cat /tmp/count"]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 409"), "{out:?}");
        assert!(since.elapsed() < Duration::from_secs(120), "A never took the session over");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(got, "6", "taken over from the last hibernation");
}

/// Fork: two children with the parent's memory, each refreshed; their ids.
fn forks_get_the_parents_memory_and_their_own_entropy(sock_a: &Path) -> Vec<String> {
    let kids = flint_json(sock_a, &["session", "fork", "s1", "-n", "2"]);
    let kids: Vec<String> = kids.as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(kids.len(), 2);
    let mut seen = Vec::new();
    for k in &kids {
        let got = sh(sock_a, k, "cat /tmp/count; hostname; cat /proc/sys/kernel/random/uuid");
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(&lines[..2], &["6", k.as_str()], "{got}");
        seen.push(lines[2].to_string());
    }
    assert_ne!(seen[0], seen[1], "forks have their own entropy");
    assert_eq!(sh(sock_a, "s1", "cat /tmp/count"), "6", "the parent runs on");
    kids
}

/// Finding 3 of #26: a host cut off from the bucket cannot renew its claim on a running session. It pauses the
/// session's VM half-way through the lease and stops it at two thirds; the other host takes the claim over only
/// past its expiry (plus the allowed clock skew) and wakes the last hibernation. At no point do both hosts run a
/// VM of the session, and what was hibernated is not lost.
#[test]
fn a_host_that_cannot_renew_its_lease_stops_the_session_before_another_takes_it() {
    let mut s3 = S3Server::start();
    let proxy = flint_tests::PartitionProxy::start(s3.port);
    let work = TempDir::new("flintd-fence");
    let (data_a, data_b) = (work.path().join("a"), work.path().join("b"));
    let _reap_a = KillVmmsUnder(data_a.clone());
    let _reap_b = KillVmmsUnder(data_b.clone());
    let (sock_a, sock_b) = (work.path().join("a.sock"), work.path().join("b.sock"));
    let lease = "[sessions]\nlease_s = 9\ntick_ms = 200\nmax_clock_skew_ms = 3000\n";
    let (config_a, config_b) = (work.path().join("a.toml"), work.path().join("b.toml"));
    std::fs::write(&config_a, lease).unwrap();
    std::fs::write(&config_b, format!("{lease}[jail]\nuid_base = 970000\nuid_count = 1000\n")).unwrap();
    flint_tests::import_golden(&data_a, &s3, "fence", "gold", None);
    // Host A reaches the bucket only through the proxy; host B straight.
    s3.route_via(Some(proxy.port));
    let args_a = ["--allow-unauthenticated-bucket", "--config", config_a.to_str().unwrap()];
    let a = Flintd::start_with(&data_a, &sock_a, &s3, "fence", &args_a);
    s3.route_via(None);
    let args_b = ["--allow-unauthenticated-bucket", "--config", config_b.to_str().unwrap()];
    let b = Flintd::start_with(&data_b, &sock_b, &s3, "fence", &args_b);

    flint_json(&sock_a, &["session", "create", "--snapshot", "gold", "--id", "f1", "--idle-timeout", "3600"]);
    sh(&sock_a, "f1", "echo hibernated > /tmp/state");
    let h = flint_json(&sock_a, &["session", "hibernate", "f1"]);
    assert_eq!(h["base"], "f1.h1.e1", "{h}");
    assert_eq!(sh(&sock_a, "f1", "echo after > /tmp/later; cat /tmp/state"), "hibernated");
    let vm = session(&sock_a, "f1")["vm"].as_str().unwrap().to_string();
    let pid = vm_detail(&sock_a, &vm)["pid"].as_i64().expect("the VM's pid");

    proxy.cut();
    let cut = Instant::now();
    let mut frozen_seen = false;
    let mut a_stopped_at = None;
    let woken = loop {
        assert!(cut.elapsed() < Duration::from_secs(300), "B never woke the session");
        match proc_state(pid) {
            Some(state) => frozen_seen |= state == "T",
            None => {
                a_stopped_at.get_or_insert(cut.elapsed());
            }
        }
        let a_stopped = a_stopped_at.is_some();
        let out = flint(&sock_b, &["exec", "f1", "--", "/bin/sh", "-c", "cat /tmp/state; cat /tmp/later || true"]);
        if out.status.success() {
            // B's wake began after A's VMM was seen gone: never two VMs of the session at once.
            assert!(a_stopped, "B woke the session while A's VM (pid {pid}) still ran");
            break String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("HTTP 409") && err.contains("is held by host"), "B's wake failed otherwise: {err}");
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("A's VM stopped {a_stopped_at:?} after the cut; B woke the session {:?} after it", cut.elapsed());
    assert!(frozen_seen, "A paused the VM before it stopped it");
    assert_eq!(woken, "hibernated", "the last hibernation, and nothing A did after it");
    let on_a = wait_state(&sock_a, "f1", "failed", Duration::from_secs(120));
    assert!(on_a["error"].as_str().unwrap_or("").contains("lost its lease"), "{on_a}");
    let metrics = String::from_utf8_lossy(&flint(&sock_a, &["metrics"]).stdout).into_owned();
    for m in ["flint_session_lease_freezes_total 1", "flint_session_lease_fences_total 1"] {
        assert!(metrics.contains(m), "{m}: {metrics}");
    }

    proxy.heal();
    the_fenced_host_is_refused_and_the_new_owner_publishes_the_next_epoch(&sock_a, &sock_b, "lost its lease");
    drop((a, b));
}

/// A, back in touch, is refused while B holds session `f1` (its record says why: `why`); B's hibernation publishes
/// under the next epoch; B removes it.
fn the_fenced_host_is_refused_and_the_new_owner_publishes_the_next_epoch(sock_a: &Path, sock_b: &Path, why: &str) {
    let out = flint(sock_a, &["exec", "f1", "--", "/bin/true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(why), "a failed session says why: {out:?}");
    let out = flint(sock_a, &["session", "wake", "f1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HTTP 409") && err.contains("is held by host"), "A's wake while B holds it: {out:?}");
    let h = flint_json(sock_b, &["session", "hibernate", "f1"]);
    assert_eq!(h["base"], "f1.h2.e3", "A created (1) and woke (2) it, B took it over (3): {h}");
    flint_json(sock_b, &["session", "rm", "f1"]);
    assert!(flint_json(sock_b, &["vm", "ls"]).as_array().unwrap().is_empty());
}

/// The state letter of process `pid` (`R`, `S`, `T` when stopped...); none once it is gone or a zombie.
fn proc_state(pid: i64) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()).map(str::to_string))
        .filter(|state| state != "Z")
}

/// Session `e1` created on A: A's claim and registration in etcd; hibernated: no owner, and the session entry
/// names the hibernation.
fn a_claim_and_a_hibernation_are_kept_in_etcd(etcd: &flint_tests::EtcdServer, sock_a: &Path, host_a: &str) {
    flint_json(sock_a, &["session", "create", "--snapshot", "gold", "--id", "e1", "--idle-timeout", "3600"]);
    let keys = etcd.get_prefix("/flint/").expect("etcd answers");
    assert_eq!(keys.get("/flint/owners/e1"), Some(&host_a.to_string()), "A's claim: {keys:?}");
    let reg: serde_json::Value = serde_json::from_str(&keys[&format!("/flint/hosts/{host_a}")]).unwrap();
    assert!(reg["mem_total_mib"].as_u64().unwrap() > 0 && reg["draining"] == false, "{reg}");
    sh(sock_a, "e1", "echo hibernated > /tmp/state");
    let h = flint_json(sock_a, &["session", "hibernate", "e1"]);
    assert_eq!(h["base"], "e1.h1.e1", "{h}");
    let keys = etcd.get_prefix("/flint/").expect("etcd answers");
    assert!(!keys.contains_key("/flint/owners/e1"), "a hibernated session has no owner: {keys:?}");
    let entry: serde_json::Value = serde_json::from_str(&keys["/flint/sessions/e1"]).unwrap();
    assert_eq!(entry["session"]["base"], "e1.h1.e1", "the entry names the last hibernation: {entry}");
}

/// #29: hosts of an etcd cluster. A session's owner key is bound to its host's etcd lease: another host is
/// refused while the holder lives, and wakes the session from its last hibernation once the holder's lease ends.
/// Host A, cut off from etcd, pauses the session's VM before its lease can have ended (reversible), learns on
/// reconnection that the lease ended, stops the VM and registers again; its late commits are refused. At no point
/// do both hosts run a VM of the session, and the owner keys in etcd always name one host.
#[test]
fn an_etcd_cluster_hands_sessions_over_and_a_cut_off_host_pauses_then_stops() {
    let s3 = S3Server::start();
    let etcd = flint_tests::EtcdServer::start();
    let proxy = flint_tests::PartitionProxy::start(etcd.port);
    let work = TempDir::new("flintd-etcd");
    let (data_a, data_b) = (work.path().join("a"), work.path().join("b"));
    let _reap_a = KillVmmsUnder(data_a.clone());
    let _reap_b = KillVmmsUnder(data_b.clone());
    let (sock_a, sock_b) = (work.path().join("a.sock"), work.path().join("b.sock"));
    let cluster = |url: String| {
        format!(
            "[sessions]\ntick_ms = 200\n[cluster]\netcd = [\"{url}\"]\nlease_ttl_s = 6\npause_margin_ms = 1500\n\
             etcd_timeout_ms = 1000\n"
        )
    };
    let (config_a, config_b) = (work.path().join("a.toml"), work.path().join("b.toml"));
    // Host A reaches etcd only through the proxy; host B straight.
    std::fs::write(&config_a, cluster(format!("http://127.0.0.1:{}", proxy.port))).unwrap();
    std::fs::write(&config_b, format!("{}[jail]\nuid_base = 970000\nuid_count = 1000\n", cluster(etcd.url()))).unwrap();
    flint_tests::import_golden(&data_a, &s3, "etcd", "gold", None);
    let args_a = ["--allow-unauthenticated-bucket", "--config", config_a.to_str().unwrap()];
    let a = Flintd::start_with(&data_a, &sock_a, &s3, "etcd", &args_a);
    let args_b = ["--allow-unauthenticated-bucket", "--config", config_b.to_str().unwrap()];
    let b = Flintd::start_with(&data_b, &sock_b, &s3, "etcd", &args_b);
    let host = |sock: &Path| flint_json(sock, &["health"])["host"].as_str().unwrap().to_string();
    let (host_a, host_b) = (host(&sock_a), host(&sock_b));

    a_claim_and_a_hibernation_are_kept_in_etcd(&etcd, &sock_a, &host_a);
    // A wakes it again and runs past the hibernation; B is refused while A's host lease lives.
    assert_eq!(sh(&sock_a, "e1", "echo after > /tmp/later; cat /tmp/state"), "hibernated");
    let out = flint(&sock_b, &["exec", "e1", "--", "/bin/true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HTTP 409") && err.contains(&format!("is held by host `{host_a}`")), "{out:?}");
    let vm = session(&sock_a, "e1")["vm"].as_str().unwrap().to_string();
    let pid = vm_detail(&sock_a, &vm)["pid"].as_i64().expect("the VM's pid");

    proxy.cut();
    let cut = Instant::now();
    let mut paused_at = None;
    let woken = loop {
        assert!(cut.elapsed() < Duration::from_secs(300), "B never woke the session");
        let state = proc_state(pid);
        if state.as_deref() == Some("T") {
            paused_at.get_or_insert(cut.elapsed());
        }
        let out = flint(&sock_b, &["exec", "e1", "--", "/bin/sh", "-c", "cat /tmp/state; cat /tmp/later || true"]);
        if out.status.success() {
            // B's wake began after A's VM was seen paused, and A's VM is paused or gone still.
            assert!(paused_at.is_some(), "B woke the session before A's VM (pid {pid}) was seen paused");
            let now = proc_state(pid);
            assert!(matches!(now.as_deref(), Some("T") | None), "A's VM runs beside B's: state {now:?}");
            break String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("HTTP 409") && err.contains("is held by host"), "B's wake failed otherwise: {err}");
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("A paused its VM {paused_at:?} after the cut; B woke the session {:?} after it", cut.elapsed());
    assert_eq!(woken, "hibernated", "the last hibernation, and nothing A did after it");
    let keys = etcd.get_prefix("/flint/").expect("etcd answers");
    assert_eq!(keys.get("/flint/owners/e1"), Some(&host_b), "B's claim: {keys:?}");
    assert!(!keys.contains_key(&format!("/flint/hosts/{host_a}")), "A's registration ended with its lease");

    proxy.heal();
    the_reconnected_host_stops_its_vm_and_registers_again(&etcd, &sock_a, pid, &host_a, "e1");
    let h = flint_json(&sock_b, &["session", "hibernate", "e1"]);
    assert_eq!(h["base"], "e1.h2.e3", "A created (1) and woke (2) it, B took it over (3): {h}");
    flint_json(&sock_b, &["session", "rm", "e1"]);
    let keys = etcd.get_prefix("/flint/").expect("etcd answers");
    assert!(keys.keys().all(|k| k.starts_with("/flint/hosts/")), "only host registrations are left: {keys:?}");
    assert!(flint_json(&sock_b, &["vm", "ls"]).as_array().unwrap().is_empty());
    drop((a, b));
}

/// A, back in touch with etcd, finds its lease gone: it stops its VM (`pid`) of session `id`, records why, is refused
/// while B holds the session, and registers again.
fn the_reconnected_host_stops_its_vm_and_registers_again(
    etcd: &flint_tests::EtcdServer,
    sock_a: &Path,
    pid: i64,
    host_a: &str,
    id: &str,
) {
    let healed = Instant::now();
    while proc_state(pid).is_some() {
        assert!(healed.elapsed() < Duration::from_secs(120), "A never stopped its VM after reconnecting");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The VM is killed first, the record written once the session's operation lock is free: wait for it.
    let on_a = wait_state(sock_a, id, "failed", Duration::from_secs(120));
    assert!(on_a["error"].as_str().unwrap_or("").contains("etcd lease ended"), "{on_a}");
    let out = flint(sock_a, &["session", "hibernate", id]);
    assert!(!out.status.success(), "A's late hibernation is refused: {out:?}");
    let out = flint(sock_a, &["session", "wake", id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HTTP 409") && err.contains("is held by host"), "A's wake while B holds it: {out:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !etcd.get_prefix("/flint/hosts/").unwrap_or_default().contains_key(&format!("/flint/hosts/{host_a}")) {
        assert!(Instant::now() < deadline, "A never registered again");
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = String::from_utf8_lossy(&flint(sock_a, &["metrics"]).stdout).into_owned();
    for m in ["flint_session_lease_freezes_total 1", "flint_session_lease_fences_total 1"] {
        assert!(metrics.contains(m), "{m}: {metrics}");
    }
}

/// #29: a flintd that stops (SIGSTOP here; a crash or a hang alike) cannot pause its VMs, and its VMs outlive it by
/// design. Each session VM of a cluster host arms a dead man's switch: a fence file whose deadline flintd moves after
/// every successful etcd keep-alive. Past it the VMM holds its own vCPUs, before another host may wake the session.
/// When flintd runs again it learns its lease ended, stops the VM and records why; its late hibernation is refused.
#[test]
fn a_stopped_flintd_s_session_vm_holds_itself_before_another_host_wakes_it() {
    let s3 = S3Server::start();
    let etcd = flint_tests::EtcdServer::start();
    let work = TempDir::new("flintd-sigstop");
    let (data_a, data_b) = (work.path().join("a"), work.path().join("b"));
    let _reap_a = KillVmmsUnder(data_a.clone());
    let _reap_b = KillVmmsUnder(data_b.clone());
    let (sock_a, sock_b) = (work.path().join("a.sock"), work.path().join("b.sock"));
    let cluster = format!(
        "[sessions]\ntick_ms = 200\n[cluster]\netcd = [\"{}\"]\nlease_ttl_s = 6\npause_margin_ms = 1500\n\
         etcd_timeout_ms = 1000\n",
        etcd.url()
    );
    let (config_a, config_b) = (work.path().join("a.toml"), work.path().join("b.toml"));
    std::fs::write(&config_a, &cluster).unwrap();
    std::fs::write(&config_b, format!("{cluster}[jail]\nuid_base = 970000\nuid_count = 1000\n")).unwrap();
    flint_tests::import_golden(&data_a, &s3, "stop", "gold", None);
    let args_a = ["--allow-unauthenticated-bucket", "--config", config_a.to_str().unwrap()];
    let a = Flintd::start_with(&data_a, &sock_a, &s3, "stop", &args_a);
    let args_b = ["--allow-unauthenticated-bucket", "--config", config_b.to_str().unwrap()];
    let b = Flintd::start_with(&data_b, &sock_b, &s3, "stop", &args_b);

    flint_json(&sock_a, &["session", "create", "--snapshot", "gold", "--id", "z1", "--idle-timeout", "3600"]);
    sh(&sock_a, "z1", "echo hibernated > /tmp/state");
    flint_json(&sock_a, &["session", "hibernate", "z1"]);
    assert_eq!(sh(&sock_a, "z1", "echo after > /tmp/later; cat /tmp/state"), "hibernated");
    let vm = session(&sock_a, "z1")["vm"].as_str().unwrap().to_string();
    let detail = vm_detail(&sock_a, &vm);
    let pid = detail["pid"].as_i64().expect("the VM's pid");
    let log = Path::new(detail["dir"].as_str().unwrap()).join("vmm.log");
    let held = || std::fs::read_to_string(&log).unwrap_or_default().contains("vCPUs held");
    assert!(!held(), "the VM runs while its host renews its lease");

    let flintd_a = a.child.id() as i32;
    // SAFETY: kill(2) on the flintd this test started.
    unsafe { libc::kill(flintd_a, libc::SIGSTOP) };
    let stopped = Instant::now();
    let woken = loop {
        assert!(stopped.elapsed() < Duration::from_secs(300), "B never woke the session");
        let out = flint(&sock_b, &["exec", "z1", "--", "/bin/sh", "-c", "cat /tmp/state; cat /tmp/later || true"]);
        if out.status.success() {
            assert!(held(), "B woke the session while A's VMM (pid {pid}) still ran its vCPUs");
            break String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("HTTP 409") && err.contains("is held by host"), "B's wake failed otherwise: {err}");
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("B woke the session {:?} after A's flintd stopped", stopped.elapsed());
    assert_eq!(woken, "hibernated", "the last hibernation, and nothing A did after it");

    // SAFETY: as above.
    unsafe { libc::kill(flintd_a, libc::SIGCONT) };
    let resumed = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z")
    {
        assert!(resumed.elapsed() < Duration::from_secs(120), "A never stopped its VM once running again");
        std::thread::sleep(Duration::from_millis(100));
    }
    let on_a = wait_state(&sock_a, "z1", "failed", Duration::from_secs(120));
    assert!(on_a["error"].as_str().unwrap_or("").contains("etcd lease ended"), "{on_a}");
    assert!(!flint(&sock_a, &["session", "hibernate", "z1"]).status.success(), "A's late hibernation is refused");
    flint_json(&sock_b, &["session", "rm", "z1"]);
    let keys = etcd.get_prefix("/flint/").expect("etcd answers");
    assert!(keys.keys().all(|k| k.starts_with("/flint/hosts/")), "only host registrations are left: {keys:?}");
    drop((a, b));
}

/// #29: an etcd outage is a pause, not a fleet outage. With two of three etcd members gone (no quorum), creates
/// answer 503; the host's session VM holds at its lease's end (its fence) and flintd pauses it; when quorum returns
/// the host's lease turns out alive, and the same VM runs on, with nothing lost and nothing fenced.
#[test]
fn an_etcd_without_quorum_pauses_session_vms_and_quorum_back_resumes_them() {
    let s3 = S3Server::start();
    let mut etcd = flint_tests::EtcdServer::start_cluster(3);
    let work = TempDir::new("flintd-quorum");
    let data = work.path().join("a");
    let _reap = KillVmmsUnder(data.clone());
    let sock = work.path().join("a.sock");
    let config = work.path().join("a.toml");
    std::fs::write(
        &config,
        format!(
            "[sessions]\ntick_ms = 200\n[cluster]\netcd = [{}]\nlease_ttl_s = 6\npause_margin_ms = 1500\n\
             etcd_timeout_ms = 1000\n",
            etcd.urls_toml()
        ),
    )
    .unwrap();
    flint_tests::import_golden(&data, &s3, "quorum", "gold", None);
    let args = ["--allow-unauthenticated-bucket", "--config", config.to_str().unwrap()];
    let a = Flintd::start_with(&data, &sock, &s3, "quorum", &args);
    flint_json(&sock, &["session", "create", "--snapshot", "gold", "--id", "q1", "--idle-timeout", "3600"]);
    assert_eq!(sh(&sock, "q1", "echo kept > /tmp/marker; cat /tmp/marker"), "kept");
    let vm = session(&sock, "q1")["vm"].as_str().unwrap().to_string();
    let detail = vm_detail(&sock, &vm);
    let log = Path::new(detail["dir"].as_str().unwrap()).join("vmm.log");
    let log_has = |what: &str| std::fs::read_to_string(&log).unwrap_or_default().contains(what);

    etcd.stop_member(1);
    etcd.stop_member(2);
    let lost = Instant::now();
    while !log_has("vCPUs held") {
        assert!(lost.elapsed() < Duration::from_secs(120), "the VM never held without etcd's quorum");
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("the VM held {:?} after quorum was lost", lost.elapsed());
    let out = flint(&sock, &["session", "create", "--snapshot", "gold", "--id", "q2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("HTTP 503") && err.contains("etcd"),
        "create without quorum: {out:?}"
    );

    etcd.start_member(1);
    etcd.start_member(2);
    let back = Instant::now();
    while !log_has("vCPUs released") {
        assert!(back.elapsed() < Duration::from_secs(120), "the VM never ran again once quorum was back");
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("the VM ran again {:?} after quorum was back", back.elapsed());
    // flintd's own pause is lifted too (its tick resumes the VM once the lease is current).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = flint(&sock, &["exec", "q1", "--", "cat", "/tmp/marker"]);
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kept");
            break;
        }
        assert!(Instant::now() < deadline, "the session never answered again: {out:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = session(&sock, "q1");
    assert_eq!((s["state"].as_str(), s["vm"].as_str()), (Some("running"), Some(vm.as_str())), "the same VM: {s}");
    let metrics = String::from_utf8_lossy(&flint(&sock, &["metrics"]).stdout).into_owned();
    assert!(metrics.contains("flint_session_lease_fences_total 0"), "nothing was fenced: {metrics}");
    flint_json(&sock, &["session", "rm", "q1"]);
    drop(a);
}

/// #29: a router in front of two hosts of an etcd cluster, driven by `flint --url` with mutual TLS. New sessions
/// are placed on registered hosts; calls naming a session reach its holder; a hibernated session wakes on the host
/// that hibernated it; lists merge every host's. When a host dies (flintd and its VMMs killed), its sessions wake on
/// the other host through the router once its lease is over, from their last hibernation.
#[test]
fn a_router_places_and_routes_sessions_and_wakes_them_elsewhere_when_a_host_dies() {
    let s3 = S3Server::start();
    let etcd = flint_tests::EtcdServer::start();
    let work = TempDir::new("flintd-router");
    let certs = flint_tests::FleetCerts::make(work.path());
    let mut hosts: Vec<RoutedHost> = ["a", "b"]
        .into_iter()
        .enumerate()
        .map(|(i, name)| RoutedHost::start(work.path(), &s3, &etcd, &certs, (i, name), None))
        .collect();
    let via = flint_tests::FleetRouter::start(work.path(), "router", &[etcd.url()], &certs, 0);
    via.wait_for_hosts(2);
    // Without a client certificate the router lets nobody in.
    let out = Command::new(bin_dir().join("flint"))
        .args(["--url", &via.url, "--ca", via.ca.to_str().unwrap(), "host", "ls"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a caller without a client certificate was served: {out:?}");

    let owner = |id: &str| etcd_owner(&etcd, id);
    let ids = ["r1", "r2", "r3", "r4"];
    for id in ids {
        via.json(&["session", "create", "--snapshot", "gold", "--id", id, "--idle-timeout", "3600"]);
        let o = owner(id).expect("an owner key");
        let h = hosts.iter().find(|h| h.id == o).expect("the owner is a registered host");
        assert_eq!(session(&h.sock, id)["state"], "running", "{id} runs where its owner key says");
        let out = via.run(&["exec", id, "--", "/bin/sh", "-c", &format!("echo {id} > /tmp/id; cat /tmp/id")]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id, "{out:?}");
    }
    let listed = via.json(&["session", "ls"]);
    assert_eq!(listed.as_array().unwrap().len(), 4, "the router merges both hosts' lists: {listed}");
    a_drained_hosts_sessions_wake_and_new_ones_are_placed_elsewhere(&via, &etcd, &hosts);
    let before = a_hibernated_session_wakes_on_the_host_that_hibernated_it(&via, &etcd, "r2");

    // The host holding r2 dies with its VMs; the router wakes r2 on the other host once the lease is over.
    let victim = hosts.iter().position(|h| h.id == before).unwrap();
    let survivor = 1 - victim;
    hosts[victim].kill(work.path());
    let killed = Instant::now();
    let woken = loop {
        assert!(killed.elapsed() < Duration::from_secs(180), "r2 never woke on the surviving host");
        let out = via.run(&["exec", "r2", "--", "cat", "/tmp/id"]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("r2 woke on the surviving host {:?} after its host was killed", killed.elapsed());
    assert_eq!(woken, "r2", "from its last hibernation");
    assert_eq!(owner("r2").as_deref(), Some(hosts[survivor].id.as_str()));
    let reg = etcd.get_prefix("/flint/hosts/").unwrap();
    assert!(!reg.contains_key(&format!("/flint/hosts/{}", hosts[victim].id)), "the dead host's registration expired");
    let metrics = String::from_utf8_lossy(&via.run(&["metrics"]).stdout).into_owned();
    assert!(metrics.contains("flint_router_placed_total"), "{metrics}");

    // Every session ends through the router, wherever it was; nothing is left on the survivor or in etcd.
    for id in ids.iter().chain(&["r5"]) {
        let out = via.run(&["session", "rm", id]);
        assert!(out.status.success(), "rm {id}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(flint_json(&hosts[survivor].sock, &["vm", "ls"]).as_array().unwrap().is_empty());
    let keys = etcd.get_prefix("/flint/").unwrap();
    assert!(keys.keys().all(|k| k.starts_with("/flint/hosts/")), "only host registrations are left: {keys:?}");
}

/// #29 on a real network: a `fabric` namespace (bridge, etcd, S3 server, router) and one namespace per flintd.
/// A session created through the router, with port 8080 exposed, serves its guest's page through the router's
/// front end (the holder checks the token), is hibernated and woken on its host; that host's cable is then pulled
/// (its bridge port down: it reaches neither etcd, nor S3, nor the router). Its flintd pauses the VM by itself
/// before its lease can have ended; past the lease the router wakes the session on the other host from its last
/// hibernation, and its front end serves the page from there. Reconnected, the cut host stops its VM and its late commit is refused. The hosts' VM lists and the
/// owner keys never show the session running on two hosts; nothing is left afterwards.
#[test]
fn a_host_cut_off_the_fabric_loses_its_session_to_the_other_host_and_is_fenced() {
    let fabric = flint_tests::Fabric::new("fabric", 2);
    fabric.ns.enter(|| cut_host_flow(&fabric));
}

/// The fabric test's body, on a thread in the fabric namespace (the servers it starts run there).
fn cut_host_flow(fabric: &flint_tests::Fabric) {
    use flint_tests::Fabric;
    let s3 = S3Server::start_on(Fabric::IP);
    let etcd = flint_tests::EtcdServer::start_cluster_on(1, Fabric::IP);
    let work = TempDir::new("flintd-fabric");
    let ips: Vec<String> = (0..2).map(Fabric::host_ip).collect();
    let certs = flint_tests::FleetCerts::make_for(work.path(), &[&ips[0], &ips[1]]);
    let hosts: Vec<RoutedHost> = ["a", "b"]
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let at = (fabric.hosts[i].path(), ips[i].as_str());
            RoutedHost::start(work.path(), &s3, &etcd, &certs, (i, name), Some((&at.0, at.1)))
        })
        .collect();
    let front = ["--front-listen".to_string(), ROUTER_FRONT.to_string()];
    let via = flint_tests::FleetRouter::start_with(work.path(), "router", &etcd.urls(), &certs, 0, &front);
    via.wait_for_hosts(2);
    let exec = |script: &str| via.run(&["exec", "f1", "--", "/bin/sh", "-c", script]);
    let f1 = ["--snapshot", "gold", "--id", "f1", "--idle-timeout", "3600", "--expose", "8080:auto"];
    let created = via.json(&[&["session", "create"][..], &f1].concat());
    let token = created["network"]["ports"]["8080"]["token"].as_str().expect("the port's token").to_string();
    let serve =
        "echo hibernated > /tmp/marker && mkdir -p /www && cp /tmp/marker /www/index.html && httpd -p 8080 -h /www";
    assert!(exec(serve).status.success());
    assert_eq!(through_the_routers_front_end(&token), (200, "hibernated".into()), "the guest's port, by the router");
    assert_eq!(through_the_routers_front_end("not-the-token").0, 401, "the holder checks the token");
    via.json(&["session", "hibernate", "f1"]);
    let out = exec("echo after > /tmp/later; cat /tmp/marker");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hibernated", "{out:?}");
    let x = hosts.iter().position(|h| Some(&h.id) == etcd_owner(&etcd, "f1").as_ref()).expect("an owner");
    let pid = vm_detail(&hosts[x].sock, session(&hosts[x].sock, "f1")["vm"].as_str().unwrap())["pid"]
        .as_i64()
        .expect("the VM's pid");
    assert_eq!(running_on(&hosts, &etcd, "f1"), vec![x]);

    fabric.cut(x);
    let woken = wake_through_the_router_after_a_cut(&exec, &hosts, &etcd, pid);
    assert_eq!(woken, "hibernated", "the last hibernation, and nothing the cut host did after it");
    assert_eq!(running_on(&hosts, &etcd, "f1"), vec![1 - x]);
    assert_eq!(through_the_routers_front_end(&token), (200, "hibernated".into()), "served by the other host now");

    fabric.heal(x);
    the_reconnected_host_stops_its_vm_and_registers_again(&etcd, &hosts[x].sock, pid, &hosts[x].id, "f1");
    assert_eq!(running_on(&hosts, &etcd, "f1"), vec![1 - x]);
    via.json(&["session", "hibernate", "f1"]);
    via.json(&["session", "rm", "f1"]);
    for h in &hosts {
        assert!(flint_json(&h.sock, &["vm", "ls"]).as_array().unwrap().is_empty(), "VMs left on {}", h.id);
    }
    let keys = etcd.get_prefix("/flint/").unwrap();
    assert!(keys.keys().all(|k| k.starts_with("/flint/hosts/")), "only host registrations are left: {keys:?}");
}

/// Where a fabric host's front end for routers listens (each host has a namespace of its own).
const HOST_FRONT_PORT: u16 = 7444;
/// The fabric router's front end for exposed ports.
const ROUTER_FRONT: &str = "127.0.0.1:18580";

/// `GET /` of session f1's port 8080 through the router's front end with `token`: (status, body).
fn through_the_routers_front_end(token: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(ROUTER_FRONT).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let req =
        format!("GET / HTTP/1.1\r\nHost: 8080-f1.flint.localhost\r\nflint-token: {token}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut all = String::new();
    let _ = s.read_to_string(&mut all);
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    (head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), body.trim().to_string())
}

/// After host cut off the fabric: retries `exec` (through the router) until the session answers elsewhere, checking
/// on every attempt that it never runs on two hosts, and that the cut host's VM (`pid`) was paused (seen by a
/// sampler every 20 ms) before. The output of the exec that answered.
fn wake_through_the_router_after_a_cut(
    exec: &dyn Fn(&str) -> Output,
    hosts: &[RoutedHost],
    etcd: &flint_tests::EtcdServer,
    pid: i64,
) -> String {
    let cut = Instant::now();
    let paused_at = std::sync::Mutex::new(None);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if proc_state(pid).as_deref() == Some("T") {
                    paused_at.lock().unwrap().get_or_insert(cut.elapsed());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let woken = loop {
            if cut.elapsed() > Duration::from_secs(300) {
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                panic!("the router never woke the session on the other host");
            }
            let running = running_on(hosts, etcd, "f1");
            assert!(running.len() <= 1, "f1 runs on hosts {running:?} at once");
            let out = exec("cat /tmp/marker; cat /tmp/later || true");
            if out.status.success() {
                let paused = *paused_at.lock().unwrap();
                assert!(paused.is_some(), "f1 woke elsewhere before the cut host's VM (pid {pid}) was seen paused");
                assert!(matches!(proc_state(pid).as_deref(), Some("T") | None), "the cut host's VM runs still");
                println!(
                    "the cut host paused its VM {paused:?} after the cut; f1 answered elsewhere {:?} after it",
                    cut.elapsed()
                );
                break String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
            println!("{:?} after the cut: {}", cut.elapsed(), String::from_utf8_lossy(&out.stderr).trim());
            std::thread::sleep(Duration::from_millis(200));
        };
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        woken
    })
}

/// The hosts (indexes) on which session `id` runs: its host's record says running and its VM's process runs (is
/// not stopped). Any running host must be the one the owner key names.
fn running_on(hosts: &[RoutedHost], etcd: &flint_tests::EtcdServer, id: &str) -> Vec<usize> {
    let running: Vec<usize> = (0..hosts.len())
        .filter(|&i| {
            let out = flint(&hosts[i].sock, &["--json", "session", "get", id]);
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let Some(vm) = s["vm"].as_str().filter(|_| s["state"] == "running") else { return false };
            let out = flint(&hosts[i].sock, &["--json", "vm", "get", vm]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            v["pid"].as_i64().and_then(proc_state).is_some_and(|st| st != "T")
        })
        .collect();
    if let [i] = running[..] {
        let owner = etcd_owner(etcd, id);
        assert!(
            owner.is_none() || owner.as_deref() == Some(hosts[i].id.as_str()),
            "{id} runs on a host that is not its owner {owner:?}"
        );
    }
    running
}

/// The host whose owner key in etcd names session `id`, if any.
fn etcd_owner(etcd: &flint_tests::EtcdServer, id: &str) -> Option<String> {
    etcd.get_prefix(&format!("/flint/owners/{id}")).unwrap().into_values().next()
}

/// One flintd of the router test's etcd cluster.
struct RoutedHost {
    id: String,
    sock: PathBuf,
    flintd: Option<Flintd>,
    reap: KillVmmsUnder,
}

impl RoutedHost {
    /// Host `name` (the `i`th), with its cluster listener on mutual TLS; the first publishes the golden snapshot.
    /// On loopback, or in network namespace `at.0` on its address `at.1`.
    fn start(
        work: &Path,
        s3: &S3Server,
        etcd: &flint_tests::EtcdServer,
        certs: &flint_tests::FleetCerts,
        (i, name): (usize, &str),
        at: Option<(&Path, &str)>,
    ) -> RoutedHost {
        let p = |x: &Path| x.to_str().unwrap().to_string();
        let data = work.join(name);
        let reap = KillVmmsUnder(data.clone());
        let sock = work.join(format!("{name}.sock"));
        let port = flint_tests::free_port();
        let ip = at.map_or("127.0.0.1", |a| a.1);
        // In a namespace of its own a host has sandbox networks, and a front end for the router's.
        let (front, net) = match at {
            Some(_) => (format!("front_listen = \"{ip}:{HOST_FRONT_PORT}\"\n"), "[network]\npool = \"10.77.0.0/24\"\n"),
            None => (String::new(), ""),
        };
        let config = work.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[sessions]\ntick_ms = 200\n[cluster]\netcd = [\"{}\"]\nlease_ttl_s = 6\npause_margin_ms = 1500\n\
                 etcd_timeout_ms = 1000\nlisten = \"{ip}:{port}\"\nadvertise = \"https://{ip}:{port}\"\n{front}\
                 tls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\n[jail]\nuid_base = {}\nuid_count = 1000\n{net}",
                etcd.url(),
                p(&certs.server_cert),
                p(&certs.server_key),
                p(&certs.ca),
                960000 + i * 10000,
            ),
        )
        .unwrap();
        if i == 0 {
            // Published to the bucket: the other host restores it from there.
            flint_tests::import_golden(&data, s3, "router", "gold", None);
        }
        let args = ["--allow-unauthenticated-bucket", "--config", config.to_str().unwrap()];
        let d = Flintd::start_full(&data, &sock, Some((s3, "router")), &args, at.map(|a| a.0));
        let id = flint_json(&sock, &["health"])["host"].as_str().unwrap().to_string();
        RoutedHost { id, sock, flintd: Some(d), reap }
    }

    /// kill -9 of flintd and its VMMs.
    fn kill(&mut self, work: &Path) {
        let mut d = self.flintd.take().unwrap();
        d.child.kill().unwrap();
        d.child.wait().unwrap();
        std::mem::forget(d); // its Drop would signal a dead pid
        drop(std::mem::replace(&mut self.reap, KillVmmsUnder(work.join("none"))));
    }
}

/// Draining the host of `r3` hibernates its running sessions; the router wakes them, and places new ones (`r5`),
/// elsewhere; then the host is undrained.
fn a_drained_hosts_sessions_wake_and_new_ones_are_placed_elsewhere(
    via: &flint_tests::FleetRouter,
    etcd: &flint_tests::EtcdServer,
    hosts: &[RoutedHost],
) {
    let owner = |id: &str| etcd_owner(etcd, id);
    let drained = owner("r3").unwrap();
    let other = hosts.iter().find(|h| h.id != drained).unwrap().id.clone();
    let r = via.json(&["host", "drain", &drained]);
    assert!(r["hibernated"].as_array().unwrap().iter().any(|x| x == "r3"), "{r}");
    assert_eq!(owner("r3"), None, "{r}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !via.json(&["host", "ls"]).as_array().unwrap().iter().any(|h| h["host"] == drained && h["draining"] == true) {
        assert!(Instant::now() < deadline, "the router never saw the drain");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = via.run(&["exec", "r3", "--", "cat", "/tmp/id"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "r3", "{out:?}");
    assert_eq!(owner("r3"), Some(other.clone()), "woken on the host that is not draining");
    via.json(&["session", "create", "--snapshot", "gold", "--id", "r5", "--idle-timeout", "3600"]);
    assert_eq!(owner("r5"), Some(other.clone()), "placed on the host that is not draining");
    let r = via.json(&["host", "undrain", &drained]);
    assert_eq!(r["draining"], false, "{r}");
}

/// A hibernated session (`id`, which may have been hibernated by a drain) wakes on the host that hibernated it,
/// whose cache is warm. That host.
fn a_hibernated_session_wakes_on_the_host_that_hibernated_it(
    via: &flint_tests::FleetRouter,
    etcd: &flint_tests::EtcdServer,
    id: &str,
) -> String {
    assert!(via.run(&["exec", id, "--", "true"]).status.success());
    let before = etcd_owner(etcd, id).unwrap();
    via.json(&["session", "hibernate", id]);
    assert_eq!(etcd_owner(etcd, id), None, "a hibernated session has no owner");
    let out = via.run(&["exec", id, "--", "cat", "/tmp/id"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id, "{out:?}");
    assert_eq!(etcd_owner(etcd, id), Some(before.clone()), "woken where its cache is warm");
    before
}

/// One mapping's page accounting from /proc/PID/smaps, in KiB.
#[derive(Debug, Default)]
struct Smaps {
    inode: String,
    rss: u64,
    pss: u64,
    shared: u64,
    private: u64,
}

/// The mapping of a file under `dir` in process `pid`.
fn file_mapping(pid: i64, dir: &Path) -> Option<Smaps> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let needle = dir.display().to_string();
    let mut out: Option<Smaps> = None;
    let mut in_it = false;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first().is_some_and(|f| f.contains('-') && !f.ends_with(':')) {
            in_it = fields.get(5).is_some_and(|p| p.starts_with(&needle));
            if in_it {
                out = Some(Smaps { inode: format!("{} {}", fields[3], fields[4]), ..Default::default() });
            }
            continue;
        }
        let (Some(m), true) = (out.as_mut(), in_it) else { continue };
        let kb = fields.get(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match fields.first().copied() {
            Some("Rss:") => m.rss += kb,
            Some("Pss:") => m.pss += kb,
            Some("Shared_Clean:") | Some("Shared_Dirty:") => m.shared += kb,
            Some("Private_Clean:") | Some("Private_Dirty:") => m.private += kb,
            _ => {}
        }
    }
    out
}

/// Ten eager clones of one snapshot map one memory file copy-on-write (no copy per clone): they all map the same
/// inode, each shares pages with the others, and their memory's total PSS is at most the file's pages in the page
/// cache plus each clone's own (private) pages. Deleting the snapshot removes the file; the clones run on.
#[test]
fn eager_clones_share_one_memory_file() {
    let s3 = S3Server::start();
    let work = TempDir::new("flintd-shared");
    let data = work.path().join("data");
    let _reap = KillVmmsUnder(data.clone());
    let socket = work.path().join("flintd.sock");
    flint_tests::import_golden(&data, &s3, "shared", "gold", None);
    let _d = Flintd::start(&data, &socket, &s3, "shared");
    let clones = flint_json(&socket, &["clone", "--snapshot", "gold", "-n", "10"]);
    let ids: Vec<String> = clones.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 10);
    // The golden guest's counter wakes every second (~0.1 of a core of emulated kernel here each): ten of them
    // running take about a core of an emulating host's two, and an exec could starve past the agent's call
    // timeout. The other eight are paused (their mappings are what is measured, and a paused VM keeps them).
    for id in &ids[2..] {
        flint_json(&socket, &["vm", "pause", id]);
    }
    // Two of them write (an exec costs seconds here); every one must map the file, not a copy of its own.
    for id in &ids[..2] {
        assert_eq!(sh(&socket, id, "echo $((6*7)) > /tmp/x; cat /tmp/x"), "42");
    }
    for id in &ids {
        assert!(!data.join("vms").join(id).join("memory").exists(), "{id} has its own copy of the memory image");
    }
    let shared_dir = data.join("shared");
    let of_kind = |ext: &str| -> Vec<PathBuf> {
        let all = std::fs::read_dir(&shared_dir).unwrap().flatten().map(|e| e.path());
        all.filter(|p| p.is_file() && p.extension().is_some_and(|e| e == ext)).collect()
    };
    let files = of_kind("memory");
    assert_eq!(files.len(), 1, "one memory file for the snapshot: {files:?}");
    // And one state file, which every restore reads (none copied into a VM's directory).
    let states = of_kind("state");
    assert_eq!(states.len(), 1, "one state file for the snapshot: {states:?}");
    assert!(ids.iter().all(|id| !data.join("vms").join(id).join("state").exists()), "a VM has its own state copy");
    let maps: Vec<Smaps> = ids
        .iter()
        .map(|id| {
            let pid = vm_detail(&socket, id)["pid"].as_i64().unwrap();
            file_mapping(pid, &shared_dir).unwrap_or_else(|| panic!("{id}: no mapping of {}", shared_dir.display()))
        })
        .collect();
    println!("{maps:#?}");
    assert!(maps.iter().all(|m| m.inode == maps[0].inode), "every clone maps the same file");
    assert!(maps.iter().all(|m| m.shared > 0), "each clone shares pages with the others");
    let cached_kb = {
        let out = Command::new("fincore").args(["-b", "-n", "-o", "RES"]).arg(&files[0]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap() / 1024
    };
    let pss: u64 = maps.iter().map(|m| m.pss).sum();
    let rss: u64 = maps.iter().map(|m| m.rss).sum();
    let private: u64 = maps.iter().map(|m| m.private).sum();
    println!(
        "10 clones: memory PSS {pss} KiB, RSS {rss} KiB, private {private} KiB, file in page cache {cached_kb} KiB"
    );
    assert!(pss <= cached_kb + private, "PSS {pss} KiB > shared file pages {cached_kb} + private {private} KiB");
    assert!(pss < rss, "no page is shared: PSS {pss} = RSS {rss}");
    flint_json(&socket, &["snapshot", "rm", "gold"]);
    assert!(!files[0].exists() && !states[0].exists(), "the snapshot's memory and state files went with it");
    for id in &ids[..2] {
        assert_eq!(sh(&socket, id, "cat /tmp/x"), "42", "{id} runs on after its file was deleted");
    }
}

/// The internet for the networking test: a namespace with HTTP servers on several addresses and a DNS server.
struct World {
    ns: flint_tests::TestNetns,
}

const WORLD_DNS: &str = "198.51.100.53";

impl World {
    /// `world` ⟷ `host` by a veth pair. The host's LAN is 203.0.113.0/24: host 203.0.113.2 (default route to
    /// the world's router .1), another machine of the LAN at .20. The "internet" behind the router: 198.51.100.10,
    /// .11, .12 and a DNS server at .53; private services at 10.1.2.3 and 100.100.100.200 (Alibaba Cloud's
    /// metadata address), and 169.254.169.254: all of them reachable from the host itself.
    fn new(host: &flint_tests::TestNetns) -> World {
        let ns = flint_tests::TestNetns::new("world");
        let veth = format!("fw{}", std::process::id() % 100_000);
        host.ip(&["link", "add", "up0", "type", "veth", "peer", "name", &veth]);
        host.ip(&["link", "set", &veth, "netns", &ns.name]);
        host.ip(&["addr", "add", "203.0.113.2/24", "dev", "up0"]);
        host.ip(&["link", "set", "up0", "up"]);
        host.ip(&["route", "add", "default", "via", "203.0.113.1"]);
        for a in [
            "203.0.113.1/24",
            "203.0.113.20/32",
            "198.51.100.10/32",
            "198.51.100.11/32",
            "198.51.100.12/32",
            "198.51.100.53/32",
            "10.1.2.3/32",
            "100.100.100.200/32",
            "169.254.169.254/32",
        ] {
            ns.ip(&["addr", "add", a, "dev", &veth]);
        }
        ns.ip(&["link", "set", &veth, "up"]);
        host.ip(&["route", "add", "169.254.169.254/32", "via", "203.0.113.1"]);
        let w = World { ns };
        for (ip, body) in [
            ("198.51.100.10", "world-10"),
            ("198.51.100.11", "world-11"),
            ("198.51.100.12", "world-12"),
            ("203.0.113.20", "lan-machine"),
            ("10.1.2.3", "private-service"),
            ("100.100.100.200", "alibaba-metadata"),
            ("169.254.169.254", "metadata"),
        ] {
            let l = w.ns.enter(move || std::net::TcpListener::bind((ip, 80)).unwrap());
            std::thread::spawn(move || serve_http(l, body));
        }
        let dns = w.ns.enter(|| std::net::UdpSocket::bind((WORLD_DNS, 53)).unwrap());
        std::thread::spawn(move || {
            use flint_supervisor::net::dns;
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = dns.recv_from(&mut buf) {
                let Some(q) = dns::parse_query(&buf[..n]) else { continue };
                let addrs: Vec<std::net::Ipv4Addr> = match (q.name.as_str(), q.qtype) {
                    ("allowed.test", 1) => vec!["198.51.100.10".parse().unwrap()],
                    ("denied.test", 1) => vec!["198.51.100.11".parse().unwrap()],
                    // An allowed name whose answer is private: a domain rule must not open it.
                    ("internal.allowed.test", 1) => vec!["10.1.2.3".parse().unwrap()],
                    _ => vec![],
                };
                let _ = dns.send_to(&dns::answer(&buf[..n], &addrs, 600), from);
            }
        });
        w
    }
}

/// Answers every request on `l` with `body` and closes.
fn serve_http(l: std::net::TcpListener, body: &'static str) {
    use std::io::{Read, Write};
    for mut c in l.incoming().flatten() {
        let mut buf = [0u8; 2048];
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = c.read(&mut buf);
        let _ = write!(c, "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    }
}

/// The guest's HTTP GET of `url` (`http://IP[:PORT]/PATH`) with busybox nc: the body, or `FAILED`. A fetch that
/// should work may wait 90 s (a restored guest's first TCP connection costs 10 s and more of emulated kernel time here);
/// one that should fail waits 5 s (a dropped SYN is never answered). Debian's static busybox wget crashes in
/// glibc's getaddrinfo (even for an address), hence nc.
fn guest_fetch(socket: &Path, id: &str, url: &str) -> String {
    guest_get(socket, id, url, 90)
}

fn guest_blocked(socket: &Path, id: &str, url: &str) -> bool {
    let got = guest_get(socket, id, url, 5);
    assert_eq!(got, "FAILED", "{id} reached {url}");
    true
}

fn guest_get(socket: &Path, id: &str, url: &str, wait_s: u32) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (ip, port) = hostport.split_once(':').unwrap_or((hostport, "80"));
    sh(socket, id, &format!("ip={ip}; {}", fetch_script(port, path, wait_s)))
}

/// `$ip` fetched: prints the body or FAILED.
fn fetch_script(port: &str, path: &str, wait_s: u32) -> String {
    format!(
        "out=$(printf 'GET /{path} HTTP/1.0\\r\\n\\r\\n' | nc -w {wait_s} $ip {port} 2>/dev/null | tr -d '\\r' | sed '1,/^$/d'); \
         [ -n \"$out\" ] && echo \"$out\" || echo FAILED"
    )
}

/// What the guest gets from `http://<name>/`, the name resolved through the guest's DNS (the VM's proxy) by
/// busybox nslookup, or `FAILED`.
fn guest_fetch_name(socket: &Path, id: &str, name: &str) -> String {
    sh(
        socket,
        id,
        &format!(
            "ip=$(nslookup {name} 2>/dev/null | sed -n 's/^Address: \\([0-9.]*\\)$/\\1/p' | head -n 1); \
             if [ -z \"$ip\" ]; then echo FAILED; else {}; fi",
            fetch_script("80", "", 90)
        ),
    )
}

/// An HTTP/1.1 request from inside namespace `ns` to `addr` with `headers`; (status, head, body chunks with the
/// time each arrived).
fn front_request(
    ns: &flint_tests::TestNetns,
    addr: &'static str,
    path: &str,
    headers: &[&str],
) -> (u16, String, Vec<(Duration, String)>) {
    use std::io::{Read, Write};
    let req = format!(
        "GET {path} HTTP/1.1\r\n{}connection: close\r\n\r\n",
        headers.iter().map(|h| format!("{h}\r\n")).collect::<String>()
    );
    ns.enter(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let start = Instant::now();
        let mut all = Vec::new();
        let mut chunks = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    chunks.push((start.elapsed(), String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
            }
        }
        let text = String::from_utf8_lossy(&all).into_owned();
        let (head, _) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, head.to_string(), chunks)
    })
}

/// Requests sent one after the other on one kept-alive connection to the front end (as a pooling proxy does):
/// each answer's status and body (Content-Length framed).
fn front_keepalive(ns: &flint_tests::TestNetns, addr: &'static str, requests: Vec<String>) -> Vec<(u16, String)> {
    use std::io::{Read, Write};
    ns.enter(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for req in requests {
            s.write_all(req.as_bytes()).unwrap();
            let mut chunk = [0u8; 4096];
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "the connection closed before an answer to {req:?}");
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a Content-Length");
            while buf.len() < end + len {
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0);
                buf.extend_from_slice(&chunk[..n]);
            }
            out.push((status, String::from_utf8_lossy(&buf[end..end + len]).trim().to_string()));
            buf.drain(..end + len);
        }
        out
    })
}

/// An HTTP/1.0 GET over a plain TCP forward (from inside `ns`): the body.
fn raw_tcp_get(ns: &flint_tests::TestNetns, addr: &'static str) -> String {
    use std::io::{Read, Write};
    ns.enter(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string()).unwrap_or(out)
    })
}

fn body_of(chunks: &[(Duration, String)]) -> String {
    let all: String = chunks.iter().map(|(_, c)| c.as_str()).collect();
    all.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// Per-VM networks on real guests (restored from the golden snapshot) with flintd in a network namespace the test
/// makes, whose uplink leads to a "world" namespace (HTTP servers, a DNS server): egress by IP and by name under
/// a default-deny policy, denied targets failing both ways, a policy change at run time; two clones with their own
/// addresses and MACs reaching the world at once; no way from a guest to the host's addresses, 169.254.169.254 or
/// another VM; a guest's busybox httpd through the front end by Host, by headers and by cookie, with a token,
/// a streamed (server-sent events) response arriving as it is written; a hibernated session woken by a request;
/// the network re-adopted after kill -9 of flintd; bad policies refused with nothing changed; nothing left after
/// the VMs are deleted.
#[test]
fn networks_egress_policy_isolation_and_exposed_ports() {
    let host = flint_tests::TestNetns::new("nethost");
    let world = World::new(&host);
    let work = TempDir::new("flintd-net");
    let data = work.path().join("data");
    let _reap = KillVmmsUnder(data.clone());
    let socket = work.path().join("flintd.sock");
    let config = work.path().join("flintd.toml");
    // Jail uids of its own: scripts/test.sh runs this test beside the rest of this suite.
    std::fs::write(
        &config,
        format!(
            "[network]\npool = \"10.77.0.0/24\"\nupstream_dns = \"{WORLD_DNS}:53\"\nfront_end = \"127.0.0.1:18480\"\n\
             tcp_ports = [18490, 18499]\nmax_rules = 8\n[sessions]\ntick_ms = 200\n\
             [jail]\nuid_base = 985000\nuid_count = 1000\n"
        ),
    )
    .unwrap();
    flint_tests::import_golden_local(&data, "gold");
    let args = ["--config", config.to_str().unwrap()];
    let mut d = Some(Flintd::start_full(&data, &socket, None, &args, Some(&host.path())));
    // A service on the host's own addresses (what a guest must never reach), reachable from the host itself.
    let host_svc = host.enter(|| std::net::TcpListener::bind(("0.0.0.0", 7777)).unwrap());
    std::thread::spawn(move || serve_http(host_svc, "host-service"));

    bad_policies_are_refused_and_make_nothing(&socket, &data);
    let clones = two_clones_get_their_own_addresses_and_reach_the_world(&socket);
    egress_never_reaches_the_host_metadata_private_networks_or_another_vm(&host, &socket, &clones);
    let fe = "127.0.0.1:18480";
    the_front_end_routes_by_host_headers_and_cookie_with_a_token_and_streams(&host, &socket, fe, &clones.b);
    tcp_forwards_and_a_request_that_wakes_a_hibernated_session(&host, &socket, fe, &clones);

    // kill -9 of flintd: the network is re-adopted (DNS proxy back, policy re-applied).
    let (a, b) = (&clones.a, &clones.b);
    let mut old = d.take().unwrap();
    old.child.kill().unwrap();
    let _ = old.child.wait();
    drop(old);
    d = Some(Flintd::start_full(&data, &socket, None, &args, Some(&host.path())));
    flint_json(&socket, &["net", "policy", a, "--default-deny", "--allow", "allowed.test"]);
    assert_eq!(guest_fetch_name(&socket, a, "allowed.test"), "world-10");
    assert!(guest_blocked(&socket, a, "http://198.51.100.12/"), "the changed policy closed it");
    assert_eq!(raw_tcp_get(&host, "127.0.0.1:18490"), "guest-page", "the TCP forward is back after the restart");

    // Everything goes with the VMs.
    flint(&socket, &["session", "rm", "web"]);
    flint(&socket, &["vm", "rm", a, b]);
    assert_eq!(flint_json(&socket, &["vm", "ls"]).as_array().map(|a| a.len()), Some(0));
    let left: Vec<_> = std::fs::read_dir(data.join("netns")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "network namespaces left: {left:?}");
    let links = host.ip(&["-o", "link"]);
    assert!(!links.contains("flv"), "veth ends left: {links}");
    drop(d);
    drop(world);
}

/// Bad policies: 400, and nothing made.
fn bad_policies_are_refused_and_make_nothing(socket: &Path, data: &Path) {
    for (body, want) in [
        (r#"{"snapshot":"gold","network":{"egress":{"allow":["10.0.0.1/8"]}}}"#, "host bits"),
        (r#"{"snapshot":"gold","network":{"egress":{"alow":[]}}}"#, "unknown field"),
        (
            r#"{"snapshot":"gold","network":{"egress":{"deny":["a.com","b.com","c.com","d.com","e.com","f.com","g.com","h.com","i.com"]}}}"#,
            "at most 8",
        ),
        (r#"{"snapshot":"gold","network":{"egress":{"allow":["::1"]}}}"#, "IPv6"),
        (r#"{"snapshot":"gold","network":{"ports":{"0":{}}}}"#, "port 0"),
    ] {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (status, out) = rt
            .block_on(flint_supervisor::http::request(
                socket,
                "POST",
                "/v1/clones",
                Some(body.as_bytes()),
                Duration::from_secs(30),
            ))
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert_eq!(status, 400, "{body}: {out}");
        assert!(out.contains(want), "{body}: {out}");
    }
    assert_eq!(flint_json(socket, &["vm", "ls"]).as_array().map(|a| a.len()), Some(0), "a bad request made no VM");
    assert_eq!(std::fs::read_dir(data.join("netns")).map(|d| d.count()).unwrap_or(0), 0);
}

/// The two clones of the networks test and their `net show`.
struct NetClones {
    a: String,
    b: String,
    na: serde_json::Value,
    nb: serde_json::Value,
}

/// Two clones under a default-deny policy: their own addresses and MACs, both reaching the world at once by name
/// and by IP; denied both ways.
fn two_clones_get_their_own_addresses_and_reach_the_world(socket: &Path) -> NetClones {
    let clones = flint_json(
        socket,
        &[
            "clone",
            "--snapshot",
            "gold",
            "-n",
            "2",
            "--default-deny",
            "--allow",
            "allowed.test",
            "--allow",
            "198.51.100.12",
            "--deny",
            "denied.test",
            "--expose",
            "8080",
        ],
    );
    let ids: Vec<String> = clones.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect();
    let (a, b) = (ids[0].clone(), ids[1].clone());
    let na = flint_json(socket, &["net", "show", &a]);
    let nb = flint_json(socket, &["net", "show", &b]);
    println!("{na}\n{nb}");
    assert_ne!(na["address"], nb["address"]);
    assert_ne!(na["mac"], nb["mac"]);
    for (id, n) in [(&a, &na), (&b, &nb)] {
        let inside = sh(socket, id, "cat /sys/class/net/eth0/address; ip -4 addr show dev eth0");
        assert!(inside.contains(n["mac"].as_str().unwrap()), "{id}: {inside}");
        assert!(inside.contains(&format!("{}/30", n["address"].as_str().unwrap())), "{id}: {inside}");
    }
    // Both reach the world at once, by name and by IP.
    let both: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|id| {
            let socket = socket.to_path_buf();
            std::thread::spawn(move || guest_fetch_name(&socket, &id, "allowed.test"))
        })
        .collect();
    for t in both {
        assert_eq!(t.join().unwrap(), "world-10");
    }
    assert_eq!(guest_fetch(socket, &a, "http://198.51.100.12/"), "world-12");
    // Denied both ways: by name (the DNS proxy refuses it) and by IP (not allowed; the default denies).
    assert_eq!(guest_fetch_name(socket, &a, "denied.test"), "FAILED");
    assert!(guest_blocked(socket, &a, "http://198.51.100.11/"));
    assert_eq!(guest_fetch(socket, &a, "http://198.51.100.10/"), "world-10", "the name's answer opened its address");
    NetClones { a, b, na, nb }
}

/// What no policy opens: the host's addresses, the metadata addresses, private networks by default, an allowed
/// name's private answer, another VM, a DNS server other than the proxy; and from the host, no guest port but
/// through flintd. Leaves clone b serving /www on 8080 (httpd, with a streaming CGI).
fn egress_never_reaches_the_host_metadata_private_networks_or_another_vm(
    host: &flint_tests::TestNetns,
    socket: &Path,
    clones: &NetClones,
) {
    let NetClones { a, b, na, nb } = clones;
    // Never: the host's addresses (uplink and the VM's own host end), the metadata address, another VM, a DNS
    // server other than the proxy.
    let host_end = {
        let g: std::net::Ipv4Addr = na["address"].as_str().unwrap().parse().unwrap();
        std::net::Ipv4Addr::from(u32::from(g) + 3)
    };
    assert_eq!(front_request(host, "203.0.113.2:7777", "/", &[]).0, 200, "the host service answers the host");
    assert_eq!(front_request(host, "169.254.169.254:80", "/", &[]).0, 200, "the metadata service answers the host");
    // A bad change is refused whole: the policy stays as it was.
    let bad = flint(socket, &["net", "policy", a, "--allow", "198.51.100.0/24", "--allow", "10.0.0.1/8"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("host bits"), "{bad:?}");
    assert_eq!(flint_json(socket, &["net", "show", a])["egress"], na["egress"]);
    // Open everything the policy can: what stays closed is closed by flintd's own rules.
    flint_json(socket, &["net", "policy", a, "--allow", "allowed.test"]);
    assert_eq!(guest_fetch(socket, a, "http://198.51.100.11/"), "world-11", "default allow now");
    // A default-allow policy does not reach private networks, Alibaba's and Azure's metadata or the host's LAN
    // (finding 5), nor does an allowed name whose answer is private (finding 6); an explicit CIDR rule opens a
    // private network.
    for (addr, what) in [
        ("10.1.2.3:80", "a private network"),
        ("100.100.100.200:80", "Alibaba Cloud's metadata service"),
        ("203.0.113.20:80", "another machine of the host's LAN"),
    ] {
        assert_eq!(front_request(host, addr, "/", &[]).0, 200, "{what} answers the host");
        assert!(guest_blocked(socket, a, &format!("http://{addr}/")), "{what} reached by default");
    }
    let resolved = sh(
        socket,
        a,
        &format!(
            "ip=$(nslookup internal.allowed.test 2>/dev/null | sed -n 's/^Address: \\([0-9.]*\\)$/\\1/p' | head -n 1); \
             echo $ip; {}",
            fetch_script("80", "", 5)
        ),
    );
    assert_eq!(resolved, "10.1.2.3\nFAILED", "an allowed name's private answer is answered, never opened");
    flint_json(socket, &["net", "policy", a, "--allow", "10.1.2.0/24"]);
    assert_eq!(guest_fetch(socket, a, "http://10.1.2.3/"), "private-service", "an explicit CIDR rule opens it");
    assert!(guest_blocked(socket, a, "http://100.100.100.200/"), "and only what it names");
    flint_json(socket, &["net", "policy", a]);
    sh(socket, b, "mkdir -p /www/cgi-bin && echo guest-page > /www/index.html && printf '#!/bin/sh\\necho \"Content-Type: text/event-stream\"\\necho\\nfor i in 1 2 3; do echo \"data: $i\"; echo; sleep 1; done\\n' > /www/cgi-bin/events && chmod +x /www/cgi-bin/events && httpd -p 8080 -h /www && echo started");
    let nb_addr = nb["address"].as_str().unwrap().to_string();
    for url in [
        "http://203.0.113.2:7777/".to_string(),
        format!("http://{host_end}:7777/"),
        "http://127.0.0.1:7777/".into(),
        "http://169.254.169.254/".into(),
        format!("http://{nb_addr}:8080/"),
    ] {
        assert!(guest_blocked(socket, a, &url));
    }
    assert!(sh(
        socket,
        a,
        &format!("nslookup allowed.test {WORLD_DNS} >/dev/null 2>&1 && echo RESOLVED || echo FAILED")
    )
    .ends_with("FAILED"));

    // Finding 7: from the host into a VM network only flintd's own (marked) connections get through: another
    // host process reaches no guest port, exposed or not.
    for port in [8080, 22] {
        let guest: std::net::SocketAddr = format!("{nb_addr}:{port}").parse().unwrap();
        let direct = host.enter(move || std::net::TcpStream::connect_timeout(&guest, Duration::from_secs(3)).is_ok());
        assert!(!direct, "a host process reached {guest} directly");
    }
}

/// The front end: by Host, by headers, by cookie; a token; a streamed response.
fn the_front_end_routes_by_host_headers_and_cookie_with_a_token_and_streams(
    host: &flint_tests::TestNetns,
    socket: &Path,
    fe: &'static str,
    b: &str,
) {
    let (st, head, chunks) = front_request(host, fe, "/", &[&format!("Host: 8080-{b}.flint.localhost:18480")]);
    assert_eq!((st, body_of(&chunks).trim()), (200, "guest-page"), "{head}");
    assert!(head.to_ascii_lowercase().contains(&format!("set-cookie: flint-route={b}.8080")), "{head}");
    // HTTP/1.1 requests need a Host (RFC 9112); one that names no sandbox leaves the routing to the headers.
    let plain = "Host: 127.0.0.1:18480";
    let (st, _, chunks) = front_request(host, fe, "/", &[plain, &format!("flint-session: {b}"), "flint-port: 8080"]);
    assert_eq!((st, body_of(&chunks).trim()), (200, "guest-page"));
    let (st, _, chunks) = front_request(host, fe, "/", &[plain, &format!("Cookie: flint-route={b}.8080")]);
    assert_eq!((st, body_of(&chunks).trim()), (200, "guest-page"));
    let (st, head, _) = front_request(host, fe, "/", &[plain]);
    assert_eq!(st, 400, "no route: {head}");
    let (st, _, _) = front_request(host, fe, "/", &["Host: 8081-nosuch.flint.localhost"]);
    assert_eq!(st, 404);
    let (st, _, chunks) = front_request(host, fe, "/", &[&format!("Host: 9090-{b}.flint.localhost")]);
    assert_eq!(st, 404, "an unexposed port: {}", body_of(&chunks));
    let weak = flint(socket, &["port", "expose", b, "8080", "--token", "s3cret-token"]);
    assert!(String::from_utf8_lossy(&weak.stderr).contains("at least 128 bits"), "a guessable token: {weak:?}");
    let set = flint_json(socket, &["port", "expose", b, "8080", "--token", "auto"]);
    let token = set["ports"].as_array().and_then(|p| p.iter().find(|p| p["port"] == 8080)).expect("port 8080")
        ["access_token"]
        .as_str()
        .expect("the made token, shown once")
        .to_string();
    assert_eq!(token.len(), 32, "{set}");
    let listed =
        flint_json(socket, &["vm", "get", b]).to_string() + &flint_json(socket, &["net", "show", b]).to_string();
    assert!(!listed.contains(&token), "a record shows the token: {listed}");
    let (st, _, _) = front_request(host, fe, "/", &[&format!("Host: 8080-{b}.flint.localhost")]);
    assert_eq!(st, 401);
    let (st, _, chunks) =
        front_request(host, fe, "/", &[&format!("Host: 8080-{b}.flint.localhost"), &format!("flint-token: {token}")]);
    assert_eq!((st, body_of(&chunks).trim()), (200, "guest-page"));
    let (st, _, chunks) = front_request(
        host,
        fe,
        &format!("/cgi-bin/events?flint_token={token}"),
        &[&format!("Host: 8080-{b}.flint.localhost")],
    );
    assert_eq!(st, 200);
    let first = chunks.iter().find(|(_, c)| c.contains("data: 1")).map(|(t, _)| *t).expect("first event");
    let last = chunks.iter().find(|(_, c)| c.contains("data: 3")).map(|(t, _)| *t).expect("last event");
    println!("events: first at {first:?}, last at {last:?}");
    assert!(last >= first + Duration::from_millis(1500), "the events came in one piece: {chunks:?}");
}

/// Plain TCP forwarding: a front-end port of its own; one port forwards to one VM or session. A session with a
/// network, hibernated, woken by a request through the front end; one kept-alive connection for two guests.
fn tcp_forwards_and_a_request_that_wakes_a_hibernated_session(
    host: &flint_tests::TestNetns,
    socket: &Path,
    fe: &'static str,
    clones: &NetClones,
) {
    let (a, b) = (&clones.a, &clones.b);
    flint_json(socket, &["port", "expose", b, "8080", "--tcp", "18490"]);
    assert_eq!(raw_tcp_get(host, "127.0.0.1:18490"), "guest-page");
    let taken = flint(socket, &["port", "expose", a, "8080", "--tcp", "18490"]);
    assert!(String::from_utf8_lossy(&taken.stderr).contains("already forwards"), "{taken:?}");
    let outside = flint(socket, &["port", "expose", a, "8080", "--tcp", "18000"]);
    assert!(String::from_utf8_lossy(&outside.stderr).contains("outside network.tcp_ports"), "{outside:?}");

    // A session with a network: hibernated, a request through the front end wakes it (a new address).
    flint_json(socket, &["session", "create", "--snapshot", "gold", "--id", "web", "--expose", "8080"]);
    sh(socket, "web", "mkdir -p /www && echo session-page > /www/index.html && httpd -p 8080 -h /www");
    let before = flint_json(socket, &["net", "show", "web"]);
    flint_json(socket, &["session", "hibernate", "web"]);
    let (st, head, chunks) = front_request(host, fe, "/", &["Host: 8080-web.flint.localhost"]);
    assert_eq!((st, body_of(&chunks).trim()), (200, "session-page"), "{head}");
    assert_eq!(session(socket, "web")["state"], "running");
    let after = flint_json(socket, &["net", "show", "web"]);
    assert_ne!(before["vm"], after["vm"]);
    assert_eq!(guest_fetch_name(socket, "web", "allowed.test"), "world-10", "the woken guest's network works");

    // One kept-alive connection, as a pooling proxy keeps: each request reaches its own guest, and a token-less
    // request after an authorised one is refused (the guests' httpd closes its own connection every time).
    let set = flint_json(socket, &["port", "expose", "web", "8080", "--token", "auto"]);
    let web_token = set["ports"][0]["access_token"].as_str().expect("the made token").to_string();
    let get = |host: &str, extra: &str| format!("GET / HTTP/1.1\r\nHost: 8080-{host}.flint.localhost\r\n{extra}\r\n");
    let answers = front_keepalive(
        host,
        fe,
        vec![get("web", &format!("flint-token: {web_token}\r\n")), get(b, ""), get("web", "")],
    );
    assert_eq!(
        answers.iter().map(|(st, body)| (*st, body.contains("-page").then_some(body.as_str()))).collect::<Vec<_>>(),
        vec![(200, Some("session-page")), (200, Some("guest-page")), (401, None)],
        "{answers:?}"
    );
}

/// `flint run` in a VM: its stdout, and the exit code (0 ok, 1 an exception, 124 a timeout).
fn run_py(socket: &Path, id: &str, code: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["run", id, code];
    args.extend_from_slice(extra);
    let out = flint(socket, &args);
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// The Python image end to end (one cold boot): a template from `images/python` whose warm runner the snapshot
/// captures; clones answer cells with state kept between calls and across a snapshot → clone, tracebacks and
/// timeouts that leave the runner answering, fresh PRNG seeds per clone; each VM's writable disk is its own
/// (isolation), bounded (ENOSPC in the guest, the host file never past the quota), kept in its snapshots, and gone
/// with the VM; the image's root is never written.
#[test]
fn python_image_runner_and_per_vm_disks() {
    let image = flint_tests::named_image("python");
    let t0 = Instant::now();
    let step = |what: &str| println!("[{:>7.1} s] {what}", t0.elapsed().as_secs_f64());
    let work = TempDir::new("flintd-python");
    let data = work.path().join("data");
    let _reaper = KillVmmsUnder(data.clone());
    let socket = work.path().join("flintd.sock");
    let image_arg = format!("python={}", image.display());
    let _d = Flintd::start_full(&data, &socket, None, &["--image", &image_arg], None);

    // Bad input: no disk for an initramfs image, a quota past the limit, a caller naming an image drive.
    let bad = flint(&socket, &["vm", "create", "--disk-mib", "64"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("has no disk"), "{bad:?}");
    let bad = flint(&socket, &["vm", "create", "--image", "python", "--disk-mib", "99999999"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("limits.max_disk_mib"), "{bad:?}");
    let images = flint_json(&socket, &["image", "ls"]);
    let py = images.as_array().unwrap().iter().find(|i| i["name"] == "python").cloned().unwrap();
    assert_eq!((py["root"].as_str(), py["runners"][0].as_str()), (Some("disk"), Some("python")), "{images}");
    let sha_before = sha256_of(&image.join("rootfs.ext4"));

    step("The template");
    // The template: a cold boot, a file written by its init (into the template's disk), the runner warm.
    let started = Instant::now();
    let t = flint_json(
        &socket,
        &[
            "template",
            "create",
            "py",
            "--image",
            "python",
            "--disk-mib",
            "64",
            "--",
            "/bin/sh",
            "-c",
            "echo from-template > /etc/flint-template",
        ],
    );
    println!("python template in {:?}: {t}", started.elapsed());
    let clones = flint_json(&socket, &["clone", "py", "-n", "2"]);
    let ids: Vec<String> = clones.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect();
    let (a, b) = (&ids[0], &ids[1]);
    assert_eq!(clones[0]["disk_mib"], 64, "{clones}");

    step("Cells");
    the_python_runner_keeps_state_reseeds_and_survives_exceptions_and_timeouts(&socket, a, b);
    step("Disks");
    let disk = each_clone_has_its_own_disk_within_its_quota(&socket, &data, a, b);
    step("mounts");
    a_host_directory_mounts_read_only_then_read_write(&socket, work.path(), a, b);

    // The state and the files (the disk's and the mount's) survive snapshot → clone.
    step("snapshot → clone");
    flint_json(&socket, &["snapshot", "create", a, "py-a"]);
    let c = flint_json(&socket, &["clone", "--snapshot", "py-a"]);
    let c = c[0]["id"].as_str().unwrap().to_string();
    assert_eq!(run_py(&socket, &c, "print(x + 1)", &[]).1, "2");
    assert_eq!(sh(&socket, &c, "cat /root/mine"), "only-in-a");
    assert_eq!(sh(&socket, &c, "cat /mnt/rw/new /mnt/rw/hello.txt"), "written-in-guest\nfrom-host");
    let crec = flint_json(&socket, &["vm", "get", &c]);
    assert_eq!(crec["mounts"][0]["path"], "/mnt/rw", "{crec}");
    step("Deleting a VM");
    // Deleting a VM deletes its disk; the image's root was never written.
    flint(&socket, &["vm", "rm", a, b, &c]);
    assert!(!disk.exists(), "{} is left", disk.display());
    assert_eq!(sha256_of(&image.join("rootfs.ext4")), sha_before);
}

/// Clones `a` and `b` of the python template: cells keep state, each clone reseeded its PRNG, an exception's
/// traceback, a timeout that interrupts the code and leaves the runner (and `x = 1` in `a`) alive.
fn the_python_runner_keeps_state_reseeds_and_survives_exceptions_and_timeouts(socket: &Path, a: &str, b: &str) {
    // Cells: output, values, state between calls.
    let t = Instant::now();
    assert_eq!(run_py(socket, a, "print(6*7)", &[]), (0, "42".into(), String::new()));
    println!("clone → first print answered in {:?}", t.elapsed());
    assert_eq!(
        run_py(socket, a, "import json, sqlite3, hashlib, ssl\nx = 1\nssl.OPENSSL_VERSION[:7]", &[]).1,
        "'OpenSSL'"
    );
    assert_eq!(run_py(socket, a, "print(x + 1)", &[]).1, "2");
    // Each clone reseeded its interpreter's PRNG: the template's state is not shared.
    let draw = "import random\nrandom.getrandbits(64)";
    assert_ne!(run_py(socket, a, draw, &[]).1, run_py(socket, b, draw, &[]).1, "two clones drew the same number");
    // An exception: its traceback, exit 1; a timeout interrupts the code, the runner and its state live on.
    let (code, _, err) = run_py(socket, a, "def f():\n    raise ValueError('bad value')\nf()", &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Traceback") && err.contains("ValueError: bad value") && err.contains("in f"), "{err}");
    let (code, _, err) = run_py(socket, a, "while True: pass", &["--timeout-ms", "3000"]);
    assert_eq!(code, 124, "{err}");
    assert!(err.contains("KeyboardInterrupt"), "{err}");
    assert_eq!(run_py(socket, a, "x", &[]).1, "1");
}

/// Disks: the template's file in both clones; each clone's own files; the quota. Clone `a`'s disk file.
fn each_clone_has_its_own_disk_within_its_quota(socket: &Path, data: &Path, a: &str, b: &str) -> PathBuf {
    // Disks: the template's file in both; each clone's own files; the quota.
    assert_eq!(sh(socket, a, "cat /etc/flint-template"), "from-template");
    assert_eq!(sh(socket, b, "cat /etc/flint-template"), "from-template");
    sh(socket, a, "echo only-in-a > /root/mine && sync");
    assert_eq!(sh(socket, b, "cat /root/mine 2>/dev/null || echo absent"), "absent");
    // Past the quota: a reservation (fallocate, no data to copy) and a real write once the disk is nearly full
    // (guest block I/O on an emulating host is far too slow to fill 64 MiB by writing).
    // (A failed fallocate keeps what it allocated: the file goes, or the disk stays full.)
    let over = sh(socket, a, "fallocate -l 100M /root/huge 2>&1; echo rc=$?; rm -f /root/huge");
    assert!(over.contains("No space left on device") && over.contains("rc=1"), "{over}");
    let full = sh(
        socket,
        a,
        "free=$(df -k / | awk 'NR==2 {print $4}'); fallocate -l $(( (free - 1024) * 1024 )) /root/filler; \
         dd if=/dev/zero of=/root/big bs=64k count=64 2>&1; echo rc=$?; rm -f /root/filler /root/big; sync",
    );
    assert!(full.contains("No space left on device") && full.contains("rc=1"), "{full}");
    let disk = data.join("vms").join(a).join("drive1.img");
    let other = data.join("vms").join(b).join("drive1.img");
    assert!(flint_supervisor::image::allocated_bytes(&other) < 16 << 20, "a clone's disk is sparse");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 64 << 20, "the disk file is exactly the quota");
    assert!(flint_supervisor::image::allocated_bytes(&disk) <= 64 << 20);
    disk
}

/// Dynamic mounts: a copy of a host directory into running VM `a`, read-only, then read-write at /mnt/rw.
fn a_host_directory_mounts_read_only_then_read_write(socket: &Path, work: &Path, a: &str, b: &str) {
    let share = work.join("share");
    std::fs::create_dir_all(share.join("sub")).unwrap();
    std::fs::write(share.join("hello.txt"), "from-host\n").unwrap();
    std::fs::write(share.join("sub/deep.txt"), "deep\n").unwrap();
    let spec = |path: &str| format!("{}:{path}", share.display());
    let m = flint_json(socket, &["mount", a, &spec("/mnt/in:ro")]);
    assert_eq!(m["mounts"][0]["path"], "/mnt/in", "{m}");
    assert_eq!(sh(socket, a, "cat /mnt/in/hello.txt /mnt/in/sub/deep.txt"), "from-host\ndeep");
    assert!(sh(socket, a, "touch /mnt/in/x 2>&1; true").contains("Read-only file system"));
    assert_eq!(sh(socket, b, "cat /mnt/in/hello.txt 2>/dev/null || echo absent"), "absent");
    let busy = flint(socket, &["mount", a, &spec("/mnt/other")]);
    assert!(String::from_utf8_lossy(&busy.stderr).contains("unmount it first"), "{busy:?}");
    let bad = flint(socket, &["mount", b, &spec("/proc/x")]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/proc"), "{bad:?}");
    flint_json(socket, &["umount", a, "/mnt/in"]);
    assert_eq!(sh(socket, a, "cat /mnt/in/hello.txt 2>/dev/null || echo gone"), "gone");
    flint_json(socket, &["mount", a, &spec("/mnt/rw")]);
    sh(socket, a, "echo written-in-guest > /mnt/rw/new && sync");
    assert!(!share.join("new").exists(), "a mount is a copy: the host directory is unchanged");
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
}

/// One layer as a tar: `(path, content or symlink target, kind)` entries, in order.
enum Item<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
    Link(&'a str, &'a str),
}

fn layer_tar(items: &[Item]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for it in items {
        let mut h = tar::Header::new_gnu();
        match it {
            Item::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            Item::File(p, data, mode) => {
                // The name is written raw: the builder refuses `..`, which a hostile layer has.
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                h.as_old_mut().name[..p.len()].copy_from_slice(p.as_bytes());
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            Item::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// Writes `bytes` as a blob of the layout; its digest.
fn blob(layout: &Path, bytes: &[u8]) -> String {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    format!("sha256:{hex}")
}

/// An OCI image layout with two layers (gzip, then plain) and a config (env, working dir).
fn oci_layout(layout: &Path, layers: &[Vec<u8>]) {
    use std::io::Write;
    let mut descs = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let (bytes, media) = if i == 0 {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(l).unwrap();
            (gz.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
        } else {
            (l.clone(), "application/vnd.oci.image.layer.v1.tar")
        };
        descs.push(serde_json::json!({"mediaType": media, "digest": blob(layout, &bytes), "size": bytes.len()}));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "GREETING=hi-from-oci"], "WorkingDir": "/data", "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": []}
    })
    .to_string();
    let cdigest = blob(layout, config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": config.len()},
        "layers": descs,
    })
    .to_string();
    let mdigest = blob(layout, manifest.as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": manifest.len()}
    ]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// An OCI image layout built here from busybox (a whiteout and an opaque directory in its upper layer) imports
/// (as a directory and as a tar), boots and execs with the image's env and working dir; malformed layouts are
/// refused with a message that says what is wrong, and leave no image behind.
#[test]
fn oci_layouts_import_boot_and_exec() {
    let work = TempDir::new("flintd-oci");
    let data = work.path().join("data");
    let _reaper = KillVmmsUnder(data.clone());
    let socket = work.path().join("flintd.sock");
    let _d = Flintd::start_full(&data, &socket, None, &[], None);
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (Debian package busybox-static)");
    let lower = layer_tar(&[
        Item::Dir("bin"),
        Item::File("bin/busybox", &busybox, 0o755),
        Item::Link("bin/sh", "busybox"),
        Item::Link("bin/cat", "/bin/busybox"),
        Item::Link("bin/ls", "busybox"),
        Item::Dir("etc"),
        Item::File("etc/hello", b"layer1\n", 0o644),
        Item::File("etc/removed", b"gone\n", 0o644),
        Item::Dir("data"),
        Item::File("data/keep", b"lower\n", 0o644),
    ]);
    let upper = layer_tar(&[
        Item::File("etc/.wh.removed", b"", 0o644),
        Item::File("etc/hello", b"layer2\n", 0o644),
        Item::File("data/.wh..wh..opq", b"", 0o644),
        Item::File("data/new", b"upper\n", 0o644),
    ]);
    let layout = work.path().join("layout");
    oci_layout(&layout, &[lower.clone(), upper.clone()]);
    let v =
        flint_json(&socket, &["image", "import", "oci-test", "--oci", layout.to_str().unwrap(), "--disk-mib", "32"]);
    println!("imported: {v}");
    assert_eq!((v["layers"].as_u64(), v["workdir"].as_str()), (Some(2), Some("/data")), "{v}");
    // The same layout as a tar imports too.
    let tarball = work.path().join("layout.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&tarball).unwrap());
    b.append_dir_all(".", &layout).unwrap();
    b.finish().unwrap();
    drop(b);
    flint_json(&socket, &["image", "import", "oci-tar", "--oci", tarball.to_str().unwrap()]);
    let bad = flint(&socket, &["image", "import", "oci-test", "--oci", layout.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("already exists"), "{bad:?}");
    malformed_oci_layouts_are_refused_with_nothing_left(&socket, work.path(), &data, &lower, &upper);

    // Boot the imported image and exec in it: the upper layer won, the whiteouts removed, env and cwd kept.
    let vm = flint_json(&socket, &["vm", "create", "--image", "oci-test"]);
    let id = vm["id"].as_str().unwrap().to_string();
    let out =
        sh(&socket, &id, "cat /etc/hello; test -e /etc/removed || echo removed-gone; ls /data; echo $GREETING; pwd");
    assert_eq!(out, "layer2\nremoved-gone\nnew\nhi-from-oci\n/data", "{out}");
    flint(&socket, &["vm", "rm", &id]);
}

/// Malformed layouts (empty, bad index.json, a tampered blob, a layer climbing out): each refused with what is
/// wrong, and nothing left behind (the two good images of `data` stay).
fn malformed_oci_layouts_are_refused_with_nothing_left(
    socket: &Path,
    work: &Path,
    data: &Path,
    lower: &[u8],
    upper: &[u8],
) {
    let refuse = |name: &str, dir: &Path, want: &str| {
        let out = flint(socket, &["image", "import", name, "--oci", dir.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{name}: want `{want}`: {err}");
        assert!(!data.join("images").join(name).exists());
    };
    let empty = work.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    refuse("bad1", &empty, "neither an OCI image layout");
    let garbage = work.join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    std::fs::write(garbage.join("index.json"), "{not json").unwrap();
    refuse("bad2", &garbage, "index.json");
    let tampered = work.join("tampered");
    oci_layout(&tampered, &[lower.to_vec(), upper.to_vec()]);
    for e in std::fs::read_dir(tampered.join("blobs/sha256")).unwrap().flatten() {
        if std::fs::metadata(e.path()).unwrap().len() == upper.len() as u64 {
            std::fs::write(e.path(), layer_tar(&[Item::File("etc/evil", b"x", 0o644)])).unwrap();
        }
    }
    refuse("bad3", &tampered, "digest");
    let escape = work.join("escape");
    oci_layout(
        &escape,
        &[lower.to_vec(), layer_tar(&[Item::Link("etc/x", "/etc"), Item::File("../../outside", b"x", 0o644)])],
    );
    refuse("bad4", &escape, "climbs out");
    assert!(!work.join("outside").exists() && !Path::new("/outside").exists());
    let leftovers: Vec<_> = std::fs::read_dir(data.join("images")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 2, "only the two good images: {leftovers:?}");
}

/// The critical finding of docs/security.md: an image whose `tmp` is a symlink to a host directory and whose
/// `etc/flint/image.json` is a symlink to a host file imports without touching either (the host directory keeps
/// its mode and stays empty, the file its content), and the image holds a real `/tmp` and `image.json`.
#[test]
fn oci_import_never_writes_through_the_images_symlinks() {
    let work = TempDir::new("flintd-oci-links");
    let data = work.path().join("data");
    let socket = work.path().join("flintd.sock");
    let _d = Flintd::start_full(&data, &socket, None, &[], None);
    let host_dir = work.path().join("host-dir");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::set_permissions(&host_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let host_file = work.path().join("profile-x.sh");
    std::fs::write(&host_file, "# untouched\n").unwrap();
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (Debian package busybox-static)");
    let layer = layer_tar(&[
        Item::Dir("bin"),
        Item::File("bin/busybox", &busybox, 0o755),
        Item::Link("tmp", host_dir.to_str().unwrap()),
        Item::Dir("etc"),
        Item::Dir("etc/flint"),
        Item::Link("etc/flint/image.json", host_file.to_str().unwrap()),
        Item::Link("root", "/etc"),
    ]);
    let layout = work.path().join("layout");
    oci_layout(&layout, &[layer.clone(), layer_tar(&[Item::File("etc/marker", b"m\n", 0o644)])]);
    flint_json(&socket, &["image", "import", "links", "--oci", layout.to_str().unwrap(), "--disk-mib", "32"]);
    assert_eq!(std::fs::metadata(&host_dir).unwrap().permissions().mode() & 0o7777, 0o755, "host dir chmod'ed");
    assert_eq!(std::fs::read_dir(&host_dir).unwrap().count(), 0, "a file was written into the host dir");
    assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "# untouched\n", "the host file was overwritten");
    // The image's root holds a real /tmp (1777) and image.json: read it with debugfs (e2fsprogs).
    let rootfs = data.join("images/links/rootfs.ext4");
    let stat = |p: &str| {
        let out = Command::new("debugfs").args(["-R", &format!("stat {p}")]).arg(&rootfs).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tmp = stat("/tmp");
    assert!(tmp.contains("Type: directory") && tmp.contains("Mode:  01777"), "{tmp}");
    assert!(stat("/etc/flint/image.json").contains("Type: regular"), "image.json is not a file");
    assert!(stat("/root").contains("Type: directory"), "the root home is the image's link no more");
}

/// flintd's default `vcpu_sched_idle`: the VMM `pid`'s vCPU thread runs SCHED_IDLE (5), its other threads do not
/// (KVM's own `kvm-nx-lpage-recovery` task of the process is SCHED_IDLE by the kernel's choice).
fn assert_vcpus_idle_class(pid: u64) {
    let policies = thread_policies(pid);
    assert!(policies.iter().any(|(n, p)| n == "vcpu0" && *p == 5), "{policies:?}");
    let mut own = policies.iter().filter(|(n, _)| !n.starts_with("vcpu") && !n.starts_with("kvm-"));
    assert!(own.clone().count() >= 2 && own.all(|(_, p)| *p == 0), "{policies:?}");
}

/// Each thread of process `pid`: its name and scheduling policy (/proc/PID/task/TID/stat field 41).
fn thread_policies(pid: u64) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string();
        let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
        // Field 41 of the whole line is the 39th after the command's closing parenthesis (state is field 3).
        if let Some(p) = after.split_whitespace().nth(38).and_then(|p| p.parse().ok()) {
            out.push((comm, p));
        }
    }
    out
}

/// Waits until flintd has `n` idle standby VMMs of 256 MiB (`GET /v1/health`).
fn wait_standbys(socket: &Path, n: u64) {
    let t = Instant::now();
    loop {
        let h: serde_json::Value = serde_json::from_slice(&flint_supervisor_get(socket, "/v1/health")).unwrap();
        if h["standby"]["256"].as_u64().unwrap_or(0) >= n {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{n} standby VMMs never came: {h}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// #30: a jailed restore is handed to a standby VMM (started ahead, jailed, its KVM VM and memory slots made):
/// the VM runs jailed in its own directory and cgroup, answers, reports flintd's and the VMM's time to its first
/// instruction, and the standby is replaced; a restarted flintd re-adopts the VM and starts fresh standbys (the old
/// ones ended with its control sockets), leaving nothing of them behind.
#[test]
fn a_standby_vmm_takes_a_jailed_restore() {
    let work = TempDir::new("flintd-standby");
    let data = work.path().join("data");
    let _reaper = KillVmmsUnder(data.clone());
    let socket = work.path().join("flintd.sock");
    flint_tests::import_golden_local(&data, "gold");
    let d = Flintd::start_full(&data, &socket, None, &[], None);
    wait_standbys(&socket, 2);
    let waiting: Vec<PathBuf> = std::fs::read_dir(data.join("standby")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(waiting.len(), 2, "{waiting:?}");
    let vm = flint_json(&socket, &["clone", "--snapshot", "gold"])[0].clone();
    let id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(vm["standby"], true, "{vm}");
    let (first, launch) = (vm["first_run_us"].as_u64().unwrap(), vm["launch_us"].as_u64().unwrap());
    assert!(launch > 0 && launch < first, "flintd's part {launch} µs of {first} µs to the first instruction");
    println!("standby restore: request → first instruction {first} µs, of which flintd {launch} µs");
    let pid = vm["pid"].as_u64().unwrap();
    let dir = data.join("vms").join(&id);
    flint_tests::assert_jailed(pid, &dir);
    assert_vcpus_idle_class(pid);
    // Its cgroup, made with the standby, is named after the uid the VM keeps.
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let own = format!("/flint/vm-{}", vm["uid"].as_u64().unwrap());
    assert!(
        cgroups.lines().any(|l| (l.contains(":memory:") || l.starts_with("0::")) && l.ends_with(&own)),
        "the VMM is in its VM's cgroup {own}: {cgroups}"
    );
    assert_eq!(waiting.iter().filter(|p| p.exists()).count(), 1, "the taken standby's directory became the VM's");
    let out = flint(&socket, &["exec", &id, "--", "/bin/cat", "/proc/sys/kernel/random/uuid"]);
    assert!(out.status.success() && out.stdout.len() == 37, "{out:?}");
    wait_standbys(&socket, 2);

    // A restart: the VM is re-adopted; the old standbys are gone, two new ones wait.
    // Cgroups are named after uids: the standbys' (`s<uid>` directories) and the VM's.
    let cg_of = |p: &Path| format!("vm-{}", p.file_name().unwrap().to_string_lossy().trim_start_matches('s'));
    let mut seen: Vec<String> =
        std::fs::read_dir(data.join("standby")).unwrap().flatten().map(|e| cg_of(&e.path())).collect();
    seen.extend(waiting.iter().map(|p| cg_of(p)));
    seen.push(format!("vm-{}", vm["uid"].as_u64().unwrap()));
    // (The VM's VMM still names the standby's spec on its command line.)
    let old: Vec<u32> = flint_tests::processes_naming(&data.join("standby"))
        .into_iter()
        .map(|(p, _)| p as u32)
        .filter(|p| u64::from(*p) != pid)
        .collect();
    assert_eq!(old.len(), 2, "two standby VMMs: {old:?}");
    drop(d);
    let _d = Flintd::start_full(&data, &socket, None, &[], None);
    let t = Instant::now();
    while old.iter().any(|p| std::path::Path::new(&format!("/proc/{p}")).exists()) {
        assert!(t.elapsed() < Duration::from_secs(30), "the old standbys did not end with their flintd");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_standbys(&socket, 2);
    let again = vm_detail(&socket, &id);
    assert_eq!((again["status"].as_str(), again["pid"].as_u64()), (Some("running"), Some(pid)), "{again}");
    let out = flint(&socket, &["exec", &id, "--", "/bin/true"]);
    assert!(out.status.success(), "{out:?}");
    assert!(flint(&socket, &["vm", "rm", &id]).status.success());
    // No cgroup of the VM or of a standby that is gone: only the two waiting standbys' own.
    let waiting: Vec<String> =
        std::fs::read_dir(data.join("standby")).unwrap().flatten().map(|e| cg_of(&e.path())).collect();
    let t = Instant::now();
    loop {
        let left: Vec<String> = std::fs::read_dir("/sys/fs/cgroup/memory/flint")
            .or_else(|_| std::fs::read_dir("/sys/fs/cgroup/flint"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| seen.contains(n) && !waiting.contains(n))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "cgroups left: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
