//! `flint-bench`: prints performance figures (never a test). `make bench` runs it.
//!
//! `flint-bench boot [--runs N]`: cold boots of the standard images, each measured from VMM
//! process start to the agent's first answer, with the VMM-side breakdown.
use std::time::{Duration, Instant};

use flint_tests::*;

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

async fn boot_once() -> serde_json::Value {
    let dir = TempDir::new("bench");
    let mut vm = VmProcess::boot(dir.path(), &[]);
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
    let mut vm = VmProcess::boot(dir.path(), &["--track-dirty-pages".into()]);
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
        let mut r =
            VmProcess::restore(rdir.path(), &dir.path().join("full.state"), &dir.path().join("full.mem"), mode, &[]);
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
    if mode != "boot" {
        eprintln!("usage: flint-bench boot [--runs N] | flint-bench snapshot");
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
