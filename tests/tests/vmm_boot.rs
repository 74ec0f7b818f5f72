//! End-to-end: flint-vmm boots the real guest images on /dev/kvm, and the guest's devices and
//! agent work. One boot carries most checks (a boot costs ~40 s on emulating KVM hosts).
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use flint_agent::client::{AgentClient, ExecEvent};
use flint_agent::protocol::ExecRequest;
use flint_tests::*;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const DRIVE_BYTES: usize = 1 << 20;

/// One process, no shell: each guest fork+exec costs ~1 s on emulating hosts.
fn argv(a: &[&str]) -> ExecRequest {
    ExecRequest { argv: a.iter().map(|s| s.to_string()).collect(), timeout_ms: Some(60_000), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_and_every_device_works() {
    let dir = TempDir::new("boot");
    let net = NetnsTap::create("boot", 201);

    // Drives: a read-only one with known content, a read-write one of zeros.
    let ro = dir.path().join("ro.img");
    let mut ro_data = vec![0u8; DRIVE_BYTES];
    ro_data[..14].copy_from_slice(b"FLINT-RO-DRIVE");
    ro_data[DRIVE_BYTES - 9..].copy_from_slice(b"LAST-BYTE");
    std::fs::write(&ro, &ro_data).unwrap();
    let rw = dir.path().join("rw.img");
    std::fs::write(&rw, vec![0u8; DRIVE_BYTES]).unwrap();

    let service = a_host_vsock_service(dir.path());

    let mut vm = VmProcess::boot_with(dir.path(), |c| {
        use flint_vmm_api::config::{DriveConfig, NetConfig};
        let drive = |path: &std::path::Path, read_only| DriveConfig {
            path: path.to_path_buf(),
            read_only,
            root: false,
            rate_limiter: None,
        };
        c.drives = vec![drive(&ro, true), drive(&rw, false)];
        c.net = Some(NetConfig { tap: net.tap.clone(), netns: Some(net.netns_path().into()), ..NetConfig::detached() });
        c.cmdline_extra = net.guest_ip_cmdline();
    });
    let agent = vm.agent(BOOT_TIMEOUT).await;

    // Host → guest vsock: the agent answers.
    let h = agent.health().await.unwrap();
    assert_eq!(h.pid, 1, "the agent is the guest's init");
    assert!(h.mem_total_kb > 200_000 && h.mem_total_kb < 262_144, "{}", h.mem_total_kb);

    // The VMM runs under its seccomp filter (every thread: TSYNC).
    let threads = vm.seccomp_status();
    assert!(
        threads.len() > 1 && threads.iter().all(|t| t == &("2".into(), "1".into())),
        "(Seccomp, NoNewPrivs) per thread: {threads:?}"
    );

    // The control API describes the VM.
    let (st, d) = api_call(&vm.api_sock, "GET", "/vm", None).unwrap();
    assert_eq!(st, 200);
    assert_eq!(d["state"], "running");
    assert_eq!(d["devices"].as_array().unwrap().len(), 6, "2 drives, net, vsock, rng, balloon");
    assert!(d["devices"].as_array().unwrap().iter().all(|x| x["activated"] == true), "{d}");
    assert!(d["timings"]["first_run_to_init_us"].as_u64().is_some());

    the_agent_runs_processes_with_the_hosts_tunables(&agent, &mut vm, &d).await;
    the_guest_reaches_a_host_vsock_service(&agent, service).await;
    drives_rng_and_balloon_work(&agent, &vm, &ro_data).await;

    // Net: the guest reaches the host end of the tap inside the namespace, and back.
    let out = agent.exec_output(argv(&["/bin/ping", "-c", "2", "-W", "5", &net.host_ip])).await.unwrap();
    assert_eq!(
        out.code,
        Some(0),
        "guest ping failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    run("ip", &["netns", "exec", &net.ns, "ping", "-c", "1", "-W", "5", &net.guest_ip]);

    let fresh = pause_and_resume_through_the_api(&mut vm, &agent).await;

    // Clean shutdown from inside the guest: the VMM exits 0 and leaves no sockets behind.
    fresh.shutdown().await.unwrap();
    let (status, stderr) = vm.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("reset itself"), "{stderr}");
    assert!(!vm.api_sock.exists() && !vm.vsock_uds.exists(), "sockets removed");
    let written = std::fs::read(&rw).unwrap();
    assert_eq!(&written[..16], b"FLINT-WROTE-THIS", "data written by the guest is in the host file");
    assert!(written[16..512].iter().all(|b| *b == 0));
}

/// Guest → host vsock: a host service on port 5000 of the VM in `dir`, answering one line; what it was sent.
fn a_host_vsock_service(dir: &std::path::Path) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(dir.join("vsock.sock_5000")).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            got.push(b[0]);
        }
        s.write_all(b"pong-from-host\n").unwrap();
        String::from_utf8_lossy(&got).into_owned()
    })
}

