//! `flint-bench`: prints performance figures (never a test). `make bench` runs it.
//!
//! `flint-bench boot [--runs N]`: cold boots of the standard images, each measured from VMM
//! process start to the agent's first answer, with the VMM-side breakdown.
use std::time::{Duration, Instant};

use flint_tests::*;

/// One call to flintd's API; a non-2xx answer is a panic (a benchmark has no use for a failed step).
fn flintd_call(
    rt: &tokio::runtime::Runtime,
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let body = body.map(|b| b.to_string().into_bytes());
    let (status, out) = rt
        .block_on(flint_supervisor::http::request(sock, method, path, body.as_deref(), Duration::from_secs(3600)))
        .expect("flintd");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    assert!(status < 300, "{method} {path}: {status} {v}");
    v
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

async fn boot_once() -> serde_json::Value {
    let dir = TempDir::new("bench");
    let mut vm = VmProcess::boot(dir.path());
    let agent = vm.agent(Duration::from_secs(300)).await;
    let ready = vm.started.elapsed();
    let rtt = {
        let t = Instant::now();
        for _ in 0..10 {
            agent.health().await.expect("health");
        }
        t.elapsed() / 10
    };
    let exec = {
        let t = Instant::now();
        agent.run(&["/bin/true"]).await.expect("exec");
        t.elapsed()
    };
    let (_, d) = api_call(&vm.api_sock, "GET", "/vm", None).expect("describe");
    let _ = agent.shutdown().await;
    let _ = vm.wait(Duration::from_secs(60));
    serde_json::json!({
        "host_profile": d["host_profile"],
        "timings": d["timings"],
        "vcpu_exits": d["vcpus"][0]["exits"],
        "agent_ready_ms": ready.as_secs_f64() * 1000.0,
        "health_rtt_ms": rtt.as_secs_f64() * 1000.0,
        "exec_true_ms": exec.as_secs_f64() * 1000.0,
    })
}

fn us(v: &serde_json::Value) -> f64 {
    v.as_u64().unwrap_or(0) as f64 / 1000.0
}

/// Cold boot vs. restores of one snapshot, side by side in one run, with VMM-side costs.
async fn snapshot_bench() {
    let dir = TempDir::new("bench-snap");
    println!("flint-bench snapshot: images {}", images().dir.display());
    // 1. Cold boot.
    let mut vm = VmProcess::boot_with(dir.path(), |c| c.track_dirty_pages = true);
    let agent = vm.agent(Duration::from_secs(300)).await;
    let cold_ms = vm.started.elapsed().as_secs_f64() * 1000.0;
    let (_, d) = api_call(&vm.api_sock, "GET", "/vm", None).expect("describe");
    let profile = d["host_profile"].as_str().unwrap_or("?").to_string();
    // 2. Full snapshot, then a diff after the guest touches 2 MiB.
    let full_req =
        serde_json::json!({"state_path": dir.path().join("full.state"), "mem_path": dir.path().join("full.mem")});
    let (_, full) = api_call(&vm.api_sock, "PUT", "/snapshot/create", Some(&full_req)).expect("full snapshot");
    let full = full["snapshot"].clone();
    let _ = agent
        .exec_output(flint_agent::protocol::ExecRequest {
            argv: ["/bin/dd", "if=/dev/zero", "of=/tmp/touch", "bs=64k", "count=32"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            timeout_ms: Some(120_000),
            ..Default::default()
        })
        .await;
    let diff_req = serde_json::json!({"state_path": dir.path().join("diff.state"), "mem_path": dir.path().join("diff.mem"), "kind": "diff"});
    let (_, diff) = api_call(&vm.api_sock, "PUT", "/snapshot/create", Some(&diff_req)).expect("diff snapshot");
    let diff = diff["snapshot"].clone();
    let _ = api_call(&vm.api_sock, "PUT", "/vm/shutdown", None);
    let _ = vm.wait(Duration::from_secs(30));
    drop(agent);

    // 3. Restores of the full snapshot.
    let mut rows = Vec::new();
    for mode in ["private", "uffd"] {
        let rdir = TempDir::new("bench-restore");
        let mut r = VmProcess::restore(rdir.path(), &dir.path().join("full.state"), &dir.path().join("full.mem"), mode);
        let a = r.agent(Duration::from_secs(120)).await;
        let ready_ms = r.started.elapsed().as_secs_f64() * 1000.0;
        let (_, d) = api_call(&r.api_sock, "GET", "/vm", None).expect("describe");
        drop(a);
        let _ = api_call(&r.api_sock, "PUT", "/vm/shutdown", None);
        let _ = r.wait(Duration::from_secs(30));
        rows.push((mode, ready_ms, d));
    }

    let gib = |bytes: &serde_json::Value| bytes.as_u64().unwrap_or(1) as f64 / (1u64 << 30) as f64;
    println!("host profile: {profile}; guest memory {} MiB", full["guest_memory_bytes"].as_u64().unwrap_or(0) >> 20);
    println!();
    println!("{:<44} {:>12}", "start to agent answering", "ms");
    println!("{:<44} {:>12.1}", "cold boot", cold_ms);
    for (mode, ms, _) in &rows {
        println!("{:<44} {:>12.1}   ({:.0}x faster than cold boot)", format!("restore ({mode})"), ms, cold_ms / ms);
    }
    println!();
    println!("VMM-side restore breakdown (ms)     {:>10} {:>10}", rows[0].0, rows[1].0);
    for (label, key) in [
        ("read + check state file", "read_state_us"),
        ("KVM VM + irqchip", "kvm_setup_us"),
        ("memory map / userfaultfd setup", "memory_us"),
        ("devices", "devices_us"),
        ("VM state (irqchip, PIT, clock)", "vm_state_us"),
        ("vCPU state", "vcpu_state_us"),
    ] {
        println!("  {:<34} {:>10.2} {:>10.2}", label, us(&rows[0].2["restore"][key]), us(&rows[1].2["restore"][key]));
    }
    println!(
        "  {:<34} {:>10.2} {:>10.2}",
        "process start -> first instruction",
        us(&rows[0].2["timings"]["process_to_first_run_us"]),
        us(&rows[1].2["timings"]["process_to_first_run_us"])
    );
    println!("  {:<34} {:>10} {:>10}", "VMM RSS at agent-ready (KiB)", rows[0].2["rss_kib"], rows[1].2["rss_kib"]);
    let u = &rows[1].2["uffd"];
    println!(
        "userfaultfd: {} faults served, {} pages copied, {} zero pages, {:.1} MiB read, {:.1} ms in the handler",
        u["faults"],
        u["pages_copied"],
        u["zero_pages"],
        u["bytes_read"].as_u64().unwrap_or(0) as f64 / 1048576.0,
        us(&u["handler_us"])
    );
    println!();
    println!("snapshot create                       {:>10} {:>10}", "full", "diff");
    for (label, key) in [
        ("pause", "pause_us"),
        ("save vCPU/VM/device state", "save_state_us"),
        ("write state file", "write_state_us"),
        ("write memory", "write_memory_us"),
        ("total", "total_us"),
    ] {
        println!("  {:<34} {:>8.2}ms {:>8.2}ms", label, us(&full[key]), us(&diff[key]));
    }
    println!(
        "  {:<34} {:>8.1}MB {:>8.1}MB",
        "memory bytes written",
        full["memory"]["bytes_written"].as_u64().unwrap_or(0) as f64 / 1e6,
        diff["memory"]["bytes_written"].as_u64().unwrap_or(0) as f64 / 1e6
    );
    println!(
        "  {:<34} {:>8.0}ms {:>8.0}ms",
        "memory write time per GiB of guest",
        us(&full["write_memory_us"]) / gib(&full["guest_memory_bytes"]),
        us(&diff["write_memory_us"]) / gib(&diff["guest_memory_bytes"])
    );
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes only into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Store figures for real guest memory images: the golden snapshot's memory and a clone's memory after it wrote
/// 512 KiB of files. For several chunk sizes, side by side: compression, dedup of the second image, put/publish/get
/// throughput against a real S3 server on loopback, and objects per image.
async fn store_bench() {
    use flint_snapshot_store::{ImageSource, S3Config, SnapshotDraft, Store, StoreConfig};
    let g = flint_tests::golden();
    let dir = TempDir::new("bench-store");
    // A second image: a clone of the golden snapshot after some work (files written through the agent).
    let rdir = TempDir::new("bench-store-clone");
    let mut r = VmProcess::restore(rdir.path(), &g.state, &g.mem, "private");
    let agent = r.agent(Duration::from_secs(120)).await;
    for i in 0..4 {
        let data: Vec<u8> =
            (0..(1usize << 20)).map(|j| (j as u32).wrapping_mul(2654435761).to_le_bytes()[i % 4]).collect();
        agent.write_file(&format!("/tmp/work{i}"), 0o644, &data).await.expect("write a file in the clone");
    }
    let mem2 = dir.path().join("clone.mem");
    let req = serde_json::json!({"state_path": dir.path().join("clone.state"), "mem_path": mem2});
    api_call(&r.api_sock, "PUT", "/snapshot/create", Some(&req)).expect("snapshot the clone");
    drop(agent);
    let _ = api_call(&r.api_sock, "PUT", "/vm/shutdown", None);
    let _ = r.wait(Duration::from_secs(30));

    let s3 = flint_tests::S3Server::start();
    for (k, v) in s3.env() {
        std::env::set_var(k, v);
    }
    let size = std::fs::metadata(&g.mem).map(|m| m.len()).unwrap_or(0);
    println!(
        "flint-bench store: guest memory images of {} MiB (golden, and a clone after writing 512 KiB of files)",
        size >> 20
    );
    println!(
        "S3: s3s-fs on loopback; zstd level 3; {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!();
    println!(
        "{:>6} {:>8} {:>9} {:>8} {:>10} {:>11} {:>11} {:>11} {:>11}",
        "chunk", "objects", "stored MB", "ratio", "2nd adds", "put MB/s", "put MB/s/c", "publish MB/s", "get MB/s"
    );
    for cs in [64u32 << 10, 256 << 10, 1 << 20, 4 << 20] {
        let mut cfg = StoreConfig::new(&dir.path().join(format!("l1-{cs}")));
        let mut s3c = S3Config::new(&s3.bucket);
        s3c.endpoint = Some(s3.endpoint());
        s3c.prefix = format!("bench-{cs}");
        cfg.s3 = Some(s3c);
        cfg.chunk_size = cs;
        let store = Store::open(cfg.clone()).expect("open store");
        let (c0, t0) = (cpu_seconds(), Instant::now());
        let (m1, put1) = store
            .put(SnapshotDraft::new("golden").image("memory", ImageSource::File(g.mem.clone())), false)
            .await
            .expect("put");
        let put_s = t0.elapsed().as_secs_f64();
        let put_cpu = cpu_seconds() - c0;
        let t1 = Instant::now();
        let pubr = store.publish("golden").await.expect("publish");
        let pub_s = t1.elapsed().as_secs_f64();
        let (_, put2) = store
            .put(SnapshotDraft::new("clone").image("memory", ImageSource::File(mem2.clone())), true)
            .await
            .expect("put 2");
        cfg.local_dir = dir.path().join(format!("l1-{cs}-reader"));
        let reader = Store::open(cfg).expect("open reader");
        let t2 = Instant::now();
        let out = dir.path().join("out.mem");
        reader.get_image("golden", "memory", &out).await.expect("get");
        let get_s = t2.elapsed().as_secs_f64();
        let nonzero = (put1.chunks - put1.zero_chunks) as f64 * cs as f64;
        let mb = size as f64 / 1e6;
        println!(
            "{:>5}K {:>8} {:>9.1} {:>7.1}x {:>9.2}% {:>11.0} {:>11.0} {:>11.0} {:>11.0}",
            cs >> 10,
            m1.chunk_ids().count(),
            m1.stored_bytes() as f64 / 1e6,
            nonzero / m1.stored_bytes().max(1) as f64,
            put2.new_plain_bytes as f64 * 100.0 / size as f64,
            mb / put_s,
            mb / put_cpu.max(1e-9),
            pubr.uploaded_bytes as f64 / 1e6 / pub_s,
            mb / get_s
        );
        let _ = std::fs::remove_file(&out);
    }
    println!();
    println!(
        "ratio: non-zero chunk bytes / stored bytes. 2nd adds: new chunk bytes of the clone image, % of its size."
    );
    println!(
        "put MB/s/c: logical MB per CPU-second (hash + zero check + compress). publish: stored MB uploaded per second."
    );
}

/// Restores through flintd from S3 with an empty local cache, side by side in one run: eager (whole memory image
/// first), lazy (pages on first touch; records the working set), lazy + prefetch of that working set.
fn lazy_bench(runs: usize, latency_ms: u64, workers: Option<usize>) {
    let mut s3 = flint_tests::S3Server::start();
    let _proxy = (latency_ms > 0).then(|| {
        let p = flint_tests::LatencyProxy::start(s3.port, Duration::from_millis(latency_ms));
        s3.route_through(&p);
        p
    });
    let work = TempDir::new("bench-lazy");
    let data = work.path().join("data");
    let sock = work.path().join("flintd.sock");
    let config = work.path().join("flintd.toml");
    std::fs::write(&config, workers.map(|w| format!("[store]\nlazy_fetch_workers = {w}\n")).unwrap_or_default())
        .expect("config");
    let daemon = flint_tests::Flintd::start_with(
        &data,
        &sock,
        &s3,
        "",
        &["--allow-unauthenticated-bucket", "--config", config.to_str().unwrap_or_default()],
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let call = |method: &str, path: &str, body: Option<serde_json::Value>| flintd_call(&rt, &sock, method, path, body);
    let metric = |name: &str| -> u64 {
        let (_, out) = rt
            .block_on(flint_supervisor::http::request(&sock, "GET", "/metrics", None, Duration::from_secs(10)))
            .expect("metrics");
        String::from_utf8_lossy(&out)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    };
    println!(
        "flint-bench lazy: template from {} (cold boot), pushed to S3 (s3s-fs on loopback{})",
        images().dir.display(),
        if latency_ms > 0 { format!(", {latency_ms} ms added to every request by a proxy") } else { String::new() }
    );
    if let Some(w) = workers {
        println!("page server: {w} fetch workers");
    }
    let t = call(
        "POST",
        "/v1/templates",
        Some(serde_json::json!({"name": "b", "publish": true, "init": ["/bin/sh", "-c", "echo ready > /tmp/ready"]})),
    );
    let snaps = call("GET", "/v1/snapshots", None);
    let stored = snaps
        .as_array()
        .and_then(|a| a.iter().find(|s| s["id"] == "tmpl-b"))
        .map(|s| s["stored_bytes"].as_u64().unwrap_or(0))
        .unwrap_or(0);
    println!("cold boot {:.0} ms; snapshot stores {:.1} MB", t["boot_ms"].as_f64().unwrap_or(0.0), stored as f64 / 1e6);
    println!();
    println!(
        "{:<6} {:<34} {:>12} {:>14} {:>9} {:>9} {:>10}",
        "run", "restore (empty local cache)", "ready ms", "S3 bytes", "% stored", "faults", "prefetched"
    );
    let modes = [
        ("eager (whole image first)", false),
        ("lazy, first (records working set)", true),
        ("lazy + working-set prefetch", true),
    ];
    let mut ready: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for run in 0..runs {
        // Each run restores from a snapshot with no working set yet: the template's, then a fresh snapshot of
        // an eager clone of it (same guest, no new cold boot).
        let snapshot = if run == 0 {
            "tmpl-b".to_string()
        } else {
            let c = call("POST", "/v1/clones", Some(serde_json::json!({"template": "b", "count": 1})));
            let id = c[0]["id"].as_str().unwrap_or("?").to_string();
            let snap = format!("b-run{run}");
            call("POST", &format!("/v1/vms/{id}/snapshots"), Some(serde_json::json!({"id": snap, "publish": true})));
            call("DELETE", &format!("/v1/vms/{id}"), None);
            snap
        };
        for (i, (label, lazy)) in modes.iter().enumerate() {
            call("DELETE", "/v1/store/cache", None);
            let before = metric("flint_store_remote_bytes_total");
            let c =
                call("POST", "/v1/clones", Some(serde_json::json!({"snapshot": snapshot, "count": 1, "lazy": lazy})));
            let id = c[0]["id"].as_str().unwrap_or("?").to_string();
            let d = call("GET", &format!("/v1/vms/{id}"), None);
            let u = &d["vmm"]["uffd"];
            // Every fetch is flintd's (eager: the images; lazy: its page server), so flintd's counter has them all.
            let bytes = metric("flint_store_remote_bytes_total") - before;
            let ms = d["ready_ms"].as_f64().unwrap_or(0.0);
            ready[i].push(ms);
            println!(
                "{:<6} {:<34} {:>12.1} {:>14} {:>8.1}% {:>9} {:>10}",
                run + 1,
                label,
                ms,
                bytes,
                bytes as f64 * 100.0 / stored.max(1) as f64,
                if *lazy { u["faults"].to_string() } else { "-".into() },
                if *lazy { u["prefetched_units"].to_string() } else { "-".into() }
            );
            call("DELETE", &format!("/v1/vms/{id}"), None);
        }
    }
    println!();
    println!("median of {runs} run(s):");
    for (i, (label, _)) in modes.iter().enumerate() {
        let mut v = ready[i].clone();
        v.sort_by(|a, b| a.total_cmp(b));
        println!("  {:<34} {:>10.1} ms", label, v.get(v.len() / 2).copied().unwrap_or(0.0));
    }
    println!();
    println!("ready ms: flintd's restore call start -> agent answers and refresh done (includes fetching from S3).");
    drop(daemon);
}

/// The jail's cost, side by side in one run: a flintd with the jail and one with `--no-jail`, each restoring
/// clones of the golden snapshot (eager) and booting one VM; flintd's ready time and the VMM's own timings.
fn jail_bench(runs: usize) {
    let s3 = flint_tests::S3Server::start();
    let work = TempDir::new("bench-jail");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut daemons = Vec::new();
    for (label, extra) in [("jailed", vec![]), ("no jail", vec!["--no-jail"])] {
        let data = work.path().join(label.replace(' ', "-"));
        let sock = work.path().join(format!("{}.sock", label.replace(' ', "-")));
        let prefix = label.replace(' ', "-");
        flint_tests::import_golden(&data, &s3, &prefix, "base", None);
        let mut args = vec!["--allow-unauthenticated-bucket"];
        args.extend(extra);
        let d = flint_tests::Flintd::start_with(&data, &sock, &s3, &prefix, &args);
        daemons.push((label, sock, d));
    }
    let call = |sock: &std::path::Path, method: &str, path: &str, body: Option<serde_json::Value>| {
        flintd_call(&rt, sock, method, path, body)
    };
    println!(
        "flint-bench jail: {runs} eager restore(s) of the golden snapshot and 1 cold boot, with and without the jail"
    );
    println!();
    println!(
        "{:<6} {:<8} {:>10} {:>22} {:>14} {:>12}",
        "run", "jail", "ready ms", "VMM start->1st run ms", "restore ms", "memory ms"
    );
    let mut ready: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut vmm: Vec<Vec<f64>> = vec![Vec::new(); 2];
    for run in 0..runs {
        for (i, (label, sock, _)) in daemons.iter().enumerate() {
            let c = call(sock, "POST", "/v1/clones", Some(serde_json::json!({"snapshot": "base", "count": 1})));
            let id = c[0]["id"].as_str().unwrap_or("?").to_string();
            let d = call(sock, "GET", &format!("/v1/vms/{id}"), None);
            let t = &d["vmm"]["timings"];
            let r = &d["vmm"]["restore"];
            let total_restore: u64 =
                ["read_state_us", "kvm_setup_us", "memory_us", "devices_us", "vm_state_us", "vcpu_state_us"]
                    .iter()
                    .map(|k| r[*k].as_u64().unwrap_or(0))
                    .sum();
            let first_run = ms(t["process_to_first_run_us"].as_u64().unwrap_or(0));
            let ready_ms = d["ready_ms"].as_f64().unwrap_or(0.0);
            ready[i].push(ready_ms);
            vmm[i].push(first_run);
            println!(
                "{:<6} {:<8} {:>10.1} {:>22.2} {:>14.2} {:>12.2}",
                run + 1,
                label,
                ready_ms,
                first_run,
                ms(total_restore),
                ms(r["memory_us"].as_u64().unwrap_or(0))
            );
            call(sock, "DELETE", &format!("/v1/vms/{id}"), None);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!();
    println!("median of {runs}: ready ms jailed {:.1} / no jail {:.1} (ratio {:.2}); VMM start->first run jailed {:.2} / no jail {:.2} ms",
        median(&ready[0]), median(&ready[1]), median(&ready[0]) / median(&ready[1]).max(0.001), median(&vmm[0]), median(&vmm[1]));
    println!();
    println!("cold boot (VMM-side):");
    for (label, sock, _) in &daemons {
        let v = call(sock, "POST", "/v1/vms", Some(serde_json::json!({})));
        let id = v["id"].as_str().unwrap_or("?").to_string();
        let d = call(sock, "GET", &format!("/v1/vms/{id}"), None);
        let t = &d["vmm"]["timings"];
        println!(
            "  {:<8} VMM process start -> first guest instruction {:>8.2} ms (KVM {:.2}, memory {:.2}, kernel load {:.2}, devices {:.2}); ready {:.0} ms",
            label,
            ms(t["process_to_first_run_us"].as_u64().unwrap_or(0)),
            ms(t["kvm_setup_us"].as_u64().unwrap_or(0)),
            ms(t["memory_us"].as_u64().unwrap_or(0)),
            ms(t["kernel_load_us"].as_u64().unwrap_or(0)),
            ms(t["devices_us"].as_u64().unwrap_or(0)),
            d["ready_ms"].as_f64().unwrap_or(0.0)
        );
        call(sock, "DELETE", &format!("/v1/vms/{id}"), None);
    }
    println!();
    println!(
        "ready ms: flintd's call start -> the clone's agent answers (includes fetching the images, the jail's setup in"
    );
    println!("flintd (cgroup, chown, clone into namespaces) and in the VMM (pivot_root, /dev, uid drop)).");
    drop(daemons);
}

/// Sessions, side by side in one run on one flintd: for a guest that dirtied N MiB since its base, a session's
/// hibernation (a diff, stored layered on the base) against a full snapshot of a plain clone that dirtied the
/// same (what hibernating without diffs would cost): time, bytes the VMM wrote, new bytes in the store. Then
/// wakes (lazy, from the hibernation) against eager restores of the base.
fn sessions_bench(runs: usize) {
    let s3 = flint_tests::S3Server::start();
    let work = TempDir::new("bench-sessions");
    let data = work.path().join("data");
    let sock = work.path().join("flintd.sock");
    flint_tests::import_golden(&data, &s3, "bench", "base", None);
    let _d = flint_tests::Flintd::start_with(&data, &sock, &s3, "bench", &["--allow-unauthenticated-bucket"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let call = |method: &str, path: &str, body: Option<serde_json::Value>| flintd_call(&rt, &sock, method, path, body);
    let exec = |id: &str, script: &str| {
        let t = Instant::now();
        let body = serde_json::json!({"argv": ["/bin/sh", "-c", script], "timeout_ms": 600_000});
        let out = call("POST", &format!("/v1/vms/{id}/exec"), Some(body));
        assert!(out.to_string().contains("\"code\":0"), "{script}: {out}");
        t.elapsed().as_secs_f64() * 1000.0
    };
    let dirty = |id: &str, mib: u64| {
        if mib > 0 {
            // Incompressible, distinct pages (a counter in each 16-byte line would compress).
            exec(id, &format!("dd if=/dev/urandom of=/tmp/dirty bs=1M count={mib} 2>/dev/null"));
        } else {
            exec(id, "true");
        }
    };
    // Bytes in the local cache (new chunks of a put land there first).
    let stored_before = || {
        let m = String::from_utf8_lossy(
            &rt.block_on(flint_supervisor::http::request(&sock, "GET", "/metrics", None, Duration::from_secs(30)))
                .expect("metrics")
                .1,
        )
        .into_owned();
        m.lines()
            .find_map(|l| l.strip_prefix("flint_store_l1_bytes "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    println!("flint-bench sessions: {runs} run(s) per size; 256 MiB guest restored from the golden snapshot");
    println!();
    println!("{:<5} {:>9} {:<26} {:>10} {:>14}", "run", "dirty MiB", "snapshot", "ms", "new stored MB");
    let mut wakes = Vec::new();
    let mut eager = Vec::new();
    for run in 0..runs {
        for mib in [0u64, 1, 4] {
            let sid = format!("b{run}-{mib}");
            call(
                "POST",
                "/v1/sessions",
                Some(serde_json::json!({"snapshot": "base", "id": sid, "idle_timeout_s": 3600})),
            );
            dirty(&sid, mib);
            let t = Instant::now();
            let h = call("POST", &format!("/v1/sessions/{sid}/hibernate"), None);
            let hib_ms = t.elapsed().as_secs_f64() * 1000.0;
            let hib_new = h["last_hibernate_stored_bytes"].as_u64().unwrap_or(0);
            println!(
                "{:<5} {:>9} {:<26} {:>10.0} {:>14.2}",
                run + 1,
                mib,
                "session hibernate (diff)",
                hib_ms,
                hib_new as f64 / 1e6
            );
            // The same dirtying in a plain clone, then a full snapshot (what a hibernation without diffs costs).
            let c = call("POST", "/v1/clones", Some(serde_json::json!({"snapshot": "base"})));
            let cid = c[0]["id"].as_str().unwrap_or("?").to_string();
            dirty(&cid, mib);
            let before = stored_before();
            let t = Instant::now();
            let snap = format!("full-{run}-{mib}");
            call("POST", &format!("/v1/vms/{cid}/snapshots"), Some(serde_json::json!({"id": snap})));
            let full_ms = t.elapsed().as_secs_f64() * 1000.0;
            let full_new = stored_before().saturating_sub(before);
            println!(
                "{:<5} {:>9} {:<26} {:>10.0} {:>14.2}",
                run + 1,
                mib,
                "full snapshot (clone)",
                full_ms,
                full_new as f64 / 1e6
            );
            call("DELETE", &format!("/v1/vms/{cid}"), None);
            call("DELETE", &format!("/v1/snapshots/{snap}"), None);
            // Wake (lazy, from the hibernation) vs an eager restore of the base.
            let t = Instant::now();
            let w = call("POST", &format!("/v1/sessions/{sid}/wake"), None);
            wakes.push((t.elapsed().as_secs_f64() * 1000.0, w["last_wake_ms"].as_f64().unwrap_or(0.0)));
            let c = call("POST", "/v1/clones", Some(serde_json::json!({"snapshot": "base"})));
            eager.push(c[0]["ready_ms"].as_f64().unwrap_or(0.0));
            call("DELETE", &format!("/v1/vms/{}", c[0]["id"].as_str().unwrap_or("?")), None);
            call("DELETE", &format!("/v1/sessions/{sid}"), None);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!();
    println!(
        "wake (lazy, from the hibernation): median {:.0} ms API call, {:.0} ms flintd-side; eager restore of the base: median {:.0} ms ({} of each)",
        median(wakes.iter().map(|w| w.0).collect()),
        median(wakes.iter().map(|w| w.1).collect()),
        median(eager.clone()),
        eager.len()
    );
    println!("hibernate ms: API call (before-checkpoint hook, pause, diff, layered put, VMM stop); full snapshot ms: API call");
    println!(
        "(hook, full memory write, put of every chunk). New stored MB: chunks the store did not have (compressed)."
    );
}

/// Clone rate, warm-pool hand-outs and density, on one flintd with the golden snapshot imported:
/// - N restores in one call (N = 1, 4, 8): restores per second (and per core), VMM-side (process start → first
///   guest instruction) and ready (call start → agent refreshed) p50 / p99;
/// - a template (one cold boot) with a warm pool of 4: hand-out (API call) and hand-out → first exec answered,
///   against a restore (pool empty) and its first exec;
/// - density: `--density N` (default 100) idle clones of that template running at once (a guest whose agent
///   waits: the golden snapshot's counter would keep every clone busy): RSS and PSS per VMM, host memory per
///   clone (MemAvailable before/after), the shared memory files counted once.
fn clones_bench(density: usize) -> std::collections::BTreeMap<&'static str, f64> {
    let mut fig = std::collections::BTreeMap::new();
    let s3 = flint_tests::S3Server::start();
    let work = TempDir::new("bench-clones");
    let data = work.path().join("data");
    let sock = work.path().join("flintd.sock");
    flint_tests::import_golden(&data, &s3, "bench", "base", None);
    let config = work.path().join("flintd.toml");
    std::fs::write(&config, format!("[limits]\nmax_vms = {}\n", density + 64)).expect("config");
    let _d = flint_tests::Flintd::start_with(
        &data,
        &sock,
        &s3,
        "bench",
        &["--allow-unauthenticated-bucket", "--config", config.to_str().unwrap_or_default()],
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let call = |method: &str, path: &str, body: Option<serde_json::Value>| flintd_call(&rt, &sock, method, path, body);
    let pct = |v: &[f64], p: f64| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0)
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    println!(
        "flint-bench clones: golden snapshot (256 MiB guest), eager restores sharing one memory file, {cores} cores"
    );
    println!();
    println!(
        "{:>3} {:>10} {:>12} {:>16} {:>16} {:>14} {:>14} {:>18}",
        "N",
        "wall ms",
        "restores/s",
        "restores/s/core",
        "VMM-side p50 ms",
        "VMM p99 ms",
        "ready p50/p99",
        "agent/refresh p50"
    );
    for n in [1usize, 4, 8] {
        let t = Instant::now();
        let c = call("POST", "/v1/clones", Some(serde_json::json!({"snapshot": "base", "count": n})));
        let wall = t.elapsed().as_secs_f64();
        let ids: Vec<String> =
            c.as_array().into_iter().flatten().filter_map(|v| v["id"].as_str().map(String::from)).collect();
        let mut vmm = Vec::new();
        let mut ready = Vec::new();
        let mut agent = Vec::new();
        let mut refresh = Vec::new();
        let mut steps: std::collections::BTreeMap<String, Vec<f64>> = std::collections::BTreeMap::new();
        let mut refresh_guest = Vec::new();
        for id in &ids {
            let d = call("GET", &format!("/v1/vms/{id}"), None);
            for (k, v) in d["refresh_steps_us"].as_object().into_iter().flatten() {
                steps.entry(k.clone()).or_default().push(v.as_f64().unwrap_or(0.0) / 1000.0);
            }
            refresh_guest.push(d["refresh_guest_ms"].as_f64().unwrap_or(0.0));
            vmm.push(ms(d["vmm"]["timings"]["process_to_first_run_us"].as_u64().unwrap_or(0)));
            ready.push(d["ready_ms"].as_f64().unwrap_or(0.0));
            agent.push(d["agent_ms"].as_f64().unwrap_or(0.0));
            refresh.push(d["refresh_ms"].as_f64().unwrap_or(0.0));
        }
        println!(
            "{:>3} {:>10.0} {:>12.2} {:>16.2} {:>16.2} {:>14.2} {:>7.0}/{:<6.0} {:>8.0}/{:<8.0}",
            n,
            wall * 1000.0,
            ids.len() as f64 / wall,
            ids.len() as f64 / wall / cores,
            pct(&vmm, 0.5),
            pct(&vmm, 0.99),
            pct(&ready, 0.5),
            pct(&ready, 0.99),
            pct(&agent, 0.5),
            pct(&refresh, 0.5)
        );
        if n == 1 {
            let parts: Vec<String> = steps.iter().map(|(k, v)| format!("{k} {:.1}", pct(v, 0.5))).collect();
            println!(
                "    guest side, one clone: agent connected {:.0} ms after the VMM started; refresh {:.0} ms, of which the agent {:.1} ms ({}), the rest vsock and flintd",
                pct(&agent, 0.5),
                pct(&refresh, 0.5),
                pct(&refresh_guest, 0.5),
                parts.join(", ")
            );
            fig.insert("agent_ms_1", pct(&agent, 0.5));
            fig.insert("refresh_ms_1", pct(&refresh, 0.5));
            fig.insert("refresh_guest_ms_1", pct(&refresh_guest, 0.5));
        }
        if n == 8 {
            fig.insert("rate_per_core", ids.len() as f64 / wall / cores);
            fig.insert("vmm_p50_ms", pct(&vmm, 0.5));
            fig.insert("vmm_p99_ms", pct(&vmm, 0.99));
            fig.insert("ready_p50_ms", pct(&ready, 0.5));
            fig.insert("ready_p99_ms", pct(&ready, 0.99));
        }
        for id in &ids {
            call("DELETE", &format!("/v1/vms/{id}"), None);
        }
    }

    println!();
    println!("warm pool (template `bt`, one cold boot, pool of 4):");
    let t = Instant::now();
    call("POST", "/v1/templates", Some(serde_json::json!({"name": "bt", "init": ["/bin/true"], "pool_size": 4})));
    println!("  template created in {:.1} s; waiting for the pool", t.elapsed().as_secs_f64());
    let pooled = || {
        call("GET", "/v1/vms", None)
            .as_array()
            .map(|a| a.iter().filter(|v| v["owner"]["id"] == "bt" && v["status"] == "paused").count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while pooled() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    // (wall ms, the agent's own ms, flintd's wait for the agent in ms) of an exec of /bin/true: the exec answer's
    // last line is {"exit": {...}}.
    let exec_true = |id: &str| {
        let t = Instant::now();
        let body = serde_json::json!({"argv": ["/bin/true"]}).to_string().into_bytes();
        let (status, out) = rt
            .block_on(flint_supervisor::http::request(
                &sock,
                "POST",
                &format!("/v1/vms/{id}/exec"),
                Some(&body),
                Duration::from_secs(600),
            ))
            .expect("exec");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&out));
        let wall = t.elapsed().as_secs_f64() * 1000.0;
        let exit = String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v.get("exit").is_some())
            .unwrap_or_default();
        let e = &exit["exit"];
        (wall, e["guest_ms"].as_f64().unwrap_or(0.0), e["agent_ms"].as_f64().unwrap_or(f64::NAN))
    };
    let mut rows = Vec::new();
    let (mut flintd_side, mut minus_agent_own, mut handout_total, mut resume) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..4 {
        let t = Instant::now();
        let c = call("POST", "/v1/clones", Some(serde_json::json!({"template": "bt"})));
        let api = t.elapsed().as_secs_f64() * 1000.0;
        let id = c[0]["id"].as_str().unwrap_or("?").to_string();
        let (first, first_guest, first_agent) = exec_true(&id);
        // flintd's side: both calls' wall time (this client's, over the API socket) minus flintd's waits for the
        // agent's answers (refresh sent → answered, exec sent → exit read): the API, the records' commits, the
        // VMM's resume and the agent connection's host end stay in; the vsock device, the guest kernel and the
        // agent go out. The older figure subtracted only what the agent reports for itself.
        let refresh_agent = c[0]["refresh_agent_ms"].as_f64().unwrap_or(f64::NAN);
        let refresh_guest = c[0]["refresh_guest_ms"].as_f64().unwrap_or(0.0);
        flintd_side.push(api - refresh_agent + first - first_agent);
        minus_agent_own.push(api - refresh_guest + first - first_guest);
        resume.push(c[0]["resume_ms"].as_f64().unwrap_or(f64::NAN));
        handout_total.push(api + first);
        rows.push((format!("hand-out {}", i + 1), api, first, id));
    }
    fig.insert("handout_exec_total_ms", pct(&handout_total, 0.5));
    fig.insert("handout_exec_flintd_ms", pct(&flintd_side, 0.5));
    fig.insert("handout_exec_flintd_max_ms", pct(&flintd_side, 1.0));
    fig.insert("handout_exec_minus_agent_own_ms", pct(&minus_agent_own, 0.5));
    fig.insert("handout_resume_ms", pct(&resume, 0.5));
    println!(
        "  hand-out → first exec answered: {:.1} ms p50 in all; flintd's side (minus flintd's waits for the agent) \
         {:.1} ms p50 (max {:.1}), of which the VMM's resume {:.1} ms; minus only the agent's own time {:.1} ms",
        pct(&handout_total, 0.5),
        pct(&flintd_side, 0.5),
        pct(&flintd_side, 1.0),
        pct(&resume, 0.5),
        pct(&minus_agent_own, 0.5)
    );
    call("POST", "/v1/templates/bt/pool", Some(serde_json::json!({"size": 0})));
    let t = Instant::now();
    let c = call("POST", "/v1/clones", Some(serde_json::json!({"template": "bt"})));
    let api = t.elapsed().as_secs_f64() * 1000.0;
    let id = c[0]["id"].as_str().unwrap_or("?").to_string();
    let (first, _, _) = exec_true(&id);
    rows.push(("restore (no pool)".into(), api, first, id));
    println!("  {:<20} {:>12} {:>22}", "", "API call ms", "then exec /bin/true ms");
    for (label, api, first, id) in &rows {
        println!("  {label:<20} {api:>12.1} {first:>22.1}");
        call("DELETE", &format!("/v1/vms/{id}"), None);
    }

    println!();
    println!("density: {density} idle clones of template `bt` running at once");
    let avail = || {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    l.strip_prefix("MemAvailable:")
                        .map(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap_or(0))
                })
            })
            .unwrap_or(0)
    };
    let before = avail();
    let mut ids = Vec::new();
    while ids.len() < density {
        let n = (density - ids.len()).min(8);
        let c = call("POST", "/v1/clones", Some(serde_json::json!({"template": "bt", "count": n})));
        ids.extend(c.as_array().into_iter().flatten().filter_map(|v| v["id"].as_str().map(String::from)));
    }
    std::thread::sleep(Duration::from_secs(5));
    let after = avail();
    let (mut rss, mut pss, mut pids) = (Vec::new(), Vec::new(), Vec::new());
    for id in &ids {
        let d = call("GET", &format!("/v1/vms/{id}"), None);
        let pid = d["pid"].as_u64().unwrap_or(0);
        pids.push(pid);
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        let field = |name: &str| {
            rollup
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        rss.push(field("Rss:") / 1024.0);
        pss.push(field("Pss:") / 1024.0);
    }
    // The shared memory files, by inode, and how many of the clones' VMMs map each (through /proc/PID/map_files:
    // a jailed VMM names the file by another path).
    use std::os::unix::fs::MetadataExt;
    let mut shared: std::collections::BTreeMap<u64, (f64, usize)> = std::fs::read_dir(data.join("shared"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| (m.ino(), (m.blocks() as f64 * 512.0 / (1 << 20) as f64, 0)))
        .collect();
    for pid in &pids {
        let inodes: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/map_files"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::metadata(e.path()).ok())
            .map(|m| m.ino())
            .collect();
        for ino in inodes {
            if let Some(f) = shared.get_mut(&ino) {
                f.1 += 1;
            }
        }
    }
    let mapped: Vec<&(f64, usize)> = shared.values().filter(|f| f.1 > 0).collect();
    let mapped_mib: f64 = mapped.iter().map(|f| f.0).sum();
    let mapped_by: Vec<usize> = mapped.iter().map(|f| f.1).collect();
    println!(
        "  per VMM: RSS p50 {:.1} MiB, PSS p50 {:.1} MiB (p99 {:.1}); all VMMs' PSS {:.0} MiB",
        pct(&rss, 0.5),
        pct(&pss, 0.5),
        pct(&pss, 0.99),
        pss.iter().sum::<f64>()
    );
    let per_clone = before.saturating_sub(after) as f64 / 1024.0 / ids.len().max(1) as f64;
    println!(
        "  host memory per clone (MemAvailable drop / N): {per_clone:.1} MiB; the memory file(s) they map: {} \
         holding {mapped_mib:.1} MiB, mapped by {mapped_by:?} of the {} VMMs (counted once)",
        mapped_by.len(),
        pids.len()
    );
    fig.insert("pss_p50_mib", pct(&pss, 0.5));
    fig.insert("rss_p50_mib", pct(&rss, 0.5));
    fig.insert("host_mib_per_clone", per_clone);
    fig.insert("density_n", ids.len() as f64);
    for id in &ids {
        call("DELETE", &format!("/v1/vms/{id}"), None);
    }
    call("DELETE", "/v1/templates/bt", None);
    fig
}

/// VMM-side restore (process start → first guest instruction), side by side in one run: this build's flint-vmm
/// against a baseline binary (`FLINT_VMM_BASELINE`, e.g. the previous release), alternating, `runs` restores
/// each, of a 256 MiB and a 2 GiB snapshot made here (two cold boots). Unjailed (the
/// jail's own cost is `flint-bench jail`); private (mmap) memory.
async fn restore_floor_bench(runs: usize) -> Vec<(String, String, f64)> {
    let mut fig = Vec::new();
    let current = bin_dir().join("flint-vmm");
    let baseline = std::env::var_os("FLINT_VMM_BASELINE").map(std::path::PathBuf::from);
    let work = TempDir::new("bench-floor");
    // A 256 MiB and a 2 GiB snapshot made here (two cold boots): boot, wait for the agent, snapshot. Without a
    // network card, so a baseline from before cards were always there restores them too.
    for (name, mem) in [("small", "256"), ("big", "2048")] {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        let mem_mib: u64 = mem.parse().unwrap_or(256);
        let mut vm = VmProcess::boot_with(&dir, |c| c.mem_mib = mem_mib);
        drop(vm.agent(Duration::from_secs(600)).await);
        let req = serde_json::json!({"state_path": dir.join("vm.state"), "mem_path": dir.join("vm.mem")});
        api_call(&vm.api_sock, "PUT", "/snapshot/create", Some(&req)).expect("snapshot");
        let _ = api_call(&vm.api_sock, "PUT", "/vm/shutdown", None);
        let _ = vm.wait(Duration::from_secs(30));
    }
    let (small, big) = (work.path().join("small"), work.path().join("big"));
    let one = |bin: &std::path::Path, state: &std::path::Path, mem: &std::path::Path| -> serde_json::Value {
        let dir = TempDir::new("floor-run");
        let spec = serde_json::json!({
            "api_sock": dir.path().join("api.sock"),
            "seccomp": true,
            "launch": {"restore": {
                "state_path": state,
                "memory": {"mode": "private", "path": mem},
                "devices": {"vsock_uds": dir.path().join("v.sock"), "console": "off"},
                "track_dirty_pages": false,
            }},
        });
        std::fs::write(dir.path().join("spec.json"), spec.to_string()).expect("spec");
        let mut child = std::process::Command::new(bin)
            .arg("--spec")
            .arg(dir.path().join("spec.json"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("flint-vmm");
        let deadline = Instant::now() + Duration::from_secs(30);
        let d = loop {
            if let Ok((200, d)) = api_call(&dir.path().join("api.sock"), "GET", "/vm", None) {
                if d["timings"]["process_to_first_run_us"].as_u64().unwrap_or(0) > 0 {
                    break d;
                }
            }
            assert!(Instant::now() < deadline, "restore did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = child.kill();
        let _ = child.wait();
        d
    };
    let mut bins: Vec<(&str, std::path::PathBuf)> = Vec::new();
    if let Some(b) = &baseline {
        bins.push(("baseline", b.clone()));
    }
    bins.push(("this build", current.clone()));
    println!("flint-bench restore-floor: {runs} restore(s) per binary and size, alternating; VMM process start → first guest instruction");
    if let Some(b) = &baseline {
        println!("baseline: {}", b.display());
    }
    println!("this build: {}", current.display());
    println!();
    println!(
        "{:<8} {:<11} {:>8} {:>8} {:>8}   {:>9} {:>9} {:>9} {:>9} {:>9}",
        "guest", "binary", "p50 ms", "p90 ms", "max ms", "state", "KVM", "memory", "devices", "vCPUs"
    );
    for (label, state, mem) in
        [("256 MiB", small.join("vm.state"), small.join("vm.mem")), ("2 GiB", big.join("vm.state"), big.join("vm.mem"))]
    {
        let mut results: Vec<Vec<serde_json::Value>> = vec![Vec::new(); bins.len()];
        for _ in 0..runs {
            for (i, (_, b)) in bins.iter().enumerate() {
                results[i].push(one(b, &state, &mem));
            }
        }
        for (i, (name, _)) in bins.iter().enumerate() {
            let mut total: Vec<f64> =
                results[i].iter().map(|d| ms(d["timings"]["process_to_first_run_us"].as_u64().unwrap_or(0))).collect();
            total.sort_by(|a, b| a.total_cmp(b));
            let med = |k: &str| {
                let mut v: Vec<f64> = results[i].iter().map(|d| ms(d["restore"][k].as_u64().unwrap_or(0))).collect();
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            };
            fig.push((label.to_string(), name.to_string(), total[total.len() / 2]));
            println!(
                "{:<8} {:<11} {:>8.2} {:>8.2} {:>8.2}   {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                label,
                name,
                total[total.len() / 2],
                total[(total.len() * 9 / 10).min(total.len() - 1)],
                total[total.len() - 1],
                med("read_state_us"),
                med("kvm_setup_us"),
                med("memory_us"),
                med("devices_us"),
                med("vcpu_state_us")
            );
        }
    }
    println!();
    println!("breakdown: medians in ms (state file read, KVM VM + irqchip, memory mapped and registered, devices, vCPU state).");
    fig
}

/// `flint-bench floor`: #18's figures from one run on one host, in one table: VMM-side restore (this build and
/// `FLINT_VMM_BASELINE` side by side), clone rate, warm-pool hand-out → first exec (in all and flintd's side),
/// density.
async fn floor_bench(runs: usize) {
    let restore = restore_floor_bench(runs).await;
    println!();
    let standby = std::thread::spawn(move || standby_bench(runs)).join().unwrap_or_default();
    let sb = |size: &str, mode: &str| {
        standby.iter().find(|(s, m, _)| s == size && m == mode).map(|x| format!("{:.2}", x.2)).unwrap_or("-".into())
    };
    println!();
    let clones = std::thread::spawn(|| clones_bench(100)).join().unwrap_or_default();
    let f = |k: &str| clones.get(k).copied().unwrap_or(f64::NAN);
    let r = |size: &str, bin: &str| {
        restore.iter().find(|(s, b, _)| s == size && b == bin).map(|x| format!("{:.2}", x.2)).unwrap_or("-".into())
    };
    println!();
    println!(
        "=== one run, one host ({} cores) ===",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("`before #18`: the issue's figures (make demo on this host); `baseline`: FLINT_VMM_BASELINE in this run.");
    let row = |name: &str, target: &str, before: &str, baseline: String, now: String| {
        println!("{name:<52} {target:>7} {before:>12} {baseline:>10} {now:>11}");
    };
    let none = String::new;
    row("figure", "target", "before #18", "baseline".into(), "this build".into());
    row("VMM-side restore p50, 256 MiB (ms)", "≤ 3", "8.8-16.8", r("256 MiB", "baseline"), r("256 MiB", "this build"));
    row("VMM-side restore p50, 2 GiB (ms)", "≤ 4", "-", r("2 GiB", "baseline"), r("2 GiB", "this build"));
    println!("jailed, through flintd: request → first instruction; `baseline` column: no standby VMM (#30):");
    row(
        "  with a standby VMM p50, 256 MiB (ms)",
        "≤ 1.5",
        "4.3-5.2",
        sb("256 MiB", "spawned"),
        sb("256 MiB", "standby"),
    );
    row("  with a standby VMM p50, 2 GiB (ms)", "≤ 2", "-", sb("2 GiB", "spawned"), sb("2 GiB", "standby"));
    row(
        "  standby 256 MiB: alone → beside a spinning VM (ms)",
        "≤ 2x",
        "-",
        sb("256 MiB", "standby"),
        sb("256 MiB", "spinner"),
    );
    row("restore → agent ready p50, 8 at once (ms)", "", "255-314 (1)", none(), format!("{:.0}", f("ready_p50_ms")));
    row("restore → agent ready p99, 8 at once (ms)", "", "", none(), format!("{:.0}", f("ready_p99_ms")));
    row("clone rate, 8 at once (restores/s/core)", "", "-", none(), format!("{:.2}", f("rate_per_core")));
    row("one clone: VMM start → agent connected (ms)", "", "-", none(), format!("{:.0}", f("agent_ms_1")));
    row("one clone: refresh (ms)", "", "-", none(), format!("{:.0}", f("refresh_ms_1")));
    row("  … of which inside the agent (ms)", "", "-", none(), format!("{:.1}", f("refresh_guest_ms_1")));
    row(
        "hand-out → first exec answered, flintd-side (ms)",
        "≤ 50",
        "-",
        none(),
        format!("{:.1}", f("handout_exec_flintd_ms")),
    );
    row("  … max of 4 (ms)", "", "-", none(), format!("{:.1}", f("handout_exec_flintd_max_ms")));
    row("  … of which the VMM's resume (ms)", "", "-", none(), format!("{:.1}", f("handout_resume_ms")));
    row(
        "  … minus only the agent's own time (ms)",
        "",
        "-",
        none(),
        format!("{:.1}", f("handout_exec_minus_agent_own_ms")),
    );
    row("  … in all, the guest's time included (ms)", "", "-", none(), format!("{:.0}", f("handout_exec_total_ms")));
    row("idle clone's VMM PSS p50 (MiB)", "", "-", none(), format!("{:.1}", f("pss_p50_mib")));
    row("host memory per idle clone (MiB)", "", "256+ (2)", none(), format!("{:.1}", f("host_mib_per_clone")));
    println!("(1) one clone at a time. (2) every eager clone had its own copy of the memory image.");
}

/// `flint-bench net [--runs N]`: VM create (restore) time with and without a network, side by side; requests per
/// second and latency to a guest's busybox httpd through flintd's front end vs. straight to the guest's address,
/// with 1 and 16 concurrent clients. flintd runs in a network namespace of its own (nothing touches the host's).
fn net_bench(runs: usize) {
    use std::io::{Read, Write};
    let host = flint_tests::TestNetns::new("bench-net");
    let work = TempDir::new("bench-net");
    let data = work.path().join("data");
    let _reap = flint_tests::KillVmmsUnder(data.clone());
    let sock = work.path().join("flintd.sock");
    let config = work.path().join("flintd.toml");
    std::fs::write(&config, "[network]\npool = \"10.78.0.0/24\"\nfront_end = \"127.0.0.1:18481\"\n").expect("config");
    flint_tests::import_golden_local(&data, "base");
    let args = ["--config", config.to_str().unwrap_or_default()];
    let _d = flint_tests::Flintd::start_full(&data, &sock, None, &args, Some(&host.path()));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let call = |method: &str, path: &str, body: Option<serde_json::Value>| flintd_call(&rt, &sock, method, path, body);
    let p50 = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!("flint-bench net: golden snapshot (256 MiB guest), eager restores, {runs} run(s) each, alternating");
    let (mut plain, mut netted, mut net_ms, mut plain_api, mut net_api) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut plain_refresh, mut net_refresh) = (vec![], vec![]);
    for _ in 0..runs {
        for with in [false, true] {
            let mut body = serde_json::json!({"snapshot": "base", "count": 1});
            if with {
                body["network"] = serde_json::json!({});
            }
            let t = Instant::now();
            let c = call("POST", "/v1/clones", Some(body));
            let api = t.elapsed().as_secs_f64() * 1000.0;
            let vm = &c[0];
            let id = vm["id"].as_str().unwrap_or_default().to_string();
            let ready = vm["ready_ms"].as_f64().unwrap_or(0.0);
            let refresh = vm["refresh_ms"].as_f64().unwrap_or(0.0);
            if with {
                netted.push(ready);
                net_api.push(api);
                net_ms.push(vm["net_ms"].as_f64().unwrap_or(0.0));
                net_refresh.push(refresh);
            } else {
                plain.push(ready);
                plain_api.push(api);
                plain_refresh.push(refresh);
            }
            call("DELETE", &format!("/v1/vms/{id}"), None);
        }
    }
    println!();
    println!("{:<34} {:>12} {:>12} {:>12}", "restore → agent ready (p50)", "ready ms", "API call ms", "refresh ms");
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>12.1}",
        "without a network",
        p50(&plain),
        p50(&plain_api),
        p50(&plain_refresh)
    );
    println!("{:<34} {:>12.1} {:>12.1} {:>12.1}", "with a network", p50(&netted), p50(&net_api), p50(&net_refresh));
    println!(
        "{:<34} {:>12.1}   (namespace, tap, veth, addresses, nftables, DNS proxy; x{:.2} ready time)",
        "  building the network (flintd)",
        p50(&net_ms),
        p50(&netted) / p50(&plain).max(0.001)
    );

    // A guest web server: busybox httpd (one fork per connection in the guest).
    let c = call(
        "POST",
        "/v1/clones",
        Some(serde_json::json!({"snapshot": "base", "count": 1, "network": {"ports": {"8080": {}}}})),
    );
    let id = c[0]["id"].as_str().unwrap_or_default().to_string();
    let n = call("GET", &format!("/v1/vms/{id}/network"), None);
    let guest = format!("{}:8080", n["address"].as_str().unwrap_or_default());
    let script = "mkdir -p /www && echo hello > /www/index.html && httpd -p 8080 -h /www";
    call(
        "POST",
        &format!("/v1/vms/{id}/exec"),
        Some(serde_json::json!({"argv": ["/bin/sh", "-c", script], "timeout_ms": 60000})),
    );
    let one = move |addr: String, host_hdr: Option<String>| -> f64 {
        let t = Instant::now();
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        let h = host_hdr.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
        let _ = write!(s, "GET / HTTP/1.0\r\n{h}\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(
            out.starts_with(b"HTTP/1.") && out.windows(5).any(|w| w == b"hello"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        t.elapsed().as_secs_f64() * 1000.0
    };
    println!();
    println!("requests to the guest's httpd (HTTP/1.0, a connection each), from flintd's namespace:");
    println!("{:<26} {:>8} {:>10} {:>12} {:>12}", "path", "clients", "requests", "requests/s", "p50 ms");
    let fe_host = format!("8080-{id}.flint.localhost");
    let mut rates = std::collections::BTreeMap::new();
    for clients in [1usize, 16] {
        for (name, addr, hdr) in [
            ("direct to the guest", guest.clone(), None),
            ("through the front end", "127.0.0.1:18481".to_string(), Some(fe_host.clone())),
        ] {
            let per = if clients == 1 { 8 } else { 2 };
            let (addr2, hdr2) = (addr.clone(), hdr.clone());
            let (lat, wall) = host.enter(move || {
                let t = Instant::now();
                let threads: Vec<_> = (0..clients)
                    .map(|_| {
                        let (a, h) = (addr2.clone(), hdr2.clone());
                        std::thread::spawn(move || (0..per).map(|_| one(a.clone(), h.clone())).collect::<Vec<f64>>())
                    })
                    .collect();
                let lat: Vec<f64> = threads.into_iter().flat_map(|t| t.join().unwrap_or_default()).collect();
                (lat, t.elapsed().as_secs_f64())
            });
            let rate = lat.len() as f64 / wall;
            rates.insert((clients, name), (rate, p50(&lat)));
            println!("{:<26} {:>8} {:>10} {:>12.2} {:>12.1}", name, clients, lat.len(), rate, p50(&lat));
        }
        let (d, f) = (rates[&(clients, "direct to the guest")], rates[&(clients, "through the front end")]);
        println!(
            "  front end vs direct, {clients} client(s): {:+.1} ms p50 latency, x{:.2} requests/s",
            f.1 - d.1,
            f.0 / d.0.max(0.0001)
        );
    }
    call("DELETE", &format!("/v1/vms/{id}"), None);
}

/// `POST /v1/vms/{id}/run`: the final `result` line of the NDJSON answer, and the wall time of the call.
fn run_python(rt: &tokio::runtime::Runtime, sock: &std::path::Path, id: &str, code: &str) -> (serde_json::Value, f64) {
    let body = serde_json::json!({"code": code}).to_string();
    let t = Instant::now();
    let (status, out) = rt
        .block_on(flint_supervisor::http::request(
            sock,
            "POST",
            &format!("/v1/vms/{id}/run"),
            Some(body.as_bytes()),
            Duration::from_secs(600),
        ))
        .expect("flintd");
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let text = String::from_utf8_lossy(&out);
    assert!(status < 300, "run in {id}: {status} {text}");
    let result = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("result").cloned())
        .unwrap_or_else(|| panic!("run in {id}: no result in {text}"));
    assert_eq!(result["status"], "ok", "run in {id}: {text}");
    (result, ms)
}

/// The Python image (#17): a cold boot → first `print` answered vs. a clone of the warm template → first `print`
/// answered, side by side in one run; the per-session cost of the writable disk (what a hibernation stores after
/// 1 MiB written to the disk vs. to tmpfs, and the disk file's host bytes).
fn python_bench(runs: usize) {
    let image = flint_tests::named_image("python");
    let work = TempDir::new("bench-python");
    let data = work.path().join("data");
    let _reap = flint_tests::KillVmmsUnder(data.clone());
    let sock = work.path().join("flintd.sock");
    let image_arg = format!("python={}", image.display());
    let _d = flint_tests::Flintd::start_full(&data, &sock, None, &["--image", &image_arg], None);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let call = |method: &str, path: &str, body: Option<serde_json::Value>| flintd_call(&rt, &sock, method, path, body);
    let p50 = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!("flint-bench python: image {} (256 MiB guests, 64 MiB disks)", image.display());

    // Cold: boot the image, then the first print (which waits for the runner to start).
    let t = Instant::now();
    let vm = call("POST", "/v1/vms", Some(serde_json::json!({"image": "python", "disk_mib": 64})));
    let cold_boot = t.elapsed().as_secs_f64() * 1000.0;
    let id = vm["id"].as_str().unwrap_or_default().to_string();
    let (_, cold_print) = run_python(&rt, &sock, &id, "print(6*7)");
    let cold_total = t.elapsed().as_secs_f64() * 1000.0;
    let (_, cold_second) = run_python(&rt, &sock, &id, "print(6*7)");
    call("DELETE", &format!("/v1/vms/{id}"), None);

    // Warm: the template (boot, runner warm, snapshot), then clones.
    let t = Instant::now();
    let tmpl =
        call("POST", "/v1/templates", Some(serde_json::json!({"name": "py", "image": "python", "disk_mib": 64})));
    let tmpl_ms = t.elapsed().as_secs_f64() * 1000.0;
    let (mut clone_ready, mut clone_print, mut clone_total, mut clone_guest) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let t = Instant::now();
        let c = call("POST", "/v1/clones", Some(serde_json::json!({"template": "py", "count": 1})));
        let ready = t.elapsed().as_secs_f64() * 1000.0;
        let id = c[0]["id"].as_str().unwrap_or_default().to_string();
        let (r, print) = run_python(&rt, &sock, &id, "print(6*7)");
        clone_total.push(t.elapsed().as_secs_f64() * 1000.0);
        clone_ready.push(ready);
        clone_print.push(print);
        clone_guest.push(r["guest_ms"].as_f64().unwrap_or(0.0));
        call("DELETE", &format!("/v1/vms/{id}"), None);
    }
    println!();
    println!("{:<44} {:>12} {:>14} {:>12}", "first print(6*7) answered", "start ms", "first run ms", "total ms");
    println!("{:<44} {:>12.1} {:>14.1} {:>12.1}", "cold boot of the image", cold_boot, cold_print, cold_total);
    println!(
        "{:<44} {:>12.1} {:>14.1} {:>12.1}   (p50 of {runs}; x{:.0} faster)",
        "clone of the warm template",
        p50(&clone_ready),
        p50(&clone_print),
        p50(&clone_total),
        cold_total / p50(&clone_total).max(0.001)
    );
    println!(
        "  a warm runner's run: {:.1} ms in the guest (p50), {:.1} ms for a second run in the cold VM; template {:.1} s \
         (boot {:.1} s, snapshot with the runner warm {:.1} s)",
        p50(&clone_guest),
        cold_second,
        tmpl_ms / 1000.0,
        tmpl["boot_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        tmpl["snapshot_ms"].as_f64().unwrap_or(0.0) / 1000.0
    );

    // Per-session disk overhead: a hibernation after 1 MiB written to tmpfs (memory) vs. to the disk.
    let s = call("POST", "/v1/sessions", Some(serde_json::json!({"template": "py", "id": "s1"})));
    let sid = s["id"].as_str().unwrap_or("s1").to_string();
    let exec = |script: &str| {
        let body = serde_json::json!({"argv": ["/bin/sh", "-c", script]}).to_string();
        rt.block_on(flint_supervisor::http::request(
            &sock,
            "POST",
            &format!("/v1/vms/{sid}/exec"),
            Some(body.as_bytes()),
            Duration::from_secs(600),
        ))
        .expect("exec");
    };
    let hibernate = || {
        let h = call("POST", &format!("/v1/sessions/{sid}/hibernate"), None);
        let stored = h["last_hibernate_stored_bytes"].as_u64().unwrap_or(0);
        call("POST", &format!("/v1/sessions/{sid}/wake"), None);
        stored
    };
    let idle = hibernate();
    exec("head -c 1048576 /dev/urandom > /tmp/blob && sync");
    let tmpfs = hibernate();
    exec("rm -f /tmp/blob; head -c 1048576 /dev/urandom > /root/blob && sync");
    let disk = hibernate();
    let vm = call("GET", &format!("/v1/sessions/{sid}"), None);
    let vm_id = vm["vm"].as_str().unwrap_or_default().to_string();
    let disk_file = data.join("vms").join(&vm_id).join("drive1.img");
    let host_bytes = flint_supervisor::image::allocated_bytes(&disk_file);
    call("DELETE", &format!("/v1/sessions/{sid}"), None);
    let mb = |b: u64| b as f64 / 1e6;
    println!();
    println!("{:<52} {:>14}", "session hibernation (diff) after …", "new stored MB");
    println!("{:<52} {:>14.2}", "nothing written", mb(idle));
    println!("{:<52} {:>14.2}", "1 MiB of random bytes written to /tmp (memory)", mb(tmpfs));
    println!("{:<52} {:>14.2}", "1 MiB of random bytes written to /root (its disk)", mb(disk));
    println!(
        "  the session's 64 MiB disk holds {:.2} MB on the host after it (sparse; the image's {} MiB root is shared)",
        mb(host_bytes),
        std::fs::metadata(image.join("rootfs.ext4")).map(|m| m.len() >> 20).unwrap_or(0)
    );
}

/// E2B's unchanged Python SDK against flintd's E2B endpoint, side by side with the same operations through Flint's
/// own API in the same run: create → first command, a command, pause (hibernate) and connect (wake), 8 MiB file
/// write and read.
fn e2b_bench(runs: usize) {
    let image = flint_tests::named_image("e2b");
    let work = TempDir::new("bench-e2b");
    let data = work.path().join("data");
    let _reap = flint_tests::KillVmmsUnder(data.clone());
    let sock = work.path().join("flintd.sock");
    let image_arg = format!("e2b={}", image.display());
    let listen = "127.0.0.1:18780";
    let _d =
        flint_tests::Flintd::start_full(&data, &sock, None, &["--image", &image_arg, "--e2b-listen", listen], None);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let call = |method: &str, path: &str, body: Option<serde_json::Value>| flintd_call(&rt, &sock, method, path, body);
    let p50 = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let t = Instant::now();
    call("POST", "/v1/templates", Some(serde_json::json!({"name": "base", "image": "e2b"})));
    println!(
        "flint-bench e2b: template `base` from {} in {:.1} s; {runs} run(s) each",
        image.display(),
        t.elapsed().as_secs_f64()
    );
    let key = call("POST", "/v1/e2b/keys", Some(serde_json::json!({"name": "bench"})))["key"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let python = flint_tests::e2b_python(&["e2b==2.63.0"]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("e2b/bench.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(runs.to_string())
        .env("E2B_API_KEY", &key)
        .env("E2B_API_URL", format!("http://{listen}"))
        .env("E2B_SANDBOX_URL", format!("http://{listen}"))
        .output()
        .expect("run the SDK bench");
    assert!(out.status.success(), "the SDK bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let sdk: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the SDK bench's JSON");
    let sdk_p50 = |k: &str| {
        p50(&sdk[k].as_array().map(|a| a.iter().filter_map(|v| v.as_f64()).collect::<Vec<_>>()).unwrap_or_default())
    };
    // The same through Flint's own API (a session is what an E2B sandbox is).
    let blob: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let (mut create, mut first, mut run, mut pause, mut wake, mut write, mut read) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let client = flint_supervisor::client::Client::new(&sock);
    for _ in 0..runs {
        let t = Instant::now();
        let s = call("POST", "/v1/sessions", Some(serde_json::json!({"template": "base"})));
        create.push(t.elapsed().as_secs_f64() * 1e3);
        let id = s["id"].as_str().unwrap_or_default().to_string();
        rt.block_on(client.exec_output(&id, &["true"])).expect("exec");
        first.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        rt.block_on(client.exec_output(&id, &["true"])).expect("exec");
        run.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        rt.block_on(client.write_file(&id, "/tmp/blob.bin", 0o644, &blob)).expect("write");
        write.push(blob.len() as f64 / 1e6 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let got = rt.block_on(client.read_file(&id, "/tmp/blob.bin", None)).expect("read");
        read.push(blob.len() as f64 / 1e6 / t.elapsed().as_secs_f64());
        assert_eq!(got.len(), blob.len());
        let t = Instant::now();
        call("POST", &format!("/v1/sessions/{id}/hibernate"), None);
        pause.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        rt.block_on(client.exec_output(&id, &["true"])).expect("exec waking");
        wake.push(t.elapsed().as_secs_f64() * 1e3);
        call("DELETE", &format!("/v1/sessions/{id}"), None);
    }
    println!();
    println!("{:<40} {:>14} {:>14} {:>8}", "p50", "E2B SDK", "Flint API", "ratio");
    for (what, e, f, unit) in [
        ("create -> first command answered", sdk_p50("first_run_ms"), p50(&first), "ms"),
        ("  of which create", sdk_p50("create_ms"), p50(&create), "ms"),
        ("a command (`true`)", sdk_p50("run_ms"), p50(&run), "ms"),
        ("pause / hibernate", sdk_p50("pause_ms"), p50(&pause), "ms"),
        ("connect + command / wake + command", sdk_p50("connect_ms"), p50(&wake), "ms"),
        ("8 MiB file write", sdk_p50("write_mbs"), p50(&write), "MB/s"),
        ("8 MiB file read", sdk_p50("read_mbs"), p50(&read), "MB/s"),
    ] {
        println!("{what:<40} {e:>11.1} {unit:<2} {f:>11.1} {unit:<2} {:>7.2}x", e / f.max(1e-9));
    }
    println!("  (ratio = E2B / Flint: above 1 the translation costs time for ms, gains throughput for MB/s)");
}

/// `flint-bench standby [--runs N]`: jailed restores through flintd, request → first guest instruction
/// (`first_run_us`: flintd's clock and the VMM's, one clock), with standby VMMs and without, side by side in one
/// run: two flintds (one `[standby] count = 2` for 256 MiB and 2 GiB, one `count = 0`), the same two snapshots
/// (the golden 256 MiB one and a 2 GiB one this bench boots), requests alternating between them. Before each
/// standby restore the bench waits until the taken standby was replaced (a burst beyond `count` takes the
/// ordinary path). Returns (size, mode, p50 ms) for `floor`.
fn standby_bench(runs: usize) -> Vec<(String, String, f64)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let work = TempDir::new("bench-standby");
    // The 2 GiB snapshot: one cold boot, as restore-floor makes it.
    let big = work.path().join("big");
    std::fs::create_dir_all(&big).expect("dir");
    let report = rt.block_on(async {
        let mut vm = VmProcess::boot_with(&big, |c| c.mem_mib = 2048);
        drop(vm.agent(Duration::from_secs(600)).await);
        let req = serde_json::json!({"state_path": big.join("vm.state"), "mem_path": big.join("vm.mem")});
        let (_, r) = api_call(&vm.api_sock, "PUT", "/snapshot/create", Some(&req)).expect("snapshot");
        let _ = api_call(&vm.api_sock, "PUT", "/vm/shutdown", None);
        let _ = vm.wait(Duration::from_secs(30));
        r
    });
    let report = if report["snapshot"].is_object() { report["snapshot"].clone() } else { report };
    let mut daemons = Vec::new();
    for (label, count, uid_base) in [("standby", 2, 961_000), ("spawned", 0, 962_000)] {
        let data = work.path().join(label);
        flint_tests::import_golden_local(&data, "small");
        flint_tests::import_local(
            &data,
            flint_tests::snapshot_draft("big", &big.join("vm.state"), &big.join("vm.mem"), &report, Some(2048)),
        );
        let config = work.path().join(format!("{label}.toml"));
        std::fs::write(
            &config,
            format!(
                "[jail]\nuid_base = {uid_base}\nuid_count = 500\n[standby]\ncount = {count}\nmem_mib = [256, 2048]\n"
            ),
        )
        .expect("config");
        let sock = work.path().join(format!("{label}.sock"));
        let _reap = flint_tests::KillVmmsUnder(data.clone());
        let d = flint_tests::Flintd::start_full(&data, &sock, None, &["--config", config.to_str().unwrap_or("")], None);
        daemons.push((label, sock, d, _reap));
    }
    let call = |sock: &std::path::Path, method: &str, path: &str, body: Option<serde_json::Value>| {
        flintd_call(&rt, sock, method, path, body)
    };
    let wait_standbys = |sock: &std::path::Path, mib: &str| {
        let t = Instant::now();
        while call(sock, "GET", "/v1/health", None)["standby"][mib].as_u64().unwrap_or(0) < 2 {
            assert!(t.elapsed() < Duration::from_secs(120), "standbys of {mib} MiB did not come back");
            std::thread::sleep(Duration::from_millis(20));
        }
        t.elapsed().as_secs_f64() * 1000.0
    };
    println!(
        "flint-bench standby: {runs} jailed eager restore(s) per size and mode, alternating; request → first guest instruction"
    );
    let mut rows: Vec<(String, String, Vec<serde_json::Value>)> = Vec::new();
    let mut refill_ms = Vec::new();
    // Per guest size: each restored VMM's (cgroup non-file, guest anonymous, overhead) in KiB.
    let mut overhead: std::collections::BTreeMap<&str, Vec<(u64, u64, u64)>> = Default::default();
    // One restore of each snapshot on each flintd first, not counted: it writes the snapshot's shared memory and
    // state files from the store.
    for (_, sock, _, _) in &daemons {
        for snap in ["small", "big"] {
            let c = call(sock, "POST", "/v1/clones", Some(serde_json::json!({"snapshot": snap, "count": 1})));
            call(sock, "DELETE", &format!("/v1/vms/{}", c[0]["id"].as_str().unwrap_or("?")), None);
        }
    }
    for (size, snap, mib) in [("256 MiB", "small", "256"), ("2 GiB", "big", "2048")] {
        let mut results: Vec<Vec<serde_json::Value>> = vec![Vec::new(); daemons.len()];
        for _ in 0..runs {
            for (i, (label, sock, _, _)) in daemons.iter().enumerate() {
                if *label == "standby" {
                    refill_ms.push(wait_standbys(sock, mib));
                }
                let c = call(sock, "POST", "/v1/clones", Some(serde_json::json!({"snapshot": snap, "count": 1})));
                let id = c[0]["id"].as_str().unwrap_or("?").to_string();
                let d = call(sock, "GET", &format!("/v1/vms/{id}"), None);
                assert_eq!(d["standby"].as_bool().unwrap_or(false), *label == "standby", "{label}: {d}");
                let pid = d["pid"].as_u64().unwrap_or(0) as u32;
                if let Some(o) = vmm_overhead_kib(pid, mib.parse().unwrap_or(256)) {
                    overhead.entry(size).or_default().push(o);
                }
                results[i].push(d);
                call(sock, "DELETE", &format!("/v1/vms/{id}"), None);
            }
        }
        for (i, (label, ..)) in daemons.iter().enumerate() {
            rows.push((size.to_string(), label.to_string(), std::mem::take(&mut results[i])));
        }
    }
    // A spinning neighbour (#30): a VM whose guest runs a busy loop on its vCPU (a whole core of this 2-core host,
    // no CPU limit), then the standby restores of 256 MiB again beside it.
    let (_, sock, _, _) = &daemons[0];
    let spinner = call(sock, "POST", "/v1/clones", Some(serde_json::json!({"snapshot": "small", "count": 1})));
    let spinner = spinner[0]["id"].as_str().unwrap_or("?").to_string();
    let spin = serde_json::json!({"argv": ["sh", "-c", "while :; do :; done >/dev/null 2>&1 </dev/null &"]});
    call(sock, "POST", &format!("/v1/vms/{spinner}/exec"), Some(spin));
    let spinner_pid = call(sock, "GET", &format!("/v1/vms/{spinner}"), None)["pid"].as_u64().unwrap_or(0) as u32;
    let (c0, _) = proc_cpu_rss(spinner_pid);
    std::thread::sleep(Duration::from_secs(2));
    let spinner_cpu = (proc_cpu_rss(spinner_pid).0 - c0) / 2.0 * 100.0;
    let mut beside = Vec::new();
    for _ in 0..runs {
        refill_ms.push(wait_standbys(sock, "256"));
        let c = call(sock, "POST", "/v1/clones", Some(serde_json::json!({"snapshot": "small", "count": 1})));
        let id = c[0]["id"].as_str().unwrap_or("?").to_string();
        beside.push(call(sock, "GET", &format!("/v1/vms/{id}"), None));
        call(sock, "DELETE", &format!("/v1/vms/{id}"), None);
    }
    if let Some(o) = vmm_overhead_kib(spinner_pid, 256) {
        overhead.entry("256 MiB, spinning").or_default().push(o);
    }
    call(sock, "DELETE", &format!("/v1/vms/{spinner}"), None);
    rows.push(("256 MiB".into(), "spinner".into(), beside));
    let pick = |v: &[serde_json::Value], f: &dyn Fn(&serde_json::Value) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(|a, b| a.total_cmp(b));
        (x[x.len() / 2], x[(x.len() * 9 / 10).min(x.len() - 1)])
    };
    println!();
    println!(
        "{:<8} {:<8} {:>9} {:>9}   {:>8} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "guest", "VMM", "p50 ms", "p90 ms", "flintd", "VMM-side", "state", "KVM", "memory", "devices", "VM", "vCPUs"
    );
    let mut fig = Vec::new();
    for (size, label, v) in &rows {
        let (p50, p90) = pick(v, &|d| ms(d["first_run_us"].as_u64().unwrap_or(0)));
        let med = |k: &str| pick(v, &|d| ms(d["vmm"]["restore"][k].as_u64().unwrap_or(0))).0;
        let vmm = pick(v, &|d| ms(d["vmm"]["timings"]["process_to_first_run_us"].as_u64().unwrap_or(0))).0;
        let flintd = pick(v, &|d| ms(d["launch_us"].as_u64().unwrap_or(0))).0;
        println!(
            "{:<8} {:<8} {:>9.2} {:>9.2}   {:>8.2} {:>10.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            size,
            label,
            p50,
            p90,
            flintd,
            vmm,
            med("read_state_us"),
            med("kvm_setup_us"),
            med("memory_us"),
            med("devices_us"),
            med("vm_state_us"),
            med("vcpu_state_us")
        );
        fig.push((size.clone(), label.clone(), p50));
    }
    refill_ms.sort_by(|a, b| a.total_cmp(b));
    println!();
    println!("p50/p90: flintd took the restore → the guest's first instruction (CLOCK_MONOTONIC in both processes).");
    println!(
        "flintd: its part (request → VMM spawned, or a standby handed the spec; medians). VMM-side: the VMM's own"
    );
    println!(
        "part (process start, or a standby's hand-over, → first instruction); the gap between them is the process"
    );
    println!("start (exec, loader) or the standby's wake-up;");
    println!("the columns after it are its restore steps (medians; VM: irqchip, PIT and clock state). A standby's KVM");
    println!("VM, memory slots, irqchip, PIT, vCPU 0 and supported CPUID were made ahead.");
    if let Some(m) = refill_ms.get(refill_ms.len() / 2) {
        println!("waiting for the taken standby's replacement before a standby restore: p50 {m:.0} ms");
    }
    for (size, v) in &overhead {
        let mut o: Vec<u64> = v.iter().map(|x| x.2).collect();
        o.sort_unstable();
        let (guest, all) = v.iter().fold((0, 0), |(g, a), x| (g.max(x.1), a.max(x.0)));
        println!(
            "VMM memory beyond the guest's, {size}: p50 {:.1} MiB, max {:.1} MiB ({} VMMs; cgroup non-file up to \
             {:.1} MiB, of which guest anonymous up to {:.1} MiB)",
            o[o.len() / 2] as f64 / 1024.0,
            o[o.len() - 1] as f64 / 1024.0,
            o.len(),
            all as f64 / 1024.0,
            guest as f64 / 1024.0
        );
    }
    // The spinning neighbour's effect: the same restores (standby, 256 MiB) with and without it.
    let vmm_side = |label: &str| {
        rows.iter().find(|(size, l, _)| size == "256 MiB" && l == label).map(|(_, _, v)| {
            let (p50, _) = pick(v, &|d| ms(d["first_run_us"].as_u64().unwrap_or(0)));
            (p50, pick(v, &|d| ms(d["vmm"]["timings"]["process_to_first_run_us"].as_u64().unwrap_or(0))).0)
        })
    };
    if let (Some((alone, alone_vmm)), Some((spun, spun_vmm))) = (vmm_side("standby"), vmm_side("spinner")) {
        println!(
            "spinner: the same standby restores beside a VM spinning on its vCPU ({spinner_cpu:.0}% of a core, no CPU \
             limit): VMM-side {spun_vmm:.2} ms against {alone_vmm:.2} alone ({:.2}x); to the first instruction \
             {spun:.2} against {alone:.2} ({:.2}x)",
            spun_vmm / alone_vmm.max(1e-9),
            spun / alone.max(1e-9)
        );
        fig.push(("256 MiB".into(), "spinner".into(), spun));
    }
    drop(daemons);
    fig
}

/// One timed request on flintd's socket: (status, ms to the response's headers, ms to its end). `Connection:
/// close`, read to the end (an exec's stream included).
fn timed_request(sock: &std::path::Path, method: &str, path: &str, body: &[u8]) -> (u16, f64, f64) {
    use std::io::{Read, Write};
    let t = Instant::now();
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else { return (0, 0.0, 0.0) };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: flintd\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).and_then(|_| s.write_all(body)).is_err() {
        return (0, 0.0, 0.0);
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut headers_ms = None;
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if headers_ms.is_none() && buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    headers_ms = Some(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
    }
    let status = std::str::from_utf8(&buf[..buf.len().min(12)])
        .ok()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, headers_ms.unwrap_or(0.0), t.elapsed().as_secs_f64() * 1e3)
}

/// A process's CPU time (user + system), seconds, and RSS, MiB.
fn proc_cpu_rss(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (ticks / hz, rss / 1024.0)
}

/// How busy the host was over a stretch, and how long a process's threads waited for a CPU in it: what tells a
/// control plane's slow call from a host whose cores its guests keep busy.
struct Quiet {
    pid: u32,
    cpu: (u64, u64),
    waited_ns: std::collections::HashMap<String, u64>,
    own_ns: std::collections::HashMap<String, u64>,
}

impl Quiet {
    fn start(pid: u32) -> Quiet {
        let own_ns = run_queue_waits_ns(std::process::id());
        Quiet { pid, cpu: host_cpu_ticks(), waited_ns: run_queue_waits_ns(pid), own_ns }
    }

    /// (host CPU busy over the stretch, %; the process's and this bench's run-queue waits in it, ms: each
    /// thread's growth, a thread started since counted whole, one that ended since not at all).
    fn end(self) -> (f64, f64, f64) {
        let (busy, total) = host_cpu_ticks();
        let pct = (busy - self.cpu.0) as f64 * 100.0 / (total - self.cpu.1).max(1) as f64;
        let grown = |pid: u32, was: &std::collections::HashMap<String, u64>| {
            let ns: u64 = run_queue_waits_ns(pid)
                .into_iter()
                .map(|(tid, ns)| ns.saturating_sub(was.get(&tid).copied().unwrap_or(0)))
                .sum();
            ns as f64 / 1e6
        };
        (pct, grown(self.pid, &self.waited_ns), grown(std::process::id(), &self.own_ns))
    }
}

/// (busy, total) ticks of all the host's CPUs (/proc/stat; idle and iowait are not busy).
fn host_cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).take(8).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// How long each of a process's threads has waited on a run queue, ns (the second field of its schedstat).
fn run_queue_waits_ns(pid: u32) -> std::collections::HashMap<String, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Default::default() };
    tasks
        .flatten()
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            Some((t.file_name().to_string_lossy().into_owned(), stat.split_whitespace().nth(1)?.parse().ok()?))
        })
        .collect()
}

/// What a jailed VMM holds in its cgroup beyond its guest's memory (KiB): the cgroup's usage that is not file
/// cache (the VMM's heap, stacks and page tables, KVM's accounted kernel memory, the guest's anonymous pages),
/// minus the anonymous pages of the guest's memory mappings (the snapshot's memory file mapped copy-on-write, or
/// anonymous guest memory of its size). `(cgroup non-file, guest anonymous, overhead)`; none if unreadable.
fn vmm_overhead_kib(pid: u32, guest_mib: u64) -> Option<(u64, u64, u64)> {
    let (dir, v2) = flint_tests::cgroup_dir(pid.into(), "memory")?;
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let stat = read("memory.stat")?;
    let stat_of = |k: &str| stat.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.trim().parse::<u64>().ok());
    let non_file = if v2 {
        read("memory.current")?.trim().parse::<u64>().ok()?.saturating_sub(stat_of("file").unwrap_or(0))
    } else {
        read("memory.usage_in_bytes")?.trim().parse::<u64>().ok()?.saturating_sub(stat_of("cache").unwrap_or(0))
    } / 1024;
    // The guest's mappings: the largest ones (at least half the guest's memory each, or its whole layout).
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut guest_anon = 0;
    let mut in_guest = false;
    for l in smaps.lines() {
        if let Some((range, _)) = l.split_once(' ').filter(|(r, _)| r.contains('-') && !r.ends_with(':')) {
            let (a, b) = range.split_once('-')?;
            let len = u64::from_str_radix(b, 16).ok()?.saturating_sub(u64::from_str_radix(a, 16).ok()?);
            in_guest = len >= (guest_mib << 20) / 2;
        } else if let Some(v) = l.strip_prefix("Anonymous:").filter(|_| in_guest) {
            guest_anon += v.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some((non_file, guest_anon, non_file.saturating_sub(guest_anon)))
}

fn mem_available_mib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn du_bytes(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        total += if m.is_dir() { du_bytes(&e.path()) } else { m.blocks() * 512 };
    }
    total
}

/// p50 and p99 of `v`.
fn p50_p99(v: &[f64]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return (0.0, 0.0);
    }
    (v[v.len() / 2], v[((v.len() as f64 * 0.99) as usize).min(v.len() - 1)])
}

/// One timed API call to any target (socket or URL); (status, ms, body).
fn call_timed(
    rt: &tokio::runtime::Runtime,
    to: &flint_supervisor::http::Target,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, f64, serde_json::Value) {
    let body = body.map(|b| b.to_string().into_bytes());
    let t = Instant::now();
    let r = rt.block_on(flint_supervisor::http::request(to, method, path, body.as_deref(), Duration::from_secs(600)));
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    match r {
        Ok((status, out)) => (status, ms, serde_json::from_slice(&out).unwrap_or_default()),
        Err(e) => (0, ms, serde_json::json!({ "error": e.to_string() })),
    }
}

/// etcd's own count of the operations it served (puts, deletes, ranges, transactions, lease renewals), from its
/// Prometheus endpoint.
fn etcd_ops(url: &str) -> u64 {
    let out = std::process::Command::new("curl").args(["-sf", "-m", "5", &format!("{url}/metrics")]).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let name = l.split([' ', '{']).next().unwrap_or("");
            matches!(
                name,
                "etcd_mvcc_put_total"
                    | "etcd_mvcc_delete_total"
                    | "etcd_mvcc_range_total"
                    | "etcd_mvcc_txn_total"
                    | "etcd_debugging_mvcc_put_total"
                    | "etcd_debugging_mvcc_delete_total"
                    | "etcd_debugging_mvcc_range_total"
                    | "etcd_debugging_mvcc_txn_total"
                    | "etcd_debugging_lease_renewed_total"
            )
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// `flint-bench cluster [--runs N] [--seconds S]`: a real etcd, an S3 server, two flintds with cluster listeners
/// (mutual TLS) and a flint-router, on loopback. Side by side in one run: session create and wake latency through
/// the router vs. straight to a host's cluster listener vs. its Unix socket; the router's added latency on a session
/// GET and on an exposed-port request; etcd operations per session per minute while sessions run idle, and per
/// create/hibernate/wake cycle.
fn cluster_bench(runs: usize, idle_s: u64) {
    use flint_supervisor::http::Target;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let work = TempDir::new("bench-cluster");
    let s3 = flint_tests::S3Server::start();
    let etcd = flint_tests::EtcdServer::start();
    let certs = flint_tests::FleetCerts::make(work.path());
    let p = |x: &std::path::Path| x.display().to_string();
    let mut hosts = Vec::new();
    // Host A has sandbox networks: its front end (for clients) and its front end for routers.
    let (edge_front, host_front) = (flint_tests::free_port(), flint_tests::free_port());
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let data = work.path().join(name);
        let reap = flint_tests::KillVmmsUnder(data.clone());
        let sock = work.path().join(format!("{name}.sock"));
        let port = flint_tests::free_port();
        let config = work.path().join(format!("{name}.toml"));
        let (front, net) = match i {
            0 => (
                format!("front_listen = \"127.0.0.1:{host_front}\"\n"),
                format!("[network]\npool = \"10.78.0.0/24\"\nfront_end = \"127.0.0.1:{edge_front}\"\n"),
            ),
            _ => (String::new(), String::new()),
        };
        std::fs::write(
            &config,
            format!(
                "[sessions]\ntick_ms = 200\n[cluster]\netcd = [\"{}\"]\nlisten = \"127.0.0.1:{port}\"\n\
                 advertise = \"https://127.0.0.1:{port}\"\n{front}tls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\n\
                 [jail]\nuid_base = {}\nuid_count = 1000\n{net}",
                etcd.url(),
                p(&certs.server_cert),
                p(&certs.server_key),
                p(&certs.ca),
                963_000 + i * 10_000,
            ),
        )
        .expect("config");
        if i == 0 {
            flint_tests::import_golden(&data, &s3, "cluster", "gold", None);
        }
        let args = ["--allow-unauthenticated-bucket", "--config", config.to_str().unwrap_or("")];
        let d = flint_tests::Flintd::start_with(&data, &sock, &s3, "cluster", &args);
        hosts.push((sock, port, d, reap));
    }
    let (rport, router_front) = (flint_tests::free_port(), flint_tests::free_port());
    let mut router = std::process::Command::new(flint_tests::bin_dir().join("flint-router"));
    flint_tests::die_with_parent(&mut router);
    let mut router = router
        .args(["--etcd", &etcd.url(), "--listen", &format!("127.0.0.1:{rport}"), "--min-free-mib", "64"])
        .args(["--front-listen", &format!("127.0.0.1:{router_front}")])
        .args(["--tls-cert", &p(&certs.server_cert), "--tls-key", &p(&certs.server_key), "--client-ca", &p(&certs.ca)])
        .args(["--host-ca", &p(&certs.ca), "--cert", &p(&certs.client_cert), "--key", &p(&certs.client_key)])
        .stderr(std::fs::File::create(work.path().join("router.log")).expect("log"))
        .spawn()
        .expect("flint-router");
    let tls = flint_supervisor::tls::client_config(&certs.ca, Some((&certs.client_cert, &certs.client_key)))
        .expect("client TLS");
    let via_router = Target::url(&format!("https://127.0.0.1:{rport}"), Some(tls.clone())).expect("url");
    let direct = Target::url(&format!("https://127.0.0.1:{}", hosts[0].1), Some(tls)).expect("url");
    let socket = Target::Unix(hosts[0].0.clone());
    let t = Instant::now();
    while call_timed(&rt, &via_router, "GET", "/v1/hosts", None).2.as_array().map_or(0, Vec::len) < 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "the router never saw both hosts");
        std::thread::sleep(Duration::from_millis(100));
    }
    let create = |to: &Target, id: &str| {
        let body = serde_json::json!({ "id": id, "snapshot": "gold", "idle_timeout_s": 3600 });
        let (status, ms, v) = call_timed(&rt, to, "POST", "/v1/sessions", Some(body));
        assert!(status < 300, "create {id}: {status} {v}");
        ms
    };
    // Warm-up, not counted: each host restores the snapshot once (B fetches it from the bucket).
    for (i, (sock, ..)) in hosts.iter().enumerate() {
        let id = format!("warm{i}");
        create(&Target::Unix(sock.clone()), &id);
        call_timed(&rt, &Target::Unix(sock.clone()), "DELETE", &format!("/v1/sessions/{id}"), None);
    }
    println!("flint-bench cluster: {runs} run(s) per path, alternating; 2 hosts, 1 etcd member, 1 router, loopback");
    let ops_before = etcd_ops(&etcd.url());
    let paths = [("router", &via_router), ("cluster listener", &direct), ("unix socket", &socket)];
    let mut created: std::collections::BTreeMap<&str, Vec<f64>> = std::collections::BTreeMap::new();
    let mut ids: Vec<(&str, String)> = Vec::new();
    for i in 0..runs {
        for (label, to) in paths {
            let id = format!("{}{i}", &label[..1]);
            created.entry(label).or_default().push(create(to, &id));
            ids.push((label, id));
        }
    }
    let ops_created = etcd_ops(&etcd.url());
    // Idle: sessions run, nothing is asked of them.
    std::thread::sleep(Duration::from_secs(idle_s));
    let ops_idle = etcd_ops(&etcd.url());
    let mut got: std::collections::BTreeMap<&str, Vec<f64>> = std::collections::BTreeMap::new();
    for _ in 0..20 {
        for (label, id) in &ids {
            // Each path asks for the sessions it made (the socket and the listener made theirs on host A).
            let to = paths.iter().find(|p| p.0 == *label).map_or(&via_router, |p| p.1);
            let (status, ms, v) = call_timed(&rt, to, "GET", &format!("/v1/sessions/{id}"), None);
            assert_eq!(status, 200, "GET {id} via {label}: {v}");
            got.entry(label).or_default().push(ms);
        }
    }
    for (_, id) in &ids {
        let (status, _, v) = call_timed(&rt, &via_router, "POST", &format!("/v1/sessions/{id}/hibernate"), None);
        assert!(status < 300, "hibernate {id}: {status} {v}");
    }
    let ops_hibernated = etcd_ops(&etcd.url());
    let mut woken: std::collections::BTreeMap<&str, Vec<f64>> = std::collections::BTreeMap::new();
    for (label, id) in &ids {
        // A wake through the router goes where it was hibernated; straight calls go to host A (which may take a
        // session B hibernated: then from the bucket).
        let to = paths.iter().find(|p| p.0 == *label).map_or(&via_router, |p| p.1);
        let (status, ms, v) = call_timed(&rt, to, "POST", &format!("/v1/sessions/{id}/wake"), None);
        assert!(status < 300, "wake {id} via {label}: {status} {v}");
        woken.entry(label).or_default().push(ms);
    }
    let ops_woken = etcd_ops(&etcd.url());
    let row = |what: &str, m: &std::collections::BTreeMap<&str, Vec<f64>>| {
        let r = p50_p99(m.get("router").map_or(&[][..], Vec::as_slice));
        let c = p50_p99(m.get("cluster listener").map_or(&[][..], Vec::as_slice));
        let u = p50_p99(m.get("unix socket").map_or(&[][..], Vec::as_slice));
        println!(
            "  {what:<22} router {:>8.2} / {:>8.2}   listener {:>8.2} / {:>8.2}   socket {:>8.2} / {:>8.2}   router/socket p50 {:.2}x",
            r.0,
            r.1,
            c.0,
            c.1,
            u.0,
            u.1,
            if u.0 > 0.0 { r.0 / u.0 } else { 0.0 }
        );
    };
    println!("  ms, p50 / p99:");
    row("session create", &created);
    row("session GET", &got);
    row("session wake", &woken);
    let n = ids.len() as f64;
    println!(
        "  etcd operations (etcd's own counters: puts, deletes, ranges, transactions, lease renewals): {:.1} per \
         create, {:.1} per hibernate, {:.1} per wake",
        (ops_created - ops_before) as f64 / n,
        (ops_hibernated - ops_idle) as f64 / n,
        (ops_woken - ops_hibernated) as f64 / n,
    );
    println!(
        "  idle ({} running sessions, {} s): {:.1} etcd operations per host per minute (keep-alive and registration), \
         none per session",
        ids.len(),
        idle_s,
        (ops_idle - ops_created) as f64 / hosts.len() as f64 * 60.0 / idle_s as f64,
    );
    for (_, id) in &ids {
        call_timed(&rt, &via_router, "DELETE", &format!("/v1/sessions/{id}"), None);
    }
    exposed_port_latency(&rt, &socket, edge_front, router_front, runs * 40);
    let _ = router.kill();
    let _ = router.wait();
    drop(hosts);
}

/// The router's added latency for an exposed-port request: `n` requests for a page of a guest's httpd (session
/// `web` on host A, port 8080 with a token), alternating between host A's front end and the router's (which sends
/// them to A's front end for routers over mutual TLS), each on a new connection as a browser's first request is.
fn exposed_port_latency(
    rt: &tokio::runtime::Runtime,
    host_a: &flint_supervisor::http::Target,
    edge_front: u16,
    router_front: u16,
    n: usize,
) {
    let token = "bench-token-0123456789abcdef";
    let ports = serde_json::json!({ "8080": { "token": token } });
    let body =
        serde_json::json!({ "id": "web", "snapshot": "gold", "idle_timeout_s": 3600, "network": { "ports": ports } });
    let (status, _, v) = call_timed(rt, host_a, "POST", "/v1/sessions", Some(body));
    assert!(status < 300, "create web: {status} {v}");
    let serve = "mkdir -p /www && echo page > /www/index.html && httpd -p 8080 -h /www";
    let body = serde_json::json!({ "argv": ["/bin/sh", "-c", serve], "timeout_ms": 600_000 });
    let (status, _, v) = call_timed(rt, host_a, "POST", "/v1/vms/web/exec", Some(body));
    assert!(status < 300 && v.to_string().contains("\"code\":0"), "httpd: {status} {v}");
    // (port, Host's guest port, the answer expected): the guest's page (its httpd forks per request: guest time
    // dominates here), or a port not exposed (404 from the holder: the path alone, no guest).
    let get = |port: u16, guest_port: u16, want: &str| {
        use std::io::{Read, Write};
        let t = Instant::now();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("front end");
        let req = format!(
            "GET / HTTP/1.1\r\nHost: {guest_port}-web.flint.localhost\r\nflint-token: {token}\r\nconnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).expect("request");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with(want), "{answer}");
        t.elapsed().as_secs_f64() * 1000.0
    };
    for (what, guest_port, want, n) in [
        ("the guest's page", 8080, "HTTP/1.1 200", n / 10),
        ("a port not exposed (404 from the host)", 9999, "HTTP/1.1 404", n),
    ] {
        get(edge_front, guest_port, want);
        get(router_front, guest_port, want);
        let (mut direct, mut routed) = (Vec::new(), Vec::new());
        for _ in 0..n {
            direct.push(get(edge_front, guest_port, want));
            routed.push(get(router_front, guest_port, want));
        }
        let (d, r) = (p50_p99(&direct), p50_p99(&routed));
        println!(
            "  exposed port, GET of {what}, new connection each, ms p50 / p99: host's front end {:.2} / {:.2}, \
             router's front end {:.2} / {:.2}: the router adds {:.2} ms at p50 ({n} each)",
            d.0,
            d.1,
            r.0,
            r.1,
            r.0 - d.0
        );
    }
    call_timed(rt, host_a, "DELETE", "/v1/sessions/web", None);
}

/// `flint-bench scale [--sessions N] [--running M] [--clients K] [--seconds S] [--probes P] [--sched-slice-us U]
/// [--vcpu-sched-idle 0|1]`: one flintd on its defaults (jail, standby VMMs; `sched_slice_us` U, default 0;
/// `vcpu_sched_idle`, default 1), a template of the default
/// image with a warm pool; N sessions, M of them kept running, the rest hibernating after 1 s idle; then K
/// clients doing exec/file calls on random sessions (waking hibernated ones) for S seconds. Prints creation,
/// hibernation and wake rates, the API's latency per route at 10 sessions and at N (P calls each, default 200;
/// ratio) with how busy the host was and how long flintd waited for a CPU meanwhile, flintd's idle CPU and RSS,
/// host memory per running session, disk per hibernated session, errors.
fn scale_bench(n: usize, m: usize, k: usize, secs: u64, probes: usize, slice_us: u64, vcpu_idle: bool) {
    let work = TempDir::new("bench-scale");
    let data = work.path().join("data");
    let _reap = flint_tests::KillVmmsUnder(data.clone());
    let sock = work.path().join("flintd.sock");
    let config = work.path().join("flintd.toml");
    let head =
        format!("sched_slice_us = {slice_us}\nvcpu_sched_idle = {vcpu_idle}\n[limits]\nmax_vms = {}\n", m + 2 * k + 64);
    std::fs::write(&config, format!("{head}[sessions]\nmax_sessions = {}\n", n + 64)).expect("config");
    let d = flint_tests::Flintd::start_full(&data, &sock, None, &["--config", config.to_str().unwrap_or("")], None);
    let flintd_pid = d.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let call = |method: &str, path: &str, body: Option<serde_json::Value>| flintd_call(&rt, &sock, method, path, body);
    let t = Instant::now();
    call("POST", "/v1/templates", Some(serde_json::json!({"name": "idle", "pool_size": 4})));
    println!(
        "flint-bench scale: N={n} sessions, M={m} running, K={k} clients for {secs} s, flintd's scheduling slice {}, \
         vCPU threads {}; template in {:.0} s",
        if slice_us == 0 { "the kernel's".to_string() } else { format!("{slice_us} µs") },
        if vcpu_idle { "SCHED_IDLE" } else { "SCHED_OTHER" },
        t.elapsed().as_secs_f64()
    );
    let mem_before = mem_available_mib();
    let store_before = du_bytes(&data.join("store"));
    let errors = std::sync::atomic::AtomicU64::new(0);
    let ids = std::sync::Mutex::new(Vec::<String>::new());
    let create_ms = std::sync::Mutex::new(Vec::<f64>::new());
    // Creates sessions `range` (the first M stay running, the others hibernate after 1 s idle), 4 at a time.
    let create = |range: std::ops::Range<usize>| {
        let next = std::sync::atomic::AtomicUsize::new(range.start);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= range.end {
                        return;
                    }
                    let idle = if i < m { 3600 } else { 1 };
                    let body =
                        serde_json::json!({"template": "idle", "id": format!("s{i:05}"), "idle_timeout_s": idle});
                    let (st, _, total) = timed_request(&sock, "POST", "/v1/sessions", body.to_string().as_bytes());
                    if st == 201 || st == 200 {
                        ids.lock().unwrap().push(format!("s{i:05}"));
                        create_ms.lock().unwrap().push(total);
                    } else {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        eprintln!("create s{i:05}: {st}");
                    }
                });
            }
        });
    };
    // The API's latency per route, `rounds` times each, on random sessions (exec: running ones).
    let probe = |rounds: usize| -> std::collections::BTreeMap<&'static str, Vec<f64>> {
        let mut out: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
        let list: Vec<String> = ids.lock().unwrap().clone();
        let running: Vec<&String> = list.iter().filter(|i| i[1..].parse::<usize>().unwrap_or(0) < m.min(10)).collect();
        // `GET /v1/vms/{id}` takes a VM's id, not its session's.
        let running_vms: Vec<String> = running
            .iter()
            .filter_map(|id| call("GET", &format!("/v1/sessions/{id}"), None)["vm"].as_str().map(String::from))
            .collect();
        // A call's time under its route; a status other than 200 is an error.
        let note = |out: &mut std::collections::BTreeMap<&'static str, Vec<f64>>, route: &'static str, st: u16, ms| {
            if st != 200 {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                eprintln!("{route}: {st}");
            }
            out.entry(route).or_default().push(ms);
        };
        let mut x = 0x9e37_79b9_u64;
        let mut pick = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n.max(1) as u64) as usize
        };
        for _ in 0..rounds {
            let id = &list[pick(list.len())];
            let (st, _, ms) = timed_request(&sock, "GET", &format!("/v1/sessions/{id}"), b"");
            note(&mut out, "get session", st, ms);
            let (st, _, ms) = timed_request(&sock, "GET", "/v1/sessions", b"");
            note(&mut out, "list all sessions", st, ms);
            // What a client of a large host pages with (`Flint-Next-After`): a page as long as the whole list at 10.
            let (st, _, ms) = timed_request(&sock, "GET", "/v1/sessions?limit=10", b"");
            note(&mut out, "list a page of 10", st, ms);
            let (st, _, ms) =
                timed_request(&sock, "GET", &format!("/v1/vms/{}", running_vms[pick(running_vms.len())]), b"");
            note(&mut out, "get VM", st, ms);
            let exec = serde_json::json!({"argv": ["/bin/true"]}).to_string();
            let (st, head, _) = timed_request(
                &sock,
                "POST",
                &format!("/v1/vms/{}/exec", running[pick(running.len())]),
                exec.as_bytes(),
            );
            note(&mut out, "exec start", st, head);
        }
        // Creates one at a time on a quiet host, each from a full warm pool (the same case at 10 and at N: the
        // mass creation above runs beside hibernations and pool refills), each deleted after.
        let pooled = || {
            call("GET", "/v1/vms", None)
                .as_array()
                .map_or(0, |a| a.iter().filter(|v| v["owner"]["kind"] == "pool" && v["status"] == "paused").count())
        };
        for i in 0..20 {
            let t = Instant::now();
            while pooled() < 4 && t.elapsed() < Duration::from_secs(120) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let id = format!("probe{}-{i}", list.len());
            let body = serde_json::json!({"template": "idle", "id": id, "idle_timeout_s": 3600}).to_string();
            let (st, _, ms) = timed_request(&sock, "POST", "/v1/sessions", body.as_bytes());
            note(&mut out, "create session", if st == 201 { 200 } else { st }, ms);
            call("DELETE", &format!("/v1/sessions/{id}"), None);
        }
        out
    };
    // At 10 sessions. Creation and hibernation rates count the time spent creating, not the probes.
    let t = Instant::now();
    create(0..10.min(n));
    let mut created_s = t.elapsed().as_secs_f64();
    let q10 = Quiet::start(flintd_pid);
    let at10 = probe(probes);
    let q10 = q10.end();
    // Up to N.
    let t = Instant::now();
    create(10.min(n)..n);
    created_s += t.elapsed().as_secs_f64();
    let create_all = create_ms.lock().unwrap().clone();
    // Every session past M hibernated.
    let state_count = |st: &str| {
        let list = call("GET", "/v1/sessions", None);
        list.as_array().map(|a| a.iter().filter(|s| s["state"] == st).count()).unwrap_or(0)
    };
    let t_hib = Instant::now();
    while state_count("hibernated") < n.saturating_sub(m) {
        assert!(t_hib.elapsed() < Duration::from_secs(7200), "sessions did not hibernate");
        std::thread::sleep(Duration::from_secs(2));
    }
    let all_hibernated_s = t.elapsed().as_secs_f64();
    let metrics = |name: &str| -> f64 {
        let (_, body) = rt
            .block_on(flint_supervisor::http::request(&sock, "GET", "/metrics", None, Duration::from_secs(60)))
            .unwrap_or_default();
        String::from_utf8_lossy(&body).lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0.0)
    };
    let hibernations = metrics("flint_session_hibernate_ms_count");
    // Idle: N sessions (M running), 30 s.
    std::thread::sleep(Duration::from_secs(5));
    let (c0, _) = proc_cpu_rss(flintd_pid);
    std::thread::sleep(Duration::from_secs(30));
    let (c1, rss) = proc_cpu_rss(flintd_pid);
    let idle_cpu = (c1 - c0) / 30.0 * 100.0;
    let mem_per_running = (mem_before - mem_available_mib()) / m.max(1) as f64;
    let disk_per_hibernated = (du_bytes(&data.join("store")).saturating_sub(store_before)) as f64
        / n.saturating_sub(m).max(1) as f64
        / 1048576.0;
    // At N sessions.
    let qn = Quiet::start(flintd_pid);
    let atn = probe(probes);
    let qn = qn.end();
    // K clients for S seconds on random sessions: exec or a 4 KiB file write and read.
    let wakes0 = metrics("flint_session_wake_ms_count");
    let load: std::sync::Mutex<std::collections::BTreeMap<&'static str, Vec<f64>>> = Default::default();
    let end = Instant::now() + Duration::from_secs(secs);
    let list: Vec<String> = ids.lock().unwrap().clone();
    std::thread::scope(|s| {
        for c in 0..k {
            let (list, load, errors, sock) = (&list, &load, &errors, &sock);
            s.spawn(move || {
                let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ (c as u64 + 1);
                let mut i = 0u64;
                while Instant::now() < end {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let id = &list[(x % list.len() as u64) as usize];
                    i += 1;
                    let (route, st, ms) = if i.is_multiple_of(2) {
                        let exec = serde_json::json!({"argv": ["/bin/true"]}).to_string();
                        let (st, _, ms) = timed_request(sock, "POST", &format!("/v1/vms/{id}/exec"), exec.as_bytes());
                        ("exec /bin/true (to its end)", st, ms)
                    } else {
                        let path = format!("/v1/vms/{id}/files?path=/tmp/f{c}&mode=644");
                        let (st, _, ms) = timed_request(sock, "PUT", &path, &[7u8; 4096]);
                        ("write 4 KiB file", st, ms)
                    };
                    if !(200..300).contains(&st) {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        eprintln!("{route} {id}: {st}");
                    }
                    load.lock().unwrap().entry(route).or_default().push(ms);
                }
            });
        }
    });
    let wakes = metrics("flint_session_wake_ms_count") - wakes0;
    // What each running session's VMM holds beyond its guest's memory, after the load.
    let mut overhead: Vec<u64> = call("GET", "/v1/sessions", None)
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|s| s["state"] == "running")
                .filter_map(|s| {
                    let vm = call("GET", &format!("/v1/vms/{}", s["vm"].as_str()?), None);
                    let mib = vm["mem_mib"].as_u64().unwrap_or(256);
                    vmm_overhead_kib(vm["pid"].as_u64()? as u32, mib).map(|o| o.2)
                })
                .collect()
        })
        .unwrap_or_default();
    overhead.sort_unstable();
    println!();
    println!("{:<44} {:>12}", "sessions created (incl. the first 10)", n);
    println!("{:<44} {:>12.2}", "  sessions created/s", n as f64 / created_s);
    let (c50, c99) = p50_p99(&create_all);
    println!("{:<44} {:>12.0} {:>10.0}", "  create p50 / p99, 4 at a time (ms)", c50, c99);
    println!("{:<44} {:>12.2}", "hibernations/s (last creates → all hibernated)", hibernations / all_hibernated_s);
    println!("{:<44} {:>12.2}", format!("wakes/s under {k} clients"), wakes / secs as f64);
    println!();
    println!(
        "{:<24} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "API route (ms)",
        "p50 @10",
        "p99 @10",
        format!("p50 @{n}"),
        format!("p99 @{n}"),
        "p99 ratio"
    );
    for (route, v10) in &at10 {
        let (a, b) = p50_p99(v10);
        let (c, dd) = p50_p99(atn.get(route).map(Vec::as_slice).unwrap_or(&[]));
        println!("{:<24} {:>12.2} {:>12.2} {:>12.2} {:>12.2} {:>10.2}", route, a, b, c, dd, dd / b.max(1e-9));
    }
    println!(
        "while probing: host CPU busy {:.0}% @10, {:.0}% @{n}; flintd's threads waited for a CPU {:.1} ms @10, \
         {:.1} ms @{n}; this bench's {:.1} / {:.1} ms (run queue, /proc/PID/task/*/schedstat)",
        q10.0, qn.0, q10.1, qn.1, q10.2, qn.2
    );
    println!();
    println!("{:<34} {:>10} {:>10} {:>10}", format!("under {k} clients (ms)"), "p50", "p99", "calls");
    for (route, v) in load.lock().unwrap().iter() {
        let (a, b) = p50_p99(v);
        println!("{:<34} {:>10.1} {:>10.1} {:>10}", route, a, b, v.len());
    }
    println!();
    println!("flintd idle CPU, {n} sessions ({m} running): {idle_cpu:.2}% of a core; RSS {rss:.1} MiB");
    println!("host memory per running session (MemAvailable drop / M): {mem_per_running:.1} MiB");
    if let (Some(p50), Some(max)) = (overhead.get(overhead.len() / 2), overhead.last()) {
        println!(
            "VMM memory beyond the guest's ({} running sessions' cgroups, after the load): p50 {:.1} MiB, max {:.1} MiB",
            overhead.len(),
            *p50 as f64 / 1024.0,
            *max as f64 / 1024.0
        );
    }
    println!("disk per hibernated session (store growth / (N - M)): {disk_per_hibernated:.2} MiB");
    println!("errors: {}", errors.load(std::sync::atomic::Ordering::Relaxed));
    drop(d);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("boot");
    let runs: usize =
        args.iter().position(|a| a == "--runs").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(1);
    if mode == "snapshot" {
        snapshot_bench().await;
        return;
    }
    if mode == "store" {
        store_bench().await;
        return;
    }
    if mode == "lazy" {
        // Its own thread: it drives flintd with blocking calls on a runtime of its own.
        let latency: u64 = args
            .iter()
            .position(|a| a == "--latency-ms")
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let workers: Option<usize> =
            args.iter().position(|a| a == "--workers").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok());
        let _ = std::thread::spawn(move || lazy_bench(runs, latency, workers)).join();
        return;
    }
    if mode == "jail" {
        let _ = std::thread::spawn(move || jail_bench(runs)).join();
        return;
    }
    if mode == "restore-floor" {
        restore_floor_bench(runs.max(5)).await;
        return;
    }
    if mode == "floor" {
        floor_bench(runs.max(5)).await;
        return;
    }
    if mode == "clones" {
        let density: usize = args
            .iter()
            .position(|a| a == "--density")
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(100);
        let _ = std::thread::spawn(move || drop(clones_bench(density))).join();
        return;
    }
    if mode == "sessions" {
        let _ = std::thread::spawn(move || sessions_bench(runs)).join();
        return;
    }
    if mode == "net" {
        let _ = std::thread::spawn(move || net_bench(runs.max(3))).join();
        return;
    }
    if mode == "python" {
        let _ = std::thread::spawn(move || python_bench(runs.max(3))).join();
        return;
    }
    if mode == "e2b" {
        let _ = std::thread::spawn(move || e2b_bench(runs.max(3))).join();
        return;
    }
    if mode == "scale" {
        let arg = |k: &str, d: usize| -> usize {
            args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(d)
        };
        let (n, m, k, s) = (arg("--sessions", 1000), arg("--running", 100), arg("--clients", 32), arg("--seconds", 60));
        let probes = arg("--probes", 200);
        let slice = arg("--sched-slice-us", 0) as u64;
        let idle = arg("--vcpu-sched-idle", 1) != 0;
        let _ = std::thread::spawn(move || scale_bench(n, m.min(n), k, s as u64, probes, slice, idle)).join();
        return;
    }
    if mode == "standby" {
        let _ = std::thread::spawn(move || standby_bench(runs.max(5))).join();
        return;
    }
    if mode == "cluster" {
        let secs =
            args.iter().position(|a| a == "--seconds").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok());
        let _ = std::thread::spawn(move || cluster_bench(runs.max(3), secs.unwrap_or(30))).join();
        return;
    }
    if mode != "boot" {
        eprintln!("usage: flint-bench boot [--runs N] | flint-bench snapshot | flint-bench store | flint-bench lazy [--runs N] [--latency-ms L] [--workers W] | flint-bench jail [--runs N] | flint-bench sessions [--runs N] | flint-bench clones [--density N] | flint-bench restore-floor [--runs N] | flint-bench floor [--runs N] | flint-bench net [--runs N] | flint-bench python [--runs N] | flint-bench e2b [--runs N] | flint-bench standby [--runs N] | flint-bench cluster [--runs N] [--seconds S] | flint-bench scale [--sessions N] [--running M] [--clients K] [--seconds S] [--probes P] [--sched-slice-us U] [--vcpu-sched-idle 0|1]");
        std::process::exit(2);
    }
    println!("flint-bench boot: {runs} cold boot(s) of {}", images().dir.display());
    let mut results = Vec::new();
    for i in 0..runs {
        let r = boot_once().await;
        let t = &r["timings"];
        let g = |k: &str| t[k].as_u64().unwrap_or(0);
        println!("run {} (host profile {}):", i + 1, r["host_profile"].as_str().unwrap_or("?"));
        println!("  VMM process start -> first guest instruction  {:>10.2} ms", ms(g("process_to_first_run_us")));
        println!(
            "    KVM setup {:.2} ms, memory {:.2} ms, kernel+initramfs load {:.2} ms, devices {:.2} ms, vCPUs {:.2} ms",
            ms(g("kvm_setup_us")),
            ms(g("memory_us")),
            ms(g("kernel_load_us")),
            ms(g("devices_us")),
            ms(g("vcpus_us"))
        );
        println!("  first guest instruction -> /init              {:>10.2} ms", ms(g("first_run_to_init_us")));
        println!(
            "  VMM process start -> agent answers            {:>10.2} ms",
            r["agent_ready_ms"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  agent health round trip (vsock)               {:>10.3} ms",
            r["health_rtt_ms"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  exec /bin/true                                {:>10.2} ms",
            r["exec_true_ms"].as_f64().unwrap_or(0.0)
        );
        println!("  vCPU exits to userspace during boot           {:>10}", r["vcpu_exits"]);
        results.push(r);
    }
    if let Ok(path) = std::env::var("FLINT_BENCH_JSON") {
        let _ = std::fs::write(path, serde_json::to_string_pretty(&results).unwrap_or_default());
    }
}
