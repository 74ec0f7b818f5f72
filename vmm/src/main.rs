//! `flint-vmm`: runs one microVM. See docs/vmm.md for flags, the control API and exit codes.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use clap::Parser;
use flint_vmm::api::error_chain;
use flint_vmm::config::{DriveConfig, NetConfig, VsockConfig};
use flint_vmm::spec::{HostDevices, Launch, LaunchSpec, MemorySource, RestoreSpec, MAX_SPEC_BYTES};
use flint_vmm::{api, HostProfile, VmConfig, Vmm};

/// Exit code for a bad configuration or a VM that could not be built.
const EXIT_SETUP: u8 = 1;

#[derive(Parser, Debug)]
#[command(name = "flint-vmm", version, about = "Flint's KVM microVM monitor (one VM per process)")]
struct Args {
    /// The launch spec flintd writes (JSON `LaunchSpec`, docs/vmm.md): everything this process is to do. No other
    /// flag may be given with it.
    #[arg(long, conflicts_with_all = ["config", "kernel", "initramfs", "mem", "vcpus", "cmdline_extra", "drives", "tap", "vsock_uds", "console", "console_limit", "no_rng", "no_balloon", "api_sock", "track_dirty_pages", "restore_state", "restore_mem", "merged_memory", "no_seccomp", "merge_diff"])]
    spec: Option<PathBuf>,
    /// Run as a standby VMM (`StandbySpec` JSON, docs/vmm.md): jail, KVM VM and memory slots made ahead, then wait
    /// for a launch spec on fd 3 (flintd's launcher only).
    #[arg(long, conflicts_with_all = ["spec", "config", "kernel", "initramfs", "mem", "vcpus", "cmdline_extra", "drives", "tap", "vsock_uds", "console", "console_limit", "no_rng", "no_balloon", "api_sock", "track_dirty_pages", "restore_state", "restore_mem", "merged_memory", "no_seccomp", "merge_diff"])]
    standby: Option<PathBuf>,
    /// JSON VM configuration (fields as in docs/vmm.md); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Uncompressed ELF vmlinux.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Uncompressed initramfs (cpio).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long)]
    mem: Option<u64>,
    #[arg(long)]
    vcpus: Option<u8>,
    /// Appended to the kernel command line.
    #[arg(long)]
    cmdline_extra: Option<String>,
    /// Block device: PATH[,ro][,root]; repeat for several drives.
    #[arg(long = "drive")]
    drives: Vec<String>,
    /// Tap device: NAME[,netns=PATH][,mac=MAC]; `none`: a network card with no host side (detached), which a
    /// restore of its snapshots may attach to a tap.
    #[arg(long)]
    tap: Option<String>,
    /// Host-side vsock Unix socket.
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
    /// Serial console: a file path, "stdout" or "off".
    #[arg(long)]
    console: Option<String>,
    /// Most bytes the console file and its rotated predecessor hold together.
    #[arg(long)]
    console_limit: Option<u64>,
    /// No virtio-balloon (free page reporting) device.
    #[arg(long)]
    no_balloon: bool,
    /// Disable virtio-rng.
    #[arg(long)]
    no_rng: bool,
    /// Host profile: auto, hardware or pvm-native.
    #[arg(long, default_value = "auto")]
    host_profile: String,
    /// Control API socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Print the VM description as JSON on exit.
    #[arg(long)]
    describe_on_exit: bool,
    /// Log dirtied pages so diff snapshots can be taken.
    #[arg(long)]
    track_dirty_pages: bool,
    /// Restore from this snapshot state file instead of booting (with --restore-mem).
    #[arg(long, requires = "restore_mem")]
    restore_state: Option<PathBuf>,
    /// The snapshot's memory file.
    #[arg(long, requires = "restore_state")]
    restore_mem: Option<PathBuf>,
    /// How restored memory is provided: private (mmap MAP_PRIVATE, shared page cache), uffd
    /// (filled on first touch by this process's userfaultfd handler) or pager (filled by the page
    /// server listening at the --restore-mem path, which gets the userfaultfd).
    #[arg(long, default_value = "private")]
    restore_mode: String,
    /// With a diff snapshot's state file: the memory file is its base with the diff merged on.
    #[arg(long, requires = "restore_state")]
    merged_memory: bool,
    /// Do not install the seccomp filter (for debugging; see docs/security.md).
    #[arg(long)]
    no_seccomp: bool,
    /// Merge a diff memory file onto its base and exit: --merge-diff BASE DIFF.
    #[arg(long, num_args = 2, value_names = ["BASE", "DIFF"])]
    merge_diff: Option<Vec<PathBuf>>,
}

