//! `flintd`: the Flint host daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "flintd", version, about = "Flint host daemon: microVMs, snapshots, clones")]
struct Args {
    /// TOML configuration (default /etc/flint/flintd.toml if it exists, else built-in defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the API socket path.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Override the data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Add a guest image: NAME=DIR (DIR holds vmlinux and initramfs.cpio). Repeatable.
    #[arg(long = "image")]
    images: Vec<String>,
    /// Override the VMM binary.
    #[arg(long)]
    vmm_bin: Option<PathBuf>,
    /// The store secret file (store.secret_file).
    #[arg(long)]
    store_secret_file: Option<PathBuf>,
    /// Run an S3 tier without a secret (store.allow_unauthenticated_bucket): only for a bucket nobody else can write.
    #[arg(long)]
    allow_unauthenticated_bucket: bool,
    /// Group owning the API socket (socket_group): its members may use flintd without root.
    #[arg(long)]
    socket_group: Option<String>,
    /// Run VMMs unjailed (jail.enabled = false): for debugging only, never on a host with tenants.
    #[arg(long)]
    no_jail: bool,
    /// Tests only: fake in-process VMMs whose commands run on this host (docs/testing.md). Never with tenants.
    #[arg(long, hide = true)]
    fake_vmm: bool,
    /// Serve the E2B-compatible API on this address ([e2b] listen; docs/e2b.md).
    #[arg(long)]
    e2b_listen: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(flint_supervisor::log_colours())
        .init();
    let args = Args::parse();
    let mut cfg = match flint_supervisor::config::Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flintd: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(s) = args.socket {
        cfg.socket = s;
    }
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    if let Some(v) = args.vmm_bin {
        cfg.vmm_bin = Some(v);
    }
    if let Some(f) = args.store_secret_file {
        cfg.store.secret_file = Some(f);
    }
    if args.no_jail {
        cfg.jail.enabled = false;
    }
    if let Some(g) = args.socket_group {
        cfg.socket_group = Some(g);
    }
    if let Some(a) = args.e2b_listen {
        cfg.e2b.listen = Some(a);
    }
    if args.allow_unauthenticated_bucket {
        cfg.store.allow_unauthenticated_bucket = true;
    }
    for spec in args.images {
        let Some((name, dir)) = spec.split_once('=') else {
            eprintln!("flintd: --image `{spec}`: expected NAME=DIR");
            return ExitCode::FAILURE;
        };
        cfg.images.insert(name.to_string(), PathBuf::from(dir));
    }
    // Every thread of flintd's, the runtime's as each starts, asks for the configured scheduling slice.
    let slice = cfg.sched_slice_us;
    let take_slice = move || {
        if slice > 0 {
            if let Err(e) = flint_supervisor::sched::set_thread_slice(slice) {
                tracing::warn!(error = %e, slice_us = slice, "sched_slice_us: the kernel refused the slice");
            }
        }
    };
    take_slice();
    if slice > 0 {
        tracing::info!(slice_us = slice, "flintd's threads ask for a scheduling slice");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().on_thread_start(take_slice).build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flintd: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = if args.fake_vmm {
        rt.block_on(flint_supervisor::run_without_kvm(cfg))
    } else {
        rt.block_on(flint_supervisor::run(cfg))
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flintd: {e}");
            ExitCode::FAILURE
        }
    }
}
