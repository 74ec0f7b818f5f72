//! `flint-demo` (run by `make demo`): boots a sandbox with flint-vmm from the cached images,
//! talks to its agent over vsock, runs commands, snapshots it, restores clones and prints a
//! timing table.
use std::time::{Duration, Instant};

use flint_agent::protocol::ExecRequest;
use flint_tests::*;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let img = images();
    println!("flint demo: kernel {}, initramfs {}", img.vmlinux.display(), img.initramfs.display());
    let dir = TempDir::new("demo");
    let t0 = Instant::now();
    let mut vm = VmProcess::boot(dir.path(), &[]);
    println!("booting a 256 MiB, 1-vCPU sandbox (console: {}) ...", vm.console.display());
    let agent = vm.agent(Duration::from_secs(300)).await;
    let boot = t0.elapsed();
    println!("agent answered after {:.1} s", boot.as_secs_f64());

    let mut rows: Vec<(String, Duration, String)> = Vec::new();
    for argv in [&["/bin/uname", "-sr"][..], &["/bin/cat", "/proc/loadavg"][..], &["/bin/true"][..]] {
        let t = Instant::now();
        let req = ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout_ms: Some(60_000),
            ..Default::default()
        };
        let out = agent.exec_output(req).await.expect("exec");
        let status = match (out.code, out.signal) {
            (Some(c), _) => format!("exit {c}"),
            (_, Some(s)) => format!("signal {s}"),
            _ => "?".into(),
        };
        rows.push((argv.join(" "), t.elapsed(), format!("{} [{status}]", String::from_utf8_lossy(&out.stdout).trim())));
    }
    let t = Instant::now();
    agent.write_file("/tmp/upload.bin", 0o644, &vec![7u8; 256 << 10]).await.expect("upload");
    let back = agent.read_file("/tmp/upload.bin").await.expect("download");
    rows.push(("256 KiB upload + download".into(), t.elapsed(), format!("{} bytes back", back.len())));

    let (_, d) = api_call(&vm.api_sock, "GET", "/vm", None).expect("describe");
    let tm = &d["timings"];
    let ms = |k: &str| tm[k].as_u64().unwrap_or(0) as f64 / 1000.0;
    println!();
    println!("host profile: {}", d["host_profile"].as_str().unwrap_or("?"));
    println!("{:<42} {:>12}", "phase", "time");
    println!("{:<42} {:>9.2} ms", "VMM start -> first guest instruction", ms("process_to_first_run_us"));
    println!("{:<42} {:>9.2} ms", "  KVM VM + irqchip + PIT", ms("kvm_setup_us"));
    println!("{:<42} {:>9.2} ms", "  guest memory", ms("memory_us"));
    println!("{:<42} {:>9.2} ms", "  kernel + initramfs load", ms("kernel_load_us"));
    println!("{:<42} {:>9.2} ms", "  devices", ms("devices_us"));
    println!("{:<42} {:>9.2} ms", "first guest instruction -> /init", ms("first_run_to_init_us"));
    println!("{:<42} {:>9.2} ms", "VMM start -> agent answers (cold boot)", boot.as_secs_f64() * 1000.0);
    for (label, t, out) in &rows {
        println!("{:<42} {:>9.2} ms   {}", format!("exec: {label}"), t.as_secs_f64() * 1000.0, out);
    }

    // SnapStart: snapshot the initialised sandbox, then start clones from it.
    agent.before_checkpoint().await.expect("before-checkpoint");
    let req = serde_json::json!({
        "state_path": dir.path().join("demo.state"),
        "mem_path": dir.path().join("demo.mem"),
        "resume": false,
    });
    let (_, snap) = api_call(&vm.api_sock, "PUT", "/snapshot/create", Some(&req)).expect("snapshot");
    let snap = &snap["snapshot"];
    let _ = api_call(&vm.api_sock, "PUT", "/vm/shutdown", None);
    let _ = vm.wait(Duration::from_secs(60));
    drop(agent);
    let us = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64 / 1000.0;
    println!(
        "{:<42} {:>9.2} ms   ({:.1} MB of {} MiB written, pause {:.2} ms)",
        "snapshot (full)",
        us(&snap["total_us"]),
        snap["memory"]["bytes_written"].as_u64().unwrap_or(0) as f64 / 1e6,
        snap["guest_memory_bytes"].as_u64().unwrap_or(0) >> 20,
        us(&snap["pause_us"])
    );

    const CLONES: usize = 3;
    let dirs: Vec<TempDir> = (0..CLONES).map(|_| TempDir::new("demo-clone")).collect();
    let t = Instant::now();
    let mut clones: Vec<VmProcess> =
        dirs.iter().map(|d| VmProcess::restore(d.path(), &d_state(&dir), &d_mem(&dir), "private", &[])).collect();
    for (i, c) in clones.iter_mut().enumerate() {
        let a = c.agent(Duration::from_secs(120)).await;
        let ready = c.started.elapsed();
        a.refresh(Default::default(), Some(format!("clone-{i}"))).await.expect("refresh");
        let rnd = a.read_file_limit("/dev/urandom", Some(8)).await.expect("entropy");
        let (_, d) = api_call(&c.api_sock, "GET", "/vm", None).expect("describe");
        println!(
            "{:<42} {:>9.2} ms   (VMM start -> first instruction {:.2} ms, RSS {} KiB, urandom {})",
            format!("clone {i}: restore -> agent answers"),
            ready.as_secs_f64() * 1000.0,
            us(&d["timings"]["process_to_first_run_us"]),
            d["rss_kib"],
            rnd.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
    }
    println!("{:<42} {:>9.2} ms", format!("{CLONES} clones, all answering"), t.elapsed().as_secs_f64() * 1000.0);
    for c in clones.iter_mut() {
        let _ = api_call(&c.api_sock, "PUT", "/vm/shutdown", None);
        let _ = c.wait(Duration::from_secs(60));
    }
    println!();
    println!("cold boot vs. restore: the ratio is what a host with hardware KVM also sees; the absolute");
    println!("boot time here reflects this machine's emulating KVM (see docs/images.md).");
}

fn d_state(d: &TempDir) -> std::path::PathBuf {
    d.path().join("demo.state")
}

fn d_mem(d: &TempDir) -> std::path::PathBuf {
    d.path().join("demo.mem")
}
