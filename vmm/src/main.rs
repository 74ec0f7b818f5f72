//! `flint-vmm`: runs one microVM. See docs/vmm.md for flags, the control API and exit codes.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use clap::Parser;
use flint_vmm::config::{DriveConfig, NetConfig, VsockConfig};
use flint_vmm::{api, HostProfile, VmConfig, Vmm};

/// Exit code for a bad configuration or a VM that could not be built.
const EXIT_SETUP: u8 = 1;

#[derive(Parser, Debug)]
#[command(
    name = "flint-vmm",
    version,
    about = "Flint's KVM microVM monitor (one VM per process)"
)]
struct Args {
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
    /// Tap device: NAME[,netns=PATH][,mac=MAC].
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
}

fn parse_drive(s: &str) -> Result<DriveConfig, String> {
    let mut parts = s.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("--drive needs a path")?;
    let mut d = DriveConfig {
        path: path.into(),
        read_only: false,
        root: false,
    };
    for opt in parts {
        match opt {
            "ro" => d.read_only = true,
            "rw" => d.read_only = false,
            "root" => d.root = true,
            o => return Err(format!("unknown --drive option {o:?} (use ro, rw, root)")),
        }
    }
    Ok(d)
}

fn parse_tap(s: &str) -> Result<NetConfig, String> {
    let mut parts = s.split(',');
    let tap = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("--tap needs a name")?;
    let mut n = NetConfig {
        tap: tap.into(),
        netns: None,
        mac: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            Some(("netns", v)) => n.netns = Some(v.into()),
            Some(("mac", v)) => n.mac = Some(v.into()),
            _ => {
                return Err(format!(
                    "unknown --tap option {opt:?} (use netns=PATH, mac=MAC)"
                ))
            }
        }
    }
    Ok(n)
}

fn build_config(a: &Args) -> Result<VmConfig, String> {
    let mut c = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
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
        c.vsock = Some(VsockConfig {
            guest_cid: a.vsock_cid,
            uds_path: u.clone(),
        });
    }
    if let Some(con) = &a.console {
        c.console = con.clone();
    }
    if a.no_rng {
        c.rng = false;
    }
    match a.host_profile.as_str() {
        "auto" => {}
        p => {
            c.host_profile = Some(HostProfile::parse(p).ok_or_else(|| {
                format!("unknown host profile {p:?} (auto, hardware, pvm-native)")
            })?)
        }
    }
    Ok(c)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    let args = Args::parse();
    let config = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flint-vmm: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let profile = config.host_profile.unwrap_or_else(HostProfile::detect);
    let mut vmm = match Vmm::build(config, profile, process_start) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("flint-vmm: {}", error_chain(&e));
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let handle = vmm.handle();
    if let Some(p) = &args.api_sock {
        if let Err(e) = api::serve(p, handle.clone()) {
            eprintln!("flint-vmm: {}", error_chain(&e));
            return ExitCode::from(EXIT_SETUP);
        }
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs an async-signal-safe handler (one atomic store).
        unsafe { libc::signal(sig, on_term as *const () as libc::sighandler_t) };
    }
    eprintln!(
        "flint-vmm: host profile {}, cmdline: {}",
        profile.name(),
        vmm.cmdline
    );
    if let Err(e) = vmm.start(process_start) {
        eprintln!("flint-vmm: {}", error_chain(&e));
        return ExitCode::from(EXIT_SETUP);
    }
    let reason = vmm.run(&STOP);
    if let Some(p) = &args.api_sock {
        let _ = std::fs::remove_file(p);
    }
    if args.describe_on_exit {
        println!("{}", handle.describe());
    }
    eprintln!("flint-vmm: {reason}");
    ExitCode::from(reason.exit_code() as u8)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