/// A command, a pipeline, and the environment the host profile asks for.
async fn the_agent_runs_processes_with_the_hosts_tunables(
    agent: &AgentClient,
    vm: &mut VmProcess,
    d: &serde_json::Value,
) {
    // The agent runs processes: a single command and a three-stage shell pipeline.
    let out = agent.exec_output(argv(&["/bin/echo", "hello", "flint"])).await.unwrap();
    assert_eq!((out.code, String::from_utf8_lossy(&out.stdout).as_ref()), (Some(0), "hello flint\n"), "{out:?}");
    let out = agent.exec_output(argv(&["/bin/sh", "-c", "echo one two three | tr ' ' '\\n' | wc -l"])).await.unwrap();
    assert_eq!(out.code, Some(0), "pipeline failed: {out:?}\n{}", vm.diagnostics());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3", "{out:?}");
    // On pvm-native hosts guest user mode must not use AVX (the guest kernel cannot preserve YMM
    // state there): every process the agent starts gets the profile's glibc tunables.
    let out = agent.exec_output(argv(&["/bin/sh", "-c", "echo \"$GLIBC_TUNABLES\""])).await.unwrap();
    let tunables = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if d["host_profile"] == "pvm-native" {
        assert!(tunables.starts_with("glibc.cpu.hwcaps=-AVX,-AVX2,"), "pvm-native guest env: {tunables:?}");
    } else {
        assert_eq!(tunables, "", "hardware hosts leave glibc alone");
    }
}

/// Guest → host vsock to [`a_host_vsock_service`].
async fn the_guest_reaches_a_host_vsock_service(agent: &AgentClient, service: std::thread::JoinHandle<String>) {
    // Guest → host vsock (stdin streamed into the guest-side client).
    let mut req = ExecRequest {
        argv: vec!["/sbin/flint-agent".into(), "vsock-cat".into(), "2".into(), "5000".into()],
        stdin: true,
        ..Default::default()
    };
    req.timeout_ms = Some(60_000);
    let mut s = agent.exec(req).await.unwrap();
    s.write_stdin(b"ping-from-guest\n").await.unwrap();
    s.close_stdin().await.unwrap();
    let mut out = Vec::new();
    let mut exit = None;
    while let Some(ev) = s.next().await.unwrap() {
        match ev {
            ExecEvent::Stdout(b) => out.extend(b),
            ExecEvent::Exit { code, .. } => exit = code,
            ExecEvent::Stderr(e) => eprintln!("vsock-cat: {}", String::from_utf8_lossy(&e)),
        }
    }
    drop(s);
    assert_eq!((String::from_utf8_lossy(&out).as_ref(), exit), ("pong-from-host\n", Some(0)));
    assert_eq!(service.join().unwrap(), "ping-from-guest");
}

