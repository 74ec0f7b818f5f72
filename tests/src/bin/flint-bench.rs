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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("boot");
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if mode != "boot" {
        eprintln!("usage: flint-bench boot [--runs N]");
        std::process::exit(2);
    }
    println!(
        "flint-bench boot: {runs} cold boot(s) of {}",
        images().dir.display()
    );
    let mut results = Vec::new();
    for i in 0..runs {
        let r = boot_once().await;
        let t = &r["timings"];
        let g = |k: &str| t[k].as_u64().unwrap_or(0);
        println!(
            "run {} (host profile {}):",
            i + 1,
            r["host_profile"].as_str().unwrap_or("?")
        );
        println!(
            "  VMM process start -> first guest instruction  {:>10.2} ms",
            ms(g("process_to_first_run_us"))
        );
        println!("    KVM setup {:.2} ms, memory {:.2} ms, kernel+initramfs load {:.2} ms, devices {:.2} ms, vCPUs {:.2} ms",
            ms(g("kvm_setup_us")), ms(g("memory_us")), ms(g("kernel_load_us")), ms(g("devices_us")), ms(g("vcpus_us")));
        println!(
            "  first guest instruction -> /init              {:>10.2} ms",
            ms(g("first_run_to_init_us"))
        );
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
        println!(
            "  vCPU exits to userspace during boot           {:>10}",
            r["vcpu_exits"]
        );
        results.push(r);
    }
    if let Ok(path) = std::env::var("FLINT_BENCH_JSON") {
        let _ = std::fs::write(
            path,
            serde_json::to_string_pretty(&results).unwrap_or_default(),
        );
    }
}