fn parse_drive(s: &str) -> Result<DriveConfig, String> {
    let mut parts = s.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or("--drive needs a path")?;
    let mut d = DriveConfig { path: path.into(), read_only: false, root: false, rate_limiter: None };
    for opt in parts {
        match opt {
            "ro" => d.read_only = true,
            "rw" => d.read_only = false,
            "root" => d.root = true,
            o if flint_vmm::config::parse_limit_option(o, &mut d.rate_limiter)? => {}
            o => return Err(format!("unknown --drive option {o:?} (use ro, rw, root, bw=BYTES_PER_S, iops=N)")),
        }
    }
    Ok(d)
}

fn parse_tap(s: &str) -> Result<NetConfig, String> {
    let mut parts = s.split(',');
    let tap = parts.next().filter(|p| !p.is_empty()).ok_or("--tap needs a name")?;
    let tap = if tap == "none" { "" } else { tap };
    let mut n = NetConfig { tap: tap.into(), ..NetConfig::detached() };
    for opt in parts {
        match opt.split_once('=') {
            Some(("netns", v)) => n.netns = Some(v.into()),
            Some(("mac", v)) => n.mac = Some(v.into()),
            // rx_bw= / tx_bw= / rx_iops= / tx_iops=: the guest's receive and send limits.
            Some((k, v)) if k.starts_with("rx_") || k.starts_with("tx_") => {
                let (dir, limit) = k.split_at(3);
                let target = if dir == "rx_" { &mut n.rx_rate_limiter } else { &mut n.tx_rate_limiter };
                if !flint_vmm::config::parse_limit_option(&format!("{limit}={v}"), target)? {
                    return Err(format!("unknown --tap option {opt:?}"));
                }
            }
            _ => {
                return Err(format!(
                    "unknown --tap option {opt:?} (use netns=PATH, mac=MAC, rx_bw=, tx_bw=, rx_iops=, tx_iops=)"
                ))
            }
        }
    }
    Ok(n)
}

