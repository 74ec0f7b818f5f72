//! `flint-store`: a small debug tool over the snapshot store (ls, put, get, publish, pull, verify, gc, rm, stats).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use flint_snapshot_store::{ImageSource, S3Config, Secret, SnapshotDraft, Store, StoreConfig};

#[derive(Parser)]
#[command(name = "flint-store", about = "Inspect and drive a Flint snapshot store")]
struct Cli {
    /// L1 cache directory.
    #[arg(long, env = "FLINT_STORE_DIR", default_value = "/var/lib/flint/store")]
    dir: PathBuf,
    /// L1 byte budget (e.g. 20G, 512M).
    #[arg(long, default_value = "20G", value_parser = parse_size)]
    budget: u64,
    /// Chunk size for new images (e.g. 256K).
    #[arg(long, default_value = "256K", value_parser = parse_size)]
    chunk_size: u64,
    /// S3 bucket of the remote tier (none: local only).
    #[arg(long, env = "FLINT_S3_BUCKET")]
    s3_bucket: Option<String>,
    #[arg(long, env = "FLINT_S3_PREFIX", default_value = "")]
    s3_prefix: String,
    /// S3 endpoint (MinIO, Garage, ...); AWS_ENDPOINT_URL also works.
    #[arg(long, env = "FLINT_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 30)]
    s3_timeout: u64,
    /// File holding the 64-hex-digit store secret (turns on encryption at rest).
    #[arg(long, env = "FLINT_STORE_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// GC grace period in seconds.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    gc_grace: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List snapshots (local and remote).
    Ls,
    /// Store a snapshot: `flint-store put ID memory=/path state=/path`.
    Put {
        id: String,
        /// NAME=PATH pairs.
        #[arg(required = true)]
        images: Vec<String>,
        #[arg(long)]
        parent: Option<String>,
        /// Upload to the remote tier too (write-through).
        #[arg(long)]
        publish: bool,
    },
    /// Upload a locally stored snapshot.
    Publish { id: String },
    /// Fetch every chunk of a snapshot into L1.
    Pull { id: String },
    /// Write one image of a snapshot to a file.
    Get { id: String, image: String, dest: PathBuf },
    /// Check every chunk of a snapshot against its hash (remote tier unless --local).
    Verify {
        id: String,
        #[arg(long)]
        local: bool,
    },
    /// Delete a snapshot's manifest (chunks go at the next gc).
    Rm {
        id: String,
        #[arg(long)]
        remote: bool,
    },
    /// Delete unreferenced chunks.
    Gc {
        #[arg(long)]
        remote: bool,
    },
    /// Print the manifest of a snapshot.
    Show { id: String },
    /// L1 usage and counters.
    Stats,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().map(|n| n * mult).map_err(|_| format!("`{s}` is not a size (e.g. 512M, 20G)"))
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = StoreConfig::new(&cli.dir);
    cfg.local_budget = cli.budget;
    cfg.chunk_size = u32::try_from(cli.chunk_size).map_err(|_| "chunk size too large")?;
    cfg.gc_grace = Duration::from_secs(cli.gc_grace);
    if let Some(f) = &cli.secret_file {
        let text = std::fs::read_to_string(f).map_err(|e| format!("read secret {}: {e}", f.display()))?;
        cfg.secret = Some(Secret::from_hex(&text)?);
    }
    if let Some(bucket) = &cli.s3_bucket {
        let mut s3 = S3Config::new(bucket);
        s3.prefix = cli.s3_prefix.clone();
        s3.endpoint = cli.s3_endpoint.clone();
        s3.timeout_s = cli.s3_timeout;
        cfg.s3 = Some(s3);
    }
    let store = Store::open(cfg)?;
    let print = |v: &dyn erased::Json| println!("{}", v.json());
    match cli.cmd {
        Cmd::Ls => {
            for s in store.list().await? {
                println!(
                    "{:<32} {:>12} logical {:>12} stored  local={}{} remote={}",
                    s.id,
                    s.logical_bytes,
                    s.stored_bytes,
                    s.local,
                    if s.local_complete { "(complete)" } else { "" },
                    s.remote
                );
            }
        }
        Cmd::Put { id, images, parent, publish } => {
            let mut draft = SnapshotDraft::new(&id);
            draft.parent = parent;
            for spec in images {
                let (name, path) = spec.split_once('=').ok_or_else(|| format!("`{spec}`: expected NAME=PATH"))?;
                draft = draft.image(name, ImageSource::File(PathBuf::from(path)));
            }
            let (_, report) = store.put(draft, publish).await?;
            print(&report);
        }
        Cmd::Publish { id } => print(&store.publish(&id).await?),
        Cmd::Pull { id } => print(&store.pull(&id).await?),
        Cmd::Get { id, image, dest } => print(&store.get_image(&id, &image, &dest).await?),
        Cmd::Verify { id, local } => {
            let report = store.verify(&id, local).await?;
            print(&report);
            if !report.problems.is_empty() {
                return Err(format!("{} of {} chunks failed verification", report.problems.len(), report.chunks).into());
            }
        }
        Cmd::Rm { id, remote } => store.delete(&id, remote).await?,
        Cmd::Gc { remote } => print(&store.gc(remote).await?),
        Cmd::Show { id } => print(&store.manifest(&id).await?),
        Cmd::Stats => print(&store.stats()),
    }
    Ok(())
}

mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string_pretty(self).unwrap_or_default()
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Chunks and manifests hold guest memory: this user's only (as flintd makes them).
    // SAFETY: umask(2) only sets the file-creation mask.
    unsafe { libc::umask(0o077) };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flint-store: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flint-store: {}", flint_snapshot_store::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
