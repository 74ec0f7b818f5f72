//! `flint-demo` (run by `make demo`): boots a sandbox with flint-vmm from the cached images,
//! talks to its agent over vsock, runs a few commands and prints a timing table.
use std::time::{Duration, Instant};

use flint_agent::protocol::ExecRequest;
use flint_tests::*;

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        timeout_ms: Some(60_000),
        ..Default::default()
    }
}

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
    for (label, script) in [
        ("uname", "uname -sr"),
        ("pipeline", "seq 1 1000 | grep 7 | wc -l"),
        ("write+read a file", "echo hello > /tmp/f && cat /tmp/f"),
    ] {
        let t = Instant::now();
        let out = agent.exec_output(sh(script)).await.expect("exec");
        rows.push((label.into(), t.elapsed(), String::from_utf8_lossy(&out.stdout).trim().to_string()));
    }
    let t = Instant::now();
    agent.write_file("/tmp/upload.bin", 0o644, &vec![7u8; 4 << 20]).await.expect("upload");
    let back = agent.read_file("/tmp/upload.bin").await.expect("download");
    rows.push(("4 MiB upload + download".into(), t.elapsed(), format!("{} bytes back", back.len())));

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
    println!();
    println!("(snapshot/restore rows arrive with the snapshot issue; see README)");
    agent.shutdown().await.expect("shutdown");
    let (status, _) = vm.wait(Duration::from_secs(60));
    println!("sandbox shut down cleanly (flint-vmm exit {})", status.code().unwrap_or(-1));
}