fn build_config(a: &Args) -> Result<VmConfig, String> {
    let mut c = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            serde_json::from_str::<VmConfig>(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => VmConfig::new(a.kernel.clone().ok_or("--kernel or --config is required")?),
    };
    if let Some(k) = &a.kernel {
        c.kernel = k.clone();
    }
    if a.initramfs.is_some() {
        c.initramfs = a.initramfs.clone();
    }
    if let Some(m) = a.mem {
        c.mem_mib = m;
    }
    if let Some(v) = a.vcpus {
        c.vcpus = v;
    }
    if let Some(x) = &a.cmdline_extra {
        c.cmdline_extra = x.clone();
    }
    for d in &a.drives {
        c.drives.push(parse_drive(d)?);
    }
    if let Some(t) = &a.tap {
        c.net = Some(parse_tap(t)?);
    }
    if let Some(u) = &a.vsock_uds {
        c.vsock = Some(VsockConfig { guest_cid: a.vsock_cid, uds_path: u.clone() });
    }
    if let Some(con) = &a.console {
        c.console = con.clone();
    }
    if let Some(l) = a.console_limit {
        c.console_limit_bytes = l;
    }
    if a.no_balloon {
        c.balloon = false;
    }
    if a.no_rng {
        c.rng = false;
    }
    if a.track_dirty_pages {
        c.track_dirty_pages = true;
    }
    match a.host_profile.as_str() {
        "auto" => {}
        p => {
            c.host_profile = Some(
                HostProfile::parse(p)
                    .ok_or_else(|| format!("unknown host profile {p:?} (auto, hardware, pvm-native)"))?,
            )
        }
    }
    Ok(c)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// The launch spec: read from `--spec`, or built from the flags.
fn launch_spec(args: &Args) -> Result<LaunchSpec, String> {
    if let Some(p) = &args.spec {
        use std::io::Read;
        let f = std::fs::File::open(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        let mut text = String::new();
        f.take(MAX_SPEC_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        if text.len() as u64 > MAX_SPEC_BYTES {
            return Err(format!("{} is larger than {MAX_SPEC_BYTES} bytes", p.display()));
        }
        return serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()));
    }
    let launch = match (&args.restore_state, &args.restore_mem) {
        (Some(state), Some(mem)) => Launch::Restore(restore_spec(args, state, mem)?),
        _ => Launch::Boot(build_config(args)?),
    };
    Ok(LaunchSpec {
        api_sock: args.api_sock.clone(),
        seccomp: !args.no_seccomp,
        jail: None,
        fence: None,
        vcpu_sched_idle: false,
        launch,
    })
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    let args = Args::parse();
    if let Some(paths) = &args.merge_diff {
        return match flint_vmm::snapshot::memory::merge_diff(&paths[0], &paths[1]) {
            Ok(n) => {
                println!("merged {n} bytes of {} onto {}", paths[1].display(), paths[0].display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("flint-vmm: {}", error_chain(&e));
                ExitCode::from(EXIT_SETUP)
            }
        };
    }
    // A standby is jailed and has its KVM VM before it gets its launch spec; the VM's time starts there.
    let (mut spec, prepared, process_start) = match &args.standby {
        Some(path) => match flint_vmm::standby::run(path) {
            Ok(Some((spec, prepared, _uid))) => (spec, Some(prepared), Instant::now()),
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("flint-vmm: {}", error_chain(&e));
                return ExitCode::from(EXIT_SETUP);
            }
        },
        None => match launch_spec(&args) {
            Ok(s) => (s, None, process_start),
            Err(e) => {
                eprintln!("flint-vmm: {e}");
                return ExitCode::from(EXIT_SETUP);
            }
        },
    };
    // Every thread installs its own kind's allow-list (vmm/src/seccomp.rs); compiled here, before any starts (a
    // standby compiled them before its jail).
    if prepared.is_none() {
        if let Err(e) = flint_vmm::seccomp::prepare(spec.seccomp) {
            eprintln!("flint-vmm: {}", error_chain(&e));
            return ExitCode::from(EXIT_SETUP);
        }
    }
    if let Some(jail) = spec.jail.as_ref().filter(|_| prepared.is_none()) {
        // The host profile is read from /sys, which the jail does not have.
        if let Launch::Boot(c) = &mut spec.launch {
            c.host_profile.get_or_insert_with(HostProfile::detect);
        }
        if let Err(e) = flint_vmm::jail::enter(jail) {
            eprintln!("flint-vmm: {}", error_chain(&e));
            return ExitCode::from(EXIT_SETUP);
        }
        eprintln!("flint-vmm: jailed in {} as uid {}", jail.root.display(), jail.uid);
    }
    flint_vmm::vstate::vcpu::set_sched_idle(spec.vcpu_sched_idle);
    let built = match spec.launch {
        Launch::Restore(r) => Vmm::restore(r, process_start, prepared).map_err(|e| error_chain(&e)),
        Launch::Boot(config) => {
            let profile = config.host_profile.unwrap_or_else(HostProfile::detect);
            Vmm::build(config, profile, process_start, prepared).map_err(|e| error_chain(&e))
        }
    };
    let mut vmm = match built {
        Ok(v) => v,
        Err(e) => {
            eprintln!("flint-vmm: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    if let Some(path) = &spec.fence {
        match flint_vmm_api::spec::open_host_file(path, false) {
            Ok(f) => vmm.set_fence(f),
            Err(e) => {
                eprintln!("flint-vmm: fence {}: {e}", path.display());
                return ExitCode::from(EXIT_SETUP);
            }
        }
    }
    let profile = vmm.profile;
    let handle = vmm.handle();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs an async-signal-safe handler (one atomic store).
        unsafe { libc::signal(sig, on_term as *const () as libc::sighandler_t) };
    }
    if let Err(e) = vmm.start(process_start) {
        eprintln!("flint-vmm: {}", error_chain(&e));
        return ExitCode::from(EXIT_SETUP);
    }
    // The control API comes up once the vCPUs run, off the path to the guest's first instruction: flintd calls
    // it only after the guest's agent has answered, which needs the event loop below.
    if let Some(p) = &spec.api_sock {
        if let Err(e) = api::serve(p, handle.clone()) {
            eprintln!("flint-vmm: {}", error_chain(&e));
            return ExitCode::from(EXIT_SETUP);
        }
    }
    eprintln!("flint-vmm: host profile {}, cmdline: {}", profile.name(), vmm.cmdline);
    // The vCPUs run (each under its own list); this thread becomes the device event loop.
    if spec.seccomp {
        match flint_vmm::seccomp::enter(flint_vmm::seccomp::ThreadKind::EventLoop) {
            Ok(()) => eprintln!(
                "flint-vmm: seccomp allow-lists installed (event loop {} calls, vCPU {}, API {}, pager {})",
                flint_vmm::seccomp::allowed_count(flint_vmm::seccomp::ThreadKind::EventLoop),
                flint_vmm::seccomp::allowed_count(flint_vmm::seccomp::ThreadKind::Vcpu),
                flint_vmm::seccomp::allowed_count(flint_vmm::seccomp::ThreadKind::Api),
                flint_vmm::seccomp::allowed_count(flint_vmm::seccomp::ThreadKind::Pager),
            ),
            Err(e) => {
                eprintln!("flint-vmm: {}", error_chain(&e));
                return ExitCode::from(EXIT_SETUP);
            }
        }
    }
    let reason = vmm.run(&STOP);
    if let Some(p) = &spec.api_sock {
        let _ = std::fs::remove_file(p);
    }
    if args.describe_on_exit {
        println!("{}", serde_json::to_string(&handle.describe()).unwrap_or_default());
    }
    eprintln!("flint-vmm: {reason}");
    ExitCode::from(reason.exit_code() as u8)
}

fn restore_spec(args: &Args, state: &std::path::Path, mem: &std::path::Path) -> Result<RestoreSpec, String> {
    let memory = match args.restore_mode.as_str() {
        "private" => MemorySource::Private { path: mem.to_path_buf() },
        "uffd" => MemorySource::Uffd { path: mem.to_path_buf() },
        "pager" => MemorySource::Pager { socket: mem.to_path_buf() },
        m => return Err(format!("unknown restore mode {m:?} (private, uffd, pager)")),
    };
    if args.kernel.is_some()
        || args.initramfs.is_some()
        || args.config.is_some()
        || args.mem.is_some()
        || args.vcpus.is_some()
    {
        return Err("--kernel, --initramfs, --config, --mem and --vcpus come from the snapshot; they cannot be given with --restore-state".into());
    }
    Ok(RestoreSpec {
        state_path: state.to_path_buf(),
        memory,
        devices: HostDevices {
            vsock_uds: args.vsock_uds.clone(),
            console: args.console.clone(),
            console_limit_bytes: args.console_limit,
            net: args.tap.as_deref().map(parse_tap).transpose()?,
            drive_paths: if args.drives.is_empty() {
                None
            } else {
                Some(args.drives.iter().map(|d| parse_drive(d).map(|d| d.path)).collect::<Result<_, _>>()?)
            },
        },
        track_dirty_pages: args.track_dirty_pages.then_some(true),
        merged_memory: args.merged_memory,
    })
}