/// The drives (vda read-only holding `ro_data`, vdb read-write), virtio-rng, and the balloon's free page
/// reporting.
async fn drives_rng_and_balloon_work(agent: &AgentClient, vm: &VmProcess, ro_data: &[u8]) {
    // Block: the read-only drive reads back byte-exact and refuses writes; the read-write
    // drive takes a write.
    assert_eq!(agent.read_file("/dev/vda").await.unwrap(), ro_data, "read-only drive content");
    agent.write_file("/tmp/sector", 0o644, b"FLINT-WROTE-THIS").await.unwrap();
    let out =
        agent.exec_output(argv(&["/bin/dd", "if=/tmp/sector", "of=/dev/vda", "bs=512", "conv=fsync"])).await.unwrap();
    assert_ne!(out.code, Some(0), "writing a read-only drive must fail: {out:?}");
    let out = agent
        .exec_output(argv(&["/bin/dd", "if=/tmp/sector", "of=/dev/vdb", "bs=512", "conv=sync,fsync"]))
        .await
        .unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");

    // RNG: the guest reads entropy from virtio-rng.
    let current = agent.read_file("/sys/class/misc/hw_random/rng_current").await.unwrap();
    assert!(current.starts_with(b"virtio_rng"), "{}", String::from_utf8_lossy(&current));
    let out = agent.exec_output(argv(&["/bin/head", "-c", "64", "/dev/hwrng"])).await.unwrap();
    assert_eq!(out.stdout.len(), 64, "{out:?}");
    assert!(out.stdout.iter().any(|b| *b != 0));

    // Balloon: the guest's free page reporting hands its free memory (most of its 256 MiB, unused since boot)
    // to the VMM, which discards it.
    let t = Instant::now();
    loop {
        let (_, d) = api_call(&vm.api_sock, "GET", "/vm", None).unwrap();
        let b = d["devices"].as_array().unwrap().iter().find(|x| x["id"] == "balloon0").unwrap()["device"].clone();
        if b["reported_bytes"].as_u64().unwrap_or(0) >= 128 << 20 {
            assert_eq!(b["discard_errors"], 0, "{b}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "the guest reported no free memory: {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn bad_inputs_fail_fast_with_clear_errors() {
    let dir = TempDir::new("bad");
    let img = images();
    let not_elf = dir.path().join("bzImage");
    std::fs::write(&not_elf, b"MZ not a kernel").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--kernel".into(),
                not_elf.display().to_string(),
                "--initramfs".into(),
                img.initramfs.display().to_string(),
            ],
            "not an ELF vmlinux",
        ),
        (vec!["--kernel".into(), img.vmlinux.display().to_string()], "no root filesystem"),
        (
            vec!["--kernel".into(), "/nonexistent".into(), "--initramfs".into(), img.initramfs.display().to_string()],
            "/nonexistent does not exist",
        ),
        (
            vec![
                "--kernel".into(),
                img.vmlinux.display().to_string(),
                "--initramfs".into(),
                img.initramfs.display().to_string(),
                "--mem".into(),
                "63".into(),
            ],
            "mem_mib must be",
        ),
        (
            vec![
                "--kernel".into(),
                img.vmlinux.display().to_string(),
                "--initramfs".into(),
                img.initramfs.display().to_string(),
                "--tap".into(),
                "fnosuchtap0".into(),
            ],
            "no tap device named",
        ),
        (
            vec![
                "--kernel".into(),
                img.vmlinux.display().to_string(),
                "--initramfs".into(),
                img.initramfs.display().to_string(),
                "--drive".into(),
                "/nonexistent.img".into(),
            ],
            "does not exist",
        ),
    ];
    for (args, want) in cases {
        let mut vm = VmProcess::spawn(dir.path(), &args);
        let (status, stderr) = vm.wait(Duration::from_secs(30));
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: expected {want:?} in {stderr:?}");
        assert!(!vm.vsock_uds.exists() && !vm.api_sock.exists(), "no socket left behind for {args:?}");
    }
}

/// Pause (a paused guest does not answer) and resume through the API; an unknown route is 404. A new agent
/// connection.
async fn pause_and_resume_through_the_api(vm: &mut VmProcess, agent: &AgentClient) -> AgentClient {
    // Pause and resume through the API.
    let (st, r) = api_call(&vm.api_sock, "PUT", "/vm/pause", None).unwrap();
    assert_eq!((st, r["state"].as_str()), (200, Some("paused")));
    let paused = tokio::time::timeout(Duration::from_secs(3), agent.health()).await;
    assert!(paused.is_err(), "a paused guest does not answer");
    let (st, r) = api_call(&vm.api_sock, "PUT", "/vm/resume", None).unwrap();
    assert_eq!((st, r["state"].as_str()), (200, Some("running")));
    let fresh = vm.agent(Duration::from_secs(60)).await;
    assert!(fresh.health().await.is_ok());
    let (st, _) = api_call(&vm.api_sock, "GET", "/nope", None).unwrap();
    assert_eq!(st, 404);
    fresh
}
